"""The device's hop to stages that have replicas: it routes each session, and fails over when a replica dies.

`ReplicaHop` stands where the device's pipeline would have one hop to a server (chain mode: the first server,
which forwards along the route; star mode: one per server). A new session gets a route, one replica per stage
position (`ReplicaTable.route`: by measured latency and load); every later request of the session follows it (in
chain mode the route's tail rides in the request, so each server forwards to the chosen replica of the next
stage). When a call fails for a reason that is a node's fault (unreachable, past its deadline, an internal error,
a failure relayed from a node behind), the hop probes the route's nodes, marks the ones that do not answer down,
forgets the session, and raises `SessionError`: the generator (`edgellm.split.generator`) then replays the
session's inputs on a fresh route that avoids them, and the answer goes on with the tokens it would have had.
Down replicas are probed again every `retry_s` at the next new session; one that answers rejoins.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgellm.errors import BusyError, InputError, PeerError, SessionError
from edgellm.failover.replicas import ReplicaTable
from edgellm.net.messages import CloseSession, ForwardReply, ForwardRequest

log = logging.getLogger(__name__)

Probe = Callable[[str], bool]  # node name -> whether it answers now (a short Info call)
# A route that failed although every node answers: most likely a node's channel to a peer that just came back,
# still in gRPC's reconnect backoff (capped at 250 ms: `edgellm.net.channel.RECONNECT`); wait that out once.
STALE_CHANNEL_WAIT_S = 0.3


class ReplicaHop:
    """One hop of the device's pipeline over stage positions with replicas.

    Args:
        name: for traces and reports.
        table: the positions this hop covers and their replicas (chain mode: every server position; star: one).
        hops: a hop from the device to each replica of the table's first position (route-less: the route of
            each request is passed on).
        probe: whether a node answers now.
    """

    def __init__(self, name: str, table: ReplicaTable, hops: Mapping[str, Any], probe: Probe) -> None:
        missing = set(table.groups[0]) - set(hops)
        if missing:
            raise ValueError(f"no hop to replica(s) {sorted(missing)}")
        self.name = name
        self.table = table
        self.hops = dict(hops)
        self.probe = probe
        self.failovers: list[dict[str, Any]] = []  # every failure handled, in order
        self._routes: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def forward(self, request: ForwardRequest) -> ForwardReply:
        route = self._route_of(request)
        start = time.perf_counter()
        try:
            reply = self.hops[route[0]].forward(dataclasses.replace(request, route=route[1:]))
        except (SessionError, BusyError, InputError):
            raise  # the session is gone (replayed as it is), a node is full, or the request is bad: no node died
        except PeerError as exc:
            self._fail_over(request.session, route, exc, (time.perf_counter() - start) * 1e3)
        self._observe(route, reply)
        return reply

    def shutdown(self) -> None:
        """Close every replica's channel and the probes' (gRPC channels left to the garbage collector can hang
        the interpreter's exit)."""
        for hop in self.hops.values():
            getattr(hop, "shutdown", lambda: None)()
        getattr(self.probe, "shutdown", lambda: None)()

    def close(self, request: CloseSession) -> None:
        with self._lock:
            route = self._routes.pop(request.session, None)
            if route is not None:
                self.table.closed(route)
        if route is not None:
            self.hops[route[0]].close(dataclasses.replace(request, route=route[1:]))

    def open_routes(self) -> dict[str, tuple[str, ...]]:
        """session -> the replicas it runs on, for every session open on this hop."""
        with self._lock:
            return dict(self._routes)

    def report(self) -> dict[str, Any]:
        """Replicas (up, load, latency, failures, rejoins) and the failovers so far."""
        with self._lock:
            return {"replicas": self.table.report(), "failovers": list(self.failovers), "open": len(self._routes)}

    def _route_of(self, request: ForwardRequest) -> tuple[str, ...]:
        if request.new_session:
            self._rejoin()
            with self._lock:
                old = self._routes.pop(request.session, None)
                if old is not None:
                    self.table.closed(old)
                route = self.table.route()
                self._routes[request.session] = route
                self.table.opened(route)
            return route
        with self._lock:
            route = self._routes.get(request.session)  # type: ignore[assignment]
        if route is None:
            raise SessionError(f"{self.name}: session {request.session} has no route (its replica failed)")
        return route

    def _rejoin(self) -> None:
        with self._lock:
            due = self.table.due_for_probe()
        for name in due:
            if self.probe(name):
                with self._lock:
                    self.table.rejoined(name)
                log.info("replica %s answers again: it rejoins", name)

    def _fail_over(self, session: str, route: tuple[str, ...], exc: PeerError, call_ms: float) -> None:
        """Mark the route's nodes that no longer answer down, forget the session, raise SessionError."""
        dead = [name for name in route if not self.probe(name)]
        with self._lock:
            for name in dead:
                self.table.failed(name, str(exc))
            if self._routes.get(session) == route:
                del self._routes[session]
                self.table.closed(route)
            event = {"session": session, "route": list(route), "down": dead, "failed_call_ms": round(call_ms, 3),
                     "error": str(exc)[:300]}  # fmt: skip
            self.failovers.append(event)
        if len(route) > 1 or not dead:  # release what the live nodes of the old route hold (best effort)
            self._close_quietly(session, route)
        if not dead:
            time.sleep(STALE_CHANNEL_WAIT_S)
        log.warning("%s: route %s failed (%s); down: %s", self.name, "->".join(route), exc, dead or "none")
        raise SessionError(
            f"{self.name}: the session's route {'->'.join(route)} failed ({exc}); "
            f"{'down: ' + ', '.join(dead) if dead else 'every node still answers'}"
        ) from exc

    def _close_quietly(self, session: str, route: tuple[str, ...]) -> None:
        try:
            self.hops[route[0]].close(CloseSession(session, route=route[1:]))
        except Exception as exc:  # noqa: BLE001 - a dead node cannot close; the live ones expire it when idle
            log.debug("closing %s on %s: %s", session, route, exc)

    def _observe(self, route: tuple[str, ...], reply: ForwardReply) -> None:
        """Each route node's time on this call (its compute and the wire into it), from the reply's traces."""
        with self._lock:
            for trace in reply.trace:
                if trace.node in route:
                    self.table.observe(trace.node, trace.compute_ms + trace.wire_ms)
