"""The control ops a node answers for `edgellm profile`: its compute costs, and probes of any link it has.

- `profile_compute` (`schemes`, `prompt_tokens`, `context_tokens`): this node's costs per weight scheme
  (edgellm.deploy.compute_profile), every time multiplied by its emulated `compute_scale`, with the memory the
  planner adds up: `base_bytes` (the process's resident memory less the weights it holds, measured after the
  timing, once every scheme's loading code is resident: Python, torch, gRPC, the tokenizer on a device), `activation_bytes` (the fixed part of a prefill of
  `max_context` tokens) and `kv_bytes_per_token_per_layer` (the KV cache, plus the part of a prefill's
  activations that grows with the layers, per token of context: edgellm.deploy.memory_budget's estimate.
- `probe_link` also reaches a node this one has a declared link to but no hop (a link the current route does not
  use, which a plan may): a temporary hop through that link's emulation, closed after the probe.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgellm.deploy.compute_profile import measure_compute, scaled
from edgellm.deploy.memory_budget import activation_bytes
from edgellm.deploy.topology import Topology
from edgellm.model.stage import StageSpec
from edgellm.split.budget import release_freed_memory, rss_bytes
from edgellm.split.control import ControlOps, Field, probe_link

PROFILE_FIELDS = {
    "schemes": Field(list, required=True),
    "prompt_tokens": Field(int, default=64),
    "context_tokens": Field(int, default=64),
    "max_context": Field(int),  # the deployment's, to size activations (default: this node's)
}


def register_profile_ops(
    ops: ControlOps,
    topology: Topology,
    name: str,
    model_dir: Path,
    model_config: Any,
    held_weight_bytes: Callable[[], int],
    max_context: int,
    connect: Callable[[str], Any],
    hops: Callable[[], dict[str, Any]],
) -> None:
    """Add `profile_compute` and the wider `probe_link` to node `name`'s ops.

    `held_weight_bytes()` is what the node's stages hold now; `connect(to)` opens a hop through the declared
    link to `to`; `hops()` are the node's current hops by receiver.
    """
    node = topology.node(name)
    dtype = torch.float32

    def profile_compute(request: dict[str, Any]) -> dict[str, Any]:
        schemes = [str(s) for s in request["schemes"]]
        measured = measure_compute(model_dir, schemes, request["context_tokens"], request["prompt_tokens"])
        # After the measurement: its scratch stages are freed and handed back, and the code every scheme's
        # loading imports (quantized kernels, file readers) is now resident, as in a node that runs the plan.
        release_freed_memory()
        base = max(rss_bytes() - held_weight_bytes(), 0)
        context = request["max_context"] or max_context
        fixed = activation_bytes(model_config, [StageSpec(0, 1)], context, dtype)
        one_more = activation_bytes(model_config, [StageSpec(0, 2)], context, dtype) - fixed
        out = scaled(measured, node.emulation.compute_scale)
        out["kv_bytes_per_token_per_layer"] += one_more // context
        out.update(role=node.role, threads=node.threads, emulated=node.emulation.to_json(), base_bytes=base,
                   activation_bytes=fixed - one_more, max_context=context)  # fmt: skip

        return out

    def probe_any(request: dict[str, Any]) -> dict[str, Any]:
        to = request["to"]
        current = hops().get(to)
        if current is not None and hasattr(current, "probe"):
            return probe_link(name, current, request["sizes"], request["repeats"])
        topology.link_between(name, to)  # a ConfigError naming the missing link
        hop = connect(to)
        try:
            return probe_link(name, hop, request["sizes"], request["repeats"])
        finally:
            hop.shutdown()

    ops.register("profile_compute", profile_compute, PROFILE_FIELDS)
    ops.register("probe_link", probe_any, {"to": Field(str, required=True), "sizes": Field(list, default=[64, 65536]),
                                           "repeats": Field(int, default=3)})  # fmt: skip
