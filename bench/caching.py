"""Edge model caching (TrimCaching, issue 15): hit ratio per placement algorithm, the greedy's gap to the optimum,
its solve time at scale, and what sharing parameter blocks is worth.

a) families (the paper's figures): `examples/caching/paper.toml` as `edgellm cache simulate` runs it: hit ratio
   against storage per server, users, latency requirement, servers and the shared fraction, for independent
   caching, the TrimCaching greedy, the few-shared-blocks DP and the exact MILP (HiGHS, with its time limit; an
   instance it stops on counts its best placement and is reported). Figure: docs/caching-hit-ratio.png.
b) optimality: the TrimCaching greedy's hit ratio over the MILP optimum on `--small` random small instances
   (2-4 servers, 5-12 users, 4-8 models over 1-3 bases, 0-99% shared, as tests/test_placement.py), and
   sharing-aware against independent caching on each. Target: min ratio >= 0.95.
c) scale: 50 servers x 1,000 users x 100 models (10 bases, 90% shared, the paper scenario's density of servers),
   `--repeats` instances (seeds); per instance the time to build its arrays (latencies, who could serve whom)
   and each algorithm's solve time. Target: arrays + greedy under 10 s (median's interval).
d) sharing: the shared fraction from 0 (unrelated models) to 0.99 (LoRA variants), 30 models over one base and
   over three, `--seeds` instances each; the gap sharing-aware minus independent. Figure: docs/caching-sharing.png.

Nothing here is measured on a network: links are the emulated profiles the scenario names (recorded with the
numbers), and only solve times are measurements of this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from record import Recorder, add_record_arguments, machine_info, stamped, summary, target_record
from report import markdown_table, with_ci

from edgellm.net.link import PROFILES
from edgellm.placement import eligibility, solve
from edgellm.placement.figures import hit_ratio_figure
from edgellm.placement.random_instances import Area, Catalog, Scenario, generate, small_instance
from edgellm.placement.sim_config import parse_config
from edgellm.placement.sweep import Family, generated, sweep

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "examples" / "caching" / "paper.toml"
SCALE = Scenario(area=Area(servers=50, users=1000, side_m=2236.0), catalog=Catalog(models=100, bases=10))
SCALE_TARGET_S = 10.0
RATIO_TARGET = 0.95
SHARED = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def log(text: str) -> None:
    print(f"[caching] {text}", file=sys.stderr, flush=True)


def part_families(figure: Path) -> dict[str, Any]:
    config = parse_config(tomllib.loads(PAPER.read_text()))
    assert config.scenario is not None
    total = sum(len(f.values) for f in config.sweeps) * len(config.seeds)
    start = time.perf_counter()

    def progress(done: int, _: int) -> None:
        if done % 10 == 0 or done == total:
            log(f"families: {done}/{total} instances, {time.perf_counter() - start:.0f} s")

    results = sweep(generated(config.scenario), config.sweeps, config.algorithms, config.seeds,
                    config.milp_time_limit_s, progress)  # fmt: skip
    hit_ratio_figure(results, figure, "hit ratio per placement algorithm (examples/caching/paper.toml, "
                     f"mean of {len(config.seeds)} seeds)")  # fmt: skip
    return {"config": str(PAPER.relative_to(ROOT)), "scenario": config.scenario.to_json(),
            "algorithms": list(config.algorithms), "seeds": list(config.seeds),
            "milp_time_limit_s": config.milp_time_limit_s, "families": [r.to_json() for r in results],
            "figure": str(figure), "wall_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def part_optimality(count: int) -> dict[str, Any]:
    ratios, gaps, unsolved = [], [], 0
    for seed in range(count):
        instance = small_instance(seed)
        arrays = eligibility(instance)
        best = solve(instance, "milp", arrays)
        greedy = solve(instance, "trimcaching", arrays).hit_ratio
        gaps.append(greedy - solve(instance, "independent", arrays).hit_ratio)
        unsolved += best.optimal is not True
        if best.hit_ratio > 0:
            ratios.append(greedy / best.hit_ratio)
    out = {"instances": count, "with_hits": len(ratios), "milp_not_proven": unsolved,
           "ratio_min": min(ratios), "ratio_mean": statistics.fmean(ratios),
           "ratio_below_1": sum(r < 1 - 1e-9 for r in ratios), "gap_vs_independent_min": min(gaps),
           "gap_vs_independent_mean": statistics.fmean(gaps)}  # fmt: skip
    out["target"] = {"target": f"greedy / optimum >= {RATIO_TARGET} on every instance", "min": out["ratio_min"],
                     "verdict": "met" if out["ratio_min"] >= RATIO_TARGET else "missed"}  # fmt: skip
    log(f"optimality: greedy/optimum min {out['ratio_min']:.4f} mean {out['ratio_mean']:.4f} on {len(ratios)}")
    return out


def part_scale(repeats: int) -> dict[str, Any]:
    rows: dict[str, list[float]] = {"arrays_s": [], "trimcaching_s": [], "independent_s": [], "dp_s": [],
                                    "total_greedy_s": []}  # fmt: skip
    hits: dict[str, list[float]] = {"independent": [], "trimcaching": [], "dp": []}
    stamps = []
    for seed in range(repeats):
        instance = generate(SCALE, seed)
        with stamped() as stamp:
            start = time.perf_counter()
            arrays = eligibility(instance)
            rows["arrays_s"].append(time.perf_counter() - start)
            for name in hits:
                solution = solve(instance, name, arrays)
                rows[f"{name}_s"].append(solution.solve_s)
                hits[name].append(solution.hit_ratio)
        stamps.append(stamp)
        rows["total_greedy_s"].append(rows["arrays_s"][-1] + rows["trimcaching_s"][-1])
        log(f"scale seed {seed}: arrays {rows['arrays_s'][-1]:.2f} s, greedy {rows['trimcaching_s'][-1]:.2f} s")
    stats = {name: summary(values) for name, values in rows.items()}
    return {"scenario": SCALE.to_json(), "times": stats, "stamps": stamps,
            "hit_ratio": {name: summary(values) for name, values in hits.items()},
            "target": target_record("arrays + greedy seconds", SCALE_TARGET_S, stats["total_greedy_s"], False)}  # fmt: skip


def part_sharing(seeds: int, figure: Path) -> dict[str, Any]:
    out = {}
    for bases in (1, 3):
        scenario = dataclasses.replace(Scenario(), catalog=Catalog(models=30, bases=bases))
        (result,) = sweep(generated(scenario), [Family("shared", SHARED)], ("independent", "trimcaching"),
                          tuple(range(seeds)))  # fmt: skip
        sharing, alone = result.hit_ratio["trimcaching"], result.hit_ratio["independent"]
        out[f"{bases} base{'s' if bases > 1 else ''}"] = {
            "shared": list(SHARED), "independent": alone, "trimcaching": sharing,
            "gap": [s - a for s, a in zip(sharing, alone)]}  # fmt: skip
    sharing_figure(out, figure)
    return {"seeds": seeds, "scenario": Scenario().to_json(), "lines": out, "figure": str(figure)}


def sharing_figure(lines: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for (label, line), color in zip(lines.items(), ("tab:blue", "tab:orange")):
        axes[0].plot(line["shared"], line["trimcaching"], "o-", color=color, label=f"trimcaching, {label}")
        axes[0].plot(line["shared"], line["independent"], "s:", color=color, label=f"independent, {label}")
        axes[1].plot(line["shared"], line["gap"], "o-", color=color, label=label)
    axes[0].set_ylabel("hit ratio")
    axes[1].set_ylabel("gap: sharing-aware - independent")
    for ax in axes:
        ax.set_xlabel("fraction of each model's bytes shared with its base (0: unrelated; 0.99: LoRA)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("30 models, 10 servers, 100 users, 8 GB per server: what sharing blocks is worth", fontsize=10, y=0.99)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tables(results: dict[str, Any]) -> None:
    if "families" in results:
        fam = results["families"]
        for family in fam["families"]:
            rows = [
                [x, *(family["hit_ratio"][a][i] for a in fam["algorithms"])] for i, x in enumerate(family["values"])
            ]
            print(f"\n### hit ratio vs {family['label']}\n")
            print(markdown_table(["x", *fam["algorithms"]], rows, digits=3))
            if family["stopped_early"]:
                print(f"\nstopped at the time limit: {family['stopped_early']}")
    if "optimality" in results:
        o = results["optimality"]
        print(f"\noptimality: {o['with_hits']} instances, greedy/optimum min {o['ratio_min']:.4f} mean "
              f"{o['ratio_mean']:.4f}; sharing-aware - independent min {o['gap_vs_independent_min']:.4f}")  # fmt: skip
    if "scale" in results:
        s = results["scale"]
        rows = [[name, with_ci(stats, 2)] for name, stats in s["times"].items()]
        print("\n### scale: 50 servers x 1,000 users x 100 models (seconds)\n")
        print(markdown_table(["step", "median [CI]"], rows))
        print(f"\n{s['target']['target']} <= {SCALE_TARGET_S}: {s['target']['verdict']}")
    if "sharing" in results:
        for label, line in results["sharing"]["lines"].items():
            rows = [[x, a, t, g] for x, a, t, g in zip(line["shared"], line["independent"], line["trimcaching"],
                                                        line["gap"])]  # fmt: skip
            print(f"\n### sharing, {label}\n")
            print(markdown_table(["shared", "independent", "trimcaching", "gap"], rows, digits=3))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["families", "optimality", "scale", "sharing"])
    parser.add_argument("--small", type=int, default=120, help="random small instances for the optimality part")
    parser.add_argument("--seeds", type=int, default=5, help="instances per point of the sharing part")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "caching-hit-ratio.png")
    parser.add_argument("--sharing-figure", type=Path, default=ROOT / "docs" / "caching-sharing.png")
    add_record_arguments(parser, rows="scale instance (one seed each)")
    args = parser.parse_args()
    recorder = Recorder("caching", args.json, args.allow_dirty)
    log(recorder.header())
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "emulated_links": {name: dataclasses.asdict(PROFILES[name]) for name in ("6g", "5g", "lte", "wan")},
    }
    if "optimality" in args.parts:
        results["optimality"] = part_optimality(args.small)
    if "scale" in args.parts:
        results["scale"] = part_scale(args.repeats)
    if "sharing" in args.parts:
        results["sharing"] = part_sharing(args.seeds, args.sharing_figure)
    if "families" in args.parts:
        results["families"] = part_families(args.figure)
    print_tables(results)
    recorder.write(results, machine_info(threads=os.cpu_count() or 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
