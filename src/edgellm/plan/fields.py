"""Field checks shared by the plan's frozen dataclasses, and the strict decoding of their JSON objects."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from edgellm.errors import ConfigError


def require_name(owner: str, field: str, value: object) -> None:
    """A non-empty string.

    Raises:
        ConfigError: naming `owner.field`.
    """
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{owner} {field} must be a non-empty string, got {value!r}")


def require_number(owner: str, field: str, value: object, minimum: float = 0.0) -> None:
    """A finite int or float (not a bool) >= `minimum`.

    Raises:
        ConfigError: naming `owner.field`.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{owner} {field} must be a finite number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{owner} {field} must be >= {minimum}, got {value!r}")


def require_int(owner: str, field: str, value: object, minimum: int = 0) -> None:
    """An int (not a bool) >= `minimum`.

    Raises:
        ConfigError: naming `owner.field`.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner} {field} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{owner} {field} must be >= {minimum}, got {value!r}")


def require_choice(owner: str, field: str, value: object, choices: tuple[str, ...]) -> None:
    """One of `choices`.

    Raises:
        ConfigError: naming the valid choices.
    """
    if value not in choices:
        raise ConfigError(f"{owner} {field} must be one of {list(choices)}, got {value!r}")


def require_unique(owner: str, names: list[str]) -> None:
    """No name twice.

    Raises:
        ConfigError: naming the repeated names.
    """
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{owner} names must be unique; repeated: {repeated}")


def fields_of(owner: str, data: object, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of a JSON object, refusing unknown and missing ones (the dataclass checks the values).

    Raises:
        ConfigError: not an object, an unknown field, or a missing one.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{owner} must be a JSON object, got {type(data).__name__}")
    unknown = set(data) - set(required) - set(optional)
    if unknown:
        raise ConfigError(f"unknown {owner} fields {sorted(unknown)}; valid: {sorted(required + optional)}")
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{owner} needs fields {missing}")
    return dict(data)


def list_of(owner: str, field: str, value: object) -> list[Any]:
    """A JSON array.

    Raises:
        ConfigError: naming `owner.field`.
    """
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{owner} {field} must be a list, got {type(value).__name__}")
    return list(value)
