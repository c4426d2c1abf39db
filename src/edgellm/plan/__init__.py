"""The control plane's pure core: profiles in, plans out (cost model, exact optimizer, re-plan policy)."""

from edgellm.plan.cost import (
    PlanCost,
    check,
    decode_ms,
    evaluate,
    memory_bytes,
    ppl_increase_pct,
    throughput_tok_s,
    ttft_ms,
)
from edgellm.plan.instance import CodecCost, Instance, LinkCaps, ModelDims, NodeCaps, SchemeCost
from edgellm.plan.optimizer import InfeasiblePlan, Solution, benchmark_instance, solve
from edgellm.plan.placement import Objective, Plan, StageAssign
from edgellm.plan.replan import LinkEstimate, LinkMonitor, LinkObservation, should_migrate, update_link

__all__ = [
    "CodecCost",
    "InfeasiblePlan",
    "Instance",
    "LinkCaps",
    "LinkEstimate",
    "LinkMonitor",
    "LinkObservation",
    "ModelDims",
    "NodeCaps",
    "Objective",
    "Plan",
    "PlanCost",
    "SchemeCost",
    "Solution",
    "StageAssign",
    "benchmark_instance",
    "check",
    "decode_ms",
    "evaluate",
    "memory_bytes",
    "ppl_increase_pct",
    "should_migrate",
    "solve",
    "throughput_tok_s",
    "ttft_ms",
    "update_link",
]
