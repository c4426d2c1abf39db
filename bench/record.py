"""A benchmark is a program with a record: provenance and statistics, the same for every script in `bench/`.

Provenance (`Recorder`): the commit, whether the tree was clean (and the diff when it was not), the command
line, the start time, the machine; per measurement its start time, duration and the 1-minute load average at
its start and end (`stamped`). `--json` refuses a tree with uncommitted changes to tracked files unless
`--allow-dirty` is given; outputs under `bench/results/` do not count, so the scripts can be run one after the
other from one commit.

Statistics (pure functions, tested in tests/test_bench_stats.py): the rows of a benchmark take turns, one
measurement each per repeat (`schedule`); each row reports the median of its repeats and a distribution-free
confidence interval of the median from order statistics (`median_interval`); a target is "met" only when the
whole interval clears it (`verdict`).

Imported by the scripts next to it (`python bench/decode.py` puts `bench/` on `sys.path`); not part of the
package.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_REPEATS = 5
CI_LEVEL = 0.95  # the coverage asked of the median's interval; with n <= 5 the widest (min-max) falls short
MIN_VERDICT_LEVEL = 0.9  # below this (n < 5: min-max of 4 covers 87.5%) an interval settles no target
RESULTS = "bench/results"  # benchmark outputs: changes here do not make the tree dirty
ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- statistics (pure)


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a median: [low, high], covering the true median with probability `level`."""

    low: float
    high: float
    level: float  # exact coverage of the order statistics used, for a continuous distribution
    n: int


def _binomial_cdf_half(k: int, n: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(0, k + 1)) / 2**n if k >= 0 else 0.0


