"""Checks on one neuron: what flows through it, what happens without it, and whether its map
depends on what the model learned.

- :func:`neuron_conductance_map`: the neuron's conductance broken down by input pixel (the
  input pixels whose effect on the target score flows through this neuron).
- :func:`ablate`: the model's scores with some units of a layer set to zero (a causal check:
  does the score really need them?).
- :func:`flip_search`: how many of a layer's channels, taken in a given order (the largest
  conductance first), must be zeroed before the predicted class changes.
- :func:`cascading_randomisation`: the sanity check of Adebayo et al. (2018), "Sanity checks for
  saliency maps": re-initialise the layers from the output down, cumulatively, recompute the map
  after each stage and measure how much it still resembles the original (Spearman rank
  correlation and SSIM). A map that survives the randomisation of every weight reflects the
  image or the architecture, not what the model learned.

Every function leaves the model as it found it: ablations use forward hooks removed in
``finally`` blocks, and the randomisation works on a deep copy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from explainer import analysis
from explainer.analysis import Target
from explainer.errors import AttributionError
from explainer.hooks import lone_tensor_index, thread_bound, with_tensor_at
from explainer.neuron_conductance import NeuronConductance

__all__ = [
    "DEPENDS_BELOW",
    "MAX_STAGES",
    "SAME_ABOVE",
    "AblationResult",
    "FlipResult",
    "NeuronConductanceResult",
    "RandomisationResult",
    "ablate",
    "cascading_randomisation",
    "channel_order",
    "flip_search",
    "map_similarity",
    "neuron_conductance_map",
    "randomisation_stages",
    "randomisation_verdict",
    "well_formed",
]

Progress = Callable[[int, int], None]

MAX_STAGES = 8
"""Most randomisation stages: larger models have their layers grouped into this many steps."""

DEPENDS_BELOW = 0.5
"""Once every layer is randomised, a map whose Spearman correlation and SSIM to the original
are both below this no longer resembles it: it depends on the learned weights."""

SAME_ABOVE = 0.8
"""Once every layer is randomised, a map whose Spearman correlation or SSIM to the original is
at or above this still resembles it: it reflects the image or the architecture more than the
learned weights."""

_FLIP_BATCHES = (4, 8, 16, 32)
"""Rows per forward pass of the flip search: small first (most decisions flip within a few
channels), then up to 32."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class NeuronConductanceResult:
    """The conductance of one neuron broken down by input pixel.

    Attributes
    ----------
    layer : str
        Dotted module name.
    neuron : tuple of int
        Index of the unit in the layer output, without the batch dimension.
    target : int or tuple of int
        The explained output.
    attributions : np.ndarray
        ``(C, H, W)``, shaped like the input image: how much of the target's score change
        reaches the target through this neuron from each input value.
    total : float
        Sum of ``attributions``: the neuron's conductance (the share of ``F(image) -
        F(baseline)`` that flows through it).
    activation : float
        The neuron's value for the image.
    method : str
        Integration rule.
    n_steps : int
        Number of integration steps.
    """

    layer: str
    neuron: tuple[int, ...]
    target: Target
    attributions: np.ndarray
    total: float
    activation: float
    method: str
    n_steps: int


@dataclass(frozen=True, eq=False)
class AblationResult:
    """The model's scores for one image with some units of a layer set to zero.

    Attributes
    ----------
    layer : str
        Dotted module name.
    target : int or tuple of int
        The explained output, whose score is reported by :meth:`target_score`.
    scores : np.ndarray
        ``(classes,)`` or ``(classes, *positions)``: the scores without any change.
    ablated : np.ndarray
        ``(variants, *scores.shape)``: the scores with each variant's units zeroed.
    zeroed : tuple of tuple of tuple of int
        For each variant, the zeroed units: index prefixes into the layer output without the
        batch dimension (``(c,)`` is a whole channel, ``(c, y, x)`` one neuron).
    """

    layer: str
    target: Target
    scores: np.ndarray
    ablated: np.ndarray
    zeroed: tuple[tuple[tuple[int, ...], ...], ...]

    def predicted(self, variant: int | None = None) -> int:
        """The predicted class without changes (``None``) or with ``variant``'s units zeroed."""
        return predicted_class(self.scores if variant is None else self.ablated[variant])

    def target_score(self, variant: int | None = None) -> float:
        """The target's score without changes (``None``) or with ``variant``'s units zeroed."""
        values = self.scores if variant is None else self.ablated[variant]
        return float(values[_index(self.target)])


