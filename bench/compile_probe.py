"""Would `torch.compile` of a decode step pay? A probe, not an engine: the fast engine's decoder layer as one
function of tensors, eager against compiled (inductor), on the real model's weights.

The function is one decode step of one layer for batch 1: RMSNorm, the fused q/k/v projection, the rotary
embedding, writing the new key and value into a preallocated cache, one grouped SDPA call over the cache so far,
the output projection, RMSNorm, the fused gate/up projection, SiLU, the down projection, both residuals. The
weights go in as tensors (the packed int4 or int8 buffers of `edgellm.quant` and torch's kernels, or fp32), so
one compiled graph serves every layer; the key length is dynamic, so it compiles once for every length. The
embedding, the rotary tables, the final norm and the head run eagerly around the layers, the same in both rows.

Rows `eager` and `compiled` take turns (ABBA), `--repeats` times, each `--tokens` greedy steps from token 1 after
5 warm-up steps; medians with the order-statistic interval; compiled / eager is the median of the per-repeat
ratios. Both rows must give the same tokens (checked). The compile time (first call of every shape) is recorded.
"""

# ruff: noqa: E402  (the imports follow the OMP_WAIT_POLICY setting on purpose)

from __future__ import annotations

import sys

from record import set_omp_wait_policy

IN_PROCESS_OMP = set_omp_wait_policy(sys.argv[1:])

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from record import Recorder, add_omp_argument, add_record_arguments, machine_info, summary

from edgellm.model.stage import stage_specs
from edgellm.quant.modules import Int4Linear, Int8Linear
from edgellm.quant.scheme import parse_quant
from edgellm.split.one_process import load_stages
from edgellm.store import DEFAULT_MODEL, resolve_model
from edgellm.store.weights import load_config

Weight = tuple[str, torch.Tensor, torch.Tensor, int, int]  # kind, weight or codes, scales, group size, N


def weight_of(module: Any) -> Weight:
    if isinstance(module, Int4Linear):
        return ("int4", module.packed, module.scales_zeros, module.group_size, module.out_features)
    if isinstance(module, Int8Linear) and module.qweight.shape[0] == 1:
        return ("int8", module.qweight[0], module.scales[0], 0, module.out_features)
    if isinstance(module, torch.nn.Linear):
        return ("fp", module.weight, module.weight, 0, module.out_features)
    raise SystemExit(f"the probe covers fp32, int8 and int4 linears, not {type(module).__name__}")


def linear(w: Weight, x: torch.Tensor) -> torch.Tensor:  # x: [1, K] -> [1, N] float32
    kind, a, b, group, n = w
    if kind == "int4":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), a, group, b)[:, :n].float()
    if kind == "int8":
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), a, b).float()
    return F.linear(x, a)


