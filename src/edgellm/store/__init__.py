"""The model store: where models come from (registry), where they live (cache), and how `--model` resolves."""

from edgellm.store.registry import DEFAULT_MODEL, REGISTRY, RegisteredModel
from edgellm.store.resolve import resolve_model

__all__ = ["DEFAULT_MODEL", "REGISTRY", "RegisteredModel", "resolve_model"]