@dataclass(frozen=True, eq=False)
class FlipResult:
    """How many channels, zeroed in a given order, it takes to change the predicted class.

    Attributes
    ----------
    layer : str
        Dotted module name.
    target : int or tuple of int
        The explained output, whose score :attr:`target_scores` follows.
    channels : int
        Number of channels of the layer.
    order : np.ndarray
        The channels in the order they were zeroed (the first :attr:`searched`).
    searched : int
        How many channels were zeroed at most.
    flipped_at : int or None
        The smallest ``k`` for which zeroing the first ``k`` channels of :attr:`order` changes
        the predicted class; ``None`` when no ``k`` up to :attr:`searched` does.
    predicted : np.ndarray
        ``(searched + 1,)`` (fewer after a flip: the search stops there): the predicted class
        with the first ``k`` channels zeroed, ``k = 0, 1, ...``.
    target_scores : np.ndarray
        The target's score for the same ``k``.
    channel_axis : int
        The dimension of the layer output (without the batch dimension) whose slices were
        zeroed as channels.
    """

    layer: str
    target: Target
    channels: int
    order: np.ndarray
    searched: int
    flipped_at: int | None
    predicted: np.ndarray
    target_scores: np.ndarray
    channel_axis: int = 0

    @property
    def before(self) -> int:
        """The predicted class with nothing zeroed."""
        return int(self.predicted[0])

    @property
    def after(self) -> int | None:
        """The predicted class at the flip, or ``None`` without one."""
        return None if self.flipped_at is None else int(self.predicted[self.flipped_at])


@dataclass(frozen=True, eq=False)
class RandomisationResult:
    """The cascading randomisation test of one neuron's conductance map.

    Attributes
    ----------
    layer : str
        Dotted module name of the neuron's layer.
    neuron : tuple of int
        The neuron.
    target : int or tuple of int
        The explained output.
    stages : tuple of str
        What each stage re-initialised, e.g. ``"classifier"`` or ``"block3.conv … block3.bn"``.
    modules : np.ndarray
        ``(stages,)``: how many modules were re-initialised in total after each stage.
    maps : np.ndarray
        ``(stages + 1, H, W)``: the map (absolute value of the conductance summed over the
        colour channels) with the learned weights, then after each stage.
    spearman : np.ndarray
        ``(stages,)``: Spearman rank correlation of each stage's map with the original (NaN
        when a map is flat, so that ranks mean nothing).
    ssim : np.ndarray
        ``(stages,)``: structural similarity of each stage's map with the original, both
        scaled to [0, 1] by their largest value (NaN when a map is flat, or under 3 pixels a
        side).
    predicted : np.ndarray
        ``(stages + 1,)``: the predicted class with the learned weights, then after each stage.
    n_steps : int
        Integration steps per map.
    method : str
        Integration rule.
    seed : int
        Seed of the re-initialisation.
    """

    layer: str
    neuron: tuple[int, ...]
    target: Target
    stages: tuple[str, ...]
    modules: np.ndarray
    maps: np.ndarray
    spearman: np.ndarray
    ssim: np.ndarray
    predicted: np.ndarray
    n_steps: int
    method: str
    seed: int

    @property
    def verdict(self) -> tuple[str, str]:
        """``(kind, sentence)``: see :func:`randomisation_verdict`."""
        flat = not len(self.maps) or float(np.ptp(self.maps[0])) == 0.0
        if not len(self.spearman):
            return randomisation_verdict(float("nan"), float("nan"), original_flat=flat)
        return randomisation_verdict(
            float(self.spearman[-1]), float(self.ssim[-1]), original_flat=flat
        )