def median_ranks(n: int, level: float = CI_LEVEL) -> tuple[int, int, float]:
    """1-based ranks (lo, hi) of the order statistics that bound the median's interval, and their coverage.

    [X(k), X(n+1-k)] covers the median with probability 1 - 2 P(B <= k-1), B ~ Binomial(n, 1/2), for any
    continuous distribution. The largest k whose coverage is still >= `level` is chosen (the narrowest such
    interval); when even k = 1 (min-max) falls short, as for n <= 5 at 95%, k = 1 with its lower coverage.

    Raises:
        ValueError: n < 1 or level outside (0, 1).
    """
    if n < 1:
        raise ValueError(f"need at least one value, got n={n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    k = 1
    while k + 1 <= (n + 1) // 2 and 1.0 - 2.0 * _binomial_cdf_half(k, n) >= level:
        k += 1
    return k, n + 1 - k, 1.0 - 2.0 * _binomial_cdf_half(k - 1, n)


def median_interval(values: Sequence[float], level: float = CI_LEVEL) -> Interval:
    """The order-statistic confidence interval of the median of `values` (see `median_ranks`).

    Raises:
        ValueError: no values.
    """
    ordered = sorted(float(v) for v in values)
    lo, hi, coverage = median_ranks(len(ordered), level)
    return Interval(ordered[lo - 1], ordered[hi - 1], max(coverage, 0.0), len(ordered))


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, its interval (with the interval's exact coverage), min, max and n of `values`, for the JSON."""
    if not values:
        return {"n": 0, "median": None, "ci_low": None, "ci_high": None, "ci_level": None}
    interval = median_interval(values)
    return {
        "n": len(values),
        "median": round(float(statistics.median(values)), digits),
        "ci_low": round(interval.low, digits),
        "ci_high": round(interval.high, digits),
        "ci_level": round(interval.level, 4),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Ratios of two rows' measurements of the same repeat (taken next to each other, so drift mostly cancels).

    Raises:
        ValueError: the rows have a different number of repeats.
    """
    if len(numerators) != len(denominators):
        raise ValueError(f"paired rows differ in length: {len(numerators)} vs {len(denominators)}")
    return [a / b for a, b in zip(numerators, denominators) if b > 0]


def verdict(target: float, interval: tuple[float, float], higher_is_better: bool) -> str:
    """ "met" when the whole interval clears `target`, "missed" when it lies wholly on the wrong side, else
    "not settled". Reaching the target exactly counts as clearing it (targets read ">= x" or "<= x")."""
    low, high = min(interval), max(interval)
    if higher_is_better:
        return "met" if low >= target else "missed" if high < target else "not settled"
    return "met" if high <= target else "missed" if low > target else "not settled"


def target_record(name: str, target: float, stats: dict[str, Any], higher_is_better: bool) -> dict[str, Any]:
    """A target, the interval it is judged on, and the verdict: what the scripts store and print.

    An interval whose coverage is below MIN_VERDICT_LEVEL (fewer than 5 repeats) settles nothing.
    """
    interval = (stats["ci_low"], stats["ci_high"])
    settles = bool(stats["n"]) and stats["ci_level"] >= MIN_VERDICT_LEVEL
    return {
        "target": name,
        "threshold": target,
        "higher_is_better": higher_is_better,
        "median": stats["median"],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
        "ci_level": stats["ci_level"],
        "verdict": verdict(target, interval, higher_is_better) if settles else "not settled",
    }


def format_target(t: dict[str, Any], digits: int = 3) -> str:
    """One line: the target, the median with its interval, the verdict."""
    op = ">=" if t["higher_is_better"] else "<="
    return (
        f"target {t['target']} {op} {t['threshold']}: median {t['median']:.{digits}f}, "
        f"{100 * t['ci_level']:.1f}% CI [{t['ci_low']:.{digits}f}, {t['ci_high']:.{digits}f}] -> {t['verdict']}"
    )


def schedule(rows: int, repeats: int) -> list[tuple[int, int]]:
    """(repeat, row) in the order to measure: every row once per repeat, the order reversed on odd repeats
    (ABBA), so a drift in the machine's speed hits every row alike and no row always runs first."""
    order: list[tuple[int, int]] = []
    for repeat in range(repeats):
        rows_in_turn = range(rows) if repeat % 2 == 0 else range(rows - 1, -1, -1)
        order += [(repeat, row) for row in rows_in_turn]
    return order


# ---------------------------------------------------------------- provenance (git, /proc, clock)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where /proc is missing): how busy the machine was."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def _load_1min() -> float | None:
    load = load_average()
    return load[0] if load else None


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def stamped() -> Iterator[dict[str, Any]]:
    """Time one measurement: yields a dict that holds, afterwards, its start (UTC), seconds and 1-minute load
    average at its start and end. Store it with the measurement."""
    stamp: dict[str, Any] = {"at": now_iso(), "load_1min_start": _load_1min()}
    start = time.perf_counter()
    try:
        yield stamp
    finally:
        stamp["s"] = round(time.perf_counter() - start, 3)
        stamp["load_1min_end"] = _load_1min()


def span(stamps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A row's stamp from its measurements': first start, and the lowest and highest 1-minute load seen."""
    loads = [s[k] for s in stamps for k in ("load_1min_start", "load_1min_end") if s.get(k) is not None]
    return {
        "first_at": stamps[0]["at"] if stamps else None,
        "last_at": stamps[-1]["at"] if stamps else None,
        "load_1min_min": min(loads) if loads else None,
        "load_1min_max": max(loads) if loads else None,
    }


def _git(*args: str) -> str | None:
    """Output of a read-only git command in the repository, or None."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def run_json(cmd: Sequence[str]) -> dict[str, Any]:
    """Run `cmd` (an `edgellm ... --json` command) and return the JSON object its last stdout line holds.

    Raises:
        RuntimeError: it exited non-zero (with the end of its stderr).
    """
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])}... exited {proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def git_state() -> dict[str, Any]:
    """Commit, and whether tracked files outside bench/results/ differ from it (None: not a git checkout)."""
    outside_results = ["--", ".", f":(exclude){RESULTS}"]
    status = _git("status", "--porcelain", "--untracked-files=no", *outside_results)
    commit = _git("rev-parse", "HEAD")
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": None if status is None else bool(status.strip()),
        "git_dirty_files": [] if not status else [line[3:] for line in status.splitlines()],
        "diff_args": outside_results,
    }


def add_record_arguments(
    parser: argparse.ArgumentParser, repeats: int = DEFAULT_REPEATS, rows: str = "row, taking turns across rows"
) -> None:
    """--json, --allow-dirty and --repeats (measured runs per `rows`), worded the same in every script."""
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write every number, the machine, the commit and the command here; refused when tracked "
        "files outside bench/results/ have uncommitted changes, unless --allow-dirty",
    )
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write --json from a tree with uncommitted changes; the diff (git diff HEAD) goes into the JSON",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"measured runs per {rows}; the median and its order-statistic confidence interval are reported "
        "(default: %(default)s)",
    )


