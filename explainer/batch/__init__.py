"""Dataset mode: explain every image of a folder, locally or on a Ray cluster, into a store.

``record``   what a worker computes for one image (the ``dataset_record`` operation), and the
             check of what it sends back
``dataset``  finding images, true labels from class folders (as torchvision's ImageFolder)
``store``    the results store: SQLite tables and float32 arrays, never pickles
``runner``   :func:`run_batch`: the driver, with resume, progress and a clean stop
``cli``      ``explainer batch`` and ``explainer top``

The names below load their module on first use, so a worker that only computes records never
imports the driver's dependencies (tqdm) and importing :mod:`explainer` imports none of this.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BatchError",
    "BatchSettings",
    "BatchSummary",
    "ResultsStore",
    "StoreError",
    "run_batch",
]

_HOMES = {
    "BatchError": "explainer.batch.runner",
    "BatchSettings": "explainer.batch.runner",
    "BatchSummary": "explainer.batch.runner",
    "run_batch": "explainer.batch.runner",
    "ResultsStore": "explainer.batch.store",
    "StoreError": "explainer.batch.store",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'explainer.batch' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
