"""Preflight of a running deployment (`edgellm check`): the pure verdict, from what the topology expects of each
node and what each node answered.

The I/O shell (`edgellm.deploy.survey`) asks every node for its `Info` and every node for its next hop's
(`ping_peer`), and predicts each node's memory from the model's config; `judge` compares, with no sockets, files
or torch, and `render` writes the table. Each problem is one `Fault`, a line naming the node; the exit code says
whose fault the worst one is:

- **2** for anything a retry cannot fix: a token that differs between this command and a node, or between two
  nodes; a process at a node's address that says it is another node; a role, layer range, model, mode, dtype or
  quantization that differs from the topology; a hop a node does not have; a node predicted over its memory budget;
- **3** when a node does not answer (down, unreachable, timed out), a node cannot reach its next hop, or a node
  fails its `Info` (its own error);
- **0** when none of these is found.

A mix of both exits 2: the configuration has to be fixed whatever the network does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MB = 1_000_000
CONFIG_KINDS = frozenset({"token", "peer-token", "name", "role", "layers", "topology", "route", "memory", "config"})
PEER_KINDS = frozenset({"down", "unreachable", "error"})
COMPARED_FIELDS = ("model", "mode", "dtype", "quant")  # Info fields compared with the topology, besides the layers


@dataclass(frozen=True)
class Part:
    """One stage a node runs: layers `[start, end)`, with the embedding and/or the head."""

    start: int
    end: int
    embed: bool = False
    head: bool = False

    def label(self) -> str:
        """`0-10+embed`, `10-20`, `head` (a head-only stage)."""
        if self.start == self.end and self.head and not self.embed:
            return "head"
        flags = ("+embed" if self.embed else "") + ("+head" if self.head else "")
        return f"{self.start}-{self.end}{flags}"


@dataclass(frozen=True)
class MemoryPlan:
    """A node's predicted memory, bytes: the runtime (an assumed typical value: the node measures its own), its
    stages' weights at their quantized size, one session's KV cache at `max_context`, a prefill's activations."""

    runtime_bytes: int
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    max_context: int

    @property
    def total_bytes(self) -> int:
        return self.runtime_bytes + self.weight_bytes + self.kv_bytes + self.activation_bytes


@dataclass(frozen=True)
class Expected:
    """What the topology says of one node.

    Attributes:
        name, role, address: as in the topology (address None: a device nothing can dial).
        parts: the stages it runs; None when the model's layer count is unknown here.
        fields: the `Info` fields it must report as the topology says (`COMPARED_FIELDS`).
        memory: its predicted need; None without the model's config.
        memory_mb: its budget, None for none.
        peers: the nodes it dials in the topology's mode (its next hop in a chain; every server from a star's device).
        problem: why its stages cannot be planned from this topology (a quantization that does not fit), else None.
    """

    name: str
    role: str
    address: str | None
    parts: tuple[Part, ...] | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    memory: MemoryPlan | None = None
    memory_mb: int | None = None
    peers: tuple[str, ...] = ()
    problem: str | None = None


@dataclass(frozen=True)
class Failure:
    """A call that failed: `kind` is `down` (no answer), `token` (the deployment token was refused), `refused`
    (bad input: the node refused the request) or `error` (the node failed); `relayed` when the failure began at a
    node behind the one called, whose own message is `message`."""

    kind: str
    message: str
    relayed: bool = False


@dataclass(frozen=True)
class Answer:
    """What one call returned: the node's `Info` (or, for a ping, the peer's, and how long the node's call took),
    or how the call failed."""

    info: Mapping[str, Any] | None = None
    failure: Failure | None = None
    ms: float | None = None


@dataclass(frozen=True)
class Fault:
    """One problem, as one line naming the node; `kind` decides the exit code (`CONFIG_KINDS`: 2, else 3)."""

    node: str
    kind: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """The check's outcome: every node's row (expected and answered), the pings, the faults, the exit code."""

    nodes: tuple[Expected, ...]
    answers: Mapping[str, Answer]
    pings: Mapping[tuple[str, str], Answer]
    faults: tuple[Fault, ...]

    @property
    def exit_code(self) -> int:
        if any(f.kind in CONFIG_KINDS for f in self.faults):
            return 2
        return 3 if self.faults else 0

    def status(self, node: str) -> str:
        """`ok`, or the kinds of the faults naming `node`."""
        kinds = list(dict.fromkeys(f.kind for f in self.faults if f.node == node))
        return ", ".join(kinds) if kinds else "ok"


