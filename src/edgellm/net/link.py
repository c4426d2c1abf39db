"""Link emulation for split inference: how long a message of n bytes takes on a 6G, 5G, Wi-Fi, LTE or WAN link.

A pure scheduler (`LinkDirection`) turns (message size, clock reading) into a delivery time; a thin shell
(`EmulatedLink`) sleeps until then. Transports call `EmulatedLink.send` once per message, in each direction.

The profiles are **modelling assumptions taken from standards targets and public reports, not measurements**
(see docs/NETWORK.md for the longer rationale):

=======  ========  ==========  ======  =========  ======  ==============================================================
name     up Mb/s   down Mb/s   RTT ms  jitter ms  loss %  source / rationale
=======  ========  ==========  ======  =========  ======  ==============================================================
6g       300       500         1.0     0.1        0       ITU-R M.2160 (IMT-2030 framework): user experienced data rate
                                                          300-500 Mbit/s (research targets; peak 50-200 Gbit/s), air
                                                          latency 0.1-1 ms; edge server at the base station (MEC).
5g       50        100         10.0    2.0        0       ITU-R M.2410 (IMT-2020 minimum requirements): user
                                                          experienced rate DL 100 / UL 50 Mbit/s, user-plane latency
                                                          4 ms one way (eMBB): ~8 ms RTT on the air plus ~2 ms of core
                                                          and transport to an edge server (an assumption).
wifi6    250       500         5.0     1.0        0       IEEE 802.11ax, 2x2 client, 80 MHz channel, home/office range:
                                                          a few hundred Mbit/s of real throughput, a few ms RTT to a
                                                          server on the LAN.
lte      10        30          50.0    5.0        0       Typical LTE as reported by crowd-sourced speed tests
                                                          (20-40 Mbit/s down, about a third of that up, 40-60 ms RTT).
wan      20        50          80.0    5.0        0.1     Broadband access to a distant cloud region: 50/20 Mbit/s,
                                                          ~80 ms RTT, 0.1% loss of an uncongested internet path.
metro    10000     10000       0.2     0.02       0       Backhaul between edge servers of one MEC site or metro ring:
                                                          10 Gigabit Ethernet (IEEE 802.3ae), a few km of fibre and
                                                          one switch: ~0.2 ms RTT. An assumption, not a standard.
none     inf       inf         0.0     0.0        0       No emulation: unlimited bandwidth, no delay.
=======  ========  ==========  ======  =========  ======  ==============================================================

Radio profiles have 0% loss because HARQ/ARQ on the radio link recovers losses below IP; what remains shows up as
jitter. The model of one direction of a link, per message, is:

* **bandwidth**: a FIFO serializer at `mbps` with an optional token-bucket burst (`burst_bytes`, default 0: every
  byte is sent at line rate, so a message takes exactly `bytes / bandwidth` on the wire). A message sent
  while earlier ones are still on the wire queues behind them.
* **propagation**: rtt/2 one way.
* **jitter**: uniform in [0, jitter_ms], from a seeded `random.Random`; delivery stays in order (gRPC runs over one
  TCP connection, so a late message holds back the ones behind it).
* **loss**: per packet of `PACKET_BYTES`; a message is lost if any of its packets is, with probability
  1 - (1 - loss)^packets, and each loss costs one extra RTT (the retransmission timeout of a reliable transport);
  the retransmission may be lost again. Retransmitted bytes are not charged to the bandwidth.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgellm.errors import ConfigError

PACKET_BYTES = 1500  # Ethernet MTU: the unit that is lost and retransmitted
_MAX_RETRANSMITS = 32  # bounds the delay at loss_pct close to 100
DIRECTIONS = ("up", "down")


@dataclass(frozen=True)
class LinkProfile:
    """A bidirectional link: bandwidth each way, round-trip time, jitter and packet loss.

    Attributes:
        up_mbps: device -> server bandwidth in Mbit/s (`math.inf` for unlimited).
        down_mbps: server -> device bandwidth in Mbit/s (`math.inf` for unlimited).
        rtt_ms: round-trip propagation time; each direction gets half.
        jitter_ms: extra one-way delay, uniform in [0, jitter_ms].
        loss_pct: per-packet loss probability in percent, in [0, 100).

    Raises:
        ConfigError: a non-positive or NaN bandwidth, a negative or non-finite delay, or a loss outside [0, 100).
    """

    up_mbps: float
    down_mbps: float
    rtt_ms: float
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    def __post_init__(self) -> None:
        for name in ("up_mbps", "down_mbps"):
            value = getattr(self, name)
            if not value > 0:  # also rejects NaN
                raise ConfigError(f"{name} must be positive (math.inf for unlimited), got {value}")
        for name in ("rtt_ms", "jitter_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be finite and non-negative, got {value}")
        if not 0 <= self.loss_pct < 100:
            raise ConfigError(f"loss_pct must be in [0, 100), got {self.loss_pct}")


PROFILES: dict[str, LinkProfile] = {
    "6g": LinkProfile(up_mbps=300.0, down_mbps=500.0, rtt_ms=1.0, jitter_ms=0.1),
    "5g": LinkProfile(up_mbps=50.0, down_mbps=100.0, rtt_ms=10.0, jitter_ms=2.0),
    "wifi6": LinkProfile(up_mbps=250.0, down_mbps=500.0, rtt_ms=5.0, jitter_ms=1.0),
    "lte": LinkProfile(up_mbps=10.0, down_mbps=30.0, rtt_ms=50.0, jitter_ms=5.0),
    "wan": LinkProfile(up_mbps=20.0, down_mbps=50.0, rtt_ms=80.0, jitter_ms=5.0, loss_pct=0.1),
    "metro": LinkProfile(up_mbps=10_000.0, down_mbps=10_000.0, rtt_ms=0.2, jitter_ms=0.02),
    "none": LinkProfile(up_mbps=math.inf, down_mbps=math.inf, rtt_ms=0.0),
}


def profile(name: str) -> LinkProfile:
    """The named link profile.

    Raises:
        ConfigError: `name` is not in `PROFILES`; the message lists the valid names.
    """
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown link profile {name!r}; choose from {sorted(PROFILES)}") from None


@dataclass(frozen=True)
class Delivery:
    """When a message arrives and why. All times in seconds on the caller's clock.

    Attributes:
        sent_s: the clock reading the message was sent at.
        deliver_at_s: when its last byte arrives at the receiver.
        queue_s: time spent waiting behind earlier messages.
        serialize_s: time its own bytes took at line rate (less any burst credit).
        propagation_s: rtt/2 plus jitter (plus waiting for an earlier, later-jittered message).
        retransmits: how many times it was lost and resent, one RTT each.
    """

    sent_s: float
    deliver_at_s: float
    queue_s: float
    serialize_s: float
    propagation_s: float
    retransmits: int

    @property
    def delay_s(self) -> float:
        """Total delay: `deliver_at_s - sent_s`."""
        return self.deliver_at_s - self.sent_s


class LinkDirection:
    """One direction of an emulated link: a pure, seeded scheduler with no clock of its own.

    Args:
        mbps: bandwidth in Mbit/s, `math.inf` for unlimited.
        rtt_ms: round-trip time; the direction adds rtt/2, and rtt per retransmission.
        jitter_ms: one-way jitter bound.
        loss_pct: per-packet loss probability in percent.
        seed: seeds the jitter and loss draws; the same seed and the same calls give the same deliveries.
        burst_bytes: token-bucket depth: an idle link sends this many bytes without serialization delay.

    Raises:
        ConfigError: invalid parameters (as `LinkProfile`), or a negative `burst_bytes`.
    """

    def __init__(
        self,
        mbps: float,
        rtt_ms: float,
        jitter_ms: float = 0.0,
        loss_pct: float = 0.0,
        seed: int | str = 0,
        burst_bytes: int = 0,
    ) -> None:
        if not mbps > 0:
            raise ConfigError(f"mbps must be positive (math.inf for unlimited), got {mbps}")
        LinkProfile(up_mbps=mbps, down_mbps=mbps, rtt_ms=rtt_ms, jitter_ms=jitter_ms, loss_pct=loss_pct)
        if burst_bytes < 0:
            raise ConfigError(f"burst_bytes must be non-negative, got {burst_bytes}")
        self.bytes_per_s = mbps * 1e6 / 8
        self.rtt_s = rtt_ms / 1e3
        self.jitter_s = jitter_ms / 1e3
        self.loss = loss_pct / 100
        self.burst_s = burst_bytes / self.bytes_per_s
        self._rng = random.Random(seed)
        # When the serializer finishes the bytes accepted so far, in zero-burst virtual time.
        self._wire_free_s = -math.inf
        self._last_delivery_s = -math.inf

    def transmit(self, nbytes: int, now_s: float) -> Delivery:
        """Send `nbytes` at clock reading `now_s`; returns when and why it is delivered. Advances the link state.

        Raises:
            ConfigError: `nbytes` is negative or `now_s` is not finite.
        """
        if nbytes < 0:
            raise ConfigError(f"nbytes must be non-negative, got {nbytes}")
        if not math.isfinite(now_s):
            raise ConfigError(f"now_s must be finite, got {now_s}")
        # Token bucket as virtual time (GCRA): a full bucket lets the message start burst_s "in the past".
        start_s = max(now_s - self.burst_s, self._wire_free_s)
        self._wire_free_s = start_s + nbytes / self.bytes_per_s
        on_wire_s = max(self._wire_free_s, now_s)
        queue_s = max(0.0, start_s - now_s)
        # Drawn even when jitter is 0, so the loss draws do not depend on it.
        jitter_s = self._rng.uniform(0.0, self.jitter_s)
        retransmits = self._retransmits(nbytes)
        arrive_s = on_wire_s + self.rtt_s / 2 + jitter_s + retransmits * self.rtt_s
        deliver_at_s = max(arrive_s, self._last_delivery_s)  # in order, as over one TCP connection
        self._last_delivery_s = deliver_at_s
        return Delivery(
            sent_s=now_s,
            deliver_at_s=deliver_at_s,
            queue_s=queue_s,
            serialize_s=on_wire_s - now_s - queue_s,
            propagation_s=deliver_at_s - on_wire_s - retransmits * self.rtt_s,
            retransmits=retransmits,
        )

    def schedule(self, nbytes: int, now_s: float) -> float:
        """The absolute delivery time of `nbytes` sent at `now_s`, on the same clock. See `transmit`."""
        return self.transmit(nbytes, now_s).deliver_at_s

    def _retransmits(self, nbytes: int) -> int:
        """How many times a message of `nbytes` is lost before it gets through (geometric, bounded)."""
        if self.loss == 0:
            return 0
        packets = max(1, math.ceil(nbytes / PACKET_BYTES))
        p_lost = 1 - (1 - self.loss) ** packets
        count = 0
        while count < _MAX_RETRANSMITS and self._rng.random() < p_lost:
            count += 1
        return count


class EmulatedLink:
    """Both directions of a link, sleeping each message until its emulated delivery. Thread-safe.

    Args:
        link: the profile to emulate.
        seed: seeds both directions (each from its own stream).
        burst_bytes: token-bucket depth of each direction.
        clock: monotonic clock in seconds (injectable for tests).
        sleep: sleeps for a number of seconds (injectable for tests).
    """

    def __init__(
        self,
        link: LinkProfile,
        seed: int = 0,
        burst_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.profile = link
        self.up = LinkDirection(link.up_mbps, link.rtt_ms, link.jitter_ms, link.loss_pct, f"{seed}:up", burst_bytes)
        self.down = LinkDirection(
            link.down_mbps, link.rtt_ms, link.jitter_ms, link.loss_pct, f"{seed}:down", burst_bytes
        )
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()

    def send(self, nbytes: int, direction: str) -> float:
        """Block until `nbytes` sent now in `direction` ("up": device -> server, "down") is delivered.

        Returns:
            the seconds actually waited.

        Raises:
            ConfigError: an unknown direction or a negative size.
        """
        if direction not in DIRECTIONS:
            raise ConfigError(f"unknown link direction {direction!r}; choose from {list(DIRECTIONS)}")
        scheduler = self.up if direction == "up" else self.down
        with self._lock:  # only the scheduler state is shared; sleeping outside lets messages overlap in flight
            start_s = self._clock()
            deliver_at_s = scheduler.schedule(nbytes, start_s)
        remaining_s = deliver_at_s - self._clock()
        if remaining_s > 0:
            self._sleep(remaining_s)
        return self._clock() - start_s
