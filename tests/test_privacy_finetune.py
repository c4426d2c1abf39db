"""`edgellm finetune` with every defence on, end to end through real server and client processes: the smashed data
and the returned gradients noised on each device, DP-FedAvg at each round, each device's ledger in the report."""

from __future__ import annotations

import math

import pytest
from test_finetune import COMMON, finetune, topology

pytestmark = pytest.mark.multiprocess


def test_a_federated_split_run_with_every_defence_reports_each_devices_budget(tiny_chat_dir, tmp_path):
    topo = topology(tiny_chat_dir, tmp_path, servers=1)
    dp = ["--dp-clip", "4", "--dp-noise", "0.3", "--dp-grad-noise", "0.05", "--dp-fedavg-clip", "1",
          "--dp-fedavg-noise", "0.5", "--dp-seed", "1"]  # fmt: skip
    args = ["--topology", str(topo), "--steps", "4", "--clients", "2", "--aggregate-every", "2",
            "--output", str(tmp_path / "run"), *COMMON, *dp]  # fmt: skip
    result = finetune(args, tmp_path / "home")
    assert sorted(result["privacy"]) == ["0", "1"]
    for ledgers in result["privacy"].values():
        assert set(ledgers) == {"smashed_data", "gradients", "dp_fedavg"}
        for ledger in ledgers.values():
            assert ledger["releases"] and math.isfinite(ledger["epsilon"]) and ledger["epsilon"] > 0
        assert ledgers["smashed_data"]["noise_multiplier"] == 0.3
    assert all(len(losses) == 4 and all(math.isfinite(x) for x in losses) for losses in result["losses"].values())
