"""The device node's engine: takes prompts (raw text never leaves the device), drives the split pipeline."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.errors import ConfigError
from edgellm.model.prompt import TextStream, encode_prompt, stop_ids
from edgellm.model.sampling import SamplingConfig
from edgellm.model.stage import StageSpec
from edgellm.serve.report import link_report, node_compute, timing_report
from edgellm.split.generator import GenerationConfig, Generator
from edgellm.split.one_process import stage_label
from edgellm.split.pipeline import Hop, Pipeline

# Field -> (type, default) of a Generate request.
GENERATE_FIELDS: dict[str, tuple[type, Any]] = {
    "prompt": (str, None),
    "chat": (bool, True),
    "max_new_tokens": (int, 64),
    "greedy": (bool, True),
    "temperature": (float, 1.0),
    "top_k": (int, 0),
    "top_p": (float, 1.0),
    "seed": (int, 0),
}


@dataclass(frozen=True)
class GenerateRequest:
    """A prompt and how to decode it, as sent to a device node."""

    prompt: str
    chat: bool = True
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()

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
            if value is None:
                raise ConfigError(f"generate request needs {name!r}")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"generate field {name!r} must be {kind.__name__}, got {type(value).__name__}")
            values[name] = value
        sampling = SamplingConfig(
            values["greedy"], values["temperature"], values["top_k"], values["top_p"], values["seed"]
        )
        return cls(values["prompt"], values["chat"], values["max_new_tokens"], sampling)


class DeviceEngine:
    """Generates on a device node: local stages (first, and the head if on the device) plus remote hops.

    Args:
        name: the device node's name.
        tokenizer, model_config: of the deployed model.
        hops: the pipeline's hops in order (local ones are `LocalHop`s).
        layout: (node name, stage spec) of every stage of the deployment, in execution order.
        info: static fields for the report (model, mode, ...).
    """

    def __init__(
        self,
        name: str,
        tokenizer: Any,
        model_config: Any,
        hops: Sequence[Hop],
        layout: Sequence[tuple[str, StageSpec]],
        info: dict[str, Any],
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.hops = list(hops)
        self.layout = list(layout)
        self._info = info
        self._lock = threading.Lock()  # one generation at a time: a device serves its own user

    def info(self) -> dict[str, Any]:
        return {**self._info, "name": self.name, "role": "device", "layout": self._layout_json()}

    def generate(self, data: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Events: {"token": id, "text": delta} per token, then {"report": {...}}."""
        request = GenerateRequest.from_json(data)
        prompt_ids = encode_prompt(self.tokenizer, request.prompt, request.chat)
        config = GenerationConfig(request.max_new_tokens, request.sampling, stop_ids(self.tokenizer, self.model_config))
        with self._lock:
            pipeline = Pipeline(self.hops)
            generator = Generator(pipeline, config)
            stream = TextStream(self.tokenizer)
            for step in generator.stream(torch.tensor([prompt_ids])):
                yield {"token": step.tokens[0], "text": stream.push(step.tokens[0])}
            assert generator.result is not None
            yield {"report": self._report(prompt_ids, generator, pipeline)}

    def _report(self, prompt_ids: list[int], generator: Generator, pipeline: Pipeline) -> dict[str, Any]:
        result = generator.result
        assert result is not None
        new_tokens = result.new_tokens[0]
        remote = node_compute(pipeline.traces)
        local = [s for hop, s in zip(self.hops, pipeline.stats) if hop.name.startswith(f"{self.name}/")]
        per_token = [s.decode_compute_ms_per_call for s in local]
        remote[self.name] = (
            sum(s.compute_ms for s in local),
            sum(p for p in per_token if p is not None) if any(p is not None for p in per_token) else None,
        )
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
                }
            )
        return {
            **self._info,
            "prompt_tokens": prompt_ids,
            "new_tokens": new_tokens,
            "text": self.tokenizer.decode(new_tokens, skip_special_tokens=True),
            "nodes": nodes,
            "links": link_report(pipeline.traces),
            "stages": self._stage_rows(pipeline, remote),
            **timing_report(result),
        }

    def _stage_rows(self, pipeline: Pipeline, remote: dict[str, tuple[float, float | None]]) -> list[dict[str, Any]]:
        """One row per stage of the deployment; a server holds one stage, so its node's compute is the stage's."""
        local = {hop.name.split("/", 1)[1]: s for hop, s in zip(self.hops, pipeline.stats) if "/" in hop.name}
        rows = []
        for node, spec in self.layout:
            stats = local.get(stage_label(spec)) if node == self.name else None
            total = stats.compute_ms if stats is not None else remote.get(node, (0.0, None))[0]
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
