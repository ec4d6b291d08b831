"""Exceptions capplug raises on purpose, so callers can catch them by kind."""

from __future__ import annotations


class CapplugError(Exception):
    """Base class of capplug's own errors."""


class ModelNotFoundError(CapplugError, LookupError):
    """A model reference names no local folder, Hugging Face repository or packaged model."""


class PackageFetchError(CapplugError, RuntimeError):
    """A packaged model or data set could not be fetched from the package registry."""


class CheckpointError(CapplugError, ValueError):
    """A checkpoint is unusable for the job (wrong head, unknown score mapping, unsafe format)."""
