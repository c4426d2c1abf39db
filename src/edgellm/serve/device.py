"""The device node's engine: takes prompts (raw text never leaves the device), drives the split pipeline."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.model.prompt import TextStream, stop_ids
from edgellm.model.stage import StageSpec
from edgellm.privacy.config import DPConfig
from edgellm.privacy.mods import RowGuard, private_hops
from edgellm.serve.adapter_catalog import AdapterCatalog
from edgellm.serve.drafts import DraftShelf
from edgellm.serve.generate_request import GenerateRequest
from edgellm.serve.migration import LiveMigration, local_compute, migration_rows, run_traces
from edgellm.serve.report import link_report, node_compute, timing_report
from edgellm.serve.step_timing import StepTimer
from edgellm.spec.config import SpeculativeConfig
from edgellm.spec.generator import SpeculativeGenerator
from edgellm.split.budget import rss_bytes, to_mb
from edgellm.split.control import Field, link_profiles, node_ops
from edgellm.split.generator import BetweenSteps, GenerationConfig, Generator
from edgellm.split.layout import Layout
from edgellm.split.one_process import stage_label
from edgellm.split.pipeline import Hop, Pipeline

log = logging.getLogger(__name__)

MIGRATE_FIELDS = {  # the `migrate` control op: a `Layout`, and before which decode step (None: the next one)
    "cuts": Field(list, required=True), "route": Field(list, required=True), "quant": Field(dict),
    "head": Field(str), "at_step": Field(int), "device_embeds": Field(bool, default=False),
    "codecs": Field(dict),
}  # fmt: skip


class DeviceEngine:
    """Generates on a device node: local stages (first, and the head if on the device) plus remote hops.

    Args:
        name: the device node's name.
        tokenizer, model_config: of the deployed model.
        hops: the pipeline's hops in order (local ones are `LocalHop`s).
        layout: (node name, stage spec) of every stage of the deployment, in execution order.
        info: static fields for the report (model, mode, ...).
        migration: how to move the deployment to another layout mid-run, and the layouts asked for; None for a
            device that cannot (the `migrate` control op is then refused).
        node_status: called once at the end of each generation: node name -> fields merged into that node's
            entry of the report (`emulated`, `memory`: `edgellm.deploy.memory_budget.NodeStatus`); None for none.
    """

    def __init__(
        self,
        name: str,
        tokenizer: Any,
        model_config: Any,
        hops: Sequence[Hop],
        layout: Sequence[tuple[str, StageSpec]],
        info: dict[str, Any],
        migration: LiveMigration | None = None,
        node_status: Callable[[], dict[str, dict[str, Any]]] | None = None,
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.hops = list(hops)
        self.layout = list(layout)
        self._info = info
        self._lock = threading.Lock()  # guards `_active`; a migration between generations holds it throughout
        self._active = 0  # generations running now (concurrent ones are batched by the stage hosts)
        self.adapters: AdapterCatalog | None = None  # the deployment's LoRA adapters (`attach_adapters`)
        self.server_info: dict[str, Callable[[], dict[str, Any]]] = {}  # each server's `Info`, for `stats`
        self.drafts: DraftShelf | None = None  # the drafters for speculative decoding; None: it is refused
        self.migration = migration
        self.node_status = node_status
        self.dp_guard: RowGuard | None = None  # the topology's DP on the device's first link; one ledger for life
        self.control_ops = node_ops(name, self.info, self._linked_hops)  # edgellm.split.control
        self.control_ops.register("migrate", self._migrate_op, MIGRATE_FIELDS)

    def info(self) -> dict[str, Any]:
        return {
            **self._info,
            "name": self.name,
            "role": "device",
            "layout": self._layout_json(),
            "link_emulation": link_profiles(self._linked_hops()),
            "memory": {
                "rss_mb": to_mb(rss_bytes()),
                "peak_rss_mb": to_mb(rss_bytes("VmHWM")),
                "budget_mb": (self._info.get("emulated") or {}).get("memory_mb"),
            },  # fmt: skip
            **self._replicas(),
        }

    def _replicas(self) -> dict[str, Any]:
        """`replicas`: each replica hop's view (up, load, latency, failovers: `edgellm.failover`), if any."""
        found = {hop.name: hop.report() for hop in self.hops if hasattr(hop, "open_routes")}  # type: ignore[attr-defined]
        return {"replicas": found} if found else {}

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """A control op: echo, info, probe_link, set_link (its links to servers), migrate, and those registered."""
        return self.control_ops.dispatch(request)

    def migrate(self, layout: Layout) -> Pipeline:
        """Move the deployment to `layout` now and return a pipeline over the new hops. Call it between
        generations (holding the generation lock) or from a generation's `between_steps` hook.

        Raises:
            ConfigError: this device cannot migrate, or the layout is invalid (nothing changed then).
            PeerError: a server failed to load its new stage.
        """
        if self.migration is None:
            raise ConfigError(f"node {self.name} cannot migrate (it was built without a rebuilder)")
        self.hops, self.layout = self.migration.rebuilder.rebuild(layout, self.hops)
        self._info.update(cuts=list(layout.cuts), head=layout.head, route=[self.name, *layout.route])
        return Pipeline(self.hops, layout=self._layout_json())

    def _migrate_op(self, request: dict[str, Any]) -> dict[str, Any]:
        """Migrate now if idle and no step is named, else queue the layout for the running (or next) generation."""
        if self.migration is None:
            raise ConfigError(f"node {self.name} cannot migrate (it was built without a rebuilder)")
        fields = {key: request[key] for key in ("cuts", "route", "quant", "device_embeds", "codecs")}
        layout = Layout.from_json({**fields, "head": request["head"] or self._info.get("head", "device")})
        at_step = request["at_step"]
        if at_step is None and self._lock.acquire(blocking=False):
            try:
                if self._active:
                    return {"queued": True, "at_step": None, "waiting": self.migration.queue(layout, None)}
                self.migration.rebuilder.check(layout)
                start = time.perf_counter()
                self.migrate(layout)
                return {"migrated": True, "ms": round((time.perf_counter() - start) * 1e3, 3),
                        "layout": self._layout_json()}  # fmt: skip
            finally:
                self._lock.release()
        waiting = self.migration.queue(layout, at_step)
        return {"queued": True, "at_step": at_step, "waiting": waiting}

    def _between_steps(self, generator: Callable[[], Generator], guard: RowGuard | None) -> BetweenSteps | None:
        """The generation's hook: feed the controller the new traces, and migrate to a layout it or the control
        channel asks for."""
        migration = self.migration
        if migration is None:
            return None
        seen: list[Any] = [None, 0]  # the pipeline last observed, and how many of its traces

        def hook(step: int, fed: Sequence[Sequence[int]]) -> Pipeline | None:
            if self._active > 1:  # the other generations' sessions live on the current layout
                return None
            pipeline = generator().pipeline
            start = seen[1] if seen[0] is pipeline else 0
            seen[:] = [pipeline, len(pipeline.traces)]
            layout = migration.choose(step, pipeline.traces[start:])
            if layout is None:
                return None
            try:  # a controller's layout is checked here (a queued one was checked when queued)
                migration.rebuilder.check(layout)
            except ConfigError as exc:
                log.warning("not migrating before step %d to an invalid layout: %s", step, exc)
                return None
            moved = self.migrate(layout)
            return moved if guard is None else Pipeline(self._private(moved.hops, guard), layout=moved.layout)

        return hook

    def _guard(self, dp: DPConfig | None) -> RowGuard | None:
        """The DP guard of a generation: the topology's (one ledger for the node's life) or the request's own."""
        if dp is not None and self.dp_guard is not None:
            raise ConfigError(f"node {self.name}'s topology sets DP on its first link; a request cannot replace it")
        return self.dp_guard if dp is None else RowGuard.for_rows(dp)

    def _private(self, hops: list[Hop], guard: RowGuard | None) -> list[Hop]:
        """`hops` with the device's hop to its first server guarded (`edgellm.privacy.mods`); as-is without DP."""
        if guard is None:
            return hops
        owner, first = self.layout[0]
        if owner != self.name or not first.embed or all(node == self.name for node, _ in self.layout):
            raise ConfigError(f"differential privacy on node {self.name} needs its first stage (embedding) on the "
                              "device and a server after it: here no hidden state of the device's leaves it")  # fmt: skip
        return private_hops(hops, guard)

    def _linked_hops(self) -> dict[str, Hop]:
        return {hop.name: hop for hop in self.hops if hasattr(hop, "probe")}

    def generate(self, data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Events: {"token": id, "text": delta, "timing": {...}} per token, then {"report": {...}}.

        Generations may run at once from several threads: the stage hosts batch their steps. "timing" is what
        the token cost hop by hop (`edgellm.serve.step_timing`).
        """
        request = GenerateRequest.from_json(data)
        prompt_ids = request.prompt_ids(self.tokenizer)
        vocab = int(getattr(self.model_config, "vocab_size", 0) or 0)
        if vocab and max(prompt_ids) >= vocab:
            raise ConfigError(f"prompt token id {max(prompt_ids)} is past the vocabulary of {vocab}")
        config = GenerationConfig(request.max_new_tokens, request.sampling, stop_ids(self.tokenizer, self.model_config))
        if request.adapter is not None and self.adapters is None:
            raise ConfigError(f"node {self.name} serves no adapters; asked for {request.adapter!r}")
        if request.speculative is not None and self.drafts is None:
            raise ConfigError(f"node {self.name} has no drafter: it cannot decode speculatively")
        guard = self._guard(request.dp)
        with self._lock:
            # A layout asked for while the last generation was finishing moves the deployment once none runs on it.
            while not self._active and self.migration is not None:
                waiting = self.migration.take_unscheduled()
                if waiting is None:
                    break
                self.migrate(waiting)
            hops = self._private(list(self.hops), guard)
            self._active += 1
        try:
            with self.adapters.use(request.adapter) if request.adapter is not None else nullcontext():  # type: ignore[union-attr]
                yield from self._stream(prompt_ids, config, hops, request.adapter or "", request.speculative, guard)
        finally:
            with self._lock:
                self._active -= 1

    def _stream(
        self, prompt_ids: list[int], config: GenerationConfig, hops: list[Hop], adapter: str,
        speculative: SpeculativeConfig | None, guard: RowGuard | None,
    ) -> Iterator[dict[str, Any]]:  # fmt: skip
        pipeline = Pipeline(hops, layout=self._layout_json())
        generator: Generator | SpeculativeGenerator
        if speculative is not None:  # no live migration mid-answer: a draft round spans several steps
            assert self.drafts is not None
            drafter = self.drafts.get(speculative.draft)
            generator = SpeculativeGenerator(pipeline, config, drafter, speculative, adapter)
        else:
            plain = Generator(pipeline, config, self._between_steps(lambda: plain, guard), adapter)
            generator = plain
        stream = TextStream(self.tokenizer)
        timer = StepTimer(generator.pipeline)
        for step in generator.stream(torch.tensor([prompt_ids])):
            token = step.tokens[0]
            yield {"token": token, "text": stream.push(token), "timing": timer.step(generator.pipeline)}
        assert generator.result is not None
        report = self._report(prompt_ids, generator)
        privacy = None if guard is None else guard.ledger.to_json()  # the topology's: the node's life so far
        yield {"report": {**report, "adapter": adapter or None, "privacy": privacy}}

    def attach_adapters(self, catalog: AdapterCatalog) -> None:
        """Serve LoRA adapters: generations may name one of `catalog`'s."""
        self.adapters = catalog

    def adapter_listing(self) -> list[dict[str, Any]]:
        """Every adapter the device knows: name, loaded, bytes, source, in_use."""
        return [] if self.adapters is None else self.adapters.listing()

    def load_adapter(self, name: str, path: str | None = None) -> dict[str, Any]:
        if self.adapters is None:
            raise ConfigError(f"node {self.name} serves no adapters")
        return self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> dict[str, Any]:
        if self.adapters is None:
            raise ConfigError(f"node {self.name} serves no adapters")
        return self.adapters.unload(name)

    def stats(self) -> dict[str, Any]:
        """Generations running; each stage host's sessions and batch sizes: `stages` (this process's), and
        `nodes` (those and every server's, from its `Info`; a server that does not answer gets `error`)."""
        hosts: dict[str, Any] = {hop.name: getattr(hop, "handler", None) for hop in self.hops}
        local = {name: host.stats() for name, host in hosts.items() if hasattr(host, "stats")}
        nodes: dict[str, Any] = dict(local)
        for name, info in self.server_info.items():
            try:
                nodes[name] = info().get("batching") or {}
            except Exception as exc:  # noqa: BLE001 - a scrape reports the others; this one says why not
                nodes[name] = {"error": str(exc)}
        return {"active_generations": self._active, "stages": local, "nodes": nodes}

    def _report(self, prompt_ids: list[int], generator: Generator | SpeculativeGenerator) -> dict[str, Any]:
        result = generator.result
        assert result is not None
        new_tokens = result.new_tokens[0]
        traces = run_traces(generator)  # every pipeline's, without the migrations' replays
        remote = node_compute(traces)
        # a speculative round settles several tokens: per-call figures are scaled to per decoded token
        spec = result.speculative
        decoded = len(new_tokens) - 1
        rounds_per_token = spec["rounds"] / decoded if spec is not None and decoded > 0 else 1.0
        local = local_compute(generator, f"{self.name}/")
        per_token = [p for _, p in local.values() if p is not None]
        remote[self.name] = (sum(total for total, _ in local.values()), sum(per_token) if per_token else None)
        status = self.node_status() if self.node_status is not None else {}
        nodes = []
        for node, specs in self._by_node().items():
            blocks = [s for s in specs if s.num_layers] or specs
            total, per_step = remote.get(node, (0.0, None))
            nodes.append(
                {
                    "name": node,
                    "layers": [min(s.start for s in blocks), max(s.end for s in blocks)],
                    "head": any(s.head for s in specs),
                    "compute_ms": round(total, 3),
                    "compute_ms_per_token": None if per_step is None else round(per_step * rounds_per_token, 3),
                    **status.get(node, {}),
                }
            )
        return {
            **self._info,
            "prompt_tokens": prompt_ids,
            "new_tokens": new_tokens,
            "text": self.tokenizer.decode(new_tokens, skip_special_tokens=True),
            "nodes": nodes,
            "links": link_report(traces, rounds_per_token),
            "link_emulation": link_profiles(self._linked_hops()),
            "stages": self._stage_rows(local, remote),
            "migrations": migration_rows(generator),
            "recoveries": result.recoveries,  # sessions a stage lost (restart, eviction), rebuilt by replay
            **timing_report(result),
        }

    def _stage_rows(
        self, local: dict[str, tuple[float, float | None]], remote: dict[str, tuple[float, float | None]]
    ) -> list[dict[str, Any]]:
        """One row per stage of the deployment; a server holds one stage, so its node's compute is the stage's."""
        rows = []
        for node, spec in self.layout:
            found = local.get(stage_label(spec)) if node == self.name else None
            total = found[0] if found is not None else remote.get(node, (0.0, None))[0]
            rows.append({"node": node, "layers": [spec.start, spec.end], "embed": spec.embed, "head": spec.head,
                         "compute_ms": round(total, 3)})  # fmt: skip
        return rows

    def _by_node(self) -> dict[str, list[StageSpec]]:
        out: dict[str, list[StageSpec]] = {}
        for node, spec in self.layout:
            out.setdefault(node, []).append(spec)
        return out

    def _layout_json(self) -> list[dict[str, Any]]:
        return [{"node": n, "layers": [s.start, s.end], "embed": s.embed, "head": s.head} for n, s in self.layout]


class DeviceServer:
    """Adapts a `DeviceEngine` to `edgellm.net.rpc.NodeHandler`: a device serves Generate, not stages."""

    def __init__(self, engine: DeviceEngine) -> None:
        self.engine = engine

    def forward(self, frame: bytes) -> bytes:
        raise ConfigError(f"node {self.engine.name} is the device; it runs no stage for peers")

    def close(self, frame: bytes) -> None:
        raise ConfigError(f"node {self.engine.name} is the device; it holds no sessions for peers")

    def train(self, frame: bytes) -> bytes:
        raise ConfigError(
            f"node {self.engine.name} is the device; devices train with `edgellm finetune`, not for peers"
        )

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def generate(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.engine.generate(request)

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.engine.control(request)
