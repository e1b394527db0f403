"""The layer overview: conductance at many layers from one pass along the path, summarised.

Layer conductance of a layer sums to ``F(x) - F(baseline)`` when every path from the input to
the output runs through that layer (completeness). Where part of the output change bypasses a
layer (a residual connection, a branch), the layer's *share* of the difference is below one;
where the path integral is too coarse, its *completeness* (the relative convergence delta) says
so. The overview puts these numbers side by side for the layers of a network in the order they
run, together with how concentrated each layer's conductance is in its few strongest channels,
which shows where in the network the evidence for the target narrows down to a few units.

:func:`overview_layers` picks the layers from the module tree (see its docstring for the rule);
:func:`layer_overview` computes them all in one pass (the engine's ``LayerConductance`` with a
list of layers) and returns small records, cheap to send from a worker and to cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from explainer import analysis
from explainer.errors import AttributionError
from explainer.tree import ModuleTree

__all__ = [
    "MAX_OVERVIEW_LAYERS",
    "PASS_THROUGH",
    "TOP_CHANNELS",
    "LayerOverview",
    "LayerSummary",
    "layer_overview",
    "overview_layers",
    "summarise",
]

MAX_OVERVIEW_LAYERS = 24
"""Most layers one overview computes. Every layer's conductance is held for every point of the
path at once, so memory grows with the number of layers; 24 bars also still read as a chart."""

TOP_CHANNELS = 5
"""Channels listed per layer (by absolute total conductance)."""

PASS_THROUGH = frozenset(
    {"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"}
)
"""Module types whose output is their input in eval mode: the layer before them says it all."""

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LayerSummary:
    """The overview's numbers for one layer.

    Attributes
    ----------
    layer : str
        Dotted module name.
    shape : tuple of int
        The layer's output for one image, e.g. ``(C, H, W)`` or ``(F,)``.
    total : float
        Sum of the layer's conductance (its total conductance).
    share : float
        ``total / (F(x) - F(baseline))``: the part of the output change that flows through the
        layer (1 for a layer every path crosses, when the integral has converged).
    positive : float
        Sum of the positive conductances.
    negative : float
        Sum of the negative conductances (zero or less).
    delta : float
        Convergence delta ``total - (F(x) - F(baseline))``.
    relative_delta : float
        ``|delta| / |F(x) - F(baseline)|``: completeness, 0 when it holds exactly.
    top_channels : tuple of int
        Up to :data:`TOP_CHANNELS` channels (units, for a flat layer) by decreasing absolute
        total conductance.
    top_values : tuple of float
        Their total conductance.
    concentration : float
        Share of the layer's absolute conductance (summed per channel) held by
        ``top_channels``; 0 when the layer has none.
    channels : int
        Number of channels (units) of the layer.
    layer_moves : bool
        Whether the layer's output differs between the image and the baseline.
    """

    layer: str
    shape: tuple[int, ...]
    total: float
    share: float
    positive: float
    negative: float
    delta: float
    relative_delta: float
    top_channels: tuple[int, ...]
    top_values: tuple[float, ...]
    concentration: float
    channels: int
    layer_moves: bool


@dataclass(frozen=True)
class LayerOverview:
    """Conductance summaries of several layers for one image, target and baseline.

    Attributes
    ----------
    target : int or tuple of int
        The explained output.
    output_diff : float
        ``F(x) - F(baseline)`` for the target.
    method : str
        Integration rule.
    n_steps : int
        Number of integration steps.
    layers : list of LayerSummary
        One per layer, in the order asked (network order when it comes from
        :func:`overview_layers`).
    """

    target: analysis.Target
    output_diff: float
    method: str
    n_steps: int
    layers: list[LayerSummary]


def summarise(result: analysis.ConductanceResult, top_k: int = TOP_CHANNELS) -> LayerSummary:
    """The overview's numbers for one layer's :class:`~explainer.analysis.ConductanceResult`."""
    values = np.asarray(result.attributions, dtype=np.float64)
    totals = np.asarray(result.channel_totals, dtype=np.float64)
    diff = float(result.output_diff)
    # The delta was summed in the model's precision; the maps are kept as float32.
    total = diff + float(result.delta)
    share = total / diff if abs(diff) > analysis._EPS else float("nan")
    order = np.argsort(-np.abs(totals), kind="stable")[: max(0, int(top_k))]
    magnitude = float(np.abs(totals).sum())
    top_mass = float(np.abs(totals[order]).sum())
    return LayerSummary(
        layer=result.layer,
        shape=tuple(int(d) for d in values.shape),
        total=total,
        share=share,
        positive=float(values[values > 0].sum()),
        negative=float(values[values < 0].sum()),
        delta=float(result.delta),
        relative_delta=float(result.relative_delta),
        top_channels=tuple(int(c) for c in order),
        top_values=tuple(float(totals[c]) for c in order),
        concentration=top_mass / magnitude if magnitude > 0 else 0.0,
        channels=int(totals.size),
        layer_moves=bool(result.layer_moves),
    )


def _candidates(tree: ModuleTree) -> list[str]:
    """Usable layers with one output tensor, in the order they ran; the model's own output and
    a child that hands its parent's output on unchanged are left out."""
    root_shapes = tree.root.output_shapes
    names = [
        name
        for name in tree.execution_order
        if name
        and tree.nodes[name].type not in PASS_THROUGH
        and tree.nodes[name].usable
        and len(tree.nodes[name].output_shapes) == 1
        and len(tree.nodes[name].output_shapes[0]) >= 2
    ]
    kept: list[str] = []
    for i, name in enumerate(names):
        node = tree.nodes[name]
        following = names[i + 1] if i + 1 < len(names) else None
        # A container finishes right after its last step and returns that step's output: show
        # the container (its name says more), not the same tensor twice.
        if (
            following is not None
            and tree.nodes[following].output_shapes == node.output_shapes
            and name.startswith(following + ".")
            and not tree.nodes[following].is_leaf
        ):
            continue
        kept.append(name)
    # The model's last module computes the output itself: its conductance is the output.
    if kept and tree.nodes[kept[-1]].output_shapes == root_shapes and len(kept) > 1:
        head = kept[-1]
        if tree.nodes[head].depth == 1 or tree.nodes[head].is_leaf:
            kept = kept[:-1]
    return kept


