"""Project exceptions: every error a user can cause carries a sentence they can act on."""

from __future__ import annotations

__all__ = [
    "ExplainerError",
    "AttributionError",
    "AttributionTypeError",
    "ModelLoadError",
    "ImageLoadError",
]


class ExplainerError(Exception):
    """Base class of every error raised on purpose by :mod:`explainer`."""


class AttributionError(ExplainerError, ValueError):
    """An attribution call received values it cannot work with."""


class AttributionTypeError(ExplainerError, TypeError):
    """An attribution call received an argument of the wrong kind."""


class ModelLoadError(ExplainerError, ValueError):
    """A model file or architecture could not be turned into a usable model."""


class ImageLoadError(ExplainerError, ValueError):
    """An image could not be read or is unsafe to decode."""
