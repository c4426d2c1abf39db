"""The `--engine flower` options of `edgellm finetune`: Flower's strategy, client sampling and simulation."""

from __future__ import annotations

import argparse
from typing import Any

from edgellm.flower.settings import STRATEGIES, FlowerSettings


def add_flower_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Flower (--engine flower: the devices run as Flower ClientApps on its simulation engine, a Flower "
        "ServerApp aggregates their adapters; docs/TRAINING.md has the multi-machine deployment)"
    )
    group.add_argument(
        "--engine",
        choices=["default", "flower"],
        default="default",
        help="default: one process per device and FedAvg rounds at the first server; flower: Flower's "
        "simulation engine runs the devices and a Flower strategy aggregates (default: default)",
    )
    group.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default="fedavg",
        help="; ".join(f"{k}: {v}" for k, v in STRATEGIES.items()) + " (default: fedavg; with the DP-FedAvg "
        "options: DP-FedAvg)",
    )
    group.add_argument(
        "--fraction", type=float, default=1.0, help="fraction of the devices sampled per round (default: 1)"
    )
    group.add_argument(
        "--min-clients", type=int, default=1, metavar="N", help="at least N devices per round (default: 1)"
    )
    group.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's proximal weight (default: 0.01)")
    group.add_argument("--server-lr", type=float, default=1e-2, help="FedAdam's server learning rate (default: 0.01)")
    group.add_argument(
        "--cpus-per-client",
        type=float,
        default=1.0,
        metavar="C",
        help="cores the simulation reserves per device: cores / C devices train at once (default: 1)",
    )
    group.add_argument(
        "--print-run-config",
        action="store_true",
        help="print the run config (plan and flower, as TOML) that runs this job on Flower's deployment engine: "
        "the FILE of `flwr run examples/flower CONNECTION --run-config FILE` (examples/flower/README.md); and exit",
    )


def flower_settings(args: argparse.Namespace) -> FlowerSettings:
    return FlowerSettings(
        strategy=args.strategy,
        fraction=args.fraction,
        min_clients=args.min_clients,
        proximal_mu=args.proximal_mu,
        server_lr=args.server_lr,
        cpus_per_client=args.cpus_per_client,
    )


def flower_used(args: argparse.Namespace) -> bool:
    """Whether a Flower-only option was set without `--engine flower` (they would be ignored)."""
    defaults: dict[str, Any] = {"strategy": "fedavg", "fraction": 1.0, "min_clients": 1, "proximal_mu": 0.01,
                                "server_lr": 1e-2, "cpus_per_client": 1.0, "print_run_config": False}  # fmt: skip
    return any(getattr(args, k) != v for k, v in defaults.items())
