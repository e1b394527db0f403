"""The service behind the pages: predictions, layer conductance, neuron gradients, convergence.

Every function takes an eval-mode model, the layer's dotted name and one normalised image, runs
the attribution engine, and returns plain dataclasses of numpy arrays and floats that are cheap
to cache and to draw. Tensor work happens on the model's device; results come back on the CPU.

Scores: the model returns class scores shaped ``(N, classes)`` (a classifier) or
``(N, classes, *positions)`` (a score per class at every output position, e.g. a segmentation
model's ``(N, classes, H, W)``); dimension 1 is always the class dimension. A model returning a
dict is read through its ``"out"`` (torchvision segmentation models) or ``"logits"`` entry. The
target to explain is a class index for class scores and Captum's tuple target
``(class, *position)``, e.g. ``(class, row, column)``, for per-position scores.

Nothing here mutates the model: the only hooks are short-lived forward hooks that record a
layer's output for the calling thread, removed in ``finally`` blocks.
"""

from __future__ import annotations

import difflib
import itertools
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from explainer.attribution import LayerConductance, NeuronGradient
from explainer.errors import AttributionError, AttributionTypeError
from explainer.hooks import lone_tensor_index, thread_bound
from explainer.integration import check_method
from explainer.limits import max_steps

__all__ = [
    "SCORE_KEYS",
    "ConductanceResult",
    "ConvergencePoint",
    "NeuronGradientResult",
    "Target",
    "class_scores",
    "compute_conductance",
    "compute_layer_overview",
    "compute_neuron_gradient",
    "compute_neuron_gradients",
    "convergence_sweep",
    "default_target",
    "layer_activation",
    "negligible_difference",
    "neighbours",
    "position_names",
    "rank_classes",
    "score_shape",
    "top_predictions",
    "validate_target",
]

Progress = Callable[[int, int], None]

Target = int | tuple[int, ...]
"""A class index for scores shaped ``(N, classes)``; ``(class, *position)`` for per-position
scores shaped ``(N, classes, *positions)``."""

SCORE_KEYS: tuple[str, ...] = ("out", "logits")
"""Entries of a dict output that hold the scores, tried in this order: ``"out"`` (torchvision
segmentation models, whose ``"aux"`` entry is ignored) and ``"logits"`` (Hugging Face models)."""

# Guards the relative delta against division by a vanishing output difference.
_EPS = 1e-8


@dataclass(frozen=True, eq=False)
class ConductanceResult:
    """Layer conductance of one layer for one image and one target output.

    Attributes
    ----------
    layer : str
        Dotted module name.
    target : int or tuple of int
        The explained output: a class index for class scores, ``(class, *position)`` for
        per-position scores (see :attr:`target_class` and :attr:`target_position`).
    attributions : np.ndarray
        Conductance per layer unit for the image, shaped like the layer output without the
        batch dimension, e.g. ``(C, H, W)`` or ``(F,)``.
    channel_totals : np.ndarray
        ``(C,)`` sums over every dimension but the first (equal to ``attributions`` for a
        flat layer).
    spatial : np.ndarray or None
        ``(H, W)`` sum over channels for ``(C, H, W)`` layers, else None.
    delta : float
        Signed convergence delta: ``sum(attributions) - (F(x) - F(baseline))``.
    output_diff : float
        ``F(x) - F(baseline)`` for the target output.
    relative_delta : float
        ``|delta| / max(|output_diff|, eps)``.
    method : str
        Integration rule; ``"auto"`` for path points the engine chose to a tolerance.
    n_steps : int
        Number of integration steps (with ``"auto"``: intervals between the chosen points).
    is_spatial : bool
        True for ``(C, H, W)`` layers.
    layer_moves : bool
        Whether the layer's output differs between the image and the baseline. When it does
        and every conductance is zero, no gradient reaches the layer from the score (a step
        function, rounding or a detached branch lies between them).
    status : str
        ``"fixed"`` for a fixed number of steps; with ``"auto"``, why the engine stopped adding
        points: ``"converged"`` (within the tolerance), ``"cap"`` (the most steps allowed),
        ``"stalled"`` (the delta does not come from the steps), ``"memory"`` or ``"stopped"``.
    """

    layer: str
    target: Target
    attributions: np.ndarray
    channel_totals: np.ndarray
    spatial: np.ndarray | None
    delta: float
    output_diff: float
    relative_delta: float
    method: str
    n_steps: int
    is_spatial: bool
    layer_moves: bool = True
    status: str = "fixed"

    @property
    def target_class(self) -> int:
        """The class of the explained output."""
        return self.target[0] if isinstance(self.target, tuple) else self.target

    @property
    def target_position(self) -> tuple[int, ...]:
        """The output position of the explained score; ``()`` for class scores."""
        return self.target[1:] if isinstance(self.target, tuple) else ()


@dataclass(frozen=True, eq=False)
class NeuronGradientResult:
    """Gradient of one layer unit with respect to the model input.

    Attributes
    ----------
    layer : str
        Dotted module name.
    neuron : tuple of int
        Index of the unit in the layer output, without the batch dimension.
    gradient : np.ndarray
        ``(C, H, W)`` gradient of the unit with respect to the (normalised) input image.
    activation : float
        The unit's value for the image.
    abs_max : float
        ``max(|gradient|)``, handy for a symmetric colour scale.
    """

    layer: str
    neuron: tuple[int, ...]
    gradient: np.ndarray
    activation: float
    abs_max: float


