"""`edgellm finetune --engine flower --print-run-config`: the run config that runs a job on Flower's deployment
engine (SuperLink and SuperNodes on several machines): the same plan and settings the simulation uses.

Its output is a TOML file of run-config overrides for the app in examples/flower (`flwr run examples/flower
CONNECTION --run-config FILE`); the lines also fit under an app's own `[tool.flwr.app.config]` table."""

from __future__ import annotations

import json
from dataclasses import replace

from edgellm.train.coordinator import FinetuneJob, plan_to_dict, prepare

from .settings import FlowerSettings, check_flower_config


def run_config(job: FinetuneJob, settings: FlowerSettings) -> dict[str, str]:
    """`{"plan": JSON, "flower": JSON}`: the ServerApp's run config (`edgellm.flower.server_app.app`)."""
    check_flower_config(job.plan.config, settings)
    plan = prepare(job).plan  # records the run in --output, gives it a launch id
    # Absolute paths: the ServerApp and ClientApps run in processes of Flower's, in directories of their own.
    data = plan.config.data
    plan = replace(
        plan, output=plan.output.resolve(), topology=plan.topology and plan.topology.resolve(),
        init_adapter=plan.init_adapter and plan.init_adapter.resolve(),
        config=replace(plan.config, data=replace(data, path=data.path and data.path.resolve())),
    )  # fmt: skip
    return {"plan": json.dumps(plan_to_dict(plan)), "flower": settings.to_json()}


def toml_lines(config: dict[str, str]) -> str:
    """`config` as TOML: the `--run-config` file of `flwr run` (and the body of a `[tool.flwr.app.config]`)."""
    head = "# run config for `flwr run APP CONNECTION --run-config THIS_FILE` (examples/flower/README.md)\n"
    return head + "".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items())


def print_run_config(job: FinetuneJob, settings: FlowerSettings) -> int:
    print(toml_lines(run_config(job, settings)), end="")
    return 0
