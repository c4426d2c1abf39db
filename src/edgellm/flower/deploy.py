"""`edgellm finetune --engine flower --print-run-config`: the run config that runs a job on Flower's deployment
engine (SuperLink and SuperNodes on several machines): the same plan and settings the simulation uses."""

from __future__ import annotations

import json

from edgellm.train.coordinator import FinetuneJob, plan_to_dict, prepare

from .settings import FlowerSettings, check_flower_config


def run_config(job: FinetuneJob, settings: FlowerSettings) -> dict[str, str]:
    """`{"plan": JSON, "flower": JSON}`: the ServerApp's run config (`edgellm.flower.server_app.app`)."""
    check_flower_config(job.plan.config, settings)
    plan = prepare(job).plan  # records the run in --output, gives it a launch id
    return {"plan": json.dumps(plan_to_dict(plan)), "flower": settings.to_json()}


def toml_lines(config: dict[str, str]) -> str:
    """The `[tool.flwr.app.config]` table of the app's pyproject.toml holding `config`."""
    return "[tool.flwr.app.config]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items())


def print_run_config(job: FinetuneJob, settings: FlowerSettings) -> int:
    print(toml_lines(run_config(job, settings)), end="")
    return 0