@dataclass(frozen=True)
class ConvergencePoint:
    """Convergence delta of one integration rule at one number of steps."""

    method: str
    n_steps: int
    delta: float
    relative_delta: float


# --------------------------------------------------------------------------- public functions


def score_shape(model: nn.Module, x: Tensor) -> tuple[int, ...]:
    """Shape of the model's scores for one image, without the batch dimension.

    Parameters
    ----------
    model : nn.Module
        An eval-mode model.
    x : Tensor
        Normalised images ``(N, C, H, W)``; one zero image of the input size will do.

    Returns
    -------
    tuple of int
        ``(classes,)`` for a classifier, ``(classes, *positions)`` for per-position scores.

    Raises
    ------
    AttributionError
        When the output is not class scores (a tuple, a dict without scores, one number per
        image...), with what to do about it.
    """
    _check_model(model)
    x = _prepare_input(model, x, "image batch", single=False)
    scores, _ = _forward(model, x)
    return tuple(int(s) for s in scores.shape[1:])


def class_scores(model: nn.Module, x: Tensor) -> np.ndarray:
    """The model's scores for one image ``(1, C, H, W)``, on the CPU.

    Returns
    -------
    np.ndarray
        ``(classes,)`` or ``(classes, *positions)``; float64 for a float64 model, else float32.
    """
    _check_model(model)
    x = _prepare_input(model, x, "image")
    scores, _ = _forward(model, x)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return scores[0].to(device="cpu", dtype=dtype).numpy()


