"""Profiles on disk: plain versioned JSON, valid for one topology, model and code version.

A profile holds what `edgellm profile` measured (docs/PLANNER.md has the schema): per node its compute per layer,
embedding and head for each weight scheme (already scaled by the node's emulated `compute_scale`), its memory per
layer and its runtime overhead; per link a fitted line per direction (`fixed_ms + bytes * ms_per_byte`) through
the real transport and its emulation; per model the KV bytes per token and the perplexity cost of each scheme and
codec. `instance_from_profile` turns it into the planner's `edgellm.plan.Instance`.

A profile is reused while its key matches: the topology's nodes and links as declared (not its cuts, schemes or
codecs, which are what the planner chooses), the model's config, and the source of the code that runs and
measures stages and links (`MEASURED_CODE`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from edgellm.deploy.topology import Topology
from edgellm.errors import ConfigError
from edgellm.net.codec import bytes_per_token, parse_codec
from edgellm.plan import CodecCost, Instance, LinkCaps, ModelDims, NodeCaps, SchemeCost
from edgellm.store.paths import profiles_dir

FORMAT = "edgellm-profile"
# The share of each node's budget the planner leaves free: a node checks its measured RSS after loading, and what
# loading leaves behind (allocator pages, a quantized file's staging) varies by scheme by tens of MB.
MEMORY_HEADROOM = 0.1
VERSION = 1
_PACKAGE = Path(__file__).resolve().parent.parent


# The code a profile's numbers depend on: what runs a stage, moves bytes, and measures. Not the planner (plan/):
# a new optimizer reuses old measurements.
MEASURED_CODE = ("model", "engine", "quant", "net", "split", "deploy/compute_profile.py", "deploy/profile_op.py",
                 "control/profiler.py", "control/quality.py")  # fmt: skip


def code_version() -> str:
    """A hash of the source a profile's numbers depend on (`MEASURED_CODE`): a profile measured by other code is
    not reused."""
    digest = hashlib.sha256()
    paths = [
        p
        for part in MEASURED_CODE
        for p in ([_PACKAGE / part] if part.endswith(".py") else (_PACKAGE / part).rglob("*.py"))
    ]
    for path in sorted(paths):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def topology_key(topology: Topology) -> str:
    """A hash of what the measurements depend on: the model, the nodes and the links as declared."""
    nodes = [
        {"name": n.name, "role": n.role, "threads": n.threads, "memory_mb": n.memory_mb,
         **{k: getattr(n, k, None) for k in ("compute_scale", "preset")}}
        for n in topology.nodes
    ]  # fmt: skip
    links = [{"between": sorted((k.a, k.b)), "profile": k.profile_name, **vars(k.profile)} for k in topology.links]
    data = {"model": topology.model.name, "dtype": topology.model.dtype, "nodes": nodes, "links": links,
            "max_context": getattr(topology.limits, "max_context", None)}  # fmt: skip
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def profile_key(topology: Topology, model_config_sha: str) -> dict[str, str]:
    return {"topology": topology_key(topology), "model": model_config_sha, "code": code_version()}


def default_path(key: dict[str, str]) -> Path:
    """Where a profile with this key is cached when no --output is given."""
    return profiles_dir() / f"{key['topology']}-{key['model']}-{key['code']}.json"


def save_profile(profile: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile, indent=1) + "\n")
    tmp.replace(path)
    return path


def load_profile(path: Path, key: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a profile; with `key`, refuse one measured for another topology, model or code version.

    Raises:
        ConfigError: unreadable, not a profile, another format version, or a key mismatch (naming what differs).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: profile not found; run `edgellm profile --topology T.toml`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read profile: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f'{path}: not an edgellm profile (no "format": "{FORMAT}")')
    if data.get("version") != VERSION:
        raise ConfigError(f"{path}: profile format version {data.get('version')}; this edgellm reads {VERSION}")
    if key is not None:
        stale = [k for k, v in key.items() if data.get("key", {}).get(k) != v]
        if stale:
            raise ConfigError(
                f"{path}: profile is stale: its {', '.join(stale)} differ(s) from this deployment's; "
                "rerun `edgellm profile`"
            )
    return data


def codec_costs(profile: dict[str, Any], hidden_size: int) -> tuple[CodecCost, ...]:
    out = []
    for name, increase in profile["quality"]["codecs"].items():
        spec = parse_codec(name)
        per_row = bytes_per_token(hidden_size, spec)  # exact bytes of one token's hidden state on the wire
        scaled = spec.codec in ("int8", "int8mu")
        out.append(CodecCost(name, (per_row - (4 if scaled else 0)) / hidden_size, 4 if scaled else 0, increase))
    return tuple(out)


def instance_from_profile(
    profile: dict[str, Any], mode: str = "chain", prompt_tokens: int | None = None, sessions: int = 1
) -> Instance:
    """The planner's view of a profiled deployment. `prompt_tokens` defaults to the profile's prompt length
    (prefill times are per token, measured at that length)."""
    model = profile["model"]
    quality = profile["quality"]["schemes"]
    nodes = []
    for name in profile["route"]:
        node = profile["nodes"][name]
        schemes = tuple(
            SchemeCost(
                name=row["name"], layer_decode_ms=row["layer_decode_ms"],
                layer_prefill_ms_per_token=row["layer_prefill_ms_per_token"], layer_bytes=row["layer_bytes"],
                embed_bytes=row["embed_bytes"], head_bytes=row["head_bytes"], head_decode_ms=row["head_decode_ms"],
                embed_decode_ms=row["embed_decode_ms"], ppl_increase_pct=quality.get(row["name"], 0.0),
            )
            for row in node["schemes"]
        )  # fmt: skip
        budget = node["emulated"].get("memory_mb")
        nodes.append(
            NodeCaps(
                name=name, role=node["role"], schemes=schemes,
                memory_bytes=None if budget is None else int(budget * 1_000_000 * (1 - MEMORY_HEADROOM)),
                base_bytes=node["base_bytes"],
                stage_overhead_ms=node["stage_overhead_ms"], activation_bytes=node.get("activation_bytes", 0),
                kv_bytes_per_token_per_layer=model["kv_bytes_per_token_per_layer"],
            )
        )  # fmt: skip
    links = tuple(
        LinkCaps(k["a"], k["b"], k["up_fixed_ms"], k["up_ms_per_byte"], k["down_fixed_ms"], k["down_ms_per_byte"])
        for k in profile["links"]
    )
    dims = ModelDims(
        num_layers=model["num_layers"], hidden_size=model["hidden_size"], max_context=model["max_context"],
        header_bytes=model["header_bytes"], token_bytes=model.get("token_bytes", 8),
        tied_embeddings=model["tied_embeddings"],
    )  # fmt: skip
    prompt = prompt_tokens if prompt_tokens is not None else profile["settings"]["prompt_tokens"]
    return Instance(dims, tuple(nodes), links, codec_costs(profile, model["hidden_size"]), mode, prompt, sessions)


def fit_line(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares `y = a + b x` through (x, y) samples, with a, b clamped at 0 (a line cannot go negative)."""
    if not samples:
        raise ConfigError("no samples to fit")
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    var = sum((x - mean_x) ** 2 for x, _ in samples)
    slope = 0.0 if var == 0 else sum((x - mean_x) * (y - mean_y) for x, y in samples) / var
    slope = max(slope, 0.0)
    intercept = max(mean_y - slope * mean_x, 0.0)
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise ConfigError(f"cannot fit a line through {samples}")
    return intercept, slope