def well_formed(value: Any) -> bool:
    """Whether a result of this module, as received from a worker, has fields of the declared
    kinds (numeric arrays, texts, numbers), so that drawing it cannot fail on a wrong type."""
    # By name: a development server that re-imports changed modules may hold results built
    # from an earlier import of this module (the wire only ever builds these four classes).
    kinds = ("NeuronConductanceResult", "AblationResult", "FlipResult", "RandomisationResult")
    if type(value).__name__ not in kinds or not dataclasses.is_dataclass(value):
        return False
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        declared = str(field.type)
        if declared == "np.ndarray":
            ok = isinstance(item, np.ndarray) and item.dtype.kind in "fiu"
        elif declared == "str":
            ok = isinstance(item, str)
        elif declared in ("int", "float"):
            ok = isinstance(item, (int, float)) and not isinstance(item, bool)
        else:
            ok = True  # targets, indices, labels: checked where they are used
        if not ok:
            return False
    return _consistent(value)


def _consistent(value: Any) -> bool:
    """Whether the lengths of a result's parts agree with each other."""
    if type(value).__name__ == "FlipResult":
        steps = len(value.predicted)
        return len(value.target_scores) == steps >= 1 and (
            value.flipped_at is None or 0 < int(value.flipped_at) < steps
        )
    if type(value).__name__ == "RandomisationResult":
        count = len(value.stages)
        return (
            value.maps.ndim == 3
            and len(value.maps) == len(value.predicted) == count + 1
            and len(value.spearman) == len(value.ssim) == len(value.modules) == count
        )
    if type(value).__name__ == "AblationResult":
        return (
            value.ablated.shape[1:] == value.scores.shape
            and len(value.zeroed) == value.ablated.shape[0]
        )
    return True


# --------------------------------------------------------------------------- helpers


def _index(target: Target) -> tuple[int, ...]:
    return tuple(int(i) for i in target) if isinstance(target, tuple) else (int(target),)


def predicted_class(scores: np.ndarray) -> int:
    """The predicted class of one image's scores: the largest score, or for per-position
    scores the class covering most positions (as :func:`explainer.analysis.rank_classes`)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 1:
        return int(np.argmax(values))
    return int(analysis.rank_classes(values, (), k=1)[0][1])


def _prepared(
    model: nn.Module, layer_name: str, x: Tensor, target: Target
) -> tuple[nn.Module, Tensor, Target, tuple[int, ...], str | None, np.ndarray]:
    """The layer, the image on the model's device, the checked target, the layer's output
    shape (without batch), the dict key of the scores, and the unchanged scores."""
    analysis._check_model(model)
    layer = analysis._resolve_layer(model, layer_name)
    x = analysis._prepare_input(model, x, "image")
    logits, outputs, key = analysis._probe(model, [layer], [layer_name], x)
    target = analysis.validate_target(target, tuple(logits.shape[1:]))
    shape = tuple(int(s) for s in outputs[0].shape[1:])
    scores = logits[0].detach().to(device="cpu", dtype=torch.float64).numpy()
    return layer, x, target, shape, key, scores


def _channels(shape: tuple[int, ...], layer_name: str, axis: int = 0) -> int:
    """The number of channels along ``axis`` of an output shaped ``shape`` (no batch)."""
    if not 0 <= int(axis) < max(1, len(shape)):
        raise AttributionError(
            f"Layer {layer_name!r} has outputs shaped {shape}, without a dimension {axis} to "
            "take as channels; pick another layout or layer."
        )
    if not shape or shape[int(axis)] == 0:
        raise AttributionError(
            f"Layer {layer_name!r} has outputs shaped {shape}, without channels to zero; pick "
            "another layer."
        )
    return shape[int(axis)]


class _Scaling:
    """A forward hook that multiplies a layer's output by one mask per batch row, in forwards
    run by the thread that made it (others running the same model meanwhile are left alone)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask
        self.thread = threading.get_ident()
        thread_bound(self)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if threading.get_ident() != self.thread:
            return None
        lone = lone_tensor_index(output)
        if lone is not None:  # one tensor next to sizes or None: scale it, pass the rest on
            return with_tensor_at(output, lone, self(module, args, output[lone]))
        if not isinstance(output, Tensor):
            raise AttributionError("The layer returns several tensors; pick one of its sub-layers.")
        mask = self.mask.to(device=output.device, dtype=output.dtype)
        if output.shape[0] != mask.shape[0]:
            raise AttributionError(
                "The layer saw a batch of another size than the one sent; the model cannot be "
                "checked this way."
            )
        return output * mask