class DirtyTree(SystemExit):
    """--json on a tree with uncommitted changes, without --allow-dirty."""


class Recorder:
    """The record of one benchmark run: checks the tree, then carries provenance and machine into the JSON."""

    def __init__(self, benchmark: str, json_path: str | Path | None, allow_dirty: bool) -> None:
        """Check the tree and note the start.

        Raises:
            DirtyTree: `json_path` is given, tracked files have uncommitted changes, and not `allow_dirty`.
        """
        self.benchmark = benchmark
        self.json_path = Path(json_path) if json_path else None
        state = git_state()
        diff_args = state.pop("diff_args")
        if self.json_path and state["git_dirty"] and not allow_dirty:
            files = ", ".join(state["git_dirty_files"][:8])
            raise DirtyTree(
                f"refusing --json: uncommitted changes to tracked files ({files}); commit them, or pass "
                "--allow-dirty to record the diff with the results"
            )
        self.provenance: dict[str, Any] = {
            **state,
            "allow_dirty": allow_dirty,
            "git_diff": (_git("diff", "HEAD", *diff_args) or "") if state["git_dirty"] else None,
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "cwd": os.getcwd(),
            "started_at": now_iso(),
            "load_average_at_start": load_average(),
        }

    def write(self, data: dict[str, Any], machine: dict[str, Any] | None = None) -> None:
        """Write `data` with the provenance, the machine and the end time to --json (if given)."""
        if self.json_path is None:
            return
        record = {
            "benchmark": self.benchmark,
            "provenance": {**self.provenance, "finished_at": now_iso(), "load_average_at_end": load_average()},
            **({"machine": machine} if machine is not None else {}),
            **data,
        }
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {self.json_path}", file=sys.stderr)

    def header(self) -> str:
        """One line for the printed report: commit, cleanliness, start time."""
        p = self.provenance
        commit = (p["git_commit"] or "unknown")[:10]
        dirty = " (dirty tree, diff recorded)" if p["git_dirty"] else ""
        return f"commit {commit}{dirty}, started {p['started_at']}, load {p['load_average_at_start'][:1]}"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    """The hardware and software a number was measured on (imports torch: call after the OpenMP setting)."""
    import torch
    import transformers

    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(mem_kb / 1e6, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------- OpenMP wait policy (before torch loads)

OMP_POLICIES = ("PASSIVE", "ACTIVE", "unset")
# In-process engines (transformers, edgellm stages) at 2 threads: libgomp's default (spin a while, then sleep)
# decoded 1.7x faster than PASSIVE on a quiet 2-vCPU VM, as fast as ACTIVE without ACTIVE's collapse when
# anything else wants a core. See BENCHMARKS.md, "Each engine's settings".
IN_PROCESS_OMP_WAIT_POLICY = "unset"
# Node processes share the cores: the deployment launcher's setting, kept by network.py and train.py.
NODE_OMP_WAIT_POLICY = "PASSIVE"


def set_omp_wait_policy(argv: Sequence[str], default: str = IN_PROCESS_OMP_WAIT_POLICY) -> str:
    """Set this process's OMP_WAIT_POLICY before torch loads libgomp (which reads it once), and return it.

    `--omp-wait-policy` in `argv` wins, then a value already in the environment, then `default`; "unset" removes
    the variable (libgomp's default: spin a while, then sleep).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--omp-wait-policy", choices=OMP_POLICIES)
    known, _ = pre.parse_known_args(list(argv))
    policy = known.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY") or default
    if policy == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy
    return policy


def add_omp_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """The --omp-wait-policy option `set_omp_wait_policy` reads, documented in --help."""
    parser.add_argument(
        "--omp-wait-policy",
        choices=OMP_POLICIES,
        default=None,
        help=f"OMP_WAIT_POLICY of {what} (default: OMP_WAIT_POLICY from the environment if set, else "
        f"{IN_PROCESS_OMP_WAIT_POLICY}; unset: libgomp's default)",
    )


@contextlib.contextmanager
def omp_env(policy: str) -> Iterator[None]:
    """This process's environment with OMP_WAIT_POLICY = `policy` ("unset": removed) while child processes are
    started in it; restored afterwards. This process's own OpenMP runtime has read its value already."""
    saved = os.environ.get("OMP_WAIT_POLICY")
    if policy == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
