"""The device node's engine: takes prompts (raw text never leaves the device), drives the split pipeline."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.model.prompt import TextStream, encode_messages, encode_prompt, stop_ids
from edgellm.model.sampling import SamplingConfig
from edgellm.model.stage import StageSpec
from edgellm.serve.conversation import Message, parse_messages
from edgellm.serve.migration import LiveMigration, local_compute, migration_rows, run_traces
from edgellm.serve.report import link_report, node_compute, timing_report
from edgellm.split.budget import rss_bytes, to_mb
from edgellm.split.control import Field, link_profiles, node_ops
from edgellm.split.generator import BetweenSteps, GenerationConfig, Generator
from edgellm.split.layout import Layout
from edgellm.split.one_process import stage_label
from edgellm.split.pipeline import Hop, Pipeline

log = logging.getLogger(__name__)

# Field -> (type, default) of a Generate request.
GENERATE_FIELDS: dict[str, tuple[type, Any]] = {
    "prompt": (str, None),
    "messages": (list, None),  # [{role, content}, ...] in the chat template, instead of a prompt
    "chat": (bool, True),
    "max_new_tokens": (int, 64),
    "greedy": (bool, True),
    "temperature": (float, 1.0),
    "top_k": (int, 0),
    "top_p": (float, 1.0),
    "seed": (int, 0),
    "repetition_penalty": (float, 1.0),
    "no_repeat_ngram": (int, 0),
}
PROMPT_FIELDS = ("prompt", "messages")
SAMPLING_FIELDS = ("greedy", "temperature", "top_k", "top_p", "seed", "repetition_penalty", "no_repeat_ngram")


MIGRATE_FIELDS = {  # the `migrate` control op: a `Layout`, and before which decode step (None: the next one)
    "cuts": Field(list, required=True), "route": Field(list, required=True), "quant": Field(dict),
    "head": Field(str), "at_step": Field(int), "device_embeds": Field(bool, default=False),
    "codecs": Field(dict),
}  # fmt: skip


@dataclass(frozen=True)
class GenerateRequest:
    """A prompt (or chat messages) and how to decode it, as sent to a device node."""

    prompt: str | None
    chat: bool = True
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    messages: tuple[Message, ...] | None = None  # the conversation to answer, when no `prompt`

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerateRequest:
        """Validate a request object; unknown fields and wrong types are errors.

        Raises:
            ConfigError: naming the field.
        """
        unknown = set(data) - set(GENERATE_FIELDS)
        if unknown:
            raise ConfigError(f"unknown generate fields {sorted(unknown)}; valid: {sorted(GENERATE_FIELDS)}")
        values: dict[str, Any] = {}
        for name, (kind, default) in GENERATE_FIELDS.items():
            value = data.get(name, default)
            if value is None and name in PROMPT_FIELDS:  # exactly one of them, checked below
                values[name] = None
                continue
            if value is None:
                raise ConfigError(f"generate request needs {name!r}")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"generate field {name!r} must be {kind.__name__}, got {type(value).__name__}")
            values[name] = value
        sampling = SamplingConfig(**{name: values[name] for name in SAMPLING_FIELDS})
        if (values["prompt"] is None) == (values["messages"] is None):
            raise ConfigError("generate request needs exactly one of 'prompt' and 'messages'")
        messages = None if values["messages"] is None else parse_messages(values["messages"])
        if messages is not None and not values["chat"]:
            raise ConfigError("generate field 'chat' must be true with 'messages' (they always use the chat template)")
        return cls(values["prompt"], values["chat"], values["max_new_tokens"], sampling, messages=messages)

    def prompt_ids(self, tokenizer: Any) -> list[int]:
        """The prompt's token ids: the messages in the chat template, or the prompt (wrapped in it if `chat`)."""
        if self.messages is not None:
            return encode_messages(tokenizer, [m.to_json() for m in self.messages])
        assert self.prompt is not None  # from_json allows exactly one of them
        return encode_prompt(tokenizer, self.prompt, self.chat)


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
        self._lock = threading.Lock()  # one generation at a time: a device serves its own user
        self.migration = migration
        self.node_status = node_status
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
        }

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
                self.migration.rebuilder.check(layout)
                start = time.perf_counter()
                self.migrate(layout)
                return {"migrated": True, "ms": round((time.perf_counter() - start) * 1e3, 3),
                        "layout": self._layout_json()}  # fmt: skip
            finally:
                self._lock.release()
        waiting = self.migration.queue(layout, at_step)
        return {"queued": True, "at_step": at_step, "waiting": waiting}

    def _between_steps(self, generator: Callable[[], Generator]) -> BetweenSteps | None:
        """The generation's hook: feed the controller the new traces, and migrate to a layout it or the control
        channel asks for."""
        migration = self.migration
        if migration is None:
            return None
        seen: list[Any] = [None, 0]  # the pipeline last observed, and how many of its traces

        def hook(step: int, fed: Sequence[Sequence[int]]) -> Pipeline | None:
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
            return self.migrate(layout)

        return hook

    def _linked_hops(self) -> dict[str, Hop]:
        return {hop.name: hop for hop in self.hops if hasattr(hop, "probe")}

    def generate(self, data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Events: {"token": id, "text": delta} per token, then {"report": {...}}."""
        request = GenerateRequest.from_json(data)
        prompt_ids = request.prompt_ids(self.tokenizer)
        config = GenerationConfig(request.max_new_tokens, request.sampling, stop_ids(self.tokenizer, self.model_config))
        with self._lock:
            while self.migration is not None and (waiting := self.migration.take_unscheduled()) is not None:
                self.migrate(waiting)  # asked for while the last generation was finishing
            generator = Generator(
                Pipeline(self.hops, layout=self._layout_json()), config, self._between_steps(lambda: generator)
            )
            stream = TextStream(self.tokenizer)
            for step in generator.stream(torch.tensor([prompt_ids])):
                yield {"token": step.tokens[0], "text": stream.push(step.tokens[0])}
            assert generator.result is not None
            yield {"report": self._report(prompt_ids, generator)}

    def _report(self, prompt_ids: list[int], generator: Generator) -> dict[str, Any]:
        result = generator.result
        assert result is not None
        new_tokens = result.new_tokens[0]
        traces = run_traces(generator)  # every pipeline's, without the migrations' replays
        remote = node_compute(traces)
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
                    "compute_ms_per_token": None if per_step is None else round(per_step, 3),
                    **status.get(node, {}),
                }
            )
        return {
            **self._info,
            "prompt_tokens": prompt_ids,
            "new_tokens": new_tokens,
            "text": self.tokenizer.decode(new_tokens, skip_special_tokens=True),
            "nodes": nodes,
            "links": link_report(traces),
            "link_emulation": link_profiles(self._linked_hops()),
            "stages": self._stage_rows(local, remote),
            "migrations": migration_rows(generator),
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
