"""FedAvg rounds at the aggregating server: weighted averages, and rounds that close without a client."""

from __future__ import annotations

import threading

import torch

from edgellm.splitlearn.rounds import Aggregator


def run_round(agg: Aggregator, submissions: dict[int, tuple[dict, float]], clients: int, timeout_s: float) -> dict:
    results: dict[int, tuple] = {}

    def client(k: int) -> None:
        state, weight = submissions[k]
        results[k] = agg.submit(("run", "a", 10), k, clients, state, weight, timeout_s)

    threads = [threading.Thread(target=client, args=(k,)) for k in submissions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_round_averages_weighted_by_samples_and_everyone_gets_it():
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([5.0, -4.0])
    results = run_round(Aggregator(), {0: ({"w": a}, 1.0), 1: ({"w": b}, 2.0), 2: ({"w": c}, 1.0)}, 3, 30.0)
    expected = torch.tensor([(1 * 1 + 2 * 3 + 1 * 5) / 4, (1 * 2 + 2 * 6 + 1 * -4) / 4])  # = [3.0, 2.5]
    for k in range(3):
        avg, included = results[k]
        torch.testing.assert_close(avg["w"], expected)
        assert included == (0, 1, 2)


def test_round_closes_without_a_client_that_dropped_out():
    a, b = torch.tensor([0.0, 4.0]), torch.tensor([2.0, 0.0])
    results = run_round(Aggregator(), {0: ({"w": a}, 3.0), 2: ({"w": b}, 1.0)}, 3, 0.5)
    for k in (0, 2):
        avg, included = results[k]
        assert included == (0, 2)
        torch.testing.assert_close(avg["w"], torch.tensor([0.5, 3.0]))  # (3*a + 1*b) / 4


def test_a_late_client_gets_the_closed_rounds_average_without_its_part():
    agg = Aggregator()
    run_round(agg, {0: ({"w": torch.tensor([1.0])}, 1.0)}, 2, 0.2)
    avg, included = agg.submit(("run", "a", 10), 1, 2, {"w": torch.tensor([100.0])}, 1.0, 0.2)
    assert included == (0,)
    torch.testing.assert_close(avg["w"], torch.tensor([1.0]))


def test_a_client_that_missed_a_round_is_not_waited_for_until_it_returns():
    import time

    agg = Aggregator()
    w = {"w": torch.tensor([1.0])}

    def round_of(step: int, members: list[int], timeout_s: float) -> tuple[float, dict]:
        results: dict[int, tuple] = {}
        threads = [
            threading.Thread(
                target=lambda k=k: results.__setitem__(k, agg.submit(("run", "a", step), k, 3, w, 1.0, timeout_s))
            )
            for k in members
        ]
        start = time.monotonic()
        for t in threads:
            t.start()
            time.sleep(0.05)  # in the order given
        for t in threads:
            t.join(timeout=30)
        return time.monotonic() - start, results

    took, results = round_of(1, [0, 1], 0.5)  # client 2 is gone: this round waits for it once
    assert took >= 0.5 and results[0][1] == (0, 1)
    took, results = round_of(2, [0, 1], 20.0)  # ... and not again
    assert took < 5.0 and results[0][1] == (0, 1)
    took, results = round_of(3, [2, 0, 1], 20.0)  # back (first in, so before the round closes): counted again
    assert results[2][1] == (0, 1, 2)