def rank_classes(
    scores: np.ndarray | Tensor, labels: Sequence[str], k: int = 5
) -> list[tuple[str, int, float]]:
    """The ``k`` leading classes of one image's scores, as ``(label, index, value)``.

    For class scores ``(classes,)`` the value is the softmax probability and classes come by
    decreasing probability. For per-position scores ``(classes, *positions)`` the value is the
    share of output positions where the class has the highest score (the share of a
    segmentation map it covers); classes come by decreasing share, ties (e.g. the many classes
    that cover nothing) broken by decreasing mean softmax probability over the positions, then
    by index.

    Parameters
    ----------
    scores : np.ndarray or Tensor
        One image's scores, e.g. from :func:`class_scores`.
    labels : sequence of str
        Class names by index; classes without a name are shown as ``"class <i>"``.
    k : int, optional
        How many classes to return (fewer if the model has fewer classes).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise AttributionError(f"k must be a positive whole number of classes; got {k!r}.")
    if isinstance(scores, Tensor):
        scores = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise AttributionError(
            f"Scores of one image are shaped (classes,) or (classes, ...); got {values.shape}."
        )
    if not np.isfinite(values).all():
        raise AttributionError(
            "The model's scores contain NaN or infinite values for this image, so there is no "
            "ranking of its classes (and attributions would be meaningless); check the model's "
            "weights and the preprocessing (normalisation) of the image."
        )
    flat = values.reshape(values.shape[0], -1)
    probs = _softmax(flat)
    if values.ndim == 1:
        ranked_values = probs[:, 0]
        order = np.argsort(-ranked_values, kind="stable")
    else:
        winners = np.argmax(flat, axis=0)
        ranked_values = np.bincount(winners, minlength=flat.shape[0]) / flat.shape[1]
        order = np.lexsort((-probs.mean(axis=1), -ranked_values))
    return [(_label(labels, int(i)), int(i), float(ranked_values[i])) for i in order[: int(k)]]


def top_predictions(
    model: nn.Module, x: Tensor, labels: Sequence[str], k: int = 5
) -> list[list[tuple[str, int, float]]]:
    """Return the ``k`` leading classes of each image.

    Parameters
    ----------
    model : nn.Module
        An eval-mode model returning scores shaped ``(N, classes)`` or
        ``(N, classes, *positions)``.
    x : Tensor
        Normalised images ``(N, C, H, W)``.
    labels : sequence of str
        Class names by index; classes without a name are shown as ``"class <i>"``.
    k : int, optional
        How many classes to return per image (fewer if the model has fewer classes).

    Returns
    -------
    list of list of (str, int, float)
        For each image, ``(label, index, value)`` as ranked by :func:`rank_classes`: for class
        scores the value is the softmax probability; for per-position scores it is the share
        of output positions where the class has the highest score.
    """
    _check_model(model)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise AttributionError(f"k must be a positive whole number of classes; got {k!r}.")
    x = _prepare_input(model, x, "image batch", single=False)
    logits, _ = _forward(model, x)
    values = logits.detach().to(device="cpu", dtype=torch.float64).numpy()
    return [rank_classes(row, labels, k) for row in values]


NEGLIGIBLE_DIFFERENCE = 1e-5
"""Score differences at most this fraction of the largest score are rounding noise: float32
keeps about 7 significant digits, and a forward pass loses a few of them."""


def negligible_difference(output_diff: float, score_scale: float) -> bool:
    """Whether ``F(x) - F(baseline)`` (``output_diff``) is too small next to the scores
    (``score_scale``, the largest ``|score|`` of the image) for its attributions to be more than
    rounding noise: ``|output_diff| <= NEGLIGIBLE_DIFFERENCE * score_scale``, and a difference of
    exactly zero."""
    diff, scale = abs(float(output_diff)), abs(float(score_scale))
    if not (np.isfinite(diff) and np.isfinite(scale)):
        return False
    return diff == 0.0 or diff <= NEGLIGIBLE_DIFFERENCE * scale


def position_names(ndim: int) -> tuple[str, ...]:
    """Names of the position dimensions of per-position scores, for messages and forms.

    ``("position",)`` for ``(N, classes, L)`` scores, ``("row", "column")`` for
    ``(N, classes, H, W)``, ``("depth", "row", "column")`` for ``(N, classes, D, H, W)`` and
    ``("index 1", "index 2", ...)`` beyond.
    """
    if ndim == 1:
        return ("position",)
    if ndim == 2:
        return ("row", "column")
    if ndim == 3:
        return ("depth", "row", "column")
    return tuple(f"index {i + 1}" for i in range(ndim))


def validate_target(target: Any, score_shape: Sequence[int]) -> Target:
    """Check that ``target`` names one score of an image's scores; return it normalised.

    Parameters
    ----------
    target : int or tuple of int
        A class index for class scores ``(classes,)``; Captum's tuple target
        ``(class, *position)`` for per-position scores ``(classes, *positions)``. A one-element
        tuple ``(class,)`` is accepted for class scores.
    score_shape : sequence of int
        The scores' shape for one image (see :func:`score_shape`).

    Returns
    -------
    int or tuple of int
        A plain ``int`` for class scores, a tuple of plain ints for per-position scores.

    Raises
    ------
    AttributionTypeError
        When the target is not an index or a tuple of indices.
    AttributionError
        When it has the wrong number of indices or one is out of range; the message gives the
        valid ranges.
    """
    shape = tuple(int(s) for s in score_shape)
    if not shape:
        raise AttributionError("The model's scores have no class dimension; nothing to target.")
    positions = shape[1:]
    if _is_index(target):
        if positions:
            raise AttributionError(
                f"Target {int(target)} names a class only, but this model {_scores_text(shape)}, "
                f"so a target is {_target_form(len(positions))} with {_ranges(shape)}."
            )
        _check_class(int(target), shape[0])
        return int(target)
    if isinstance(target, tuple) and all(_is_index(i) for i in target):
        index = tuple(int(i) for i in target)
        if len(index) != len(shape):
            raise AttributionError(
                f"Target {index} has {len(index)} "
                f"{'index' if len(index) == 1 else 'indices'}, but this model "
                f"{_scores_text(shape)}: give {len(shape)}, {_target_form(len(positions))}, with "
                f"{_ranges(shape)}."
            )
        if not positions:
            _check_class(index[0], shape[0])
            return index[0]
        names = ("class", *position_names(len(positions)))
        for name, i, size in zip(names, index, shape, strict=True):
            if not 0 <= i < size:
                raise AttributionError(
                    f"Target {index} is out of range: {name} {i} is not between 0 and "
                    f"{size - 1}. Valid targets have {_ranges(shape)}."
                )
        return index
    form = f" or a tuple {_target_form(len(positions))}" if positions else ""
    raise AttributionTypeError(
        f"The target must be a class index (a whole number){form}; got {target!r}."
    )


def default_target(
    scores: np.ndarray | Tensor,
    target_class: int | None = None,
    position: Sequence[int | None] | None = None,
) -> Target:
    """The output to explain for one image when the user fixed only part of it, or nothing.

    The class is ``target_class``, or else the top class of :func:`rank_classes` (the most
    probable class; for per-position scores the class covering most positions). For
    per-position scores, each index of ``position`` left as None (all of them when
    ``position`` is None) is chosen where that class's score is highest with the given
    indices fixed (the first such position in row-major order on ties).

    Parameters
    ----------
    scores : np.ndarray or Tensor
        One image's scores ``(classes,)`` or ``(classes, *positions)`` (:func:`class_scores`).
    target_class : int, optional
        The class to explain; the top class when None.
    position : sequence of (int or None), optional
        One entry per position dimension; ignored for class scores.

    Returns
    -------
    int or tuple of int
        A validated target (see :func:`validate_target`).
    """
    if isinstance(scores, Tensor):
        scores = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    values = np.asarray(scores, dtype=np.float64)
    shape = values.shape
    if target_class is None:
        target_class = rank_classes(values, [], k=1)[0][1]
    if values.ndim <= 1:
        return validate_target(target_class, shape)
    count = values.ndim - 1
    if position is None:
        position = (None,) * count
    if isinstance(position, (str, bytes)) or not isinstance(position, Sequence):
        raise AttributionTypeError(
            f"An output position is a tuple of {count} indices; got {position!r}."
        )
    fixed = tuple(position)
    if len(fixed) != count:
        names = ", ".join(position_names(count))
        raise AttributionError(
            f"The output position {fixed} has {len(fixed)} "
            f"{'index' if len(fixed) == 1 else 'indices'}, but the scores have {count} position "
            f"{'dimension' if count == 1 else 'dimensions'} ({_grid(shape[1:])}): give {names}."
        )
    if any(p is not None and not _is_index(p) for p in fixed):
        raise AttributionTypeError(
            f"Output position indices must be whole numbers (or None); got {fixed!r}."
        )
    # Check the class and the fixed indices (free ones stand in as 0) before slicing.
    validate_target((target_class, *(0 if p is None else p for p in fixed)), shape)
    plane = values[int(target_class)]
    free = [d for d, p in enumerate(fixed) if p is None]
    view = plane[tuple(slice(None) if p is None else int(p) for p in fixed)]
    chosen = [None if p is None else int(p) for p in fixed]
    if free:
        clean = np.where(np.isnan(view), -np.inf, view)
        best = np.unravel_index(int(np.argmax(clean)), clean.shape)
        for d, i in zip(free, best, strict=True):
            chosen[d] = int(i)
    return validate_target((int(target_class), *chosen), shape)


def compute_conductance(
    model: nn.Module,
    layer_name: str,
    x: Tensor,
    target: Target,
    baseline: Tensor,
    *,
    method: str = "gausslegendre",
    n_steps: int | str = 50,
    internal_batch_size: int | None = None,
    progress: Progress | None = None,
    tolerance: float | None = None,
    steps_cap: int | None = None,
) -> ConductanceResult:
    """Layer conductance of ``layer_name`` for one image, target output and baseline.

    Parameters
    ----------
    model : nn.Module
        An eval-mode model returning class scores shaped ``(N, classes)``, or per-position
        scores ``(N, classes, *positions)`` (a dict output is read through :data:`SCORE_KEYS`).
    layer_name : str
        Dotted name of the layer, as in ``model.named_modules()``.
    x : Tensor
        One normalised image ``(1, C, H, W)``.
    target : int or tuple of int
        The score to explain: a class index for class scores; ``(class, *position)`` for
        per-position scores, e.g. ``(class, row, column)`` for ``(N, classes, H, W)`` (Captum's
        tuple target). :func:`default_target` picks one from the scores.
    baseline : Tensor
        Reference input shaped like ``x`` (see :func:`explainer.baselines.make_baseline`).
    method : str, optional
        Integration rule: ``"gausslegendre"``, ``"riemann_left"``, ``"riemann_right"``,
        ``"riemann_middle"`` or ``"riemann_trapezoid"``.
    n_steps : int or "auto", optional
        Number of integration steps; ``"auto"``: the engine adds path points until
        ``|delta| <= tolerance * |F(x) - F(baseline)|`` or the server's step limit
        (``method`` is then not used; the result's ``status`` says why it stopped).
    internal_batch_size : int, optional
        Path points evaluated per forward pass (bounds memory); all at once when None.
    progress : callable, optional
        ``progress(done, total)``, called as chunks of the path finish (with ``"auto"``, the
        total is the most path points the engine may use).
    tolerance : float, optional
        The relative delta ``n_steps="auto"`` aims for, e.g. ``0.01``.
    steps_cap : int, optional
        The most steps ``n_steps="auto"`` may use (at most, and by default, the server's
        step limit).

    Returns
    -------
    ConductanceResult
        Its ``output_diff`` is ``F(x)[target] - F(baseline)[target]``.
    """
    if not isinstance(layer_name, str):
        raise AttributionTypeError(f"layer_name must be a layer's dotted name, not {layer_name!r}.")
    overview = compute_layer_overview(
        model,
        [layer_name],
        x,
        target,
        baseline,
        method=method,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        progress=progress,
        tolerance=tolerance,
        steps_cap=steps_cap,
    )
    return overview[layer_name]


def compute_layer_overview(
    model: nn.Module,
    layer_names: Sequence[str],
    x: Tensor,
    target: Target,
    baseline: Tensor,
    *,
    method: str = "gausslegendre",
    n_steps: int | str = 50,
    internal_batch_size: int | None = None,
    progress: Progress | None = None,
    tolerance: float | None = None,
    steps_cap: int | None = None,
) -> dict[str, ConductanceResult]:
    """Layer conductance of several layers from one pass along the path.

    Same parameters as :func:`compute_conductance`, with a list of layer names; the engine
    walks the path once and records every layer, which is much cheaper than one call per layer.
    With ``n_steps="auto"`` the points are chosen for every layer at once (each layer's delta
    within the tolerance).

    Returns
    -------
    dict of str to ConductanceResult
        One result per distinct layer name, in the order given.
    """
    _check_model(model)
    if isinstance(layer_names, str) or not isinstance(layer_names, Sequence):
        raise AttributionTypeError(
            "layer_names must be a list of layer names; use compute_conductance for one layer."
        )
    names = list(dict.fromkeys(layer_names))
    if not names:
        raise AttributionError("Pick at least one layer for the overview.")
    # Several names may point at one module object; hand the engine each module once.
    modules: list[nn.Module] = []
    slot_of_name: dict[str, int] = {}
    for name in names:
        module = _resolve_layer(model, name)
        slot = next((i for i, known in enumerate(modules) if known is module), None)
        if slot is None:
            slot = len(modules)
            modules.append(module)
        slot_of_name[name] = slot
    auto = isinstance(n_steps, str) and n_steps == "auto"
    if auto:
        _check_tolerance(tolerance)
    else:
        _check_settings(method, n_steps)
    x = _prepare_input(model, x, "image")
    baseline = _prepare_baseline(model, baseline, x)
    first_name = {slot: name for name, slot in reversed(slot_of_name.items())}
    logits, layer_outputs, key = _probe(
        model, modules, [first_name[i] for i in range(len(modules))], torch.cat([x, baseline])
    )
    target = validate_target(target, tuple(logits.shape[1:]))
    output_diff = _output_diff(logits, target)
    moves = [not torch.equal(out[0], out[1]) for out in layer_outputs]

    engine = LayerConductance(_scores_function(model, key), modules)
    steps_options = (
        {"tolerance": float(tolerance), "max_steps": _points_cap(steps_cap)} if auto else {}
    )
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unconverged "auto" run: its status says so
        attributions = engine.attribute(
            x,
            baselines=baseline,
            target=target,
            n_steps="auto" if auto else int(n_steps),
            method=method,
            internal_batch_size=internal_batch_size,
            progress=progress,
            **steps_options,
        )
    if auto:  # points, not intervals, are what the engine counts
        method, n_steps = "auto", max(1, int(engine.last_steps[0]) - 1)
        status = str(engine.last_status[0])
    else:
        status = "fixed"
    # The probe already gave F(x) - F(baseline): the deltas need no further forward passes.
    return {
        name: replace(
            _conductance_result(
                name,
                target,
                attributions[slot],
                _delta(attributions[slot], output_diff),
                output_diff,
                method,
                int(n_steps),
                moves[slot],
            ),
            status=status,
        )
        for name, slot in slot_of_name.items()
    }


def compute_neuron_gradient(
    model: nn.Module, layer_name: str, x: Tensor, neuron: Sequence[int]
) -> NeuronGradientResult:
    """Gradient of one unit of ``layer_name`` with respect to the input image.

    See :func:`compute_neuron_gradients`, which this calls with a single neuron.
    """
    return compute_neuron_gradients(model, layer_name, x, [neuron])[0]


def compute_neuron_gradients(
    model: nn.Module, layer_name: str, x: Tensor, neurons: Sequence[Sequence[int]]
) -> list[NeuronGradientResult]:
    """Gradients of several units of one layer with respect to the input, in one batched pass.

    Parameters
    ----------
    model : nn.Module
        An eval-mode model.
    layer_name : str
        Dotted name of the layer.
    x : Tensor
        One normalised image ``(1, C, H, W)``.
    neurons : sequence of tuple of int
        Unit indices in the layer output without the batch dimension, e.g. ``(c, y, x)`` for a
        convolution or ``(f,)`` for a linear layer.

    Returns
    -------
    list of NeuronGradientResult
        One result per neuron, in the order given.
    """
    _check_model(model)
    layer = _resolve_layer(model, layer_name)
    x = _prepare_input(model, x, "image")
    if isinstance(neurons, (str, bytes)) or not isinstance(neurons, Sequence):
        raise AttributionTypeError("neurons must be a list of index tuples such as [(0, 3, 4)].")
    _, outputs, _ = _probe(model, [layer], [layer_name], x)
    activation = outputs[0][0]
    indices = [_check_neuron(n, tuple(activation.shape), layer_name) for n in neurons]
    if not indices:
        return []

    engine = NeuronGradient(model, layer)
    with torch.enable_grad():
        gradients = engine.attribute(x, neuron_selector=list(indices))
    gradients = gradients.detach()
    results = []
    for k, index in enumerate(indices):
        gradient = gradients[k, 0].to(device="cpu", dtype=torch.float32).numpy()
        results.append(
            NeuronGradientResult(
                layer=layer_name,
                neuron=index,
                gradient=gradient,
                activation=float(activation[index]),
                abs_max=float(np.abs(gradient).max()) if gradient.size else 0.0,
            )
        )
    return results


def neighbours(
    neuron: Sequence[int], layer_shape: Sequence[int], radius: int = 1
) -> list[tuple[int, ...]]:
    """Units next to ``neuron`` in a layer of shape ``layer_shape`` (without batch dimension).

    For a ``(C, H, W)`` layer and neuron ``(c, y, x)``: the units at the same channel within
    ``radius`` positions in each spatial direction (the 8 surrounding ones for ``radius=1``,
    fewer at edges and corners), then channels ``c - 1`` and ``c + 1`` at the same position.
    For a flat ``(F,)`` layer and neuron ``(f,)``: units ``f - radius`` to ``f + radius``.
    Other shapes treat the first dimension as channels and the rest as spatial.

    The neuron itself is never included; the order is fixed (spatial offsets row by row, then
    the channel before and after).

    Raises
    ------
    AttributionError
        When the neuron does not fit the shape or the radius is negative.
    """
    shape = tuple(int(s) for s in layer_shape)
    if not shape:
        raise AttributionError("A layer without dimensions has no neighbouring units.")
    index = _check_neuron(neuron, shape, "this layer")
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise AttributionError(f"radius must be a whole number of 0 or more; got {radius!r}.")
    r = int(radius)
    if len(shape) == 1:
        (f,) = index
        return [(g,) for g in range(max(0, f - r), min(shape[0], f + r + 1)) if g != f]

    channel, position = index[0], index[1:]
    result: list[tuple[int, ...]] = []
    for offset in itertools.product(range(-r, r + 1), repeat=len(position)):
        if not any(offset):
            continue
        moved = tuple(p + o for p, o in zip(position, offset, strict=True))
        if all(0 <= m < size for m, size in zip(moved, shape[1:], strict=True)):
            result.append((channel, *moved))
    for c in (channel - 1, channel + 1):
        if 0 <= c < shape[0]:
            result.append((c, *position))
    return result


def layer_activation(model: nn.Module, layer_name: str, x: Tensor) -> np.ndarray:
    """Output of ``layer_name`` for one image ``(1, C, H, W)``, without the batch dimension.

    Returns
    -------
    np.ndarray
        float32 array on the CPU, e.g. ``(C, H, W)`` or ``(F,)``.
    """
    _check_model(model)
    layer = _resolve_layer(model, layer_name)
    x = _prepare_input(model, x, "image")
    _, outputs, _ = _probe(model, [layer], [layer_name], x)
    return outputs[0][0].to(device="cpu", dtype=torch.float32).numpy()


def convergence_sweep(
    model: nn.Module,
    layer_name: str,
    x: Tensor,
    target: Target,
    baseline: Tensor,
    methods: Sequence[str],
    steps: Sequence[int],
    progress: Progress | None = None,
) -> list[ConvergencePoint]:
    """Convergence delta of every integration rule in ``methods`` at every count in ``steps``.

    The delta shows how far the summed conductance is from ``F(x) - F(baseline)``; it
    shrinks as the integral is approximated better, and faster for better rules.

    Parameters
    ----------
    model, layer_name, x, target, baseline
        As for :func:`compute_conductance`.
    methods : sequence of str
        Integration rules to compare.
    steps : sequence of int
        Numbers of steps to try for each rule.
    progress : callable, optional
        ``progress(done, total)`` with ``total = len(methods) * len(steps)``; called with
        ``done = 0`` first and after every point.

    Returns
    -------
    list of ConvergencePoint
        Ordered by method (as given), then by steps (as given).
    """
    _check_model(model)
    layer = _resolve_layer(model, layer_name)
    methods = [methods] if isinstance(methods, str) else list(methods)
    steps = list(steps)
    if not methods or not steps:
        raise AttributionError("Pick at least one integration method and one number of steps.")
    for method in methods:
        for n in steps:
            _check_settings(method, n)
    x = _prepare_input(model, x, "image")
    baseline = _prepare_baseline(model, baseline, x)
    logits, _, key = _probe(model, [layer], [layer_name], torch.cat([x, baseline]))
    target = validate_target(target, tuple(logits.shape[1:]))
    output_diff = _output_diff(logits, target)

    total = len(methods) * len(steps)
    if progress is not None:
        progress(0, total)
    engine = LayerConductance(_scores_function(model, key), layer)
    points = []
    for method in methods:
        for n in steps:
            with torch.enable_grad():
                attributions = engine.attribute(
                    x, baselines=baseline, target=target, n_steps=int(n), method=method
                )
            value = _delta(attributions, output_diff)
            points.append(
                ConvergencePoint(
                    method=method,
                    n_steps=int(n),
                    delta=value,
                    relative_delta=abs(value) / max(abs(output_diff), _EPS),
                )
            )
            if progress is not None:
                progress(len(points), total)
    return points


# --------------------------------------------------------------------------- helpers


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise AttributionTypeError(
            f"Expected a torch.nn.Module, got {type(model).__name__}; load the model first."
        )


def _resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``, or raise with the closest known names."""
    if not isinstance(name, str):
        raise AttributionTypeError(
            f"A layer is named by a string such as 'features.3'; got {type(name).__name__}."
        )
    if not name.strip():
        raise AttributionError("Pick a layer: the layer name is empty.")
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = (
            f" Did you mean {', '.join(repr(c) for c in close)}?"
            if close
            else " Pick a name from the layer tree."
        )
        raise AttributionError(f"The model has no layer named {name!r}.{hint}") from None


def _model_device_dtype(model: nn.Module, x: Tensor) -> tuple[torch.device, torch.dtype]:
    """The device of the model's first parameter (or buffer) and its floating dtype."""
    device = x.device
    dtype = x.dtype
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        device = tensor.device
        break
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            dtype = tensor.dtype
            break
    return device, dtype


def _prepare_input(model: nn.Module, x: Any, what: str, *, single: bool = True) -> Tensor:
    """Check ``x`` is an (N, C, H, W) float tensor and move it to the model's device/dtype."""
    if not isinstance(x, Tensor):
        raise AttributionTypeError(
            f"The {what} must be a torch.Tensor shaped (N, C, H, W); got {type(x).__name__}."
        )
    if not x.is_floating_point():
        raise AttributionTypeError(
            f"The {what} must hold floating-point values (it is {x.dtype}); preprocess it first."
        )
    if x.dim() != 4 or (single and x.shape[0] != 1):
        wanted = "(1, C, H, W): one image" if single else "(N, C, H, W)"
        raise AttributionError(f"The {what} must be shaped {wanted}; got shape {tuple(x.shape)}.")
    device, dtype = _model_device_dtype(model, x)
    return x.detach().to(device=device, dtype=dtype)


def _prepare_baseline(model: nn.Module, baseline: Any, x: Tensor) -> Tensor:
    if not isinstance(baseline, Tensor):
        raise AttributionTypeError(
            "The baseline must be a torch.Tensor shaped like the image; build one with "
            f"explainer.baselines.make_baseline (got {type(baseline).__name__})."
        )
    if tuple(baseline.shape) != tuple(x.shape):
        raise AttributionError(
            f"The baseline has shape {tuple(baseline.shape)} but the image has shape "
            f"{tuple(x.shape)}; build the baseline from the same preprocessed image."
        )
    if not baseline.is_floating_point():
        raise AttributionTypeError(
            f"The baseline must hold floating-point values; it is {baseline.dtype}."
        )
    return baseline.detach().to(device=x.device, dtype=x.dtype)


def _check_settings(method: Any, n_steps: Any) -> None:
    if not isinstance(method, str):
        raise AttributionTypeError(f"The integration method is a name; got {method!r}.")
    check_method(method)
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise AttributionError(f"n_steps must be a whole number of 1 or more; got {n_steps!r}.")
    if n_steps > max_steps():
        raise AttributionError(
            f"n_steps={int(n_steps)} is above this server's limit of {max_steps()} steps; use "
            "fewer steps (the convergence page shows how many are enough)."
        )


def _points_cap(steps_cap: Any) -> int:
    """Path points of at most ``steps_cap`` steps (the server's step limit when ``None``)."""
    if steps_cap is None:
        return max_steps() + 1
    _check_settings("gausslegendre", steps_cap)
    return int(steps_cap) + 1


def _check_tolerance(tolerance: Any) -> None:
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float, np.floating))
        or not 0 < float(tolerance) < 1
    ):
        raise AttributionError(
            f"n_steps='auto' needs a tolerance between 0 and 1, e.g. 0.01; got {tolerance!r}."
        )


