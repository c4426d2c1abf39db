"""Live migration on the device: layouts asked for over the control channel or by a controller, applied between
decode steps of the running generation, and accounted in its report.

A migration moves layer ranges between nodes while a generation runs: the device has every server whose stage
or next hop changes load its new stage, rebuilds its own stages and hops (a `Rebuilder`, from
`edgellm.deploy.reconfigure`), and the generator replays the tokens fed so far on the new pipeline
(`edgellm.split.generator`), so the tokens are those the old layout would have produced.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edgellm.errors import ConfigError
from edgellm.model.stage import StageSpec
from edgellm.net.messages import HopTrace
from edgellm.spec.generator import SpeculativeGenerator
from edgellm.split.generator import Generator
from edgellm.split.layout import Layout
from edgellm.split.pipeline import Hop

StageLayout = list[tuple[str, StageSpec]]  # (node, stage) in execution order


class Controller(Protocol):
    """Decides after each decode step whether to move the model (an automatic re-planner, say).

    `observe` gets the step just finished and the network hops' traces since its last call (in call order;
    right after a migration they include the replay's); it answers a layout to migrate to, or None.
    """

    def observe(self, step: int, traces: Sequence[HopTrace]) -> Layout | None: ...


class Rebuilder(Protocol):
    """Moves the deployment to a layout and builds the device's new hops (`edgellm.deploy.reconfigure`)."""

    def check(self, layout: Layout) -> StageLayout:
        """The stages of `layout`, or a ConfigError saying why it cannot be migrated to; changes nothing."""
        ...

    def rebuild(self, layout: Layout, hops: Sequence[Hop]) -> tuple[list[Hop], StageLayout]:
        """Reconfigure the servers and the device's stages for `layout`; -> the new hops and stages.
        `hops` are the device's current ones (their links' emulation carries over)."""
        ...


@dataclass(frozen=True)
class Pending:
    """A layout asked for, applied before step `at_step` of a generation (None: the next step)."""

    layout: Layout
    at_step: int | None = None


class LiveMigration:
    """The device's migration state: how to rebuild, an optional controller, and the layouts asked for.

    Thread-safe: control calls queue from their threads, the generation takes between its steps.
    """

    def __init__(self, rebuilder: Rebuilder, controller: Controller | None = None) -> None:
        self.rebuilder = rebuilder
        self.controller = controller
        self._pending: list[Pending] = []
        self._lock = threading.Lock()

    def queue(self, layout: Layout, at_step: int | None = None) -> int:
        """Ask for `layout` (checked now); -> how many layouts are waiting, this one included.

        Raises:
            ConfigError: the layout cannot be migrated to, or `at_step` is below 1 (the prompt cannot move).
        """
        if at_step is not None and at_step < 1:
            raise ConfigError(f"a migration comes before a decode step >= 1, got at_step={at_step}")
        self.rebuilder.check(layout)
        with self._lock:
            self._pending.append(Pending(layout, at_step))
            return len(self._pending)

    def take(self, step: int) -> Layout | None:
        """The first waiting layout due before `step` (removed from the queue), or None."""
        with self._lock:
            for i, pending in enumerate(self._pending):
                if pending.at_step is None or pending.at_step <= step:
                    return self._pending.pop(i).layout
        return None

    def take_unscheduled(self) -> Layout | None:
        """The first waiting layout with no step, for a device that is idle."""
        with self._lock:
            for i, pending in enumerate(self._pending):
                if pending.at_step is None:
                    return self._pending.pop(i).layout
        return None

    def choose(self, step: int, traces: Sequence[HopTrace]) -> Layout | None:
        """Between steps: the controller's layout after `step - 1` finished, else a waiting one due at `step`."""
        chosen = self.controller.observe(step - 1, traces) if self.controller is not None else None
        return chosen if chosen is not None else self.take(step)


def run_traces(generator: Generator | SpeculativeGenerator) -> list[HopTrace]:
    """The network traces of a generation over all its pipelines, without the migrations' replays."""
    migrations = generator.result.migrations if generator.result is not None else []
    skips = [0, *(m.replay_traces for m in migrations)]  # each pipeline after the first starts with its replay
    return [t for pipeline, skip in zip(generator.pipelines, skips) for t in pipeline.traces[skip:]]


def replay_traces(generator: Generator | SpeculativeGenerator) -> list[list[HopTrace]]:
    """Each migration's replay traces, in order."""
    assert generator.result is not None
    return [p.traces[: m.replay_traces] for p, m in zip(generator.pipelines[1:], generator.result.migrations)]


def local_compute(generator: Generator | SpeculativeGenerator, prefix: str) -> dict[str, tuple[float, float | None]]:
    """Per in-process hop named `prefix...` (keyed by the rest of its name): total compute over all pipelines
    and mean compute per decode step, as `edgellm.serve.report.node_compute` gives for remote nodes. Replays (the
    first call on each pipeline after the first) are left out; the migration rows account them."""
    totals: dict[str, list[float]] = {}  # name -> [prefill ms, decode ms, decode calls]
    for index, pipeline in enumerate(generator.pipelines):
        for hop, stats in zip(pipeline.hops, pipeline.stats):
            if not hop.name.startswith(prefix) or stats.calls == 0:
                continue
            row = totals.setdefault(hop.name[len(prefix) :], [0.0, 0.0, 0.0])
            if index == 0:
                row[0] += stats.first_compute_ms
            row[1] += stats.compute_ms - stats.first_compute_ms
            row[2] += stats.calls - 1
    return {name: (pre + dec, dec / calls if calls else None) for name, (pre, dec, calls) in totals.items()}


def migration_rows(generator: Generator | SpeculativeGenerator) -> list[dict[str, Any]]:
    """The report's `migrations`: step, time (switch = reconfiguring, replay = rebuilding the KV caches),
    replayed tokens and replay bytes per link, the layouts before and after."""
    assert generator.result is not None
    rows = []
    for migration, traces in zip(generator.result.migrations, replay_traces(generator)):
        replay_bytes: dict[str, int] = {}
        for t in traces:
            replay_bytes[t.link] = replay_bytes.get(t.link, 0) + t.bytes_up + t.bytes_down
        rows.append({
            "step": migration.step, "ms": round(migration.ms, 3), "switch_ms": round(migration.switch_ms, 3),
            "replay_ms": round(migration.replay_ms, 3), "replayed_tokens": migration.replayed_tokens,
            "replay_bytes": replay_bytes, "before": migration.before, "after": migration.after,
        })  # fmt: skip
    return rows
