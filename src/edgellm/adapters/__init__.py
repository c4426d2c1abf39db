"""Many LoRA adapters on one base: a per-stage adapter store and mixed-adapter batches.

    store = AdapterStore(stage)
    store.load_dir("alice", Path("adapters/alice")); store.load("bob", config, tensors)
    a, b = store.acquire("alice"), store.acquire("bob")
    with store.rows([a, b, -1]):          # one batch: row 0 with alice's adapter, row 1 with bob's, row 2 without
        h = stage(x, positions)

Nothing is merged: each targeted linear becomes a `MultiLoraLinear` over its untouched base, adding per-row
low-rank deltas gathered from stacked adapters (`bgmv_delta`, as Punica's BGMV and S-LoRA).
"""

from edgellm.adapters.bgmv import RowPlan, add_delta, bgmv_delta, plan_rows
from edgellm.adapters.multi_linear import MultiLoraLinear
from edgellm.adapters.stage_adapter import StageAdapter, stage_adapter
from edgellm.adapters.store import AdapterStore

__all__ = [
    "AdapterStore",
    "MultiLoraLinear",
    "RowPlan",
    "StageAdapter",
    "add_delta",
    "bgmv_delta",
    "plan_rows",
    "stage_adapter",
]
