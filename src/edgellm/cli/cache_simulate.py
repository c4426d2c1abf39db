"""`edgellm cache simulate`: which models edge servers should cache (TrimCaching), simulated: the hit ratio of each
placement algorithm as storage, users, latency requirement, servers or shared parameters vary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tomllib
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError

_log = logging.getLogger("edgellm.cache.simulate")
_ALGORITHMS = ("independent", "trimcaching", "dp", "milp")  # edgellm.placement.ALGORITHMS, named without importing


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `simulate` under `edgellm cache`."""
    parser = sub.add_parser(
        "simulate",
        help="simulate caching models on edge servers by shared parameter blocks (TrimCaching)",
        description="Place models on edge servers with limited storage so that as many requests as possible are "
        "hits (served by a server in reach, within the user's latency requirement), storing blocks that models "
        "share (a common base under LoRA adapters) once per server. For each sweep family of the config (storage, "
        "users, latency, servers, shared) and each value, every algorithm places one instance per seed; prints "
        "the mean hit ratio per algorithm and value, and the mean solve time. Links are emulated profiles "
        "(6g, 5g, wifi6, lte, wan) named in the config; nothing is measured on this machine but the solve time. "
        "The config format is in docs/CACHING.md (examples/caching/simulate.toml).",
    )
    parser.add_argument("--config", required=True, type=Path, metavar="C.toml",
                        help="the scenario (or a given instance) and the sweeps to run")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                        help="also draw the hit ratio per family into a PNG (needs the plot extra: matplotlib; "
                        "without it the plot is skipped and said so)")  # fmt: skip
    parser.add_argument("--algorithms", default=None, metavar="A,B",
                        help=f"comma-separated, instead of the config's: {', '.join(_ALGORITHMS)}")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="use seeds 0..N-1 instead of the config's (one instance per seed and value)")  # fmt: skip
    parser.set_defaults(run=run)


def load_config(path: Path) -> Any:
    """The checked configuration of a TOML file; an `instance = "I.json"` is read relative to it.

    Raises:
        ConfigError: the file cannot be read or parsed, or a field is bad; the message names the file.
    """
    from edgellm.placement.sim_config import parse_config

    try:
        data = tomllib.loads(path.read_text())
        if isinstance(data.get("instance"), str):
            instance_path = path.parent / data["instance"]
            data["instance"] = json.loads(instance_path.read_text())
        return parse_config(data)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML/JSON ({exc})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def with_overrides(config: Any, args: argparse.Namespace) -> Any:
    """The config with --algorithms and --seeds applied.

    Raises:
        ConfigError: an unknown algorithm or a seed count below 1.
    """
    changes: dict[str, Any] = {}
    if args.algorithms is not None:
        changes["algorithms"] = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
    if args.seeds is not None:
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
        changes["seeds"] = tuple(range(args.seeds))
    return dataclasses.replace(config, **changes) if changes else config


def run(args: argparse.Namespace) -> int:
    from edgellm.placement.sweep import explicit, generated, sweep
    from edgellm.progress import Phase

    config = with_overrides(load_config(args.config), args)
    make = generated(config.scenario) if config.scenario is not None else explicit(config.instance)
    seeds = config.seeds if config.scenario is not None else (0,)
    total = sum(len(f.values) for f in config.sweeps) * len(seeds)
    with Phase("cache simulate", total=total, unit="instances", log=_log) as phase:
        results = sweep(make, config.sweeps, config.algorithms, seeds, config.milp_time_limit_s, phase.update)
    report = simulation_report(config, seeds, results)
    if args.plot is not None:
        report.update(draw(results, args.plot, str(args.config)))
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


def simulation_report(config: Any, seeds: tuple[int, ...], results: list[Any]) -> dict[str, Any]:
    """The JSON of a run: what was simulated (every emulated setting named) and the results per family."""
    from edgellm.net.link import PROFILES

    def profile(name: str) -> dict[str, Any]:
        p = PROFILES[name]
        return {"profile": name, "up_mbps": p.up_mbps, "down_mbps": p.down_mbps, "rtt_ms": p.rtt_ms,
                "jitter_ms": p.jitter_ms}  # fmt: skip

    if config.scenario is not None:
        area = config.scenario.area
        setup = {"scenario": config.scenario.to_json()}
        emulated = {"links": [{"up_to_m": m, **profile(name)} for m, name in area.bands],
                    "backhaul": profile(area.backhaul)}  # fmt: skip
    else:
        inst = config.instance
        setup = {"instance": {"servers": len(inst.servers), "users": len(inst.users), "models": len(inst.models),
                              "blocks": len(inst.block_bytes)}}  # fmt: skip
        names = sorted({r.link.profile for r in inst.reach if r.link.profile} | {
            s.backhaul.profile for s in inst.servers if s.backhaul.profile})  # fmt: skip
        emulated = {"links": [profile(n) for n in names]}
    return {**setup, "emulated": emulated, "algorithms": list(config.algorithms), "seeds": list(seeds),
            "milp_time_limit_s": config.milp_time_limit_s, "families": [r.to_json() for r in results]}  # fmt: skip


def draw(results: list[Any], path: Path, title: str) -> dict[str, Any]:
    """Draw the figure when matplotlib is there; say why not otherwise."""
    from edgellm.deploy.chart import PLOT_INSTALL, plotting_available

    if not plotting_available():
        _log.warning("plot skipped: matplotlib is not installed (%s)", PLOT_INSTALL)
        return {"plot": None, "plot_skipped": f"matplotlib is not installed ({PLOT_INSTALL})"}
    from edgellm.placement.figures import hit_ratio_figure

    hit_ratio_figure(results, path, f"edgellm cache simulate: {title}")
    return {"plot": str(path)}


def print_report(report: dict[str, Any]) -> None:
    """Per family a table: x, then each algorithm's mean hit ratio; then each algorithm's mean solve time."""
    algorithms = report["algorithms"]
    links = ", ".join(f"{e['profile']}" + (f" <= {e['up_to_m']:g} m" if "up_to_m" in e else "")
                      for e in report["emulated"]["links"])  # fmt: skip
    print(f"cache simulate: {len(report['seeds'])} seed(s), algorithms {', '.join(algorithms)}")
    print(f"emulated links: {links}" + (f"; backhaul {report['emulated']['backhaul']['profile']}"
                                        if "backhaul" in report["emulated"] else ""))  # fmt: skip
    for family in report["families"]:
        print(f"\nhit ratio vs {family['label']}")
        print(f"{'x':>10} " + " ".join(f"{a:>12}" for a in algorithms))
        for i, x in enumerate(family["values"]):
            cells = [family["hit_ratio"][a][i] for a in algorithms]
            print(f"{x:>10g} " + " ".join(f"{'-' if c is None else f'{c:.3f}':>12}" for c in cells))
        times = [[t for t in family["solve_s"][a] if t is not None] for a in algorithms]
        print(f"{'solve ms':>10} " + " ".join(f"{(1e3 * sum(t) / len(t)) if t else float('nan'):>12.1f}"
                                              for t in times))  # fmt: skip
        for name, why in family["skipped"].items():
            print(f"  {name} skipped where '-': {why}")
        for name, count in family["stopped_early"].items():
            print(f"  {name} stopped at its time limit on {count} instance(s): its best placement, not proven optimal")
    if report.get("plot"):
        print(f"\nplot: {report['plot']}")
    elif report.get("plot_skipped"):
        print(f"\nplot skipped: {report['plot_skipped']}")
