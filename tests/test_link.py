"""Link emulation: literal delays from the scheduler, reproducible randomness, and a sleeping shell that agrees."""

from __future__ import annotations

import math
import threading

import pytest

from edgellm.errors import ConfigError
from edgellm.net.link import PROFILES, EmulatedLink, LinkDirection, LinkProfile, profile

MB = 1_000_000


def test_one_megabyte_over_8_mbit_takes_one_second_plus_half_rtt():
    link = LinkDirection(mbps=8.0, rtt_ms=20.0)
    d = link.transmit(MB, now_s=100.0)
    assert d.deliver_at_s == pytest.approx(101.010, abs=1e-9)
    assert d.serialize_s == pytest.approx(1.0) and d.queue_s == 0 and d.propagation_s == pytest.approx(0.010)
    assert d.delay_s == pytest.approx(1.010)


def test_back_to_back_messages_queue():
    link = LinkDirection(mbps=8.0, rtt_ms=20.0)
    assert link.schedule(MB, 0.0) == pytest.approx(1.010)
    second = link.transmit(MB, 0.5)  # the first is still on the wire until t=1
    assert second.queue_s == pytest.approx(0.5)
    assert second.deliver_at_s == pytest.approx(2.010)
    assert link.schedule(MB, 5.0) == pytest.approx(6.010)  # idle wire: no queueing


def test_burst_lets_an_idle_link_skip_serialization():
    link = LinkDirection(mbps=8.0, rtt_ms=0.0, burst_bytes=1500)
    assert link.schedule(1500, 10.0) == pytest.approx(10.0)
    assert link.schedule(1500, 10.0) == pytest.approx(10.0015)  # bucket empty: 1500 B at 1 MB/s
    assert link.schedule(3000, 20.0) == pytest.approx(20.0015)  # refilled: only the excess waits


def test_none_profile_adds_nothing():
    p = profile("none")
    link = LinkDirection(p.up_mbps, p.rtt_ms, p.jitter_ms, p.loss_pct)
    for now in (3.0, 3.0, 3.5):
        assert link.schedule(10**9, now) == now


def _jittered_delays(seed: int, n: int = 400) -> list[float]:
    link = LinkDirection(mbps=math.inf, rtt_ms=10.0, jitter_ms=4.0, seed=seed)
    return [link.schedule(1000, float(i)) - i for i in range(n)]  # spaced out: no in-order waiting


def test_jitter_is_bounded_and_reproducible():
    delays = _jittered_delays(seed=7)
    assert all(0.005 <= d <= 0.009 + 1e-12 for d in delays)
    assert max(delays) - min(delays) > 0.0035  # actually spread over the range
    assert delays == _jittered_delays(seed=7)
    assert delays != _jittered_delays(seed=8)


def test_jittered_deliveries_stay_in_order():
    link = LinkDirection(mbps=math.inf, rtt_ms=10.0, jitter_ms=4.0, seed=1)
    deliveries = [link.schedule(100, i * 1e-4) for i in range(200)]
    assert deliveries == sorted(deliveries)
    assert all(d - i * 1e-4 >= 0.005 for i, d in enumerate(deliveries))


def _retransmits(nbytes: int, seed: int, n: int = 4000) -> list[int]:
    link = LinkDirection(mbps=math.inf, rtt_ms=10.0, loss_pct=50.0, seed=seed)
    return [link.transmit(nbytes, float(i)).retransmits for i in range(n)]


def test_loss_costs_one_rtt_per_retransmission_and_is_reproducible():
    counts = _retransmits(1000, seed=3)  # one packet: lost with probability 0.5
    assert counts == _retransmits(1000, seed=3)
    assert 0.46 < sum(c >= 1 for c in counts) / len(counts) < 0.54
    assert 0.21 < sum(c >= 2 for c in counts) / len(counts) < 0.29  # a retransmission can be lost again
    link = LinkDirection(mbps=math.inf, rtt_ms=10.0, loss_pct=50.0, seed=3)
    for i in range(50):
        d = link.transmit(1000, float(i))
        assert d.delay_s == pytest.approx(0.005 + 0.010 * d.retransmits)


def test_loss_is_per_packet():
    counts = _retransmits(3000, seed=4)  # two packets: the message is lost with probability 0.75
    assert 0.71 < sum(c >= 1 for c in counts) / len(counts) < 0.79


