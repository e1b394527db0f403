"""What the Neuron card page draws: the default neuron, conductance shares, and the figures of
the causal check and of the randomisation test. Plain values in, plain values or figures out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from explainer.checks import DEPENDS_BELOW, SAME_ABOVE, FlipResult, RandomisationResult
from explainer.layout import Layout
from webapp import figures as F
from webapp.text import html

REMAPPED_KINDS = ("patch_tokens", "class_patch_tokens", "tokens", "channels_last")
"""Layouts whose neurons (feature, row, column) are not the raw index into the output."""

FOCUS_NOTE = "Opened from the neuron card"
"""The start of the note the Dataset page shows when the card sent the user there."""


def fits(neuron: Sequence[int] | None, shape: Sequence[int]) -> bool:
    """Whether ``neuron`` indexes a unit of a layer output shaped ``shape``."""
    return (
        neuron is not None
        and len(neuron) == len(shape)
        and all(0 <= int(i) < int(s) for i, s in zip(neuron, shape, strict=True))
    )


def default_neuron(activation: np.ndarray, channel: int | None) -> tuple[int, ...]:
    """The rule of the Neuron gradient page: the most active neuron of the selected channel,
    or of the whole layer when no channel (or one outside the layer) is selected."""
    act = np.asarray(activation)
    shape = act.shape
    if len(shape) >= 2:
        if channel is None or not 0 <= int(channel) < shape[0]:
            channel = int(np.argmax(act.reshape(shape[0], -1).max(axis=1)))
        position = np.unravel_index(int(np.argmax(act[int(channel)])), shape[1:])
        return (int(channel), *(int(p) for p in position))
    return (int(np.argmax(act)),)


@dataclass(frozen=True)
class Shares:
    """The neuron's and its channel's part of the layer's conductance."""

    neuron: float
    channel: float
    layer: float
    channel_share: float
    """The channel's conductance over the layer's (signed: may be negative or above 1)."""
    abs_share: float
    """The channel's |conductance| over the sum of every channel's |conductance|."""
    rank: int
    """1 for the channel with the largest conductance."""
    channels: int


def shares(
    attributions: np.ndarray,
    totals: np.ndarray,
    neuron: Sequence[int],
    channel: int | None = None,
) -> Shares:
    """:class:`Shares` of ``neuron`` from a layer conductance result's arrays.

    ``neuron`` indexes ``attributions``; ``totals`` are the per-channel totals and ``channel``
    the neuron's channel among them (by default the neuron's first index; a layout whose
    channels are not the first dimension, e.g. a transformer's features, passes its own).
    """
    values = np.asarray(attributions, dtype=np.float64)
    per_channel = np.asarray(totals, dtype=np.float64).reshape(-1)
    index = tuple(int(i) for i in neuron)
    channel = index[0] if channel is None else int(channel)
    layer = float(per_channel.sum())
    magnitude = float(np.abs(per_channel).sum())
    return Shares(
        neuron=float(values[index]),
        channel=float(per_channel[channel]),
        layer=layer,
        channel_share=float(per_channel[channel] / layer) if layer != 0.0 else math.nan,
        abs_share=float(abs(per_channel[channel]) / magnitude) if magnitude > 0 else math.nan,
        rank=int(np.sum(per_channel > per_channel[channel])) + 1,
        channels=int(per_channel.size),
    )


def conductance_overlay(
    pixels: np.ndarray, map2d: np.ndarray, opacity: float, height: int = 340
) -> go.Figure:
    """The neuron conductance map (summed over colour channels) over a grey copy of the image."""
    figure = F.gradient_overlay(pixels, map2d, signed=True, opacity=opacity, height=height)
    figure.update_traces(
        selector=dict(type="heatmap"),
        colorbar_title_text="conductance",
        hovertemplate="(y=%{y}, x=%{x})<br>%{z:.3g}<extra></extra>",
    )
    return figure


def flip_figure(
    flip: FlipResult, labels: Sequence[str], height: int = 300, word: str = "channel"
) -> go.Figure:
    """The target's score as the top channels are zeroed one more at a time, the flip marked;
    ``word`` names them (``"feature"`` for a transformer's tokens)."""
    ks = np.arange(len(flip.target_scores))

    def name(index: int) -> str:
        return html(labels[index]) if 0 <= index < len(labels) else f"class {index}"

    figure = go.Figure(
        go.Scatter(
            x=ks,
            y=flip.target_scores,
            mode="lines+markers",
            line=dict(color="#4a6fa5"),
            marker=dict(size=6),
            customdata=[name(int(p)) for p in flip.predicted],
            hovertemplate="top %{x} zeroed<br>target score %{y:.4g}<br>"
            "predicted: %{customdata}<extra></extra>",
        )
    )
    if flip.flipped_at is not None:
        k = int(flip.flipped_at)
        figure.add_trace(
            go.Scatter(
                x=[k],
                y=[flip.target_scores[k]],
                mode="markers+text",
                marker=dict(size=13, color="#d62728", symbol="x"),
                text=[f"flips to {name(int(flip.predicted[k]))}"],
                # The flip is the last point: its label goes to the right, where no line runs.
                textposition="middle right",
                cliponaxis=False,
                hoverinfo="skip",
            )
        )
    figure.update_layout(
        height=height,
        margin=dict(l=8, r=8, t=12, b=8),
        showlegend=False,
        plot_bgcolor="rgba(0,0,0,0)",
        paper_bgcolor="rgba(0,0,0,0)",
        xaxis_title=f"top {word}s zeroed (k)",
        yaxis_title="target score",
        hovermode="closest",
        dragmode=False,
    )
    last = len(ks) - 1
    # Half a step of room on each side keeps the end markers whole; after a flip, more on the
    # right for its label.
    right = last + (max(1.5, 0.3 * last) if flip.flipped_at is not None else 0.5)
    figure.update_xaxes(
        range=[-0.5, right],
        gridcolor="rgba(128,128,128,0.2)",
        dtick=max(1, math.ceil(len(ks) / 10)),  # whole numbers of channels only
    )
    figure.update_yaxes(gridcolor="rgba(128,128,128,0.2)")
    return figure


