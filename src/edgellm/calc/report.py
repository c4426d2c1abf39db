"""A `CalcReport` as text (a table, then every assumption) or as a JSON-able dict. Pure: returns strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgellm.calc.assumptions import MODEL_TOPICS, assumptions
from edgellm.calc.memory import CalcReport, Memory, NodeReport, fits_at_weight_bits
from edgellm.calc.presets import Preset

COMPONENTS = ("weights", "gradients", "optimizer", "activations", "kv_cache")


@dataclass(frozen=True)
class Described:
    """A report with where its model came from: `source` (a preset's citation or a config's path), `preset`."""

    report: CalcReport
    source: str
    preset: Preset | None = None


def human_bytes(n: float) -> str:
    """`783.43 GB`, `269.0 MB`, `12.0 kB`, `0 B` (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def human_count(n: float) -> str:
    """`65.29 B`, `37.75 M`, `1.2 k` (four significant digits): parameters for people."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return str(int(n))


def _memory_json(m: Memory) -> dict[str, int]:
    return {
        **{f"{name}_bytes": getattr(m, f"{name}_bytes") for name in COMPONENTS},
        "model_state_bytes": m.model_state_bytes,
        "total_bytes": m.total_bytes,
    }


def _node_json(n: NodeReport, budget_bytes: int | None) -> dict[str, Any]:
    h = n.holding
    out = {
        "node": h.node,
        "layers": [h.start, h.end],
        "embed": h.embed,
        "head": h.head,
        "params": n.params,
        "trainable_params": n.trainable_params,
        "memory": _memory_json(n.memory),
    }
    if budget_bytes is not None:
        out["fits"] = n.memory.total_bytes <= budget_bytes
    return out


def report_json(d: Described, budget_bytes: int | None = None) -> dict[str, Any]:
    """Everything in the report, bytes as integers, with the assumptions as sentences."""
    r, c = d.report, d.report.config
    dims, p = r.model.dims, c.precision
    model: dict[str, Any] = {
        "name": r.model.name,
        "model_type": r.model.model_type,
        "source": d.source,
        **{k: getattr(dims, k) for k in dims.__dataclass_fields__},
        "tied": r.model.tied,
        "params": r.whole.params,
    }
    if d.preset is not None:
        model.update(
            nominal_params=d.preset.nominal_params,
            published_params=d.preset.published_params,
            published_source=d.preset.published_source,
        )
    out: dict[str, Any] = {
        "model": model,
        "method": c.method.name,
        "lora": None
        if c.lora is None
        else {"rank": c.lora.rank, "targets": list(c.lora.targets or ()), "modules": [x.name for x in r.adapted]},
        "precision": {
            "weights": p.weights.name,
            "weight_bits": p.weights.bits,
            "float_bits": p.float_bits,
            "adapter_bits": p.adapter_bits,
            "grad_bits": p.grad_bits,
            "optimizer": p.optimizer,
            "optimizer_bits": p.optimizer_bits,
            "master_weights": p.master_weights,
            "act_bits": p.act_bits,
            "kv_bits": p.kv_bits,
        },
        "workload": {
            "batch": c.workload.batch,
            "seq_len": c.workload.seq_len,
            "tokens": c.workload.tokens,
            "checkpointing": c.workload.checkpointing,
        },
        "split": {"cuts": list(c.split.cuts), "head": c.split.head, "nodes": list(c.split.node_names)},
        "params": r.whole.params,
        "trainable_params": r.whole.trainable_params,
        "trainable_fraction": r.whole.trainable_params / r.whole.params,
        "bytes_per_trainable_param": r.bytes_per_trainable_param,
        "memory": _memory_json(r.whole.memory),
        "nodes": [_node_json(n, budget_bytes) for n in r.nodes],
        "budget": None if budget_bytes is None else _budget_json(r, budget_bytes),
        "assumptions": [f"{topic}: {text}" for topic, text in assumptions(r, d.source)],
    }
    return out


def _budget_json(r: CalcReport, budget_bytes: int) -> dict[str, Any]:
    return {
        "budget_bytes": budget_bytes,
        "fits": r.whole.memory.total_bytes <= budget_bytes,
        "fits_at_weight_bits": fits_at_weight_bits(r, budget_bytes),
    }


def report_text(d: Described, budget_bytes: int | None = None) -> str:
    """The report for people: the model, parameters, memory by component, per node, the budget, assumptions."""
    r, c = d.report, d.report.config
    lines = [
        f"model        {r.model.name} ({r.model.model_type}, {r.model.dims.num_layers} layers, hidden "
        f"{r.model.dims.hidden_size:,})",
        f"method       {c.method.name}",
        f"parameters   {r.whole.params:,} ({human_count(r.whole.params)})" + _published(d),
        f"trainable    {_trainable(r)}",
        "",
        *_memory_lines(r.whole.memory),
    ]
    if r.config.method.trains != "none":
        lines += ["", _states_line(d)]
    if len(r.nodes) > 1:
        lines += ["", *_node_lines(r.nodes, budget_bytes)]
    if budget_bytes is not None:
        lines += ["", _budget_line(r, budget_bytes)]
    lines += ["", "assumptions:", *(f"- {topic}: {text}" for topic, text in assumptions(r, d.source))]
    return "\n".join(lines)


def _published(d: Described) -> str:
    if d.preset is None:
        return ""
    pub = d.preset.published_params
    diff = 100 * (d.report.whole.params - pub) / pub
    return f", {diff:+.1f}% from the published count: {d.preset.published_source}"


def _trainable(r: CalcReport) -> str:
    w = r.whole
    if not w.trainable_params:
        return "0 (nothing trains)"
    text = (
        f"{w.trainable_params:,} ({human_count(w.trainable_params)}, {100 * w.trainable_params / w.params:.4g}% of all"
    )
    if 0 < w.trainable_params < w.params:
        text += f"; full fine-tuning trains {w.params:,}, {w.params / w.trainable_params:,.0f} times as many"
    return text + ")"


def _memory_lines(m: Memory) -> list[str]:
    rows = [(name.replace("_", " "), getattr(m, f"{name}_bytes")) for name in COMPONENTS]
    rows.append(("total", m.total_bytes))
    width = max(len(f"{b:,}") for _, b in rows)
    return [f"{'component':<12} {'bytes':>{width}}  size"] + [
        f"{name:<12} {b:>{width},}  {human_bytes(b)}" for name, b in rows
    ]


def _states_line(d: Described) -> str:
    r = d.report
    per = r.bytes_per_trainable_param
    text = (
        f"model states (weights + gradients + optimizer, no activations): "
        f"{human_bytes(r.whole.memory.model_state_bytes)}, of which the trainable parameters' "
        f"{per:g} B x {r.whole.trainable_params:,} = {human_bytes(per * r.whole.trainable_params)}"
    )
    if d.preset is not None and r.config.method.trains == "all":
        nominal = d.preset.nominal_params
        text += f"; at the nominal {human_count(nominal)} parameters: {per:g} B x {nominal:,} = {human_bytes(per * nominal)}"
    return text


def _node_lines(nodes: tuple[NodeReport, ...], budget_bytes: int | None) -> list[str]:
    head = ["node", "layers", "embed", "head", "params", "trainable", *COMPONENTS, "total"]
    if budget_bytes is not None:
        head.append("fits")
    rows = [head]
    for n in nodes:
        h, m = n.holding, n.memory
        row = [
            h.node,
            f"{h.start}-{h.end}" if h.num_layers else "-",
            "yes" if h.embed else "-",
            "yes" if h.head else "-",
            human_count(n.params),
            human_count(n.trainable_params),
            *(human_bytes(getattr(m, f"{c}_bytes")) for c in COMPONENTS),
            human_bytes(m.total_bytes),
        ]
        if budget_bytes is not None:
            row.append("yes" if m.total_bytes <= budget_bytes else "no")
        rows.append(row)
    return _table(rows)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]


def _budget_line(r: CalcReport, budget_bytes: int) -> str:
    total = r.whole.memory.total_bytes
    if total <= budget_bytes:
        text = f"budget {human_bytes(budget_bytes)}: the whole model fits, {human_bytes(budget_bytes - total)} to spare"
    else:
        bits = fits_at_weight_bits(r, budget_bytes)
        then = (
            f"it would fit with the layers' linear weights at <= {bits:.2f} bits, all else as above"
            if bits is not None
            else "it would not fit even with no linear weights at all"
        )
        text = f"budget {human_bytes(budget_bytes)}: the whole model does not fit, {human_bytes(total - budget_bytes)} over; {then}"
    if len(r.nodes) > 1:
        over = [
            f"{n.holding.node} ({human_bytes(n.memory.total_bytes)})"
            for n in r.nodes
            if n.memory.total_bytes > budget_bytes
        ]
        text += "; per node: " + (f"over it: {', '.join(over)}" if over else "every node fits")
    return text


def compare_text(items: list[Described], budget_bytes: int | None = None) -> str:
    """Several models under one setting: one row each, then the assumptions they share and each one's source."""
    head = ["model", "params", "trainable", "weights", "grads+optim", "activations", "kv_cache", "total"]
    if budget_bytes is not None:
        head += ["fits", "fits at bits"]
    rows = [head]
    for d in items:
        w, m = d.report.whole, d.report.whole.memory
        row = [
            d.report.model.name,
            human_count(w.params),
            human_count(w.trainable_params),
            human_bytes(m.weights_bytes),
            human_bytes(m.gradients_bytes + m.optimizer_bytes),
            human_bytes(m.activations_bytes),
            human_bytes(m.kv_cache_bytes),
            human_bytes(m.total_bytes),
        ]
        if budget_bytes is not None:
            bits = fits_at_weight_bits(d.report, budget_bytes)
            row += ["yes" if m.total_bytes <= budget_bytes else "no", "-" if bits is None else f"<= {bits:.2f}"]
        rows.append(row)
    lines = [f"method {items[0].report.config.method.name}", "", *_table(rows)]
    if budget_bytes is not None:
        lines += [
            "",
            f"budget {human_bytes(budget_bytes)}; 'fits at bits': the most bits per linear weight that "
            "would fit it, all else as in the row",
        ]
    sources: dict[str, list[str]] = {}
    for d in items:
        sources.setdefault(d.source, []).append(d.report.model.name)
    first = items[0].report.model.name
    lines += ["", f"assumptions (counts quoted for {first}; `edgellm calc --preset NAME` prints each model's own):"]
    lines += [f"- sizes of {', '.join(names)}: {source}" for source, names in sources.items()]
    lines += [f"- {t}: {x}" for t, x in assumptions(items[0].report, items[0].source) if t not in MODEL_TOPICS]
    return "\n".join(lines)