def test_lossless_link_never_retransmits():
    link = LinkDirection(mbps=1.0, rtt_ms=5.0, jitter_ms=1.0)
    assert all(link.transmit(10 * MB, 1000.0 * i).retransmits == 0 for i in range(100))


def test_profile_lookup():
    assert profile("5G") is PROFILES["5g"]
    with pytest.raises(ConfigError) as err:
        profile("7g")
    for name in ("6g", "5g", "wifi6", "lte", "wan", "none"):
        assert repr(name) in str(err.value)


def test_profiles_are_ordered_as_the_technologies():
    p = PROFILES
    assert p["6g"].rtt_ms < p["5g"].rtt_ms < p["lte"].rtt_ms < p["wan"].rtt_ms
    assert p["6g"].up_mbps > p["5g"].up_mbps > p["lte"].up_mbps
    assert p["none"] == LinkProfile(math.inf, math.inf, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(up_mbps=0.0, down_mbps=1.0, rtt_ms=1.0),
        dict(up_mbps=1.0, down_mbps=math.nan, rtt_ms=1.0),
        dict(up_mbps=1.0, down_mbps=1.0, rtt_ms=-1.0),
        dict(up_mbps=1.0, down_mbps=1.0, rtt_ms=math.inf),
        dict(up_mbps=1.0, down_mbps=1.0, rtt_ms=1.0, jitter_ms=-0.1),
        dict(up_mbps=1.0, down_mbps=1.0, rtt_ms=1.0, loss_pct=100.0),
        dict(up_mbps=1.0, down_mbps=1.0, rtt_ms=1.0, loss_pct=-1.0),
    ],
)
def test_invalid_profiles_are_refused(kwargs):
    with pytest.raises(ConfigError):
        LinkProfile(**kwargs)


def test_invalid_scheduler_input_is_refused():
    with pytest.raises(ConfigError, match="mbps"):
        LinkDirection(mbps=-1.0, rtt_ms=1.0)
    with pytest.raises(ConfigError, match="burst"):
        LinkDirection(mbps=1.0, rtt_ms=1.0, burst_bytes=-1)
    with pytest.raises(ConfigError, match="nbytes"):
        LinkDirection(mbps=1.0, rtt_ms=1.0).schedule(-1, 0.0)
    with pytest.raises(ConfigError, match="direction"):
        EmulatedLink(profile("none")).send(1, "sideways")


class _FakeTime:
    """A clock that only moves when slept on (per thread sleeps are recorded, the clock stays put)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def test_shell_sleeps_until_the_scheduled_delivery():
    fake = _FakeTime()
    link = EmulatedLink(LinkProfile(8.0, 80.0, 20.0), seed=5, clock=fake.clock, sleep=fake.sleep)
    link.send(MB, "up")
    link.send(MB, "down")  # the other direction does not queue behind the first
    expected = LinkDirection(8.0, 20.0, seed="5:up"), LinkDirection(80.0, 20.0, seed="5:down")
    assert fake.sleeps == pytest.approx([expected[0].schedule(MB, 0.0), expected[1].schedule(MB, 0.0)])


def test_shell_is_thread_safe():
    fake = _FakeTime()
    link = EmulatedLink(LinkProfile(8.0, 8.0, 20.0), clock=fake.clock, sleep=fake.sleep)
    threads = [threading.Thread(target=link.send, args=(MB, "up")) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Eight 1 MB messages at 1 MB/s, all sent at t=0: each queues behind the others.
    assert sorted(fake.sleeps) == pytest.approx([k + 0.010 for k in range(1, 9)])


def test_shell_real_sleeps():
    assert EmulatedLink(profile("none")).send(MB, "up") < 0.005
    link = EmulatedLink(LinkProfile(up_mbps=8.0, down_mbps=math.inf, rtt_ms=40.0))
    waited_up = link.send(50_000, "up")  # 50 ms on the wire + 20 ms propagation
    waited_down = link.send(50_000, "down")  # 20 ms propagation only
    # Sleeps never end early; the upper bounds leave room for a loaded machine.
    assert 0.070 <= waited_up < 0.070 + 0.060
    assert 0.020 <= waited_down < 0.020 + 0.060