def stage_titles(result: RandomisationResult, short: bool = False) -> list[str]:
    """Titles of the maps: the learned weights, then each stage, named by the last module it
    randomised (every module from the output down to it is random by then)."""
    titles = ["learned weights"]
    for number, (label, count) in enumerate(zip(result.stages, result.modules, strict=True)):
        last = label.split(" … ")[-1]
        if short:
            titles.append(f"{number + 1}. down to {last}")
        else:
            plural = "s" if int(count) != 1 else ""
            titles.append(
                f"{number + 1}. random from the output down to {last} ({int(count)} module{plural})"
            )
    return titles


def randomisation_figure(
    result: RandomisationResult, columns: int = 3, tile_height: int = 230
) -> go.Figure:
    """Every map of the test, each scaled to its own largest value (white: 0, dark: largest)."""
    from plotly.subplots import make_subplots

    maps = np.asarray(result.maps, dtype=np.float64)
    count = maps.shape[0]
    rows = -(-count // columns)
    titles = []
    for number, title in enumerate(stage_titles(result, short=True)):
        short = title if len(title) <= 30 else title[:27] + "…"
        if number:
            rho, ssim = result.spearman[number - 1], result.ssim[number - 1]
            short += f"<br>ρ {_num(rho)} · SSIM {_num(ssim)}"
        titles.append(html(short).replace("&lt;br&gt;", "<br>"))
    figure = make_subplots(
        rows=rows,
        cols=columns,
        subplot_titles=titles,
        horizontal_spacing=0.02,
        vertical_spacing=0.12 if rows > 1 else 0.05,
    )
    for i in range(count):
        tile = maps[i]
        peak = float(tile.max()) if tile.size else 0.0
        figure.add_trace(
            go.Heatmap(
                z=tile / peak if peak > 0 else tile,
                zmin=0.0,
                zmax=1.0,
                colorscale="Greys",
                showscale=False,
                hovertemplate="(y=%{y}, x=%{x})<br>%{z:.2f} of the largest<extra></extra>",
            ),
            row=i // columns + 1,
            col=i % columns + 1,
        )
        if peak <= 0:
            figure.add_annotation(
                text="all zero",
                x=(tile.shape[1] - 1) / 2,
                y=(tile.shape[0] - 1) / 2,
                showarrow=False,
                font=dict(size=12, color="#888888"),
                row=i // columns + 1,
                col=i % columns + 1,
            )
    frame = dict(
        showticklabels=False,
        showgrid=False,
        zeroline=False,
        showline=True,
        mirror=True,
        linecolor="rgba(128,128,128,0.35)",
    )
    figure.update_xaxes(constrain="domain", **frame)
    figure.update_yaxes(autorange="reversed", constrain="domain", **frame)
    for i in range(count):
        axis = "" if i == 0 else str(i + 1)
        figure.layout[f"yaxis{axis}"].update(scaleanchor=f"x{axis}", scaleratio=1)
    figure.update_annotations(font_size=11)
    figure.update_layout(
        height=rows * tile_height + 40 * rows,
        margin=dict(l=4, r=4, t=48, b=4),
        plot_bgcolor="rgba(0,0,0,0)",
        paper_bgcolor="rgba(0,0,0,0)",
        dragmode=False,
    )
    return figure


def _num(value: float) -> str:
    return "–" if value is None or math.isnan(float(value)) else f"{float(value):.2f}"


def number(value: float) -> str:
    """A similarity for a table: two decimals, or a dash for NaN (a flat map)."""
    return _num(value)


THRESHOLDS_TEXT = (
    f"The verdict reads the last stage, where every learned weight is random: the map **depends "
    f"on the learned weights** when its Spearman correlation and its SSIM with the original are "
    f"both below {DEPENDS_BELOW}; it **barely changes** when either is {SAME_ABOVE} or more; "
    "in between, part of it survives. A dash means a map is flat (the same value everywhere), "
    "which counts as no resemblance."
)


def channel_units(layout: Layout, channel: int) -> list[tuple[int, ...]]:
    """The raw indices that zero one channel (feature) of a layer of ``layout``.

    Channels first, a channel is the index prefix ``(channel,)``. Where the channel is not the
    first raw dimension (a transformer's feature, a channels-last map), it is every position's
    unit of that feature, the class token included.
    """
    if layout.kind not in REMAPPED_KINDS:
        return [(int(channel),)]
    rest = layout.view_shape[1:]
    units = [layout.to_raw((int(channel), *pos)) for pos in np.ndindex(*rest)]
    if layout.has_class_token:
        units.append(layout.to_raw((int(channel),)))
    return units