def layer(h, keys, values, cos, sin, norms, weights, dims):  # noqa: ANN001 - a traced function of tensors
    """h: [1, D]; keys, values: [1, H_kv, T, D_h] with the new token's place last -> [1, D]"""
    (ln1, ln2, eps), (qkv, o, gate_up, down), (heads, kv_heads, head_dim, inner) = norms, weights, dims
    x = F.rms_norm(h, (h.shape[-1],), ln1, eps)
    q, k, v = linear(qkv, x).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = q.view(1, heads, 1, head_dim), k.view(1, kv_heads, 1, head_dim), v.view(1, kv_heads, 1, head_dim)
    q = q * cos + torch.roll(q, head_dim // 2, -1) * sin
    k = k * cos + torch.roll(k, head_dim // 2, -1) * sin
    keys[:, :, -1:] = k
    values[:, :, -1:] = v
    out = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True, scale=head_dim**-0.5)
    h = h + linear(o, out.reshape(1, heads * head_dim))
    x = F.rms_norm(h, (h.shape[-1],), ln2, eps)
    gate, up = linear(gate_up, x).split([inner, inner], -1)
    return h + linear(down, F.silu(gate) * up)


class Probe:
    def __init__(self, model_dir: Any, quant: str) -> None:
        config = load_config(model_dir)
        specs = stage_specs(int(config.num_hidden_layers), (), "server")
        (self.stage,) = load_stages(model_dir, specs, torch.float32, parse_quant(quant))
        heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        head_dim = int(config.hidden_size) // heads
        self.dims = (heads, kv_heads, head_dim, int(config.intermediate_size))
        self.layers = []
        for block in self.stage.blocks:
            qkv, gate_up = block.__dict__["_edgellm_fused"]
            if qkv is None or gate_up is None:
                raise SystemExit("the probe needs the fast engine's fused projections")
            weights = (weight_of(qkv.module), weight_of(block.self_attn.o_proj), weight_of(gate_up.module),
                       weight_of(block.mlp.down_proj))  # fmt: skip
            norms = (block.input_layernorm.weight, block.post_attention_layernorm.weight, float(config.rms_norm_eps))
            self.layers.append((norms, weights))

    def run(self, fn: Callable[..., torch.Tensor], tokens: int, capacity: int) -> tuple[float, list[int]]:
        """ms per step over `tokens` steps after 5 warm-up ones, and the greedy tokens."""
        _, kv_heads, head_dim, _ = self.dims
        keys = [torch.zeros(1, kv_heads, capacity, head_dim) for _ in self.layers]
        values = [torch.zeros(1, kv_heads, capacity, head_dim) for _ in self.layers]
        token, out, start = torch.tensor([[1]]), [], 0.0
        with torch.inference_mode():
            for pos in range(tokens + 5):
                if pos == 5:
                    start = time.perf_counter()
                h = self.stage.embed(token).view(1, -1)
                cos, sin = self.stage.rotary(h.view(1, 1, -1), torch.tensor([[pos]]))
                half = head_dim // 2
                signed = torch.cat((-sin[..., :half], sin[..., half:]), -1).view(1, 1, 1, head_dim)
                for i, (norms, weights) in enumerate(self.layers):
                    k, v = keys[i][:, :, : pos + 1], values[i][:, :, : pos + 1]
                    h = fn(h, k, v, cos.view(1, 1, 1, head_dim), signed, norms, weights, self.dims)
                token = self.stage.head(self.stage.norm(h)).argmax(-1).view(1, 1)
                out.append(int(token))
        return (time.perf_counter() - start) / tokens * 1e3, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered name or directory (default: %(default)s)")
    parser.add_argument("--quant", default="int4-g32,head=int8,embed=int8", help="weight scheme (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=48, help="timed steps per run (default: %(default)s)")
    add_omp_argument(parser, "this process")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    recorder = Recorder("compile_probe", args.json, args.allow_dirty)
    torch.set_num_threads(args.threads)
    probe = Probe(resolve_model(args.model), args.quant)
    compiled = torch.compile(layer)
    capacity = args.tokens + 8
    start = time.perf_counter()
    probe.run(compiled, 3, capacity)  # compiles: a static key length first, then a dynamic one
    compile_s = time.perf_counter() - start
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    tokens: dict[str, list[int]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms both rows up
        order = [("eager", layer), ("compiled", compiled)]
        for name, fn in order if repeat % 2 else order[::-1]:
            ms, tokens[name] = probe.run(fn, args.tokens, capacity)
            if repeat:
                times[name].append(ms)
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    same = tokens["eager"] == tokens["compiled"]
    info = machine_info(args.threads)
    print(f"\n## compile probe: {args.model}, {args.quant}, {args.threads} threads, {args.tokens} steps\n")
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; {recorder.header()}\n")
    for name in times:
        print(f"{name}: {summary(times[name])['median']} ms/step")
    print(f"compiled / eager: {summary(ratios)}; same tokens: {same}; compile {compile_s:.1f} s")
    recorder.write({"settings": vars(args) | {"omp_wait_policy_in_process": IN_PROCESS_OMP}, "compile_s": compile_s,
                    "ms_per_step": {n: summary(v) for n, v in times.items()}, "compiled_vs_eager": summary(ratios),
                    "same_tokens": same, "runs": times}, machine=info)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
