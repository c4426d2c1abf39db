"""The seed's experiment 1: a 2-hop split against a single edge server, over each link profile.

Latency, accuracy and smashed-data volume of SmolLM2-135M (the "medium-sized model" of this machine) split two
ways, every node a process on loopback, every link emulated on the profile (docs/NETWORK.md):

- **1 edge server**: the device holds layers [0, 10) and the head, edge1 holds [10, 30) (one hop);
- **2 hops**: the device [0, 10) and the head, edge1 [10, 20), edge2 [20, 30) (a chain of two edge servers).

The device's link is on each profile in turn; the link between the two edge servers is `metro` (fibre
between sites, 10 Gbit/s, 0.2 ms). Both with the `--codec` on every link (int8 by default: the smashed data is compressed). Per profile both
deployments are up at once; each is warmed up, then they take turns (`--repeats` runs of `--tokens` greedy
tokens each). Recorded per setup and profile: TTFT and decode tok/s (medians with intervals), smashed-data bytes
per token on each link, up and down (from the device's report), the emulated wire time per token, and accuracy:
the share of generated tokens equal to the unsplit model's (greedy, in this process), and the perplexity of the
held-out text (`edgellm eval ppl`'s engine, the codec applied at each cut) against the unsplit model's.

Every node shares this machine's 2 cores: the split measures the protocol and the links, not faster edge
hardware (no compute slowdown is emulated here).

    python bench/exp_split.py --json bench/results/exp-split.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info, schedule, stamped, summary

PROMPT = "Explain in a few sentences how a rainbow forms."
SETUPS = {"one_edge": [10], "two_hops": [10, 20]}
BACKHAUL = "metro"  # the link between the two edge servers (docs/NETWORK.md): fibre between sites


def log(text: str) -> None:
    print(f"[exp-split] {text}", file=sys.stderr, flush=True)


def document(model: str, cuts: list[int], profile: str, codec: str, token_file: Path) -> dict[str, Any]:
    from edgellm.deploy.local_deployment import free_port

    names = ["device", *(f"edge{i + 1}" for i in range(len(cuts)))]
    return {
        "model": {"name": model, "cuts": cuts, "head": "device"},
        "deployment": {"route": names, "mode": "chain", "token_file": str(token_file), "deadline_s": 120.0},
        "nodes": [
            {"name": n, "role": "device" if i == 0 else "edge", "address": f"127.0.0.1:{free_port()}"}
            for i, n in enumerate(names)
        ],  # fmt: skip
        "links": [
            {"between": [a, b], "profile": profile if a == "device" else BACKHAUL, "codec": codec}
            for a, b in zip(names, names[1:])
        ],  # fmt: skip
    }


@contextlib.contextmanager
def deployed(work: Path, name: str, doc: dict[str, Any]) -> Iterator[Callable[[int], dict[str, Any]]]:
    """Start `doc`'s nodes; yield a function generating `n` greedy tokens through its device (its report)."""
    from edgellm.deploy.local_deployment import LocalDeployment
    from edgellm.deploy.node_builder import channel_config
    from edgellm.deploy.topology import write_topology
    from edgellm.net.rpc import RemoteHop

    path = work / f"{name}.toml"
    topology = write_topology(path, doc)
    (work / name).mkdir()
    with LocalDeployment(topology, path, work / name):
        device = topology.device
        assert device.address is not None
        hop = RemoteHop(device.name, device.address, channel_config(topology), sender="bench")

        def generate(n: int) -> dict[str, Any]:
            report: dict[str, Any] = {}
            request = {"prompt": PROMPT, "chat": True, "max_new_tokens": n, "greedy": True}
            for event in hop.generate(request):
                report = event.get("report", report)
            return report

        try:
            yield generate
        finally:
            hop.shutdown()


def run_row(report: dict[str, Any], reference: list[int], stamp: dict[str, Any], repeat: int) -> dict[str, Any]:
    tokens = report["new_tokens"]
    same = sum(a == b for a, b in zip(tokens, reference))
    return {
        "repeat": repeat, "ttft_ms": report["ttft_ms"], "decode_tok_per_s": report["decode_tok_per_s"],
        "tokens": len(tokens), "tokens_equal_unsplit": same / max(len(reference), 1),
        "links": [{k: link.get(k) for k in ("from", "to", "prefill_bytes", "bytes_up_per_token", "bytes_down_per_token",
                                             "wire_ms_per_token")} for link in report["links"]],
        "stamp": stamp,
    }  # fmt: skip


