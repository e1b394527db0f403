"""Operator limits: the one place where a server's resource bounds are read.

Each limit comes from an environment variable so that the operator of a server sets it, never
a browser user. Values are read at call time, so tests and long-running servers see changes.

===============================  ==========  ===============================================
variable                         default     what it bounds
===============================  ==========  ===============================================
EXPLAINER_MEMORY_BUDGET_MB       2048        working memory of one attribution pass (the
                                             engine meters its first pass and splits the
                                             rest to fit)
EXPLAINER_MAX_STEPS              1024        n_steps of one conductance request in the app
EXPLAINER_MAX_IMAGES             32          images held by one browser session
EXPLAINER_MAX_IMAGE_MB           25          bytes of one image file
EXPLAINER_MAX_SESSION_IMAGES_MB  200         bytes of all the images one session holds
EXPLAINER_MAX_IMAGE_PIXELS       40000000    width x height of an image (explainer.images)
EXPLAINER_MAX_UPLOAD_MB          500         bytes of a model file
EXPLAINER_MAX_CLASSES            100000      classes a model file may declare
EXPLAINER_MAX_INPUT_PIXELS       4194304     height x width of a model's input (2048 x 2048)
EXPLAINER_MAX_LABELS_MB          4           bytes of a labels file
EXPLAINER_WORKER_MEMORY_MB       6144        memory of one compute worker process
EXPLAINER_REQUEST_TIMEOUT_S      300         wall-clock time of one request to a worker
EXPLAINER_MAX_WORKERS            3           compute worker processes (one per model)
EXPLAINER_FIRST_LOOK_AFTER_S     0.25        wait for a map before showing a coarse first look
EXPLAINER_ALLOW_PICKLE           off         "1" lets trusted pickled modules load
===============================  ==========  ===============================================

Set the same way, read where they are used: ``EXPLAINER_DEVICE`` (``auto``, ``cpu`` or
``cuda``), where the compute workers run models (:mod:`explainer.compute.tasks`), and
``EXPLAINER_WORKER_CGROUP``, a control group every worker joins (:mod:`explainer.compute.local`).
"""

from __future__ import annotations

import os

from explainer.errors import ExplainerError

__all__ = [
    "MAX_LABEL_CHARS",
    "max_classes",
    "max_image_bytes",
    "max_images",
    "max_input_pixels",
    "max_label_bytes",
    "max_session_image_bytes",
    "max_steps",
    "max_upload_bytes",
    "max_workers",
    "memory_budget_bytes",
    "request_timeout_s",
    "worker_memory_bytes",
]

MAX_LABEL_CHARS = 200
"""Longest class name accepted from a labels file (a name, not a paragraph)."""


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        raise ExplainerError(
            f"The server setting {name}={raw!r} is not a number; the operator must fix or unset it."
        ) from None
    if not value > 0:
        raise ExplainerError(
            f"The server setting {name}={raw!r} must be positive; the operator must fix or unset "
            "it."
        )
    return value


def _mib(name: str, default: float) -> int:
    return int(_env_number(name, default) * 2**20)


def memory_budget_bytes() -> int:
    """Working memory allowed for one attribution pass, in bytes."""
    return _mib("EXPLAINER_MEMORY_BUDGET_MB", 2048)


def max_steps() -> int:
    """The most integration steps one request may ask for."""
    return int(_env_number("EXPLAINER_MAX_STEPS", 1024))


def max_images() -> int:
    """The most images one browser session may hold."""
    return int(_env_number("EXPLAINER_MAX_IMAGES", 32))


def max_image_bytes() -> int:
    """The largest image file accepted, in bytes."""
    return _mib("EXPLAINER_MAX_IMAGE_MB", 25)


def max_session_image_bytes() -> int:
    """The most bytes of image files one browser session may hold."""
    return _mib("EXPLAINER_MAX_SESSION_IMAGES_MB", 200)


def max_upload_bytes() -> int:
    """The largest model file accepted, in bytes."""
    return _mib("EXPLAINER_MAX_UPLOAD_MB", 500)


def max_classes() -> int:
    """The most classes (outputs) a model file may declare."""
    return int(_env_number("EXPLAINER_MAX_CLASSES", 100_000))


def max_input_pixels() -> int:
    """The largest height x width of a model's input."""
    return int(_env_number("EXPLAINER_MAX_INPUT_PIXELS", 2048 * 2048))


def max_label_bytes() -> int:
    """The largest labels file accepted, in bytes."""
    return _mib("EXPLAINER_MAX_LABELS_MB", 4)


def worker_memory_bytes() -> int:
    """The memory one compute worker process may use, in bytes."""
    return _mib("EXPLAINER_WORKER_MEMORY_MB", 6144)


def request_timeout_s() -> float:
    """The wall-clock time one request to a compute worker may take, in seconds."""
    return _env_number("EXPLAINER_REQUEST_TIMEOUT_S", 300)


def first_look_after_s() -> float:
    """How long a page waits for a conductance map before it shows a coarse first look and
    refines the map in the background, in seconds."""
    return _env_number("EXPLAINER_FIRST_LOOK_AFTER_S", 0.25)


def max_workers() -> int:
    """The most compute worker processes (one per loaded model) a server runs at once."""
    return int(_env_number("EXPLAINER_MAX_WORKERS", 3))
