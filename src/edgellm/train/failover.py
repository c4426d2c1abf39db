"""A fine-tuning client that survives the loss of a server: it goes on through a replica of the dead node's stage
from the last checkpoint.

A topology may give a server stage replicas (`replica_of`, `edgellm.failover`). The client trains through one
node per stage, the first that answers; when a step, a round or a checkpoint fails because a node is gone, the
nodes that no longer answer are avoided, and the run starts again from the newest checkpoint the device finished
(which every server also wrote, under the stage's folder: a replica reads its primary's). Since the batches and
dropout masks are functions of the seed and the step, the loss curve goes on as if nothing had failed. Runs with
one client only: with several, the others would leave the FedAvg round; the coordinator's restart with `--resume`
(every client from the newest common checkpoint) is the remedy there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from edgellm.deploy.replica_hops import prober
from edgellm.deploy.topology import Topology, load_topology
from edgellm.errors import PeerError
from edgellm.train.client import ClientPlan, Emit, latest_checkpoint, run_client

log = logging.getLogger(__name__)

MAX_FAILOVERS = 2  # per run


def choose_servers(topology: Topology, down: set[str], probe: Callable[[str], bool]) -> tuple[str, ...]:
    """One node per server stage: the first of its replicas (primary first) not known down that answers; the
    primary when none does (its failure then says what is wrong)."""
    chosen = []
    for server in topology.servers:
        live = (r.name for r in topology.replicas(server.name) if r.name not in down and probe(r.name))
        chosen.append(next(live, server.name))
    return tuple(chosen)


def run_client_failover(plan: ClientPlan, emit: Emit, probe: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """`run_client`, failing over to stage replicas (at most `MAX_FAILOVERS` times) when the topology has some
    and the run has one client; otherwise `run_client` as it is. A failover emits a `failover` event."""
    topology = load_topology(plan.topology) if plan.topology is not None else None
    if topology is None or not topology.has_replicas or plan.config.clients > 1:
        return run_client(plan, emit)
    probe = probe if probe is not None else prober(topology, topology.device.name)
    down: set[str] = set()
    for failover in range(MAX_FAILOVERS + 1):
        servers = choose_servers(topology, down, probe)
        try:
            return run_client(replace(plan, servers=servers), emit)
        except PeerError as exc:
            dead = [name for name in servers if not probe(name)]
            if not dead or failover == MAX_FAILOVERS:
                raise
            down.update(dead)
            step = latest_checkpoint(plan.output / f"client-{plan.client}")
            log.warning("training through %s failed (%s): %s down; resuming from step %d on a replica",
                        "->".join(servers), exc, ", ".join(dead), step)  # fmt: skip
            emit({"event": "failover", "client": plan.client, "down": dead, "resume_step": step,
                  "error": str(exc)[:300]})  # fmt: skip
            # a new attempt: the replica's adapter slot is created and loaded from the checkpoint
            plan = replace(plan, resume=True, resume_step=None, attempt=f"{plan.attempt}-failover{failover + 1}")
    raise AssertionError("unreachable")