def perplexities(model: str, text: Path, codec: str, ctx: int) -> dict[str, float]:
    """Held-out perplexity unsplit and at each setup's cuts with `codec` on every cut."""
    from edgellm.eval.ppl import PplConfig
    from edgellm.eval.ppl_engine import EvalConfig, run_ppl

    window = PplConfig(ctx=ctx)
    out = {"unsplit": run_ppl(EvalConfig(model=model, text=text, window=window))["ppl"]}
    for name, cuts in SETUPS.items():
        config = EvalConfig(model=model, text=text, window=window, cuts=tuple(cuts), act_codec=codec)
        out[name] = run_ppl(config)["ppl"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", default="6g,5g,wifi6,lte,wan", help="link profiles (default: %(default)s)")
    parser.add_argument("--codec", default="int8", help="smashed-data codec on every link (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per run (default: %(default)s)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", type=Path, default=Path(__file__).parents[1] / "tests/data/eb1911_shakespeare.txt")
    parser.add_argument("--ctx", type=int, default=256, help="perplexity window (default: %(default)s)")
    add_record_arguments(parser, repeats=5, rows="setups")
    args = parser.parse_args(argv)
    recorder = Recorder("exp-split", args.json, args.allow_dirty)

    from edgellm.serve.local_engine import LocalSplitConfig, PromptConfig, generate_text, load_split

    started = time.monotonic()
    local = load_split(LocalSplitConfig(args.model, (), "server", "fp32", 2))
    reference = generate_text(local, PROMPT, PromptConfig(chat=True, max_new_tokens=args.tokens))["new_tokens"]
    del local
    log(f"unsplit reference: {len(reference)} tokens")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-exp-split-") as tmp:
        work = Path(tmp)
        token_file = work / "token"
        token_file.write_text(secrets.token_hex(16))
        os.chmod(token_file, 0o600)
        for profile in args.profiles.split(","):
            with contextlib.ExitStack() as stack:
                gens = {name: stack.enter_context(deployed(work, f"{name}-{profile}",
                                                           document(args.model, cuts, profile, args.codec, token_file)))
                        for name, cuts in SETUPS.items()}  # fmt: skip
                for gen in gens.values():
                    gen(2)  # warm-up
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in gens}
                names = list(gens)
                for repeat, index in schedule(len(names), args.repeats):
                    with stamped() as stamp:
                        report = gens[names[index]](args.tokens)
                    runs[names[index]].append(run_row(report, reference, stamp, repeat))
                    log(f"{profile} {names[index]} run {repeat + 1}: TTFT {report['ttft_ms']:.0f} ms, "
                        f"{report['decode_tok_per_s']:.1f} tok/s")  # fmt: skip
            for name, setup_runs in runs.items():
                rows.append({"profile": profile, "setup": name, "cuts": SETUPS[name],
                             "ttft_ms": summary([r["ttft_ms"] for r in setup_runs]),
                             "decode_tok_per_s": summary([r["decode_tok_per_s"] for r in setup_runs]),
                             "tokens_equal_unsplit": min(r["tokens_equal_unsplit"] for r in setup_runs),
                             "links": setup_runs[0]["links"], "runs": setup_runs})  # fmt: skip
    log("perplexity of the held-out text at each setup's cuts")
    ppl = perplexities(args.model, args.text, args.codec, args.ctx)
    results = {"settings": vars(args) | {"json": None, "text": str(args.text)}, "reference_tokens": len(reference),
               "rows": rows, "ppl": ppl, "total_s": round(time.monotonic() - started, 1),
               "emulated": f"the device's link on each profile, edge1-edge2 on {BACKHAUL} (docs/NETWORK.md); "
               "every node on the same 2 cores, no compute slowdown"}  # fmt: skip
    for row in rows:
        up = sum(link["bytes_up_per_token"] or 0 for link in row["links"])
        down = sum(link["bytes_down_per_token"] or 0 for link in row["links"])
        print(f"{row['profile']:>6} {row['setup']:>9}: TTFT {row['ttft_ms']['median']:.0f} ms, "
              f"{row['decode_tok_per_s']['median']:.1f} tok/s, {up + down:.0f} B/token on the wire, "
              f"tokens equal {row['tokens_equal_unsplit']:.0%}")  # fmt: skip
    print(json.dumps(ppl))
    recorder.write(results, machine_info(threads=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