def judge(nodes: Sequence[Expected], answers: Mapping[str, Answer], pings: Mapping[tuple[str, str], Answer]) -> Verdict:
    """Compare every node's answer, and every node's ping of its peers, with what the topology expects.

    `answers` holds the `Info` call of this command to each node (by the topology's name, at the topology's
    address); `pings` the `ping_peer` op of each node to each of its peers, by (sender, receiver).
    """
    faults: list[Fault] = []
    claims = _claims(nodes, answers)
    for node in nodes:
        reached_by = [s for (s, r), a in pings.items() if r == node.name and (a.info or {}).get("name") == r]
        faults += _node_faults(node, answers.get(node.name), claims, reached_by)
    serving = {n.name for n in nodes if _serves_as_itself(n, answers.get(n.name))}
    for (sender, receiver), answer in pings.items():
        if sender in serving:
            faults += _ping_faults(sender, receiver, answer, answers.get(receiver))
    return Verdict(tuple(nodes), dict(answers), dict(pings), tuple(faults))


def _claims(nodes: Sequence[Expected], answers: Mapping[str, Answer]) -> dict[str, list[str]]:
    """Node name -> the addresses whose process says it is that node."""
    claims: dict[str, list[str]] = {}
    for node in nodes:
        answer = answers.get(node.name)
        if node.address is not None and answer is not None and answer.info is not None:
            claims.setdefault(str(answer.info.get("name")), []).append(node.address)
    return claims


def _serves_as_itself(node: Expected, answer: Answer | None) -> bool:
    return answer is not None and answer.info is not None and answer.info.get("name") == node.name


def _node_faults(
    node: Expected, answer: Answer | None, claims: Mapping[str, list[str]], reached_by: Sequence[str]
) -> list[Fault]:
    """The faults of one node's own answer; `reached_by`: the nodes whose ping reached it, as itself."""
    out = [Fault(node.name, "config", f"node {node.name}: {node.problem}")] if node.problem else []
    if node.address is None:
        return [*out, Fault(node.name, "config", f"node {node.name} has no address: nothing can reach it")]
    where = f"node {node.name} at {node.address}"
    if answer is None:
        return out
    if answer.failure is not None:
        return out + _call_faults(node, where, answer.failure, reached_by)
    info = answer.info or {}
    claimed = info.get("name")
    if claimed != node.name:
        return [*out, Fault(node.name, "name", _name_message(node, claimed, claims))]
    out += _role_faults(node, info) + _layer_faults(node, info)
    differing = [key for key, value in node.fields.items() if key in info and info[key] != value]
    if differing:
        got = ", ".join(f"{key} {info[key]!r}" for key in differing)
        want = ", ".join(f"{node.fields[key]!r}" for key in differing)
        out.append(Fault(node.name, "topology", f"{where} runs {got}; this topology says {want} "
                         "(started with another topology file?)"))  # fmt: skip
    return out


def _call_faults(node: Expected, where: str, failure: Failure, reached_by: Sequence[str]) -> list[Fault]:
    if failure.kind == "token":
        text = f"{where} refused this command's deployment token: it was started with another token"
        return [Fault(node.name, "token", text)]
    if failure.kind == "down":
        text = failure.message
        if reached_by:  # a peer reaches it at the address its own topology gives: this one may be wrong
            text += (f"; yet node {' and '.join(reached_by)} reaches it, so this topology's address for it may be "
                     "wrong, or this machine cannot reach it")  # fmt: skip
        out = [Fault(node.name, "down", text)]
        if node.memory is not None and node.memory_mb is not None and node.memory.total_bytes > node.memory_mb * MB:
            out.append(Fault(node.name, "memory", f"node {node.name} is predicted to need "
                             f"{_mb(node.memory.total_bytes)} MB, over its memory_mb of {node.memory_mb}: it refuses "
                             "to start (quantize its stages, give it fewer layers, or lower max_context)"))  # fmt: skip
        return out
    return [Fault(node.name, "error", f"{where} failed its Info: {failure.message}")]


