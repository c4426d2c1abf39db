"""The re-plan policy: link change detection with hysteresis, refitting, instance updates, migration margin."""

from __future__ import annotations

import pytest

from edgellm.errors import ConfigError
from edgellm.plan import CodecCost, Instance, LinkCaps, ModelDims, NodeCaps, SchemeCost, solve
from edgellm.plan.cost import PlanCost
from edgellm.plan.replan import LinkMonitor, LinkObservation, should_migrate, update_link

SCHEME = SchemeCost("fp", 1.0, 1.0, 100, 10, 10, 0.5)
NODES = (NodeCaps("dev", "device", (SCHEME,), None, 0, 0.0), NodeCaps("s1", "edge", (SCHEME,), None, 0, 0.0))
# dev -> s1: 10 ms + 0.01 ms/byte; s1 -> dev: 20 ms + 0.02 ms/byte.
LINK = LinkCaps("dev", "s1", 10.0, 0.01, 20.0, 0.02)
INSTANCE = Instance(ModelDims(4, 8, 16), NODES, (LINK,), (CodecCost("f16", 2.0),))
# 100 bytes up, 50 back: predicted 10 + 1 + 20 + 1 = 32 ms.
PREDICTED_MS = 32.0


def feed(monitor: LinkMonitor, *wire_ms: float, start_s: float = 0.0) -> LinkMonitor:
    for i, ms in enumerate(wire_ms):
        monitor = monitor.observe(LinkObservation("dev", "s1", 100, 50, ms, start_s + i))
    return monitor


def test_prediction_follows_the_profile():
    estimate = LinkMonitor.of(INSTANCE).estimate("s1", "dev")
    assert estimate.predicted_ms(LinkObservation("dev", "s1", 100, 50, 0.0, 0.0)) == pytest.approx(PREDICTED_MS)


def test_noise_under_the_hysteresis_never_triggers():
    noisy = [PREDICTED_MS * f for f in (1.2, 0.8, 1.25, 0.75, 1.1, 0.9, 1.29, 0.71) * 3]
    assert feed(LinkMonitor.of(INSTANCE), *noisy).changed(hysteresis=0.3, min_samples=3) == []


def test_triggers_after_min_samples_beyond_the_hysteresis():
    monitor = LinkMonitor.of(INSTANCE)
    monitor = feed(monitor, PREDICTED_MS * 2, PREDICTED_MS * 2)
    assert monitor.changed(min_samples=3) == []  # two are not enough
    monitor = feed(monitor, PREDICTED_MS * 2, start_s=2.0)
    (refit,) = monitor.changed(min_samples=3)
    assert (refit.a, refit.b) == ("dev", "s1")
    assert refit.up_fixed_ms == pytest.approx(20.0) and refit.down_ms_per_byte == pytest.approx(0.04)
    assert monitor.estimate("dev", "s1").ewma_ratio == pytest.approx(2.0)


def test_an_interrupted_streak_or_a_mixed_one_does_not_trigger():
    monitor = feed(LinkMonitor.of(INSTANCE), *(PREDICTED_MS * f for f in (2.0, 2.0, 1.0, 2.0, 2.0)))
    assert monitor.changed(min_samples=3) == []
    mixed = feed(LinkMonitor.of(INSTANCE), *(PREDICTED_MS * f for f in (2.0, 0.5, 2.0)))
    assert mixed.changed(min_samples=3) == []


def test_a_faster_link_triggers_too():
    monitor = feed(LinkMonitor.of(INSTANCE), *(PREDICTED_MS * 0.5,) * 3)
    (refit,) = monitor.changed()
    assert refit.up_fixed_ms == pytest.approx(5.0)


def test_out_of_order_observations_are_dropped_and_unknown_links_refused():
    monitor = feed(LinkMonitor.of(INSTANCE), PREDICTED_MS, start_s=10.0)
    assert monitor.observe(LinkObservation("dev", "s1", 100, 50, 999.0, 5.0)) == monitor
    with pytest.raises(ConfigError, match="no monitored link"):
        monitor.observe(LinkObservation("dev", "s9", 1, 1, 1.0, 11.0))


def test_from_trace():
    observation = LinkObservation.from_trace("dev->s1", 100, 50, 40.0, 3.0)
    assert (observation.src, observation.dst, observation.wire_ms) == ("dev", "s1", 40.0)
    with pytest.raises(ConfigError, match="sender->node"):
        LinkObservation.from_trace("dev-s1", 1, 1, 1.0, 0.0)


def test_update_link_and_rebase():
    monitor = feed(LinkMonitor.of(INSTANCE), *(PREDICTED_MS * 3,) * 3)
    (refit,) = monitor.changed()
    updated = update_link(INSTANCE, refit)
    assert updated.link("s1", "dev") == refit and updated.nodes == INSTANCE.nodes
    assert solve(updated, heads=("server",)).cost.decode_ms > solve(INSTANCE, heads=("server",)).cost.decode_ms
    rebased = monitor.rebase([refit])
    assert rebased.changed() == [] and rebased.estimate("dev", "s1").profile == refit
    with pytest.raises(ConfigError, match="no link"):
        update_link(INSTANCE, LinkCaps("dev", "s9", 1, 1, 1, 1))


def _cost(decode_ms: float, ttft_ms: float = 100.0, throughput: float = 10.0) -> PlanCost:
    return PlanCost(decode_ms, ttft_ms, throughput, {}, 0.0)


def test_should_migrate_needs_the_margin():
    current = _cost(100.0)
    assert not should_migrate(current, _cost(91.0), margin=0.1)
    assert should_migrate(current, _cost(89.0), margin=0.1)
    assert not should_migrate(current, _cost(89.0), margin=0.2)
    assert should_migrate(current, _cost(100.0, ttft_ms=50.0), objective="ttft")
    assert not should_migrate(_cost(1.0, throughput=10.0), _cost(1.0, throughput=10.5), objective="throughput")
    assert should_migrate(_cost(1.0, throughput=10.0), _cost(1.0, throughput=11.5), objective="throughput")
    with pytest.raises(ConfigError, match="unknown objective"):
        should_migrate(current, current, objective="speed")
