"""A device engine for serving the whole model in this process (`edgellm.deploy.device_engine`: a deployment's).

Every stage host batches the generations that run at once (`edgellm.split.host`), and every stage holds
its layers' part of the LoRA adapters a generation names (`edgellm.adapters`, `AdapterCatalog`).
"""

from __future__ import annotations

from pathlib import Path

from edgellm.adapters import AdapterStore
from edgellm.errors import ConfigError
from edgellm.net.direct_hop import LocalHop
from edgellm.serve.adapter_catalog import AdapterCatalog
from edgellm.serve.device import DeviceEngine
from edgellm.serve.local_engine import LocalSplitConfig, load_split
from edgellm.split.adapter_ops import LocalAdapterTarget
from edgellm.split.host import SessionLimits, StageHost
from edgellm.split.one_process import stage_label


def adapter_budget(adapter_budget_mb: float | None) -> int | None:
    if adapter_budget_mb is not None and adapter_budget_mb < 0:
        raise ConfigError(f"--adapter-budget-mb must be >= 0, got {adapter_budget_mb}")
    return None if adapter_budget_mb is None else int(adapter_budget_mb * 1e6)


def local_device_engine(
    model: str,
    quant: str = "none",
    dtype: str = "fp32",
    engine: str = "fast",
    threads: int | None = None,
    adapters_dir: Path | None = None,
    adapter_budget_mb: float | None = None,
    limits: SessionLimits = SessionLimits(),
) -> DeviceEngine:
    """The whole model as one stage in this process (no split), with its adapter store.

    Raises:
        ConfigError/ModelError: as `load_split`; a missing adapter directory; a negative budget.
    """
    budget = adapter_budget(adapter_budget_mb)
    loaded = load_split(LocalSplitConfig(model, (), "server", dtype, threads, quant, engine))
    (stage,) = loaded.stages  # no cuts, head on the one stage: embedding, every layer and the head
    store = AdapterStore(stage)
    host = StageHost(stage, limits, adapters=store)
    name = "device"
    hop = LocalHop(f"{name}/{stage_label(stage.spec)}", host)
    info = {"model": model, "mode": "local", "dtype": dtype, "quant": quant, "engine": stage.engine,
            "max_context": limits.max_context or stage.max_length, "cuts": [], "head": "device",
            "route": [name]}  # fmt: skip
    device = DeviceEngine(name, loaded.tokenizer, loaded.model_config, [hop], [(name, stage.spec)], info)
    device.attach_adapters(AdapterCatalog([LocalAdapterTarget(hop.name, host)], adapters_dir, budget))
    device.drafts = loaded.drafts
    return device
