"""Project exceptions: every error a user can cause carries a sentence they can act on."""

from __future__ import annotations

__all__ = [
    "ExplainerError",
    "AttributionError",
    "AttributionIndexError",
    "AttributionTypeError",
    "ModelLoadError",
    "ImageLoadError",
    "JobCancelled",
    "WorkerError",
    "WorkerLimitError",
]


class ExplainerError(Exception):
    """Base class of every error raised on purpose by :mod:`explainer`."""


class AttributionError(ExplainerError, ValueError, AssertionError):
    """An attribution call received values it cannot work with.

    Also an ``AssertionError``: Captum raises that type for the same mistakes (a target or
    neuron out of range, a wrong shape), so code written for Captum catches it unchanged.
    """


class AttributionIndexError(AttributionError, IndexError):
    """A target or neuron index is out of range for the output or layer.

    Also an ``IndexError``, what Captum's indexing raises in the same case.
    """


class AttributionTypeError(ExplainerError, TypeError):
    """An attribution call received an argument of the wrong kind."""


class ModelLoadError(ExplainerError, ValueError):
    """A model file or architecture could not be turned into a usable model."""


class ImageLoadError(ExplainerError, ValueError):
    """An image could not be read or is unsafe to decode."""


class WorkerError(ExplainerError):
    """A compute worker failed while running a request (it crashed, or the model raised)."""


class WorkerLimitError(WorkerError):
    """A compute worker went over an operator limit and was stopped.

    Attributes
    ----------
    limit : str
        ``"memory"`` or ``"time"``: which limit was hit.
    """

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class JobCancelled(ExplainerError):
    """A request was cancelled before it finished (superseded, or its worker was stopped)."""