def _scores_with(
    model: nn.Module, layer: nn.Module, x: Tensor, mask: Tensor, key: str | None
) -> np.ndarray:
    """Scores of ``x`` repeated once per mask row, the layer's output scaled by the masks."""
    handle = layer.register_forward_hook(_Scaling(mask))
    try:
        batch = x.expand(mask.shape[0], *x.shape[1:])
        with torch.no_grad():
            output = model(batch)
    except RuntimeError as exc:
        raise AttributionError(
            f"The model could not run with units of the layer zeroed ({exc})."
        ) from exc
    finally:
        handle.remove()
    scores, _ = analysis._scores_in(output, mask.shape[0])
    return scores.detach().to(device="cpu", dtype=torch.float64).numpy()


# --------------------------------------------------------------------------- public functions


def channel_order(channel_totals: np.ndarray) -> np.ndarray:
    """Channel indices by decreasing conductance: the channels that push the target's score up
    most come first, those that push it down last (ties keep their index order)."""
    totals = np.asarray(channel_totals, dtype=np.float64).reshape(-1)
    return np.argsort(-totals, kind="stable").astype(np.int64)


def neuron_conductance_map(
    model: nn.Module,
    layer_name: str,
    x: Tensor,
    target: Target,
    baseline: Tensor,
    neuron: Sequence[int],
    *,
    method: str = "gausslegendre",
    n_steps: int = 50,
    internal_batch_size: int | None = None,
    progress: Progress | None = None,
) -> NeuronConductanceResult:
    """Neuron conductance of one unit of ``layer_name`` for one image, per input value.

    Parameters are those of :func:`explainer.analysis.compute_conductance`, plus ``neuron``,
    the unit's index in the layer output without the batch dimension.
    """
    analysis._check_model(model)
    layer = analysis._resolve_layer(model, layer_name)
    analysis._check_settings(method, n_steps)
    x = analysis._prepare_input(model, x, "image")
    baseline = analysis._prepare_baseline(model, baseline, x)
    logits, outputs, key = analysis._probe(model, [layer], [layer_name], torch.cat([x, baseline]))
    target = analysis.validate_target(target, tuple(logits.shape[1:]))
    index = analysis._check_neuron(neuron, tuple(outputs[0].shape[1:]), layer_name)
    activation = float(outputs[0][(0, *index)])
    engine = NeuronConductance(analysis._scores_function(model, key), layer)
    with torch.enable_grad():
        maps = engine.attribute(
            x,
            neuron_selector=index,
            baselines=baseline,
            target=target,
            n_steps=int(n_steps),
            method=method,
            internal_batch_size=internal_batch_size,
            progress=progress,
        )
    values = maps.detach()[0].to(device="cpu", dtype=torch.float64).numpy()
    return NeuronConductanceResult(
        layer=layer_name,
        neuron=index,
        target=target,
        attributions=values.astype(np.float32),
        total=float(values.sum()),
        activation=activation,
        method=method,
        n_steps=int(n_steps),
    )


def ablate(
    model: nn.Module,
    layer_name: str,
    x: Tensor,
    target: Target,
    variants: Sequence[Sequence[Sequence[int]]],
) -> AblationResult:
    """The scores of one image with units of ``layer_name`` set to zero, one variant per row.

    Parameters
    ----------
    model : nn.Module
        An eval-mode model (left unchanged: the zeroing is a hook removed afterwards).
    layer_name : str
        Dotted name of the layer.
    x : Tensor
        One normalised image ``(1, C, H, W)``.
    target : int or tuple of int
        The output whose score is reported.
    variants : sequence of sequence of index tuples
        For each variant, the units to zero together: index prefixes into the layer output
        without the batch dimension, ``(c,)`` for a whole channel, ``(c, y, x)`` for a neuron.

    Returns
    -------
    AblationResult
        All variants come from one batched forward pass.
    """
    layer, x, target, shape, key, scores = _prepared(model, layer_name, x, target)
    _channels(shape, layer_name)
    if isinstance(variants, (str, bytes)) or not isinstance(variants, Sequence) or not variants:
        raise AttributionError("Give at least one set of units to zero.")
    mask = torch.ones((len(variants), *shape), dtype=torch.float32)
    zeroed = []
    for row, units in enumerate(variants):
        checked = []
        for unit in units:
            index = tuple(int(i) for i in unit) if not isinstance(unit, int) else (int(unit),)
            if not index or len(index) > len(shape):
                raise AttributionError(
                    f"Unit {index} does not index layer {layer_name!r} (outputs {shape})."
                )
            analysis._check_neuron(index, shape[: len(index)], layer_name)
            mask[(row, *index)] = 0.0
            checked.append(index)
        zeroed.append(tuple(checked))
    ablated = _scores_with(model, layer, x, mask, key)
    return AblationResult(
        layer=layer_name,
        target=target,
        scores=scores,
        ablated=ablated,
        zeroed=tuple(zeroed),
    )


