"""TOML documents of a fixed schema: strict typed reading (`Table`) and rendering to text (`render_toml`).

Reading is strict so that a typo is an error, never a silent default: a `Table` rejects keys outside its
schema up front, and every accessor checks the type (a TOML `true` is not an int; an int is a valid float).
Errors are `ConfigError`s of the form "<source>: <field path>: <problem>", e.g.
"deploy.toml: nodes[1].threads: must be >= 1, got 0".

The renderer covers what the schema uses (strings, ints, floats, bools, arrays of scalars, tables and arrays
of tables); it is not a general TOML writer. `tomllib.loads(render_toml(d)) == d` for such documents.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from edgellm.errors import ConfigError

_REQUIRED: Any = object()


def _kind(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


class Table:
    """One TOML table, read field by field with type checks; keys outside `keys` are rejected on construction.

    Args:
        data: the table as `tomllib` returns it.
        path: where it sits in the document (`""` for the root, `nodes[1]`, `deployment.tls`).
        source: the file name for error messages.
        keys: the keys this table may hold.
    """

    def __init__(self, data: object, path: str, source: str, keys: set[str]) -> None:
        self.path, self.source, self.keys = path, source, keys
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: {path or 'document'}: must be a table, got {_kind(data)}")
        self._data = data
        unknown = sorted(set(data) - keys)
        if unknown:
            raise self.error(unknown[0], f"unknown key; valid keys are {sorted(keys)}")

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def where(self, key: str) -> str:
        """The field path of `key` in this table."""
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ConfigError:
        """A ConfigError located at `key` of this table."""
        return ConfigError(f"{self.source}: {self.where(key)}: {problem}")

    def _get(self, key: str, default: Any, check: type | tuple[type, ...], expected: str) -> Any:
        if key not in self._data:
            if default is _REQUIRED:
                raise self.error(key, "missing")
            return default
        value = self._data[key]
        if isinstance(value, bool) and bool not in (check if isinstance(check, tuple) else (check,)):
            raise self.error(key, f"must be {expected}, got boolean {value}")
        if not isinstance(value, check):
            raise self.error(key, f"must be {expected}, got {_kind(value)} {value!r}")
        return value

    def string(self, key: str, default: Any = _REQUIRED) -> Any:
        """A string field; `default` (may be None) when absent, an error when absent and required."""
        return self._get(key, default, str, "a string")

    def integer(self, key: str, default: Any = _REQUIRED) -> Any:
        """An integer field (booleans are rejected)."""
        return self._get(key, default, int, "an integer")

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        """A float field; integers are accepted and converted. nan and inf are rejected."""
        if key not in self._data:
            return self._get(key, default, (int, float), "a number")
        value = self._get(key, default, (int, float), "a number")
        if not math.isfinite(value):
            raise self.error(key, f"must be a finite number, got {value}")
        return float(value)

    def boolean(self, key: str, default: Any = _REQUIRED) -> Any:
        """A boolean field."""
        return self._get(key, default, bool, "true or false")

    def strings(self, key: str) -> list[str]:
        """A required array of strings."""
        return self._list(key, str, "strings")

    def integers(self, key: str) -> list[int]:
        """A required array of integers."""
        return self._list(key, int, "integers")

    def _list(self, key: str, item: type, expected: str) -> list[Any]:
        values = self._get(key, _REQUIRED, list, f"an array of {expected}")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, item):
                raise self.error(f"{key}[{i}]", f"must be one of {expected}, got {_kind(value)} {value!r}")
        return list(values)

    def table(self, key: str, keys: set[str]) -> Table:
        """A required sub-table."""
        return Table(self._get(key, _REQUIRED, Mapping, "a table"), self.where(key), self.source, keys)

    def tables(self, key: str, keys: set[str], required: bool = True) -> list[Table]:
        """An array of tables (`[[key]]`): non-empty if `required`, else possibly absent or empty."""
        values = self._get(key, _REQUIRED if required else [], list, f"an array of tables ([[{key}]])")
        if not values and required:
            raise self.error(key, "must not be empty")
        return [Table(value, f"{self.where(key)}[{i}]", self.source, keys) for i, value in enumerate(values)]

    @contextmanager
    def at(self, key: str) -> Iterator[None]:
        """Locate a ValueError/KeyError raised inside the block (e.g. by a registry lookup) at `key`."""
        try:
            yield
        except (ValueError, KeyError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise self.error(key, str(message)) from None

    @contextmanager
    def building(self) -> Iterator[None]:
        """Locate a ConfigError "field: problem" raised by a spec's `__post_init__` inside this table."""
        try:
            yield
        except ConfigError as exc:
            prefix = f"{self.path}." if self.path else ""
            raise ConfigError(f"{self.source}: {prefix}{exc}") from None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _scalar(value: object, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are a subset of TOML's basic strings
    if isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value):
        return "[" + ", ".join(_scalar(v, where) for v in value) + "]"
    raise ConfigError(f"{where}: cannot render {_kind(value)} {value!r} as TOML")


def _is_table_array(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _render_table(table: Mapping[str, Any], header: list[str], lines: list[str]) -> None:
    """Scalars first (they belong to the current header), then sub-tables, then arrays of tables."""
    for key, value in table.items():
        if value is None:
            continue  # TOML has no null: an absent key means the default
        if not isinstance(value, Mapping) and not _is_table_array(value):
            lines.append(f"{_key(key)} = {_scalar(value, '.'.join([*header, key]))}")
    for key, value in table.items():
        if isinstance(value, Mapping):
            name = [*header, _key(key)]
            lines.extend(["", f"[{'.'.join(name)}]"])
            _render_table(value, name, lines)
    for key, value in table.items():
        if _is_table_array(value):
            name = [*header, _key(key)]
            for item in value:
                lines.extend(["", f"[[{'.'.join(name)}]]"])
                _render_table(item, name, lines)


def render_toml(document: Mapping[str, Any]) -> str:
    """Render a document of scalars, arrays of scalars, tables and arrays of tables as TOML text.

    Keys whose value is None are left out (TOML has no null). Raises ConfigError for anything else.
    """
    lines: list[str] = []
    _render_table(document, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"
