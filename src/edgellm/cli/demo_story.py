"""How `edgellm demo --plan auto` prints and charts its report (edgellm.control.demo.run_story)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {"split": "split (planned)", "device_only": "device only", "cloud": "cloud"}


def _emulation_lines(emulation: dict[str, Any]) -> list[str]:
    lines = []
    for name, node in emulation["nodes"].items():
        preset = f"preset {node['preset']}: " if node.get("preset") else ""
        memory = "no memory budget" if node.get("memory_mb") is None else f"memory budget {node['memory_mb']} MB"
        lines.append(f"  {name}: {preset}compute x{node.get('compute_scale', 1.0):g}, {memory}")
    for link in emulation["links"]:
        a, b = link["between"]
        lines.append(f"  {a}<->{b}: {link['profile']} ({link['up_mbps']:g}/{link['down_mbps']:g} Mb/s up/down, "
                     f"{link['rtt_ms']:g} ms RTT, {link['jitter_ms']:g} ms jitter, {link['loss_pct']:g}% loss)")  # fmt: skip
    return lines


def _plan_text(plan: dict[str, Any]) -> str:
    def stage(s: dict[str, Any]) -> str:
        layers = "embed only" if s["start"] == s["end"] else f"layers {s['start']}-{s['end']}"
        return f"{s['node']} {layers} {s['scheme']}"

    stages = ", ".join(stage(s) for s in plan["stages"])
    return f"{stages}; head on {plan['head']}; codecs {', '.join(plan['codecs']) or '-'}"


def print_story(report: dict[str, Any]) -> None:
    """Plan, emulation, and per scenario predicted vs measured TTFT and decode speed, then the breakdown."""
    scenarios = report["scenarios"]
    split = scenarios["split"]
    print("emulated settings (one machine stands in for all of them; see docs/PLANNER.md):")
    print("\n".join(_emulation_lines(split["emulation"])))
    cap = report["max_ppl_increase_pct"]
    print(f"\nplan ({report['objective']}, max ppl increase {cap}%): {_plan_text(split['plan'])}")
    if split.get("binding"):
        print(f"binding constraint: {split['binding']}")
    print(f"\n{'scenario':<16} {'TTFT ms':>16} {'ms/token':>18} {'tok/s':>7}   plan")
    print(f"{'':<16} {'pred':>7} {'meas':>8} {'pred':>8} {'meas':>9}")
    for name, r in scenarios.items():
        if not r.get("fits", True):
            print(f"{LABELS[name]:<16} {'does not fit:':>16} {r['reason']}")
            continue
        p = r["predicted"]
        measured = r["breakdown"]["total"]
        print(f"{LABELS[name]:<16} {p['ttft_ms']:>7.0f} {r['ttft_ms']:>8.0f} {p['decode_ms_per_token']:>8.1f} "
              f"{measured:>9.1f} {r['decode_tok_per_s']:>7.1f}   {_plan_text(r['plan'])}")  # fmt: skip
    if "switch" in split:
        s = split["switch"]
        print(f"\nlink {s['link']} switched to {s['profile']} after {s['after_tokens']} tokens: "
              f"{_ms(s.get('ms_per_token_before'))} ms/token before, {_ms(s.get('ms_per_token_after'))} after")  # fmt: skip
        for m in split.get("migrations", []):
            print(f"  re-planned at token {m.get('step')}: migrated in {m.get('ms', 0):.0f} ms "
                  f"to {m.get('after', m.get('layout'))}")  # fmt: skip
        if not split.get("migrations"):
            print("  no migration (re-planning off, or no plan was better by the margin)")
    same = report["same_tokens_as_whole_model"]
    if same is not None:
        print(f"\nlossless plan: the split's tokens {'equal' if same else 'DIFFER FROM'} the whole model's (cloud run)")
    print(f"\n{'scenario':<16} breakdown per decoded token (ms)")
    for name, r in scenarios.items():
        if r.get("fits", True):
            detail = ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown"].items() if k != "total")
            print(f"{LABELS[name]:<16} {detail}")
    if report.get("chart"):
        print(f"\nchart: {report['chart']}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def story_chart(report: dict[str, Any], path: Path) -> Path:
    from edgellm.deploy.chart import story_chart as draw

    scenarios = {k: v for k, v in report["scenarios"].items() if v.get("fits", True)}
    breakdown = {LABELS[k]: v["breakdown"] for k, v in scenarios.items()}
    predicted = {LABELS[k]: v["predicted"]["decode_ms_per_token"] for k, v in scenarios.items()}
    split = report["scenarios"]["split"]
    nodes = split["emulation"]["nodes"]
    title = "planned split vs device only vs cloud; emulated: " + ", ".join(
        f"{n} x{v.get('compute_scale', 1.0):g}" + (f"/{v['memory_mb']} MB" if v.get("memory_mb") else "")
        for n, v in nodes.items()
    )
    timeline = None
    if "switch" in split:
        s = split["switch"]
        timeline = {"times_s": split["token_times_s"], "switch_after": s["after_tokens"],
                    "migrated_at": [m.get("step") for m in split.get("migrations", [])],
                    "label": f"link {s['link']} -> {s['profile']}"}  # fmt: skip
    return draw(breakdown, predicted, path, title, timeline)
