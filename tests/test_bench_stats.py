"""bench/record.py: the order-statistic interval of the median, the verdict rule, the interleaving, and the
refusal of --json on a dirty tree."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from record import (  # noqa: E402 - bench/ is not a package
    median_interval,
    median_ranks,
    paired_ratios,
    schedule,
    summary,
    verdict,
)


@pytest.mark.parametrize(
    ("n", "ranks", "coverage"),
    [
        (5, (1, 5), 1 - 2 / 32),  # min-max: 93.75%, the most 5 values can give
        (6, (1, 6), 1 - 2 / 64),  # 96.9%
        (7, (1, 7), 1 - 2 / 128),  # 98.4%; (2, 6) would be 1 - 2 * 8 / 128 = 87.5%
        (9, (2, 8), 1 - 2 * 10 / 512),  # 96.1%
        (10, (2, 9), 1 - 2 * 11 / 1024),  # 97.9%; (3, 8) would be 89.1%
        (20, (6, 15), 1 - 2 * (1 + 20 + 190 + 1140 + 4845 + 15504) / 2**20),  # P(B <= 5): 95.9%
    ],
)
def test_median_ranks_are_the_narrowest_with_95_percent(n, ranks, coverage):
    lo, hi, level = median_ranks(n)
    assert (lo, hi) == ranks
    assert level == pytest.approx(coverage, abs=1e-12)


def test_median_ranks_small_n_and_bad_input():
    assert median_ranks(1)[:2] == (1, 1) and median_ranks(1)[2] == pytest.approx(0.0)
    assert median_ranks(2) == (1, 2, pytest.approx(0.5))
    assert median_ranks(5, level=0.5)[:2] == (2, 4)  # 1 - 2 * 6 / 32 = 62.5% >= 50%
    with pytest.raises(ValueError, match="at least one"):
        median_ranks(0)
    with pytest.raises(ValueError, match="level"):
        median_ranks(5, level=1.0)


def test_median_interval_picks_the_order_statistics_whatever_the_input_order():
    values = [7.0, 1.0, 9.0, 3.0, 5.0, 2.0, 8.0, 4.0, 10.0, 6.0]  # 1..10 shuffled
    interval = median_interval(values)
    assert (interval.low, interval.high, interval.n) == (2.0, 9.0, 10)
    five = median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (five.low, five.high) == (1.0, 5.0) and five.level == pytest.approx(0.9375)


def test_median_interval_covers_the_median_as_often_as_it_says():
    rng = random.Random(0)
    trials, hits = 4000, 0
    for _ in range(trials):  # exponential: skewed, true median ln 2
        interval = median_interval([rng.expovariate(1.0) for _ in range(10)])
        hits += interval.low <= 0.6931471805599453 <= interval.high
    assert hits / trials == pytest.approx(median_ranks(10)[2], abs=0.02)


def test_summary_reports_median_interval_and_extremes():
    s = summary([10.0, 12.0, 11.0, 14.0, 13.0])
    assert s == {
        "n": 5, "median": 12.0, "ci_low": 10.0, "ci_high": 14.0, "ci_level": 0.9375, "min": 10.0, "max": 14.0,
    }  # fmt: skip
    assert summary([])["median"] is None


@pytest.mark.parametrize(
    ("interval", "higher", "want"),
    [
        ((0.98, 1.05), True, "met"),
        ((0.97, 1.05), True, "met"),  # reaching the target is clearing it
        ((0.90, 0.96), True, "missed"),
        ((0.95, 0.99), True, "not settled"),
        ((600.0, 639.0), False, "met"),
        ((641.0, 700.0), False, "missed"),
        ((630.0, 650.0), False, "not settled"),
    ],
)
def test_verdict(interval, higher, want):
    target = 0.97 if higher else 640.0
    assert verdict(target, interval, higher) == want


def test_paired_ratios_pair_by_repeat():
    assert paired_ratios([10.0, 20.0], [5.0, 10.0]) == [2.0, 2.0]
    with pytest.raises(ValueError, match="differ in length"):
        paired_ratios([1.0], [1.0, 2.0])


def test_schedule_interleaves_rows_abba():
    assert schedule(3, 2) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]
    order = schedule(4, 5)
    assert len(order) == 20
    for repeat in range(5):  # every row once per repeat, before the next repeat starts
        assert sorted(row for r, row in order[4 * repeat : 4 * repeat + 4] if r == repeat) == [0, 1, 2, 3]


def test_target_record_needs_five_repeats_to_settle():
    from record import target_record

    five = summary([1.0, 1.01, 1.02, 1.03, 1.04])
    assert target_record("ratio", 0.97, five, higher_is_better=True)["verdict"] == "met"
    four = summary([1.0, 1.01, 1.02, 1.03])  # min-max covers 87.5%: not enough to claim anything
    assert target_record("ratio", 0.97, four, higher_is_better=True)["verdict"] == "not settled"


def test_recorder_refuses_json_on_a_dirty_tree_unless_allowed(monkeypatch, tmp_path):
    import record

    state = {"git_commit": "abc", "git_dirty": True, "git_dirty_files": ["src/x.py"], "diff_args": ["--", "."]}
    monkeypatch.setattr(record, "git_state", lambda: dict(state))
    monkeypatch.setattr(record, "_git", lambda *args: "diff --git a/src/x.py b/src/x.py\n")
    with pytest.raises(record.DirtyTree, match=r"src/x\.py.*--allow-dirty"):
        record.Recorder("t", tmp_path / "out.json", allow_dirty=False)
    record.Recorder("t", None, allow_dirty=False)  # no --json: nothing to refuse
    allowed = record.Recorder("t", tmp_path / "out.json", allow_dirty=True)
    allowed.write({"rows": []})
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["provenance"]["git_dirty"] and written["provenance"]["git_diff"].startswith("diff --git")
    assert written["provenance"]["git_commit"] == "abc" and written["rows"] == []
