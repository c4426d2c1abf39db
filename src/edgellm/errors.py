"""Errors a user or a peer can cause. The CLI prints these as one line; anything else is a bug."""

from __future__ import annotations


class EdgellmError(ValueError):
    """Base class for problems caused by input (arguments, files, peers), not by edgellm itself."""


class ModelError(EdgellmError):
    """A model cannot be found, fetched, converted or loaded, or its architecture is unsupported."""


class ConfigError(EdgellmError):
    """A configuration value (cuts, sampling, topology, ...) is invalid."""


class SessionError(EdgellmError):
    """A request names a session the stage does not hold (expired, closed, or the node restarted)."""
