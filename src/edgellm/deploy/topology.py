"""The deployment topology: which nodes run a split model, in what order, over which emulated links.

One TOML file (schema in docs/TOPOLOGY.md) describes a whole deployment; every node process loads the same
file and picks out its own part by name. `parse_topology` is the pure core (a dict in, a validated `Topology`
out); `load_topology` adds the file reading and `write_topology` the writing. Every problem is a `ConfigError`
naming the file, the field path (`nodes[1].address`, `links[0].profile`) and what is wrong; unknown keys are
errors, so a typo is never silently ignored.

The `Topology` itself and its invariants: `edgellm.deploy.topology_spec`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgellm.deploy.document import Table, render_toml
from edgellm.deploy.presets import get_preset
from edgellm.deploy.specs import (
    TOKEN_KEYS,
    ControlSpec,
    Limits,
    LinkSpec,
    ModelSpec,
    NodeSpec,
    Security,
    TLSSpec,
    TokenSource,
    link_dp,
)
from edgellm.deploy.topology_spec import MODES, Topology
from edgellm.errors import ConfigError
from edgellm.net.codec import parse_codec
from edgellm.net.link import profile

__all__ = ["MODES", "Topology", "load_topology", "parse_topology", "render_toml", "topology_toml", "write_topology"]

# The schema: the keys each table may hold (anything else is an error).
TOP_KEYS = {"model", "deployment", "nodes", "links", "control"}
CONTROL_KEYS = {"replan", "profile", "objective", "max_ppl_increase", "hysteresis", "margin", "min_samples"}
MODEL_KEYS = {"name", "dtype", "cuts", "head", "quant", "embed", "engine"}
DEPLOYMENT_KEYS = {"route", "mode", "deadline_s", "max_sessions", "idle_timeout_s", "max_context", "tls", *TOKEN_KEYS}
TLS_KEYS = {"cert", "key", "ca", "client_auth"}
NODE_KEYS = {"name", "role", "address", "threads", "memory_mb", "quant", "compute_scale", "preset", "replica_of"}
LINK_NUMBERS = ("up_mbps", "down_mbps", "rtt_ms", "jitter_ms", "loss_pct")  # override the profile's fields
LINK_KEYS = {"between", "profile", "codec", "dp", *LINK_NUMBERS}  # dp: edgellm.deploy.specs.link_dp


def _parse_model(t: Table) -> ModelSpec:
    name, cuts = t.string("name"), tuple(t.integers("cuts"))
    dtype, head, quant = t.string("dtype", "fp32"), t.string("head", "device"), t.string("quant", "none")
    embed, engine = t.string("embed", "auto"), t.string("engine", "fast")
    with t.building():
        return ModelSpec(name, cuts, dtype, head, quant, embed, engine)


def _parse_node(t: Table) -> NodeSpec:
    """A node; a `preset` gives the defaults of `threads`, `memory_mb` and `compute_scale`, its own keys win."""
    name, role, address = t.string("name"), t.string("role"), t.string("address", None)
    preset_name = t.string("preset", None)
    preset = None
    if preset_name is not None:
        with t.at("preset"):
            preset = get_preset(preset_name)
    threads = t.integer("threads", preset.threads if preset else 1)
    memory_mb = t.integer("memory_mb", preset.memory_mb if preset else None)
    compute_scale = t.number("compute_scale", preset.compute_scale if preset else 1.0)
    quant, replica_of = t.string("quant", None), t.string("replica_of", None)
    with t.building():
        return NodeSpec(name, role, address, threads, memory_mb, quant, compute_scale, preset_name, replica_of)


def _parse_link(t: Table) -> LinkSpec:
    between = t.strings("between")
    if len(between) != 2:
        raise t.error("between", f"must name exactly two nodes, got {between}")
    name, codec_text, dp = t.string("profile", "none"), t.string("codec", "none"), link_dp(t)
    with t.at("profile"):
        base = profile(name)
    overrides = {key: t.number(key) for key in LINK_NUMBERS if key in t}
    for key, value in overrides.items():
        if value < 0 or (value == 0 and key.endswith("_mbps")):
            raise t.error(key, f"must be {'> 0' if key.endswith('_mbps') else '>= 0'}, got {value}")
    if overrides.get("loss_pct", 0.0) >= 100:
        raise t.error("loss_pct", f"must be below 100, got {overrides['loss_pct']}")
    with t.at("profile"):
        link_profile = dataclasses.replace(base, **overrides)
    with t.at("codec"):
        codec = parse_codec(codec_text)
    with t.building():
        return LinkSpec(between[0], between[1], link_profile, name.lower(), codec, dp)


def _path(t: Table, key: str, base_dir: Path | None) -> Path:
    """A required, non-empty path field; a relative path is taken relative to `base_dir` (the TOML's dir)."""
    text = t.string(key)
    if not text:
        raise t.error(key, "must not be empty")
    path = Path(text)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _parse_security(t: Table, base_dir: Path | None) -> Security:
    given = [key for key in TOKEN_KEYS if key in t]
    if len(given) > 1:
        raise t.error(given[1], f"choose one token source, got {' and '.join(given)}")
    token = None
    if given:
        key = given[0]
        value = str(_path(t, key, base_dir)) if key == "token_file" else t.string(key)
        with t.building():
            token = TokenSource(TOKEN_KEYS[key], value)  # type: ignore[arg-type]
    tls = None
    if "tls" in t:
        s = t.table("tls", TLS_KEYS)
        cert, key_file = _path(s, "cert", base_dir), _path(s, "key", base_dir)
        ca = _path(s, "ca", base_dir) if "ca" in s else None
        with s.building():
            tls = TLSSpec(cert, key_file, ca, s.boolean("client_auth", False))
    return Security(token, tls)


def parse_topology(data: Mapping[str, Any], source: str = "<topology>", base_dir: Path | None = None) -> Topology:
    """Validate a parsed TOML document (a dict) into a `Topology`. Pure: reads no file, env var or clock.

    Args:
        data: the document, as `tomllib` returns it.
        source: the file name, prefixed to every error message.
        base_dir: the directory relative `token_file` and TLS paths are relative to (the TOML file's);
            None leaves them relative to the working directory.

    Raises:
        ConfigError: "<source>: <field path>: <problem>" for the first problem found.
    """
    top = Table(data, "", source, TOP_KEYS)
    model = _parse_model(top.table("model", MODEL_KEYS))
    dep = top.table("deployment", DEPLOYMENT_KEYS)
    nodes = tuple(_parse_node(t) for t in top.tables("nodes", NODE_KEYS))
    links = tuple(_parse_link(t) for t in top.tables("links", LINK_KEYS, required=False))
    route, mode = tuple(dep.strings("route")), dep.string("mode", "chain")
    security = _parse_security(dep, base_dir)
    deadline_s, max_sessions = dep.number("deadline_s", 30.0), dep.integer("max_sessions", 64)
    idle_timeout_s, max_context = dep.number("idle_timeout_s", 600.0), dep.integer("max_context", 2048)
    with dep.building():
        limits = Limits(deadline_s, max_sessions, idle_timeout_s, max_context)
    control = _parse_control(top.table("control", CONTROL_KEYS), base_dir) if "control" in top else ControlSpec()
    return Topology(model, nodes, links, route, mode, security, limits, source, control)


def _parse_control(t: Table, base_dir: Path | None) -> ControlSpec:
    profile_path = _path(t, "profile", base_dir) if "profile" in t else None
    cap = t.number("max_ppl_increase") if "max_ppl_increase" in t else None
    with t.building():
        return ControlSpec(t.boolean("replan", False), profile_path, t.string("objective", "latency"), cap,
                           t.number("hysteresis", 0.5), t.number("margin", 0.1), t.integer("min_samples", 3))  # fmt: skip


def load_topology(path: str | Path) -> Topology:
    """Read, parse and validate a topology file, and check that the TLS files it names exist.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid TOML (the message gives line and column),
            or fails validation.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: topology file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read topology file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    topology = parse_topology(data, source=str(path), base_dir=path.parent)
    topology.check_files()
    return topology


def topology_toml(document: Mapping[str, Any]) -> str:
    """Render a topology document (the dict `parse_topology` takes) as TOML text, after validating it.

    Raises:
        ConfigError: the document is not a valid topology, or holds a value TOML cannot express.
    """
    parse_topology(document, source="<rendered topology>")
    return render_toml(document)


def write_topology(path: str | Path, document: Mapping[str, Any]) -> Topology:
    """Validate `document`, write it as TOML to `path`, and return the `Topology` it describes.

    Relative `token_file` and TLS paths in `document` are relative to `path`'s directory, as when loaded.
    """
    path = Path(path)
    text = render_toml(document)
    topology = parse_topology(tomllib.loads(text), source=str(path), base_dir=path.parent)
    path.write_text(text, encoding="utf-8")
    return topology
