"""One image's record in dataset mode: what a worker computes, as plain data.

:func:`image_record` runs in whatever holds the model (a local worker process or a Ray actor,
through the ``dataset_record`` operation of :class:`explainer.compute.tasks.ModelSession`) and
returns only numbers, short texts and numpy arrays, so :mod:`explainer.compute.wire` carries it.
It calls the same library functions a per-image run does (:func:`explainer.analysis.class_scores`,
:func:`~explainer.analysis.layer_activation`, :func:`~explainer.analysis.compute_layer_overview`),
so a record holds exactly the numbers those give for the image.

:func:`record_problem` is the other side: the driver checks every record a worker sends before it
stores it, as the server checks every result of an untrusted worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from explainer import analysis
from explainer.baselines import BASELINE_KINDS, make_baseline
from explainer.errors import AttributionError, ExplainerError

__all__ = [
    "TOP_K",
    "activation_summary",
    "image_record",
    "record_problem",
]

TOP_K = 5
"""Leading classes kept per image."""

AUTO_STEPS_CAP = 511
"""With ``n_steps="auto"``: the most steps (512 path points, the engine's default cap)."""

_MAX_LAYERS = 256
_MAX_TEXT = 4000
_STATUSES = frozenset({"fixed", "converged", "cap", "stalled", "memory", "stopped"})


def activation_summary(activation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel maximum and mean of one image's layer output (first axis = channels).

    A ``(C, H, W)`` output gives each channel's strongest and average response over the
    positions; a flat ``(F,)`` output gives each unit's value twice. Both are float32 ``(C,)``.
    """
    values = np.asarray(activation, dtype=np.float32)
    if values.ndim == 0:
        values = values.reshape(1)
    flat = values.reshape(values.shape[0], -1)
    if flat.shape[1] == 0:
        empty = np.zeros(flat.shape[0], dtype=np.float32)
        return empty, empty.copy()
    return flat.max(axis=1).astype(np.float32), flat.mean(axis=1, dtype=np.float64).astype(
        np.float32
    )


def _baseline(spec: Mapping[str, Any], x: torch.Tensor, normalisation: Any) -> torch.Tensor:
    kind = spec.get("kind", "black")
    if kind not in BASELINE_KINDS:
        raise AttributionError(
            f"Unknown baseline kind {kind!r}; choose one of: {', '.join(BASELINE_KINDS)}."
        )
    return make_baseline(
        str(kind),
        x,
        normalisation,
        value=float(spec.get("value", 0.5)),
        seed=int(spec.get("seed", 0)),
        blur_sigma=float(spec.get("blur_sigma", 5.0)),
    )


def image_record(
    model: nn.Module,
    normalisation: Any,
    x: torch.Tensor,
    *,
    layers: Sequence[str],
    target_class: int | None,
    baseline: Mapping[str, Any],
    method: str,
    n_steps: int | str,
    tolerance: float | None = None,
    maps: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Everything dataset mode keeps about one image, as plain data.

    Parameters
    ----------
    model : nn.Module
        An eval-mode model.
    normalisation : object
        Anything with the model's ``mean`` and ``std`` (a ``ModelInfo`` or ``Preprocessing``):
        baselines are built in the normalised space, as in the app.
    x : Tensor
        One preprocessed image ``(1, C, H, W)``.
    layers : sequence of str
        Dotted layer names; conductance of all of them comes from one pass along the path.
    target_class : int or None
        The class to explain; None explains the predicted class. For per-position scores the
        position is where that class scores highest (:func:`explainer.analysis.default_target`).
    baseline : mapping
        ``{"kind": ..., "value": ..., "seed": ..., "blur_sigma": ...}`` as for
        :func:`explainer.baselines.make_baseline`.
    method, n_steps, tolerance
        The integration rule and its steps (``"auto"`` with a tolerance: the engine's
        automatic steps).
    maps : bool
        Also return each layer's full conductance map.

    Returns
    -------
    dict
        ``top`` (the leading classes as ``(index, value)``), ``predicted``, ``target`` and
        ``layers``: one dict per layer with ``name``, ``shape``, ``conductance`` (each
        channel's total), ``act_max`` and ``act_mean`` (each channel's activation summary),
        ``delta``, ``output_diff``, ``relative_delta``, ``n_steps``, ``steps_status``
        (``"fixed"``, or with automatic steps why the engine stopped refining),
        ``layer_moves`` and ``map`` (None unless ``maps``).
    """
    names = list(dict.fromkeys(str(n) for n in layers))
    if not names:
        raise AttributionError("Pick at least one layer (--layers a,b,c).")
    scores = analysis.class_scores(model, x)
    top = analysis.rank_classes(scores, [], k=TOP_K)
    target = analysis.default_target(scores, target_class)
    base = _baseline(baseline, x, normalisation)
    auto = n_steps == "auto"
    overview = analysis.compute_layer_overview(
        model, names, x, target, base, method=method, n_steps="auto" if auto else int(n_steps),
        tolerance=tolerance, steps_cap=AUTO_STEPS_CAP if auto else None, progress=progress,
    )  # fmt: skip
    records = []
    for name in names:
        result = overview[name]
        act_max, act_mean = activation_summary(analysis.layer_activation(model, name, x))
        records.append(
            {
                "name": name,
                "shape": tuple(int(d) for d in result.attributions.shape),
                "conductance": np.asarray(result.channel_totals, dtype=np.float32),
                "act_max": act_max,
                "act_mean": act_mean,
                "delta": float(result.delta),
                "output_diff": float(result.output_diff),
                "relative_delta": float(result.relative_delta),
                "n_steps": int(result.n_steps),
                "steps_status": result.status,
                "layer_moves": bool(result.layer_moves),
                "map": np.asarray(result.attributions, dtype=np.float32) if maps else None,
            }
        )
    return {
        "top": [(int(i), float(v)) for _, i, v in top],
        "predicted": int(top[0][1]),
        "target": target,
        "layers": records,
    }


def error_record(exc: ExplainerError) -> dict[str, Any]:
    """The record of an image the model could not explain: the reason, as one line."""
    return {"error": " ".join(str(exc).split())[:_MAX_TEXT]}


# --------------------------------------------------------------------------- checking


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vector(value: Any, length: int) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.float32 and value.shape == (length,)


def _layer_problem(entry: Any, maps: bool) -> str | None:
    if not isinstance(entry, dict):
        return "a layer entry that is not a record"
    shape = entry.get("shape")
    if not (isinstance(shape, tuple) and shape and all(_is_int(d) and d >= 0 for d in shape)):
        return "a layer shape that is not whole numbers"
    if not (isinstance(entry.get("name"), str) and len(entry["name"]) <= _MAX_TEXT):
        return "a layer name that is not a short text"
    channels = shape[0]
    for key in ("conductance", "act_max", "act_mean"):
        if not _vector(entry.get(key), channels):
            return f"{key} values that do not match the layer's {channels} channels"
    for key in ("delta", "output_diff", "relative_delta"):
        if not _is_number(entry.get(key)):
            return f"a {key} that is not a number"
    if not (_is_int(entry.get("n_steps")) and entry["n_steps"] >= 1):
        return "a number of steps that is not a positive whole number"
    if entry.get("steps_status") not in _STATUSES:
        return "a steps status that is not one of the engine's"
    if not isinstance(entry.get("layer_moves"), bool):
        return "a layer_moves flag that is not true or false"
    heat = entry.get("map")
    if maps:
        if not (isinstance(heat, np.ndarray) and heat.dtype == np.float32 and heat.shape == shape):
            return "a conductance map that does not match the layer's shape"
    elif heat is not None:
        return "a conductance map nobody asked for"
    return None


def record_problem(record: Any, layers: Sequence[str], num_classes: int, maps: bool) -> str | None:
    """Why a record a worker sent cannot be stored, or None when it is well formed.

    Checks the structure, types and sizes against what was asked (the layers in order, the
    model's classes, maps or not); records of failures (``{"error": text}``) are accepted.
    """
    if not isinstance(record, dict):
        return "a record that is not a mapping"
    if set(record) == {"error"}:
        return None if isinstance(record["error"], str) else "an error that is not a text"
    if set(record) != {"top", "predicted", "target", "layers"}:
        return "a record with the wrong fields"
    top = record["top"]
    if not (isinstance(top, list) and 1 <= len(top) <= TOP_K):
        return "a list of leading classes of the wrong length"
    for item in top:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and _is_int(item[0])
            and 0 <= item[0] < num_classes
            and _is_number(item[1])
            and math.isfinite(item[1])
        ):
            return "a leading class that is not (class, value)"
    predicted = record["predicted"]
    if not (_is_int(predicted) and 0 <= predicted < num_classes):
        return "a predicted class out of range"
    target = record["target"]
    target_class = target[0] if isinstance(target, tuple) and target else target
    if not (_is_int(target_class) and 0 <= target_class < num_classes):
        return "a target class out of range"
    if isinstance(target, tuple) and not all(_is_int(i) and i >= 0 for i in target):
        return "a target position that is not whole numbers"
    entries = record["layers"]
    if not (isinstance(entries, list) and len(entries) == len(layers) <= _MAX_LAYERS):
        return "a list of layers that does not match the layers asked for"
    for entry, name in zip(entries, layers, strict=True):
        problem = _layer_problem(entry, maps)
        if problem is not None:
            return problem
        if entry["name"] != name:
            return f"layer {entry['name']!r} where {name!r} was asked for"
    return None
