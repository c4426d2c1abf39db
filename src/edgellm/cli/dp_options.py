"""The `--dp-*` options of `generate`, `run`, `demo` and `finetune`: differential privacy on what leaves the device.

Building the parser imports nothing heavy (tests/test_cli_light.py); `dp_config` imports the library.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from edgellm.errors import ConfigError

if TYPE_CHECKING:
    from edgellm.privacy.config import DPConfig


def add_dp_arguments(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """`--dp-clip C --dp-noise Z [--dp-delta D] [--dp-max-epsilon E] [--dp-seed N]`; with `training`,
    `--dp-grad-noise C` and DP-FedAvg's `--dp-fedavg-clip S --dp-fedavg-noise Z` too."""
    group = parser.add_argument_group(
        "differential privacy (docs/TRAINING.md, docs/PRIVACY.md)",
        "Off unless --dp-clip and --dp-noise are given. The device clips each row of the smashed data it sends "
        "(one token position's hidden state) to L2 norm C and adds Gaussian noise of std Z*C; an RDP accountant "
        "(Opacus) counts every row sent as one release and reports epsilon at --dp-delta in the JSON's `privacy`. "
        "The guarantee is per row of smashed data, not per input token.",
    )
    group.add_argument("--dp-clip", type=float, default=None, metavar="C",
                       help="clip each row of the smashed data the device sends to L2 norm C (needs --dp-noise)")  # fmt: skip
    group.add_argument("--dp-noise", type=float, default=None, metavar="Z",
                       help="noise multiplier: Gaussian noise of std Z*C on every value sent; 0 clips only (no "
                       "privacy: epsilon is infinite) (needs --dp-clip)")  # fmt: skip
    group.add_argument("--dp-delta", type=float, default=None, metavar="D",
                       help="the delta epsilon is reported at (default: 1e-5)")  # fmt: skip
    group.add_argument("--dp-max-epsilon", type=float, default=None, metavar="E",
                       help="privacy budget: refuse (exit 2) before sending anything that would take epsilon past E "
                       "(default: none, epsilon is only reported)")  # fmt: skip
    group.add_argument("--dp-seed", type=int, default=None, metavar="N",
                       help="seed the noise, for reproducible runs; whoever knows it can remove the noise "
                       "(default: drawn from the operating system)")  # fmt: skip
    if not training:
        return
    group.add_argument("--dp-grad-noise", type=float, default=None, metavar="C",
                       help="also clip each row of the gradient the device sends back to the last server to L2 "
                       "norm C and add noise of std Z*C (it carries the labels' information); default: off")  # fmt: skip
    group.add_argument("--dp-fedavg-clip", type=float, default=None, metavar="S",
                       help="DP-FedAvg (--clients 2+): clip each client's device-side adapter update to L2 norm S "
                       "(needs --dp-fedavg-noise)")  # fmt: skip
    group.add_argument("--dp-fedavg-noise", type=float, default=None, metavar="Z",
                       help="DP-FedAvg: the aggregator adds Gaussian noise of std Z*S/n to the mean of the n "
                       "clipped updates; one release per round (needs --dp-fedavg-clip)")  # fmt: skip


def dp_fields(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `--dp-*` options as a DP object's short keys (a generate request's `dp`), or None when DP is off.

    Raises:
        ConfigError: --dp-clip without --dp-noise or the reverse, or another --dp-* option without them.
    """
    clip, noise = args.dp_clip, args.dp_noise
    extras = {"delta": args.dp_delta, "max_epsilon": args.dp_max_epsilon, "seed": args.dp_seed,
              "grad_clip": getattr(args, "dp_grad_noise", None)}  # fmt: skip
    if clip is None and noise is None:
        fedavg = getattr(args, "dp_fedavg_clip", None) is not None or getattr(args, "dp_fedavg_noise", None) is not None
        given = [key for key, value in extras.items() if value is not None and (key == "grad_clip" or not fedavg)]
        if given:
            names = ", ".join(
                "--dp-grad-noise" if key == "grad_clip" else f"--dp-{key.replace('_', '-')}" for key in given
            )
            raise ConfigError(f"{names} need(s) differential privacy on: add --dp-clip C --dp-noise Z")
        return None
    if clip is None or noise is None:
        raise ConfigError("differential privacy needs both --dp-clip C and --dp-noise Z")
    return {"clip": clip, "noise": noise, **{key: value for key, value in extras.items() if value is not None}}


def dp_config(args: argparse.Namespace) -> DPConfig | None:
    """`dp_fields` as a validated config (imports the library). Raises ConfigError on a bad value."""
    fields = dp_fields(args)
    if fields is None:
        return None
    from edgellm.privacy.config import DPConfig

    return DPConfig.from_json(fields, "--dp-* options")


def dp_fedavg_config(args: argparse.Namespace) -> DPConfig | None:
    """DP-FedAvg's `--dp-fedavg-clip/--dp-fedavg-noise` (with --dp-delta, --dp-max-epsilon, --dp-seed), or None.

    Raises:
        ConfigError: one of the pair without the other, or a bad value.
    """
    clip, noise = args.dp_fedavg_clip, args.dp_fedavg_noise
    if clip is None and noise is None:
        return None
    if clip is None or noise is None:
        raise ConfigError("DP-FedAvg needs both --dp-fedavg-clip S and --dp-fedavg-noise Z")
    from edgellm.privacy.config import DPConfig

    extras = {"delta": args.dp_delta, "max_epsilon": args.dp_max_epsilon, "seed": args.dp_seed}
    fields = {"clip": clip, "noise": noise, **{key: value for key, value in extras.items() if value is not None}}
    return DPConfig.from_json(fields, "--dp-fedavg-* options")


def privacy_line(ledger: dict[str, Any]) -> str:
    """`smashed_data: epsilon 12.3 at delta 1e-05 after 40 rows (clip 4, noise x1)`: one ledger of a report."""
    eps = "inf (no noise)" if ledger["epsilon"] is None else f"{ledger['epsilon']:.4g}"
    budget = ledger["budget"]["max_epsilon"]
    return (
        f"{ledger['mechanism']}: epsilon {eps} at delta {ledger['delta']:g} after {ledger['releases']} "
        f"{ledger['unit']}(s) (clip {ledger['clip_norm']:g}, noise x{ledger['noise_multiplier']:g}"
        + (f", budget {budget:g})" if budget is not None else ")")
    )
