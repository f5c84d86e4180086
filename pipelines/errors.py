"""Errors a user can act on. The UI and the batch CLI show their message as is, so it names the fix."""

from __future__ import annotations


class InputError(ValueError):
    """A generation argument is invalid; raised before any model work starts."""


class ModelLoadError(ValueError):
    """A model path, hub id or catalog name cannot be loaded as a DiT Studio pipeline."""