def flip_search(
    model: nn.Module,
    layer_name: str,
    x: Tensor,
    target: Target,
    order: Sequence[int],
    *,
    limit: int | None = None,
    channel_axis: int = 0,
    progress: Progress | None = None,
) -> FlipResult:
    """The smallest ``k`` such that zeroing channels ``order[:k]`` changes the predicted class.

    Every ``k`` from 1 up is tried (removing channels need not lower a score steadily, so no
    bisection), several per batched forward pass, and the search stops at the first flip or
    after ``limit`` channels (all of ``order`` by default).

    Parameters
    ----------
    order : sequence of int
        Distinct channel indices in the order to zero them, typically by decreasing
        conductance (the channels that push the target's score up most come first).
    limit : int, optional
        Most channels to zero.
    channel_axis : int
        The dimension of the layer output (without the batch dimension) that holds the
        channels: 0 for a convolution's ``(C, H, W)``, the last one for a vision
        transformer's ``(tokens, features)`` or a channels-last ``(H, W, C)`` map
        (:attr:`explainer.layout.Layout.channel_axis`). Zeroing a channel zeroes it at every
        position (every token, the class token included).
    progress : callable, optional
        ``progress(done, total)`` in values of ``k`` tried.
    """
    layer, x, target, shape, key, scores = _prepared(model, layer_name, x, target)
    axis = int(channel_axis)
    channels = _channels(shape, layer_name, axis)
    chosen = [int(c) for c in order]
    if len(set(chosen)) != len(chosen) or not all(0 <= c < channels for c in chosen):
        raise AttributionError(
            f"The channel order must list distinct channels between 0 and {channels - 1}."
        )
    total = len(chosen) if limit is None else max(0, min(int(limit), len(chosen)))
    predicted = [predicted_class(scores)]
    target_scores = [float(scores[_index(target)])]
    flipped_at = None
    k = 0
    batches = iter(_FLIP_BATCHES)
    rows = next(batches)
    while k < total and flipped_at is None:
        ks = list(range(k + 1, min(total, k + rows) + 1))
        # One row per k; the mask has the channels along ``axis`` and size 1 elsewhere, so it
        # broadcasts over every position of the output.
        sizes = [1] * len(shape)
        sizes[axis] = channels
        mask = torch.ones((len(ks), channels), dtype=torch.float32)
        for row, count in enumerate(ks):
            mask[row, chosen[:count]] = 0.0
        mask = mask.reshape(len(ks), *sizes)
        values = _scores_with(model, layer, x, mask, key)
        for row, count in enumerate(ks):
            predicted.append(predicted_class(values[row]))
            target_scores.append(float(values[row][_index(target)]))
            if predicted[-1] != predicted[0]:
                flipped_at = count
                break
        k = ks[-1] if flipped_at is None else flipped_at
        if progress is not None:
            progress(k, total)
        rows = next(batches, rows)
    return FlipResult(
        layer=layer_name,
        target=target,
        channels=channels,
        order=np.asarray(chosen[:k], dtype=np.int64),
        searched=k,
        flipped_at=flipped_at,
        predicted=np.asarray(predicted, dtype=np.int64),
        target_scores=np.asarray(target_scores, dtype=np.float64),
        channel_axis=axis,
    )