def _name_message(node: Expected, claimed: Any, claims: Mapping[str, list[str]]) -> str:
    text = (f"the process at {node.address} (node {node.name}'s address here) says it is node {claimed!r}: a wrong "
            f"address in this topology, or a node started with another --name or topology file")  # fmt: skip
    if isinstance(claimed, str) and len(claims.get(claimed, [])) > 1:
        text += f"; two processes claim node {claimed} (at {' and '.join(claims[claimed])})"
    return text


def _role_faults(node: Expected, info: Mapping[str, Any]) -> list[Fault]:
    role = info.get("role")
    if role is None or role == node.role:
        return []
    return [Fault(node.name, "role", f"node {node.name} serves as {role!r}; this topology says {node.role!r}")]


def info_parts(info: Mapping[str, Any], name: str) -> tuple[Part, ...] | None:
    """The stages a node reports in its `Info`: a server's `layers`, `embed`, `head`; a device's entries of its
    `layout`. None when the answer holds neither."""
    layout = info.get("layout")
    if isinstance(layout, list):
        return tuple(
            Part(int(e["layers"][0]), int(e["layers"][1]), bool(e.get("embed")), bool(e.get("head")))
            for e in layout
            if isinstance(e, dict) and e.get("node") == name and isinstance(e.get("layers"), list)
        )
    layers = info.get("layers")
    if isinstance(layers, list) and len(layers) == 2:
        return (Part(int(layers[0]), int(layers[1]), bool(info.get("embed")), bool(info.get("head"))),)
    return None


def _layer_faults(node: Expected, info: Mapping[str, Any]) -> list[Fault]:
    served = info_parts(info, node.name)
    if node.parts is None or served is None or served == node.parts:
        return []
    got = ", ".join(p.label() for p in served) or "nothing"
    want = ", ".join(p.label() for p in node.parts) or "nothing"
    return [Fault(node.name, "layers", f"node {node.name} serves layers {got}; this topology gives it {want} "
                  "(started with another topology file, or moved by a live migration)")]  # fmt: skip


def _ping_faults(sender: str, receiver: str, ping: Answer, direct: Answer | None) -> list[Fault]:
    """A node's call to its peer, against this command's own call to that peer (`direct`)."""
    failure = ping.failure
    if failure is None:
        claimed = (ping.info or {}).get("name")
        if claimed == receiver:
            return []
        return [Fault(sender, "name", f"node {sender} dials node {receiver} at an address where the process says "
                      f"it is node {claimed!r}: {sender}'s topology gives {receiver} another address")]  # fmt: skip
    if not failure.relayed:  # the sender itself refused or failed the op
        kind = "route" if failure.kind == "refused" else "error"
        return [Fault(sender, kind, f"node {sender} cannot ping node {receiver}: {failure.message}")]
    if failure.kind == "token":
        return [Fault(receiver, "peer-token", f"node {receiver} refuses the deployment token of node {sender}, "
                      "which dials it: the two were started with different tokens")]  # fmt: skip
    if direct is not None and direct.failure is not None and direct.failure.kind == "down":
        return []  # already reported: the peer does not answer this command either
    return [Fault(sender, "unreachable", f"node {sender} cannot reach node {receiver}: {failure.message}")]


def _mb(nbytes: int) -> float:
    """MB, to a tenth below 10 MB (a tiny model's parts), whole above."""
    return round(nbytes / MB, 1) if nbytes < 10 * MB else round(nbytes / MB)


