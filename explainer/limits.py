"""Operator limits: the one place where a server's resource bounds are read.

Each limit comes from an environment variable so that the operator of a server sets it, never
a browser user. Values are read at call time, so tests and long-running servers see changes.

=============================  =========  ==================================================
variable                       default    what it bounds
=============================  =========  ==================================================
EXPLAINER_MEMORY_BUDGET_MB     2048       working memory of one attribution pass (the engine
                                          splits the work into passes that fit)
=============================  =========  ==================================================
"""

from __future__ import annotations

import os

from torch import Tensor

from explainer.errors import ExplainerError

__all__ = ["memory_budget_bytes", "rows_per_pass", "ACTIVATION_FACTOR"]

# Autograd keeps several activations per layer for the backward pass; for common CNNs the
# total per example is a few dozen times the size of the input image.
ACTIVATION_FACTOR = 64


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


def rows_per_pass(inputs: tuple[Tensor, ...]) -> int:
    """How many example rows (path points or copies times examples) one pass may hold."""
    per_row = sum(t[0].numel() * t.element_size() for t in inputs) * ACTIVATION_FACTOR
    return max(1, memory_budget_bytes() // max(per_row, 1))
