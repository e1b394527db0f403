"""Operator limits: the one place where a server's resource bounds are read.

Each limit comes from an environment variable so that the operator of a server sets it, never
a browser user. Values are read at call time, so tests and long-running servers see changes.

=============================  ==========  =================================================
variable                       default     what it bounds
=============================  ==========  =================================================
EXPLAINER_MEMORY_BUDGET_MB     2048        working memory of one attribution pass (the
                                           engine meters its first pass, from the layer's
                                           activations, and splits the rest to fit)
EXPLAINER_MAX_STEPS            1024        n_steps of one conductance request in the app
EXPLAINER_MAX_IMAGES           32          images held by one browser session
EXPLAINER_MAX_UPLOAD_MB        500         size of a model file (explainer.models)
EXPLAINER_MAX_IMAGE_PIXELS     40000000    width x height of an image (explainer.images)
EXPLAINER_ALLOW_PICKLE         off         "1" lets trusted pickled modules load
=============================  ==========  =================================================
"""

from __future__ import annotations

import os

from explainer.errors import ExplainerError

__all__ = [
    "max_images",
    "max_steps",
    "memory_budget_bytes",
]


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ExplainerError(
            f"The setting {name}={raw!r} is not a number; fix it or unset it."
        ) from None
    if value <= 0:
        raise ExplainerError(f"The setting {name}={raw!r} must be positive; fix it or unset it.")
    return value


def memory_budget_bytes() -> int:
    """Working memory allowed for one attribution pass, in bytes."""
    return int(_env_number("EXPLAINER_MEMORY_BUDGET_MB", 2048) * 2**20)


def max_steps() -> int:
    """The most integration steps one request may ask for."""
    return int(_env_number("EXPLAINER_MAX_STEPS", 1024))


def max_images() -> int:
    """The most images one browser session may hold."""
    return int(_env_number("EXPLAINER_MAX_IMAGES", 32))
