"""The device's re-planner: watch the links in the device's own traffic, re-plan when one changes, migrate live.

A `serve.migration.Controller`. After every decode step the device hands it the network hops' traces (one per
hop: sender->node, bytes each way, time on the wire). The pure policy (`edgellm.plan.replan`) compares each with
what the profile predicts; when a link departs from it by more than the hysteresis for `min_samples` steps in a
row, the re-planner probes that link (light echo probes through the real transport, from the node at its near
end) and fits it again, solves the plan anew under the updated link, and answers a layout to migrate to when the
new plan beats the current one (re-costed under the same update) by the margin. Every decision is logged and kept
in `events`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgellm.control.planning import layout_for
from edgellm.control.profile_file import fit_line, instance_from_profile, load_profile
from edgellm.deploy.topology import Topology
from edgellm.errors import EdgellmError
from edgellm.net.messages import HopTrace
from edgellm.plan import InfeasiblePlan, LinkCaps, Plan, StageAssign, evaluate, solve
from edgellm.plan.replan import LinkMonitor, LinkObservation, should_migrate, update_link
from edgellm.split.layout import Layout

log = logging.getLogger(__name__)

REPROBE_SIZES = (256, 16_384, 65_536)  # light: a few hundred KB in all, well under a second on an LTE link
Prober = Callable[[str, str], list[list[float]]]  # (near, far) -> samples [[up_bytes, down_bytes, seconds], ...]


def current_plan(topology: Topology, num_layers: int) -> Plan:
    """The plan a topology runs now: its stages with each node's scheme, each hop's codec, its head side."""
    from edgellm.net.rpc import codec_name

    stages, device = [], topology.route[0]
    for owner, spec in topology.stage_assignment(num_layers):
        if spec.head and spec.num_layers == 0 and not spec.embed:
            continue  # the device's head stage: the plan's head side says it
        node = topology.node(owner)
        stages.append(StageAssign(owner, spec.start, spec.end, node.quant or topology.model.quant))
    names = [s.node for s in stages]
    route = names if names[0] == device else [device, *names]
    hops = list(zip(route, route[1:])) if topology.mode == "chain" else [(device, s) for s in route[1:]]
    codecs = tuple(codec_name(topology.link_between(a, b).codec) for a, b in hops)
    return Plan(tuple(stages), codecs, topology.model.head, topology.mode)


class Replanner:
    """Re-plans a running chain deployment from its device (see the module doc).

    Args:
        topology: the deployment as it was started (its `[control]` table holds the settings and the profile).
        num_layers: of the model.
        probe: measures a link from its near end; raising or returning no samples falls back to scaling the
            profile's line by the observed ratio.
        clock: seconds, monotonic.
    """

    def __init__(self, topology: Topology, num_layers: int, probe: Prober,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        spec = topology.control
        assert spec.profile is not None  # ControlSpec checks it when replan is on
        self.spec = spec
        self.device = topology.route[0]
        self.instance = instance_from_profile(load_profile(spec.profile), topology.mode)
        self.plan = current_plan(topology, num_layers)
        self.monitor = LinkMonitor.of(self.instance)
        self.probe = probe
        self.clock = clock
        self.cap = math.inf if spec.max_ppl_increase is None else spec.max_ppl_increase
        self.events: list[dict[str, Any]] = []

    def observe(self, step: int, traces: Sequence[HopTrace]) -> Layout | None:
        now = self.clock()
        for trace in traces:
            try:
                self.monitor = self.monitor.observe(
                    LinkObservation.from_trace(trace.link, trace.bytes_up, trace.bytes_down, trace.wire_ms, now)
                )
            except EdgellmError:  # a link the profile does not know (another route): nothing to compare with
                continue
        changed = self.monitor.changed(self.spec.hysteresis, self.spec.min_samples)
        if not changed:
            return None
        return self._replan(step, changed)

    def _replan(self, step: int, changed: list[LinkCaps]) -> Layout | None:
        refits = [self._measure(caps) for caps in changed]
        for caps in refits:
            self.instance = update_link(self.instance, caps)
        self.monitor = self.monitor.rebase(refits)
        event: dict[str, Any] = {"step": step, "links": [caps.to_json() for caps in refits]}
        current = evaluate(self.instance, self.plan)
        try:
            new = solve(self.instance, self.spec.objective, self.cap, modes=("chain",))
        except InfeasiblePlan as exc:
            event.update(decision="stay", reason=str(exc))
            self._done(event)
            return None
        event.update(current_decode_ms=round(current.decode_ms, 3), new_decode_ms=round(new.cost.decode_ms, 3),
                     new_plan=new.plan.to_json())  # fmt: skip
        if not should_migrate(current, new.cost, self.spec.margin, self.spec.objective):
            event["decision"] = "stay"
            self._done(event)
            return None
        self.plan = new.plan
        event["decision"] = "migrate"
        self._done(event)
        return layout_for(new.plan, self.device)

    def _done(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        log.info("re-plan at step %s: %s", event["step"], event)

    def _measure(self, caps: LinkCaps) -> LinkCaps:
        """The link probed again from its near end and fitted; the profile's line scaled if probing fails."""
        near, far = caps.a, caps.b
        try:
            samples = self.probe(near, far)
            small = min(REPROBE_SIZES)
            up_fixed, up_slope = fit_line([(u, s * 1e3) for u, d, s in samples if d == small])
            down_fixed, down_slope = fit_line([(d, s * 1e3) for u, d, s in samples if u == small])
        except Exception as exc:  # noqa: BLE001 - the observed ratio is a usable estimate
            log.warning("could not probe %s->%s (%s); scaling its profile by what the traffic shows", near, far, exc)
            return self.monitor.estimate(near, far).refit()
        fixed = (up_fixed + down_fixed) / 2
        return LinkCaps(near, far, fixed / 2, up_slope, fixed / 2, down_slope)


def control_prober(topology: Topology, sender: str, reach: Callable[[str], Any]) -> Prober:
    """Probes a link by asking the node at its near end (`probe_link`), through a control hop from `sender`."""

    def probe(near: str, far: str) -> list[list[float]]:
        hop = reach(near)
        try:
            answer = hop.control({"op": "probe_link", "to": far, "sizes": list(REPROBE_SIZES), "repeats": 1})
        finally:
            hop.shutdown()
        return list(answer["samples"])

    return probe