def overview_layers(
    tree: ModuleTree, max_layers: int = MAX_OVERVIEW_LAYERS
) -> tuple[list[str], str]:
    """The layers an overview shows, in network order, and the rule that chose them, in words.

    Every usable module with a single output tensor qualifies, except the model's output layer,
    modules that hand their input on unchanged in eval mode (:data:`PASS_THROUGH`), and a
    block's last step when the block returns that same output (the block is shown). When
    more than ``max_layers`` qualify, the outermost levels of the module tree are kept (stages
    and blocks rather than the layers inside them), one level deeper at a time while they fit;
    the tree's suggested layers are always added, and if that is still too many, layers are
    taken evenly from first to last (the suggested ones kept).

    Returns
    -------
    (list of str, str)
        The layer names, and a sentence saying how they were chosen.
    """
    if max_layers < 1:
        raise AttributionError("The overview needs room for at least one layer.")
    candidates = _candidates(tree)
    if not candidates:
        raise AttributionError(
            "This model has no layer the overview can show (no module returns a single "
            "floating-point tensor); see the Layer picker for the reasons."
        )
    if len(candidates) <= max_layers:
        return candidates, (
            f"All {len(candidates)} usable layers with one output, in the order they run."
        )
    depths = sorted({tree.nodes[n].depth for n in candidates})
    chosen = [n for n in candidates if tree.nodes[n].depth == depths[0]]
    level = depths[0]
    for depth in depths[1:]:
        deeper = [n for n in candidates if tree.nodes[n].depth <= depth]
        if len(deeper) > max_layers:
            break
        chosen, level = deeper, depth
    suggested = [n for n in tree.suggested if n in candidates]
    wanted = set(chosen) | set(suggested)
    ordered = [n for n in candidates if n in wanted]
    if len(ordered) > max_layers:
        ordered = _spread_keeping(ordered, set(suggested), max_layers)
    return ordered, (
        f"{len(ordered)} of {len(candidates)} usable layers: the modules down to level {level} "
        f"of the module tree, plus the suggested layers"
        + (", taken evenly from first to last" if len(ordered) < len(wanted) else "")
        + f" (at most {max_layers} per pass). Any other layer opens on the Layer conductance page."
    )


def _spread_keeping(names: list[str], keep: set[str], count: int) -> list[str]:
    """``count`` names spread evenly over ``names``, with the ones in ``keep`` first in line."""
    kept = [n for n in names if n in keep][:count]
    others = [n for n in names if n not in keep]
    room = count - len(kept)
    if room > 0 and others:
        step = len(others) / room
        kept += [others[min(len(others) - 1, int(i * step))] for i in range(room)]
    chosen = set(kept)
    return [n for n in names if n in chosen]


def layer_overview(
    model: nn.Module,
    layer_names: Sequence[str],
    x: torch.Tensor,
    target: analysis.Target,
    baseline: torch.Tensor,
    *,
    method: str = "gausslegendre",
    n_steps: int = 50,
    internal_batch_size: int | None = None,
    top_k: int = TOP_CHANNELS,
    progress: Progress | None = None,
) -> LayerOverview:
    """Conductance of every layer in ``layer_names`` from one pass along the path, summarised.

    Parameters are those of :func:`explainer.analysis.compute_layer_overview`; ``top_k`` is the
    number of channels listed per layer.

    Returns
    -------
    LayerOverview
        Its layers come in the order of ``layer_names`` (repeats dropped).
    """
    results = analysis.compute_layer_overview(
        model,
        layer_names,
        x,
        target,
        baseline,
        method=method,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        progress=progress,
    )
    first = next(iter(results.values()))
    return LayerOverview(
        target=first.target,
        output_diff=float(first.output_diff),
        method=str(method),
        n_steps=int(n_steps),
        layers=[summarise(r, top_k) for r in results.values()],
    )