def _is_index(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_class(target: int, num_classes: int) -> None:
    if not 0 <= target < num_classes:
        raise AttributionError(
            f"Target class {target} is out of range: this model has {num_classes} classes, "
            f"so pick a class between 0 and {num_classes - 1}."
        )


def _grid(positions: Sequence[int]) -> str:
    return " × ".join(str(int(p)) for p in positions)


def _scores_text(shape: tuple[int, ...]) -> str:
    count = len(shape) - 1
    if count == 0:
        return f"has {shape[0]} class scores"
    if count == 1:
        return f"scores {shape[0]} classes at each of its {shape[1]} output positions"
    return f"scores {shape[0]} classes at every position of its {_grid(shape[1:])} output"


def _target_form(count: int) -> str:
    return "(" + ", ".join(("class", *position_names(count))) + ")" if count else "a class"


def _ranges(shape: tuple[int, ...]) -> str:
    names = ("class", *position_names(len(shape) - 1))
    parts = [f"{n} between 0 and {s - 1}" for n, s in zip(names, shape, strict=True)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _softmax(values: np.ndarray) -> np.ndarray:
    """Softmax over the first axis of a float64 array."""
    shifted = values - np.max(values, axis=0, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=0, keepdims=True)


def _output_diff(scores: Tensor, target: Target) -> float:
    """``F(x)[target] - F(baseline)[target]`` from the scores of ``[x, baseline]``."""
    index = target if isinstance(target, tuple) else (target,)
    return float(scores[(0, *index)] - scores[(1, *index)])


def _check_neuron(neuron: Any, shape: tuple[int, ...], layer_name: str) -> tuple[int, ...]:
    """Return ``neuron`` as a tuple of ints after checking it indexes a unit of ``shape``."""
    if _is_index(neuron):
        neuron = (neuron,)
    if isinstance(neuron, (str, bytes)) or not isinstance(neuron, Sequence):
        raise AttributionTypeError(
            f"A neuron is a tuple of indices such as (0, 3, 4); got {neuron!r}."
        )
    if not all(_is_index(i) for i in neuron):
        raise AttributionTypeError(f"Neuron indices must be whole numbers; got {tuple(neuron)!r}.")
    index = tuple(int(i) for i in neuron)
    if len(index) != len(shape):
        raise AttributionError(
            f"Neuron {index} has {len(index)} indices but {layer_name!r} has outputs shaped "
            f"{shape}; give {len(shape)} indices, one per dimension."
        )
    for position, (i, size) in enumerate(zip(index, shape, strict=True)):
        if not 0 <= i < size:
            raise AttributionError(
                f"Neuron {index} is outside {layer_name!r} (shape {shape}): index {position} "
                f"must be between 0 and {size - 1}."
            )
    return index


def _label(labels: Sequence[str], index: int) -> str:
    if 0 <= index < len(labels):
        return str(labels[index])
    return f"class {index}"


def _describe(output: Any) -> str:
    if isinstance(output, (tuple, list)):
        kinds = sorted({type(o).__name__ for o in output})
        what = "tensors" if kinds == ["Tensor"] else ", ".join(kinds) or "nothing"
        return f"a {type(output).__name__} of {len(output)} {what}"
    return f"a {type(output).__name__}"


_WRAP_HINT = (
    "Wrap the model in a module whose forward returns only the score tensor (or export such a "
    "wrapper with torch.export) and load that."
)


def _scores_in(output: Any, batch: int) -> tuple[Tensor, str | None]:
    """The score tensor in a model output, and the dict key it was found under."""
    key = None
    if isinstance(output, Mapping):
        key = next((k for k in SCORE_KEYS if k in output), None)
        if key is None:
            keys = ", ".join(repr(k) for k in output) or "none"
            raise AttributionError(
                f"The model returns a dict (keys: {keys}) without an 'out' or 'logits' entry, so "
                f"its class scores cannot be found. {_WRAP_HINT}"
            )
        output = output[key]
    if not isinstance(output, Tensor):
        raise AttributionError(
            f"The model returns {_describe(output)}, not one tensor of class scores. {_WRAP_HINT}"
        )
    if output.dim() < 2 or output.shape[0] != batch:
        if output.dim() >= 1 and output.shape[0] == batch:
            dims = ["N", *(str(d) for d in output.shape[1:])]
            got = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ") for N images"
        else:
            got = f"shape {tuple(output.shape)} for a batch of {batch}"
        raise AttributionError(
            "The model must return class scores shaped (N, classes), or (N, classes, ...) with "
            f"a score per output position; it returns {got}. Return the scores before any "
            "argmax, sum or other reduction."
        )
    if not output.is_floating_point():
        raise AttributionError(
            f"The model returns {output.dtype} values (class indices?), not class scores; return "
            "the scores before the argmax."
        )
    if output.shape[1] == 0:
        raise AttributionError("The model returns scores for 0 classes; nothing can be explained.")
    return output, key


def _scores_function(model: nn.Module, key: str | None) -> Callable[..., Tensor]:
    """The model itself, or a function returning its ``key`` entry when it returns a dict."""
    if key is None:
        return model

    def scores(*inputs: Tensor) -> Tensor:
        return model(*inputs)[key]

    return scores


def _forward(model: nn.Module, batch: Tensor) -> tuple[Tensor, str | None]:
    """Run the model without gradients and return its scores (see :func:`_scores_in`)."""
    try:
        with torch.no_grad():
            output = model(batch)
    except RuntimeError as exc:
        raise AttributionError(
            f"The model could not run on an input of shape {tuple(batch.shape)}; check the "
            f"image size and channels the model expects. ({exc})"
        ) from exc
    return _scores_in(output, batch.shape[0])


@contextmanager
def _recording(modules: Sequence[nn.Module]) -> Iterator[list[list[Any]]]:
    """Record the outputs of ``modules`` during forwards run by the calling thread only."""
    thread = threading.get_ident()
    records: list[list[Any]] = [[] for _ in modules]
    handles = []

    def make_hook(slot: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if threading.get_ident() == thread:
                records[slot].append(output)

        return thread_bound(hook)

    try:
        for slot, module in enumerate(modules):
            handles.append(module.register_forward_hook(make_hook(slot)))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _probe(
    model: nn.Module, modules: Sequence[nn.Module], names: Sequence[str], batch: Tensor
) -> tuple[Tensor, list[Tensor], str | None]:
    """One no-grad forward of ``batch`` returning the scores, each layer's output and the dict
    key the scores came from (None for a tensor output).

    Also checks that every layer runs and returns one tensor that keeps the batch dimension,
    so that mistakes are reported before the expensive attribution pass.
    """
    with _recording(modules) as records:
        logits, key = _forward(model, batch)
    outputs = []
    for name, record in zip(names, records, strict=True):
        if not record:
            raise AttributionError(
                f"Layer {name!r} is not used when the model runs on this input; pick another "
                "layer from the tree."
            )
        output = record[0]
        lone = lone_tensor_index(output)
        if lone is not None:
            output = output[lone]  # one tensor next to sizes or None: the tensor is explained
        if not isinstance(output, Tensor):
            raise AttributionError(
                f"Layer {name!r} returns a {type(output).__name__}, not a single tensor; pick "
                "one of its sub-layers instead."
            )
        if output.dim() == 0 or output.shape[0] != batch.shape[0]:
            raise AttributionError(
                f"Layer {name!r} returns shape {tuple(output.shape)}, which does not keep one "
                "entry per image; pick another layer."
            )
        outputs.append(output)
    if not bool(torch.isfinite(logits).all()):
        raise AttributionError(
            "The model's scores contain NaN or infinite values for this image (or its baseline), "
            "so attributions would be meaningless; check the model's weights and the "
            "preprocessing (normalisation) of the image."
        )
    return logits, outputs, key


def _delta(attributions: Any, output_diff: float) -> float:
    """Signed convergence delta of one image: sum of the attributions minus F(x) - F(b)."""
    parts = attributions if isinstance(attributions, tuple) else (attributions,)
    return float(sum(float(p.detach()[0].sum()) for p in parts)) - output_diff


def _conductance_result(
    layer_name: str,
    target: Target,
    attributions: Any,
    delta: float,
    output_diff: float,
    method: str,
    n_steps: int,
    layer_moves: bool = True,
) -> ConductanceResult:
    if not isinstance(attributions, Tensor):
        raise AttributionError(
            f"Layer {layer_name!r} returns several tensors; pick one of its sub-layers instead."
        )
    values = attributions.detach()[0].to(device="cpu", dtype=torch.float64).numpy()
    if values.ndim == 0:
        values = values.reshape(1)
    if values.ndim == 1:
        channel_totals = values
    else:
        channel_totals = values.reshape(values.shape[0], -1).sum(axis=1)
    is_spatial = values.ndim == 3
    spatial = values.sum(axis=0).astype(np.float32) if is_spatial else None
    return ConductanceResult(
        layer=layer_name,
        target=target,
        attributions=values.astype(np.float32),
        channel_totals=channel_totals.astype(np.float32),
        spatial=spatial,
        delta=delta,
        output_diff=output_diff,
        relative_delta=abs(delta) / max(abs(output_diff), _EPS),
        method=method,
        n_steps=n_steps,
        is_spatial=is_spatial,
        layer_moves=layer_moves,
    )