def render(verdict: Verdict, source: str) -> str:
    """The table (one row per node: role, address, layers, predicted memory against the budget, measured RSS,
    status), the faults one per line, and a final verdict line."""
    lines = [f"{'node':<12} {'role':<7} {'address':<22} {'layers':<18} {'weights':>7} {'KV':>6} {'act':>6} "
             f"{'need/budget MB':>15} {'RSS MB':>7}  status"]  # fmt: skip
    for node in verdict.nodes:
        memory = node.memory
        weights, kv, act = ("-", "-", "-") if memory is None else (
            str(_mb(memory.weight_bytes)), str(_mb(memory.kv_bytes)), str(_mb(memory.activation_bytes)))  # fmt: skip
        need = "-" if memory is None else str(_mb(memory.total_bytes))
        budget = "-" if node.memory_mb is None else str(node.memory_mb)
        layers = "?" if node.parts is None else ", ".join(p.label() for p in node.parts)
        lines.append(f"{node.name:<12} {node.role:<7} {node.address or '-':<22} {layers:<18} {weights:>7} {kv:>6} "
                     f"{act:>6} {need + '/' + budget:>15} {_rss(verdict.answers.get(node.name)):>7}  "
                     f"{verdict.status(node.name)}")  # fmt: skip
    memory = next((n.memory for n in verdict.nodes if n.memory is not None), None)
    if memory is not None:
        lines.append(f"memory predicted from the model config: KV cache and activations for {memory.max_context} "
                     f"tokens, runtime assumed {_mb(memory.runtime_bytes)} MB (each node measures its own)")  # fmt: skip
    for (sender, receiver), ping in verdict.pings.items():
        state = "ok" if ping.failure is None else "FAILED"
        lines.append(f"hop {sender} -> {receiver}: {state}" + ("" if ping.ms is None else f" ({ping.ms:.1f} ms)"))
    lines += [f"{f.node}: {f.kind}: {f.message}" for f in verdict.faults]
    lines.append(verdict_line(verdict, source))
    return "\n".join(lines)


def _rss(answer: Answer | None) -> str:
    memory = (answer.info or {}).get("memory") if answer is not None else None
    if isinstance(memory, dict) and isinstance(memory.get("rss_mb"), int | float):
        return f"{memory['rss_mb']:.0f}"
    return "-"


def verdict_line(verdict: Verdict, source: str) -> str:
    """`check: ok: ...` or `check: FAILED (exit 2): ...`, the last line of the report."""
    if not verdict.faults:
        return (f"check: ok: {len(verdict.nodes)} nodes answer as {source} says, and every hop accepts its peer's "
                "token")  # fmt: skip
    nodes = sorted({f.node for f in verdict.faults})
    return f"check: FAILED (exit {verdict.exit_code}): {len(verdict.faults)} problem(s) at {', '.join(nodes)}"


def verdict_json(verdict: Verdict, source: str) -> dict[str, Any]:
    """The report as one JSON object (`edgellm check --json`)."""
    nodes = []
    for node in verdict.nodes:
        answer = verdict.answers.get(node.name)
        memory = node.memory
        nodes.append({
            "name": node.name, "role": node.role, "address": node.address,
            "layers": None if node.parts is None else [[p.start, p.end, p.embed, p.head] for p in node.parts],
            "memory": None if memory is None else {
                "runtime_mb_assumed": _mb(memory.runtime_bytes), "weights_mb": _mb(memory.weight_bytes),
                "kv_mb": _mb(memory.kv_bytes), "activations_mb": _mb(memory.activation_bytes),
                "need_mb": _mb(memory.total_bytes), "max_context": memory.max_context},
            "budget_mb": node.memory_mb,
            "info": None if answer is None else answer.info,
            "status": verdict.status(node.name),
        })  # fmt: skip
    pings = [
        {
            "from": s,
            "to": r,
            "ok": p.failure is None,
            "ms": p.ms,
            "error": None if p.failure is None else p.failure.message,
        }
        for (s, r), p in verdict.pings.items()
    ]
    faults = [{"node": f.node, "kind": f.kind, "message": f.message} for f in verdict.faults]
    return {"topology": source, "ok": not verdict.faults, "exit_code": verdict.exit_code, "nodes": nodes,
            "hops": pings, "faults": faults, "verdict": verdict_line(verdict, source)}  # fmt: skip