def map_similarity(original: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """``(Spearman, SSIM)`` of two non-negative 2-D maps of the same shape.

    A neuron sees only part of the image (its receptive field, fixed by the architecture), and
    the zeros outside it would make any two of its maps look alike; so both measures look only
    where either map is non-zero. Spearman's rank correlation compares the order of those
    pixels; SSIM compares the local structure of the smallest box around them (windows of 7
    pixels, fewer in a smaller box), each map scaled to [0, 1] by its largest value. Both are
    NaN when either map is flat (the same value everywhere: nothing to compare); SSIM is NaN
    for a box under 3 pixels a side.
    """
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    a = np.abs(np.asarray(original, dtype=np.float64))
    b = np.abs(np.asarray(other, dtype=np.float64))
    if a.shape != b.shape or a.ndim != 2:
        raise AttributionError(f"Maps of shapes {a.shape} and {b.shape} cannot be compared.")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    support = (a != 0) | (b != 0)
    inside_a, inside_b = a[support], b[support]
    if np.ptp(inside_a) == 0 or np.ptp(inside_b) == 0:
        rho = float("nan")
    else:
        rho = float(spearmanr(inside_a, inside_b).statistic)
    box = []
    for axis in range(2):
        used = np.nonzero(support.any(axis=1 - axis))[0]
        box.append(slice(int(used[0]), int(used[-1]) + 1))
    crop_a, crop_b = a[tuple(box)], b[tuple(box)]
    side = min(crop_a.shape)
    if side < 3:
        return rho, float("nan")
    window = min(7, side if side % 2 else side - 1)
    scaled = [m / m.max() if m.max() > 0 else m for m in (crop_a, crop_b)]
    ssim = float(structural_similarity(scaled[0], scaled[1], data_range=1.0, win_size=window))
    return rho, ssim


def randomisation_verdict(
    spearman: float, ssim: float, *, original_flat: bool = False
) -> tuple[str, str]:
    """Plain words on the last (fully randomised) stage of the randomisation test.

    Returns ``(kind, sentence)`` with kind ``"depends"`` (both measures below
    :data:`DEPENDS_BELOW`), ``"same"`` (either at or above :data:`SAME_ABOVE`), ``"partly"``
    (in between) or ``"empty"`` (the original map is zero everywhere: nothing to compare). A
    measure of NaN (the randomised map is flat) counts as no resemblance.
    """
    if original_flat:
        return (
            "empty",
            "The map is zero everywhere with the learned weights (the neuron passes nothing "
            "to the target for this image), so the test cannot say anything. Pick a neuron "
            "with a visible map.",
        )
    rho = 0.0 if math.isnan(spearman) else spearman
    structure = 0.0 if math.isnan(ssim) else ssim
    if max(rho, structure) >= SAME_ABOVE:
        return (
            "same",
            "The map barely changes when the weights are randomised: it reflects the image "
            "or the architecture more than what the model learned, so read it with care.",
        )
    if rho < DEPENDS_BELOW and structure < DEPENDS_BELOW:
        return (
            "depends",
            "The map changes once the weights are randomised: it depends on what the model "
            "learned, as an explanation should.",
        )
    return (
        "partly",
        "The map changes, but part of it survives the randomisation of every weight: it "
        "depends on what the model learned, and partly also on the image itself.",
    )


def randomisation_stages(
    model: nn.Module, x: Tensor, max_stages: int = MAX_STAGES
) -> list[list[str]]:
    """The modules to re-initialise, from the output down, grouped into at most ``max_stages``
    cumulative stages of nearly equal size.

    Modules holding parameters of their own are ordered as the forward pass of ``x`` runs them
    (the last one run comes first); when some of them never run as modules (an exported
    program reads its weights directly), their registration order is used instead.
    """
    owners = [
        (name, module)
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    if not owners:
        raise AttributionError("The model has no learned weights to randomise.")
    seen: list[int] = []
    handles = []

    def hook(module: nn.Module, args: Any) -> None:
        if id(module) not in seen:
            seen.append(id(module))

    try:
        for _, module in owners:
            handles.append(module.register_forward_pre_hook(hook))
        analysis._forward(model, x)
    finally:
        for handle in handles:
            handle.remove()
    by_id = {id(module): name for name, module in owners}
    if len(seen) == len(owners):
        ordered = [by_id[i] for i in seen]
    else:
        ordered = [name for name, _ in owners]
    ordered.reverse()
    count = max(1, min(int(max_stages), len(ordered)))
    bounds = np.linspace(0, len(ordered), count + 1).round().astype(int)
    return [ordered[bounds[i] : bounds[i + 1]] for i in range(count)]


def _reinitialise(module: nn.Module, seed: int) -> None:
    """Give ``module``'s own parameters fresh random values (its own initialisation when it
    has one), reproducibly for ``seed``."""
    devices = sorted(
        {p.device.index or 0 for p in module.parameters(recurse=False) if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)  # seeds the CUDA generators too
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
            return
        for parameter in module.parameters(recurse=False):
            if parameter.dim() >= 2:
                nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))
            else:
                bound = 1.0 / math.sqrt(max(1, parameter.numel()))
                nn.init.uniform_(parameter, -bound, bound)


def _map_of(result: NeuronConductanceResult) -> np.ndarray:
    values = np.asarray(result.attributions, dtype=np.float64)
    plane = values.sum(axis=0) if values.ndim == 3 else values.reshape(values.shape[0], -1)
    return np.abs(plane).astype(np.float32)


def cascading_randomisation(
    model: nn.Module,
    layer_name: str,
    x: Tensor,
    target: Target,
    baseline: Tensor,
    neuron: Sequence[int],
    *,
    method: str = "gausslegendre",
    n_steps: int = 16,
    max_stages: int = MAX_STAGES,
    seed: int = 0,
    internal_batch_size: int | None = None,
    progress: Progress | None = None,
    copy_model: Callable[[], nn.Module] | None = None,
) -> RandomisationResult:
    """The cascading randomisation test of the neuron's conductance map.

    A deep copy of ``model`` is made (``model`` itself is never changed); its parameterised
    modules are re-initialised from the output down in at most ``max_stages`` cumulative
    stages (:func:`randomisation_stages`), and after each stage the neuron's conductance map is
    computed again and compared with the original one (:func:`map_similarity`).
    ``copy_model``, when given, makes that copy instead (for models ``copy.deepcopy`` cannot
    copy, such as an exported program, whose file can be loaded a second time).

    ``progress(done, total)`` counts maps (``stages + 1``).
    """
    analysis._check_model(model)
    x = analysis._prepare_input(model, x, "image")
    try:
        twin = copy.deepcopy(model) if copy_model is None else copy_model()
    except Exception as exc:  # noqa: BLE001 - any copy failure gets the same advice
        raise AttributionError(
            "This model cannot be copied, so its weights cannot be randomised without changing "
            f"the model in use ({type(exc).__name__}). The other checks still work."
        ) from exc
    twin.eval()
    stages = randomisation_stages(twin, x, max_stages)
    total = len(stages) + 1

    def one_map() -> tuple[np.ndarray, int, Target]:
        result = neuron_conductance_map(
            twin,
            layer_name,
            x,
            target,
            baseline,
            neuron,
            method=method,
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
        )
        scores = analysis.class_scores(twin, x)
        return _map_of(result), predicted_class(scores), result.target

    first, first_class, checked = one_map()
    maps, predicted, counts, rhos, ssims = [first], [first_class], [], [], []
    if progress is not None:
        progress(1, total)
    done = 0
    for number, names in enumerate(stages):
        for offset, name in enumerate(names):
            _reinitialise(twin.get_submodule(name), seed + 1000 * number + offset)
        done += len(names)
        current, current_class, _ = one_map()
        rho, ssim = map_similarity(first, current)
        maps.append(current)
        predicted.append(current_class)
        counts.append(done)
        rhos.append(rho)
        ssims.append(ssim)
        if progress is not None:
            progress(number + 2, total)
    labels = tuple(names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}" for names in stages)
    return RandomisationResult(
        layer=layer_name,
        neuron=tuple(int(i) for i in neuron),
        target=checked,
        stages=labels,
        modules=np.asarray(counts, dtype=np.int64),
        maps=np.stack(maps).astype(np.float32),
        spearman=np.asarray(rhos, dtype=np.float64),
        ssim=np.asarray(ssims, dtype=np.float64),
        predicted=np.asarray(predicted, dtype=np.int64),
        n_steps=int(n_steps),
        method=method,
        seed=int(seed),
    )
