"""Plotly figure builders: pure functions from numpy arrays to figures (no Streamlit, no torch).

Conventions shared by every figure, so a reader learns them once:

- Signed maps use the diverging ``RdBu`` scale reversed, centred at zero: red pushes the output up,
  blue pushes it down, white is neutral. Magnitudes use a sequential scale (``Inferno``).
- Maps laid over an image use the same scales with zero made transparent, over a muted grey copy
  of the image, so only what matters is coloured.
- Image-like maps keep row 0 at the top and square pixels.
- Heatmaps are made clickable by laying transparent square markers over them (a plain heatmap
  reports no point when clicked). Each marker's ``customdata`` holds the indices a click selects.
- Text arguments (titles, class names, channel and method names) are plain text: Plotly would
  render the HTML tags in them, so they are escaped (:func:`webapp.text.html`) on the way in.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import plotly.colors as pc
import plotly.graph_objects as go
from PIL import Image

from webapp.text import html


def _rgb(colour: str) -> tuple[int, int, int]:
    if colour.startswith("#"):
        return pc.hex_to_rgb(colour)
    r, g, b = pc.unlabel_rgb(colour)
    return int(r), int(g), int(b)


def _scale(colours: Sequence[str], alpha: Callable[[float], float] | None = None) -> list:
    """An explicit plotly colour scale (evenly spaced stops), optionally with an alpha ramp.

    Explicit lists keep the scales exactly as chosen whatever theme draws the chart.
    """
    n = len(colours)
    stops = []
    for i, colour in enumerate(colours):
        t = i / (n - 1)
        r, g, b = _rgb(colour)
        a = 1.0 if alpha is None else max(0.0, min(1.0, alpha(t)))
        stops.append([t, f"rgba({r},{g},{b},{a:.3f})"])
    return stops


SIGNED_SCALE = _scale(pc.diverging.RdBu[::-1])
"""Diverging, centred at 0: blue negative, white zero, red positive."""
MAGNITUDE_SCALE = _scale(pc.sequential.Inferno)
"""Sequential for magnitudes: black (zero) to yellow (largest)."""
SCORE_SCALE = _scale(pc.sequential.Viridis)
"""Sequential for the model's own output scores (purple low, yellow high), unlike any
attribution map so that the two are never confused."""
SIGNED_OVERLAY_SCALE = _scale(pc.diverging.RdBu[::-1], alpha=lambda t: abs(2 * t - 1) * 1.6)
"""The signed scale with zero transparent, for maps laid over an image."""
MAGNITUDE_OVERLAY_SCALE = _scale(pc.sequential.YlOrRd, alpha=lambda t: t * 1.8)
"""Yellow to red with zero transparent, for magnitudes laid over an image."""
POSITIVE_COLOUR = "#c0392b"
NEGATIVE_COLOUR = "#2e6da4"
SELECTED_COLOUR = "#111111"
ACCENT_COLOUR = "#f5b700"
RING_PX = 16
"""Diameter of the ring that marks the selected cell of a map the browser marks itself."""
TARGET_COLOUR = "#ff3b30"
"""Marks the explained output position on score maps (stands out on the score scale)."""
METHOD_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e")
TILE_MAX = 24
"""Grid tiles larger than this (per side) are average-pooled for the overview."""
OVERLAY_MAX = 128
"""Smooth overlays are drawn at most this many cells per side (they are upsampled anyway)."""
SCORE_CELLS_MAX = 64
"""Output score maps are average-pooled to at most this many clickable cells per side."""
SCORE_POINTS_MAX = 512
"""Output score profiles show at most this many clickable points."""

_CONFIG_AXIS = dict(showgrid=False, zeroline=False, showticklabels=False, ticks="")


def symmetric_limit(values: np.ndarray | Sequence[float]) -> float:
    """Largest absolute finite value; 1.0 for an all-zero map (a scale needs a non-zero width)."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    return peak if peak > 0.0 else 1.0


def _base_layout(fig: go.Figure, height: int, title: str | None = None) -> go.Figure:
    fig.update_layout(
        height=height,
        margin=dict(l=8, r=8, t=36 if title else 8, b=8),
        title=dict(text=html(title), x=0.0, xanchor="left", font=dict(size=14)) if title else None,
        dragmode=False,
        hovermode="closest",
        hoverdistance=-1,
        clickmode="event+select",
        plot_bgcolor="rgba(0,0,0,0)",
        paper_bgcolor="rgba(0,0,0,0)",
        showlegend=False,
    )
    return fig


def _image_axes(fig: go.Figure, width: float, height: float) -> None:
    """Pin the axes to the image extent, row 0 on top, square pixels."""
    fig.update_xaxes(range=[-0.5, width - 0.5], constrain="domain", **_CONFIG_AXIS)
    fig.update_yaxes(
        range=[height - 0.5, -0.5],
        scaleanchor="x",
        scaleratio=1,
        constrain="domain",
        **_CONFIG_AXIS,
    )


def _click_layer(
    xs: np.ndarray,
    ys: np.ndarray,
    customdata: np.ndarray,
    text: Sequence[str],
    marker_px: float,
    template: str = "%{text}<br>click to select<extra></extra>",
    *,
    outline: bool = False,
    selected: int | None = None,
) -> go.Scatter:
    """Invisible square markers that turn clicks on a heatmap into selectable points.

    ``text`` is one short string per point, shown through ``template`` (which may also use
    ``%{customdata[i]}``): short texts keep figures of large layers small.

    With ``outline``, the selected point (point ``selected`` as drawn, then whichever the user
    clicks) is marked by the browser itself with a ring of :data:`RING_PX` pixels: a click
    shows its mark at once, and the figure does not change (nor is it drawn again) when the
    page answers the click. (A ring, not the cell's outline: a marker's size is in pixels,
    and how many pixels a cell gets depends on the width of the browser's window.)
    """
    if outline:
        marker = dict(
            symbol="circle-open",
            size=max(4.0, float(marker_px)),  # the click area: one cell
            color=ACCENT_COLOUR,
            opacity=0.0,  # shown on the selected point only
            line=dict(width=3),
        )
        shown = dict(marker=dict(opacity=1.0, size=RING_PX))
        hidden = dict(marker=dict(opacity=0.0))
    else:
        marker = dict(
            symbol="square",
            size=max(4.0, float(marker_px)),
            color="rgba(0,0,0,0)",
            line=dict(width=0),
        )
        shown = hidden = dict(marker=dict(opacity=1.0))
    return go.Scatter(
        x=np.asarray(xs, dtype=float),
        y=np.asarray(ys, dtype=float),
        mode="markers",
        marker=marker,
        customdata=np.asarray(customdata).tolist(),
        text=list(text),
        hovertemplate=template,
        selected=shown,
        unselected=hidden,
        selectedpoints=[int(selected)] if selected is not None else None,
        showlegend=False,
    )


def _cell_box(x: float, y: float, half_w: float = 0.5, half_h: float = 0.5) -> dict:
    return dict(
        type="rect",
        x0=x - half_w,
        x1=x + half_w,
        y0=y - half_h,
        y1=y + half_h,
        line=dict(color=ACCENT_COLOUR, width=3),
        fillcolor="rgba(0,0,0,0)",
        layer="above",
    )


def muted_grey(image: np.ndarray) -> np.ndarray:
    """A light grey copy of an ``(H, W, 3)`` or ``(H, W)`` uint8 image, for maps drawn on top.

    Colour would mix with the red/blue of a signed map and make it unreadable; a compressed grey
    keeps the picture recognisable without competing with the map.
    """
    img = np.asarray(image, dtype=np.float64)
    grey = img.mean(axis=2) if img.ndim == 3 else img
    grey = np.clip(0.55 * grey + 100.0, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def image_trace(image: np.ndarray) -> go.Image:
    """An ``(H, W, 3)`` uint8 image as a PNG data URI: a fraction of the size of raw pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return go.Image(source=uri, x0=0, y0=0, dx=1, dy=1, hoverinfo="skip")


def overlay_size(image_hw: tuple[int, int], cap: int = OVERLAY_MAX) -> tuple[int, int]:
    """Resolution for a smooth map laid over an image: the image's, at most ``cap`` per side."""
    h, w = int(image_hw[0]), int(image_hw[1])
    scale = min(1.0, cap / max(h, w, 1))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _stretched(z: np.ndarray, image_hw: tuple[int, int]) -> dict:
    """Heatmap placement so that a map of any resolution covers the whole image."""
    h, w = z.shape
    dy, dx = image_hw[0] / h, image_hw[1] / w
    return dict(x0=-0.5 + dx / 2, dx=dx, y0=-0.5 + dy / 2, dy=dy)


def _signed_colorbar(title: str) -> dict:
    return dict(title=dict(text=title, side="right"), thickness=12, len=0.9)


# --- predictions --------------------------------------------------------------------------------
def wrap_label(text: str, width: int = 26) -> list[str]:
    """``text`` split at spaces into lines of at most ``width`` characters (a longer word keeps a
    line of its own), so long class names are shown whole instead of clipped."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def prediction_bars(
    preds: Sequence[tuple[str, int, float]], height: int | None = None, hover_suffix: str = ""
) -> go.Figure:
    """Horizontal bars of the top predictions, the first on top.

    Each class name is written in full above its bar (wrapped over several lines when long,
    never clipped by the axis margin), with its index and share. ``hover_suffix`` says what the
    share is, e.g. ``" of the output"`` for the share of output positions a class covers. Class
    names are shown as written (escaped for Plotly). ``height`` defaults to what the rows need.
    """
    rows = list(preds)[::-1]
    names = [wrap_label(f"{name} (#{index})") for name, index, _ in rows]
    probs = [float(p) for _, _, p in rows]
    # Row i spans [base[i], base[i] + size[i]): the name's lines, then the bar.
    size = [len(lines) + 1.2 for lines in names]
    base = [sum(size[:i]) for i in range(len(size))]
    centre = [b + 0.6 for b in base]
    fig = go.Figure(
        go.Bar(
            x=probs,
            y=centre,
            width=0.9,
            orientation="h",
            marker_color=["#9aa5b1"] * (len(probs) - 1) + [POSITIVE_COLOUR] if probs else [],
            text=[f"{p:.1%}" for p in probs],
            textposition="outside",
            cliponaxis=False,
            customdata=[html(" ".join(lines)) for lines in names],
            hovertemplate=f"%{{customdata}}: %{{x:.2%}}{hover_suffix}<extra></extra>",
        )
    )
    for lines, b in zip(names, base, strict=True):
        fig.add_annotation(
            x=0,
            y=b + 1.2,
            xref="x",
            yref="y",
            text="<br>".join(html(line) for line in lines),
            showarrow=False,
            xanchor="left",
            yanchor="bottom",
            align="left",
            font=dict(size=12),
        )
    total = sum(size)
    _base_layout(fig, height or int(16 * total + 20))
    fig.update_layout(hovermode="y", hoverdistance=20, clickmode="none")
    fig.update_xaxes(range=[0, 1.18], tickformat=".0%", showgrid=True, tickvals=[0, 0.5, 1])
    fig.update_yaxes(range=[0, total], showticklabels=False, showgrid=False, fixedrange=True)
    return fig


# --- output scores ------------------------------------------------------------------------------
def _target_marker(x: float, y: float, size: float = 18.0) -> go.Scatter:
    return go.Scatter(
        x=[x],
        y=[y],
        mode="markers",
        marker=dict(symbol="circle-open", size=size, color=TARGET_COLOUR, line=dict(width=3)),
        hoverinfo="skip",
        showlegend=False,
    )


def score_map(
    scores: np.ndarray,
    selected: tuple[int, int],
    *,
    title: str | None = None,
    height: int = 300,
) -> go.Figure:
    """One class's output scores over the output grid, with the explained position circled.

    Clicking a cell reports its ``[row, column]`` in the output's coordinates
    (``customdata``). Grids larger than :data:`SCORE_CELLS_MAX` per side are average-pooled for
    drawing; a click then reports the centre of the pooled cell.

    Parameters
    ----------
    scores : numpy.ndarray
        ``(H, W)`` scores of the class at every output position.
    selected : (row, column)
        The explained position.
    """
    arr = np.asarray(scores, dtype=np.float64)
    h, w = arr.shape
    pooled = _pool_tile(arr, SCORE_CELLS_MAX)
    ph, pw = pooled.shape
    fy, fx = math.ceil(h / SCORE_CELLS_MAX), math.ceil(w / SCORE_CELLS_MAX)  # as _pool_tile
    finite = arr[np.isfinite(arr)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = go.Figure(
        go.Heatmap(
            z=pooled,
            x0=(fx - 1) / 2,
            dx=fx,
            y0=(fy - 1) / 2,
            dy=fy,
            colorscale=SCORE_SCALE,
            zmin=low,
            zmax=high if high > low else low + 1.0,
            hoverinfo="skip",
            colorbar=_signed_colorbar("score"),
        )
    )
    rows, cols = np.mgrid[0:ph, 0:pw]
    centre_y = np.minimum(h - 1, rows.ravel() * fy + fy // 2)
    centre_x = np.minimum(w - 1, cols.ravel() * fx + fx // 2)
    custom = np.stack([centre_y, centre_x], axis=1)
    text = [f"{v:.4g}" for v in pooled.ravel()]
    template = (
        "row %{customdata[0]}, column %{customdata[1]}<br>score %{text}"
        "<br>click to explain this position<extra></extra>"
    )
    fig.add_trace(
        _click_layer(
            cols.ravel() * fx + (fx - 1) / 2,
            rows.ravel() * fy + (fy - 1) / 2,
            custom,
            text,
            (height - 40) / max(ph, 1),
            template,
        )
    )
    row, col = int(selected[0]), int(selected[1])
    fig.add_trace(_target_marker(col, row))
    _base_layout(fig, height, title)
    fig.update_layout(shapes=[{**_cell_box(col, row), "line": dict(color=TARGET_COLOUR, width=2)}])
    _image_axes(fig, w, h)
    return fig


def score_profile(
    scores: np.ndarray,
    selected: int,
    *,
    title: str | None = None,
    height: int = 240,
) -> go.Figure:
    """One class's output scores along a 1-D output, with the explained position circled.

    Clicking a point reports ``[position]`` (``customdata``); long outputs show every k-th
    position so that at most :data:`SCORE_POINTS_MAX` points are drawn.
    """
    arr = np.asarray(scores, dtype=np.float64).ravel()
    stride = max(1, math.ceil(arr.size / SCORE_POINTS_MAX))
    idx = np.arange(0, arr.size, stride)
    fig = go.Figure(
        go.Scatter(
            x=idx,
            y=arr[idx],
            mode="lines+markers",
            line=dict(color="#5b6770", width=1.5),
            marker=dict(size=6, color="#5b6770"),
            customdata=[[int(i)] for i in idx],
            hovertemplate="position %{customdata[0]}<br>score %{y:.4g}"
            "<br>click to explain this position<extra></extra>",
            selected=dict(marker=dict(opacity=1.0)),
            unselected=dict(marker=dict(opacity=1.0)),
        )
    )
    if 0 <= int(selected) < arr.size:
        fig.add_trace(_target_marker(int(selected), float(arr[int(selected)])))
    _base_layout(fig, height, title)
    fig.update_layout(hoverdistance=20)
    fig.update_xaxes(title="output position", showgrid=False)
    fig.update_yaxes(title="score", showgrid=True)
    return fig


# --- conductance --------------------------------------------------------------------------------
def channel_bars(
    channels: Sequence[int],
    totals: np.ndarray,
    selected: int | None = None,
    height: int = 320,
    title: str | None = None,
) -> go.Figure:
    """Sorted bar chart of per-channel conductance; clicking a bar selects its channel.

    Parameters
    ----------
    channels : sequence of int
        Channel indices in display order (already ranked).
    totals : numpy.ndarray
        Total conductance of EVERY channel (indexed by channel).
    selected : int, optional
        The selected channel, drawn with a dark outline.
    """
    channels = [int(c) for c in channels]
    values = np.asarray(totals, dtype=np.float64)[channels] if channels else np.zeros(0)
    colours = [POSITIVE_COLOUR if v >= 0 else NEGATIVE_COLOUR for v in values]
    outline = [3 if c == selected else 0 for c in channels]
    fig = go.Figure(
        go.Bar(
            x=[f"#{c}" for c in channels],
            y=values,
            marker=dict(color=colours, line=dict(color=SELECTED_COLOUR, width=outline)),
            customdata=[[c] for c in channels] if channels else None,
            hovertemplate="channel %{customdata[0]}<br>conductance %{y:.4g}<extra></extra>",
            selected=dict(marker=dict(opacity=1.0)),
            unselected=dict(marker=dict(opacity=1.0)),
        )
    )
    _base_layout(fig, height, title)
    fig.update_layout(hoverdistance=20)
    fig.update_xaxes(
        type="category", tickangle=-90 if len(channels) > 10 else 0, tickfont=dict(size=10)
    )
    fig.update_yaxes(title="conductance", zeroline=True, zerolinecolor="#888", showgrid=True)
    return fig


def _pool_tile(tile: np.ndarray, max_side: int = TILE_MAX) -> np.ndarray:
    """Average-pool a 2-D map so that neither side exceeds ``max_side`` (overview only)."""
    h, w = tile.shape
    fy, fx = math.ceil(h / max_side), math.ceil(w / max_side)
    if fy == 1 and fx == 1:
        return tile
    hh, ww = math.ceil(h / fy) * fy, math.ceil(w / fx) * fx
    padded = np.full((hh, ww), np.nan)
    padded[:h, :w] = tile
    with np.errstate(invalid="ignore"):
        return np.nanmean(padded.reshape(hh // fy, fy, ww // fx, fx), axis=(1, 3))


def channel_grid(
    attributions: np.ndarray,
    channels: Sequence[int],
    totals: np.ndarray,
    *,
    zmax: float,
    selected: int | None = None,
    ncols: int = 6,
    plot_width: int = 560,
) -> go.Figure:
    """ONE tiled heatmap of the channels' conductance maps, all on the same colour scale.

    Clicking a tile selects its channel (``customdata = [channel]``).

    Parameters
    ----------
    attributions : numpy.ndarray
        ``(C, H, W)`` conductance of the layer.
    channels : sequence of int
        The channels to draw, in order (one page of the ranked list).
    totals : numpy.ndarray
        ``(C,)`` total conductance per channel (shown on hover).
    zmax : float
        Half-width of the shared colour scale (the layer's largest absolute value).
    selected : int, optional
        Channel to outline.
    ncols : int
        Tiles per row.
    plot_width : int
        Expected width of the plotting area in pixels, used to size the figure.
    """
    channels = [int(c) for c in channels]
    n = len(channels)
    ncols = max(1, min(ncols, n)) if n else 1
    nrows = max(1, math.ceil(n / ncols))
    tiles = [_pool_tile(np.asarray(attributions[c], dtype=np.float64)) for c in channels]
    th, tw = tiles[0].shape if tiles else (1, 1)
    gap_x = max(1, round(tw * 0.12))
    label_h = max(1.0, th * 0.28)
    row_h = th + label_h
    col_w = tw + gap_x
    mosaic = np.full((max(1, round(nrows * row_h)) + 1, ncols * col_w), np.nan)
    xs, ys, hover, annotations, shapes = [], [], [], [], []
    for k, (channel, tile) in enumerate(zip(channels, tiles, strict=True)):
        r, c = divmod(k, ncols)
        y0 = round(r * row_h + label_h)
        x0 = c * col_w
        mosaic[y0 : y0 + th, x0 : x0 + tw] = tile
        xs.append(x0 + (tw - 1) / 2)
        ys.append(y0 + (th - 1) / 2)
        hover.append(f"channel {channel}<br>total {float(totals[channel]):.4g}")
        annotations.append(
            dict(
                x=x0 - 0.5,
                y=y0 - 0.5,
                text=f"#{channel}",
                showarrow=False,
                xanchor="left",
                yanchor="bottom",
                font=dict(size=11, color=SELECTED_COLOUR if channel == selected else "#555"),
            )
        )
        if channel == selected:
            shapes.append(
                dict(
                    type="rect",
                    x0=x0 - 0.5,
                    x1=x0 + tw - 0.5,
                    y0=y0 - 0.5,
                    y1=y0 + th - 0.5,
                    line=dict(color=ACCENT_COLOUR, width=3),
                    layer="above",
                )
            )
    # Height that keeps tiles square at the expected on-screen width (the axes keep the aspect
    # ratio; a good guess only avoids blank bands above and below).
    mosaic_h, mosaic_w = mosaic.shape
    height = int(plot_width * mosaic_h / mosaic_w) + 16
    fig = go.Figure(
        go.Heatmap(
            z=mosaic.astype(np.float32),
            colorscale=SIGNED_SCALE,
            zmid=0.0,
            zmin=-zmax,
            zmax=zmax,
            hoverinfo="skip",
            colorbar=_signed_colorbar("conductance"),
        )
    )
    marker_px = 0.9 * plot_width / ncols
    fig.add_trace(
        _click_layer(
            np.array(xs), np.array(ys), np.array(channels).reshape(-1, 1), hover, marker_px
        )
    )
    _base_layout(fig, height)
    fig.update_layout(annotations=annotations, shapes=shapes)
    _image_axes(fig, mosaic.shape[1], mosaic.shape[0])
    return fig


def spatial_map(
    map2d: np.ndarray,
    *,
    channel: int | None,
    selected_cell: tuple[int, int] | None = None,
    title: str | None = None,
    colorbar_title: str = "conductance",
    height: int = 360,
    signed: bool = True,
    zmax: float | None = None,
    revision: int | None = None,
) -> go.Figure:
    """A layer-resolution heatmap whose cells are clickable (``customdata = [channel, y, x]``).

    Parameters
    ----------
    map2d : numpy.ndarray
        ``(H, W)`` values.
    channel : int or None
        Channel the cells belong to (``-1`` is stored when ``None``).
    selected_cell : (y, x), optional
        Cell to outline.
    revision : int, optional
        With it, the outline is the click layer's selected point: the browser moves it to the
        cell the user clicks, without a new figure. A new ``revision`` makes a figure that
        differs from the last one even for the same cell (a browser that shows its own click
        is given the page's selection again).
    signed : bool
        Diverging scale centred at 0 (True) or a sequential magnitude scale.
    zmax : float, optional
        Half-width of the colour scale; defaults to the map's largest absolute value.
    """
    arr = np.asarray(map2d, dtype=np.float64)
    h, w = arr.shape
    limit = zmax if zmax is not None else symmetric_limit(arr)
    heat = go.Heatmap(
        z=arr,
        colorscale=SIGNED_SCALE if signed else MAGNITUDE_SCALE,
        zmid=0.0 if signed else None,
        zmin=-limit if signed else 0.0,
        zmax=limit,
        hoverinfo="skip",
        colorbar=_signed_colorbar(colorbar_title),
    )
    fig = go.Figure(heat)
    yy, xx = np.mgrid[0:h, 0:w]
    ch = -1 if channel is None else int(channel)
    custom = np.stack([np.full(h * w, ch), yy.ravel(), xx.ravel()], axis=1)
    text = [f"{v:.4g}" for v in arr.ravel()]
    template = (
        f"(y=%{{y}}, x=%{{x}})<br>{colorbar_title} %{{text}}<br>click to select<extra></extra>"
    )
    in_browser = revision is not None
    fig.add_trace(
        _click_layer(
            xx.ravel(),
            yy.ravel(),
            custom,
            text,
            (height - 40) / max(h, 1),
            template,
            outline=in_browser,
            selected=(
                int(selected_cell[0]) * w + int(selected_cell[1])
                if in_browser and selected_cell is not None
                else None
            ),
        )
    )
    _base_layout(fig, height, title)
    if in_browser:
        fig.update_layout(meta=dict(revision=int(revision)))
    elif selected_cell is not None:
        fig.update_layout(shapes=[_cell_box(selected_cell[1], selected_cell[0])])
    _image_axes(fig, w, h)
    return fig


def class_token_cell(
    value: float,
    *,
    channel: int,
    selected: bool = False,
    zmax: float | None = None,
    colorbar_title: str = "conductance",
    signed: bool = True,
    height: int = 150,
) -> go.Figure:
    """The class token of a vision transformer as one clickable cell, drawn beside the patch map.

    The cell uses the colour scale of the map next to it (``zmax``); clicking it reports
    ``[channel]``, the feature of the class token (``customdata``).
    """
    v = float(value)
    limit = zmax if zmax is not None else symmetric_limit([v])
    fig = go.Figure(
        go.Heatmap(
            z=[[v]],
            colorscale=SIGNED_SCALE if signed else MAGNITUDE_SCALE,
            zmid=0.0 if signed else None,
            zmin=-limit if signed else 0.0,
            zmax=limit,
            hoverinfo="skip",
            showscale=False,
        )
    )
    fig.add_trace(
        _click_layer(
            np.array([0.0]),
            np.array([0.0]),
            np.array([[int(channel)]]),
            [f"{v:.4g}"],
            height - 30,
            f"class token, feature {int(channel)}<br>{html(colorbar_title)} %{{text}}"
            "<br>click to select<extra></extra>",
        )
    )
    _base_layout(fig, height)
    if selected:
        fig.update_layout(shapes=[_cell_box(0.0, 0.0, 0.47, 0.47)])
    _image_axes(fig, 1, 1)
    return fig


def overlay_map(
    image: np.ndarray,
    upsampled: np.ndarray,
    layer_hw: tuple[int, int],
    *,
    channel: int | None,
    selected_cell: tuple[int, int] | None = None,
    opacity: float = 0.9,
    signed: bool = True,
    title: str | None = None,
    colorbar_title: str = "conductance",
    height: int = 360,
    layer_values: np.ndarray | None = None,
) -> go.Figure:
    """A map upsampled to the image, laid over it; clicks select a layer cell (``[channel, y, x]``).

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 image the model sees.
    upsampled : numpy.ndarray
        The map, upsampled to the image or to :func:`overlay_size` of it; it is stretched to
        cover the image.
    layer_hw : (h, w)
        Resolution of the layer; clicks report the layer cell under the pointer.
    layer_values : numpy.ndarray, optional
        ``(h, w)`` values at layer resolution, shown on hover.
    """
    img = muted_grey(image)
    height_px, width_px = img.shape[:2]
    arr = np.asarray(upsampled, dtype=np.float32)
    limit = symmetric_limit(arr)
    fig = go.Figure(image_trace(img))
    fig.add_trace(
        go.Heatmap(
            z=arr,
            **_stretched(arr, (height_px, width_px)),
            colorscale=SIGNED_OVERLAY_SCALE if signed else MAGNITUDE_OVERLAY_SCALE,
            zmid=0.0 if signed else None,
            zmin=-limit if signed else 0.0,
            zmax=limit,
            opacity=float(opacity),
            hoverinfo="skip",
            colorbar=_signed_colorbar(colorbar_title),
        )
    )
    h, w = layer_hw
    sy, sx = height_px / h, width_px / w
    yy, xx = np.mgrid[0:h, 0:w]
    cx = (xx.ravel() + 0.5) * sx - 0.5
    cy = (yy.ravel() + 0.5) * sy - 0.5
    ch = -1 if channel is None else int(channel)
    custom = np.stack([np.full(h * w, ch), yy.ravel(), xx.ravel()], axis=1)
    cell = "layer cell (y=%{customdata[1]}, x=%{customdata[2]})"
    if layer_values is not None:
        text = [f"{v:.4g}" for v in np.asarray(layer_values, dtype=np.float64).ravel()]
        template = f"{cell}<br>{colorbar_title} %{{text}}<br>click to select<extra></extra>"
    else:
        text = [""] * (h * w)
        template = f"{cell}<br>click to select<extra></extra>"
    fig.add_trace(_click_layer(cx, cy, custom, text, (height - 40) / max(h, 1), template))
    _base_layout(fig, height, title)
    if selected_cell is not None:
        y, x = selected_cell
        fig.update_layout(
            shapes=[
                _cell_box((x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5, sx / 2, sy / 2),
            ]
        )
    _image_axes(fig, width_px, height_px)
    return fig


def feature_strip(
    values: np.ndarray,
    *,
    selected: int | None = None,
    title: str | None = None,
    yaxis_title: str = "value",
    height: int = 260,
    max_bars: int = 512,
) -> go.Figure:
    """Bars over the features of a 2-D layer (one bar per unit); clicking one selects ``(i,)``."""
    vals = np.asarray(values, dtype=np.float64).ravel()
    idx = np.arange(vals.size)
    if vals.size > max_bars:
        keep = np.sort(np.argsort(-np.abs(vals))[:max_bars])
        if selected is not None and selected not in keep and 0 <= selected < vals.size:
            keep = np.sort(np.append(keep, selected))
        idx = keep
    colours = [POSITIVE_COLOUR if vals[i] >= 0 else NEGATIVE_COLOUR for i in idx]
    outline = [3 if i == selected else 0 for i in idx]
    fig = go.Figure(
        go.Bar(
            x=idx,
            y=vals[idx],
            marker=dict(color=colours, line=dict(color=SELECTED_COLOUR, width=outline)),
            customdata=[[int(i)] for i in idx],
            hovertemplate="unit %{customdata[0]}<br>%{y:.4g}<extra></extra>",
            selected=dict(marker=dict(opacity=1.0)),
            unselected=dict(marker=dict(opacity=1.0)),
        )
    )
    _base_layout(fig, height, title)
    fig.update_layout(hoverdistance=20, bargap=0.05)
    fig.update_xaxes(title="unit", showgrid=False)
    fig.update_yaxes(title=yaxis_title, zeroline=True, zerolinecolor="#888", showgrid=True)
    return fig


# --- neuron gradients ---------------------------------------------------------------------------
def gradient_overlay(
    image: np.ndarray,
    grad2d: np.ndarray,
    *,
    signed: bool,
    opacity: float = 0.9,
    title: str | None = None,
    height: int = 360,
    zmax: float | None = None,
) -> go.Figure:
    """A gradient map over a grey copy of the image (grey keeps the colours of the map readable)."""
    grey = muted_grey(image)
    arr = np.asarray(grad2d, dtype=np.float32)
    limit = zmax if zmax is not None else symmetric_limit(arr)
    fig = go.Figure(image_trace(grey))
    fig.add_trace(
        go.Heatmap(
            z=arr,
            colorscale=SIGNED_OVERLAY_SCALE if signed else MAGNITUDE_OVERLAY_SCALE,
            zmid=0.0 if signed else None,
            zmin=-limit if signed else 0.0,
            zmax=limit,
            opacity=float(opacity),
            hovertemplate="(y=%{y}, x=%{x})<br>%{z:.3g}<extra></extra>",
            colorbar=_signed_colorbar("gradient" if signed else "|gradient|"),
        )
    )
    _base_layout(fig, height, title)
    fig.update_layout(clickmode="none", hoverdistance=0)
    _image_axes(fig, arr.shape[1], arr.shape[0])
    return fig


GRADIENT_PERCENTILE = 99.5
"""Percentile of |gradient| (over the non-zero pixels) where the robust colour scale saturates."""


def robust_limit(
    values: np.ndarray | Sequence[float], percentile: float = GRADIENT_PERCENTILE
) -> float:
    """The ``percentile`` of |values| over the finite non-zero entries; 1.0 when there are none.

    Input gradients of large images are dominated by a handful of pixels: a colour scale that
    ends at the largest value leaves everything else nearly invisible. Zeros are left out so
    that a small receptive field in a large image does not pull the limit down to zero.
    """
    arr = np.abs(np.asarray(values, dtype=np.float64)).ravel()
    arr = arr[np.isfinite(arr) & (arr > 0.0)]
    if not arr.size:
        return 1.0
    return float(np.percentile(arr, float(percentile)))


@dataclass(frozen=True)
class FieldBox:
    """A square-ish crop of an image around where a gradient is non-negligible.

    Rows ``top:bottom`` and columns ``left:right`` (half-open, inside the image) are the crop;
    ``support_height`` x ``support_width`` is the bounding box of the pixels that reached the
    threshold, before the margin was added.
    """

    top: int
    bottom: int
    left: int
    right: int
    support_height: int
    support_width: int
    image_height: int
    image_width: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def whole_image(self) -> bool:
        return self.height == self.image_height and self.width == self.image_width


def _span(low: int, high: int, size: int, extent: int) -> tuple[int, int]:
    """``[start, start + size)`` centred on ``[low, high)``, shifted into ``[0, extent)``."""
    size = min(size, extent)
    start = int(math.floor((low + high - size) / 2))
    start = max(0, min(start, extent - size))
    return start, start + size


def receptive_field_box(
    magnitude: np.ndarray,
    limit: float,
    *,
    fraction: float = 0.01,
    margin: float = 0.1,
    min_side: int = 16,
) -> FieldBox | None:
    """The crop that shows where ``magnitude`` (an ``(H, W)`` map) is non-negligible.

    A pixel counts when its |value| is at least ``fraction`` of ``limit`` (the colour limit the
    map is drawn with). The bounding box of those pixels grows by ``margin`` of its longer side
    (at least 2 px) on every side, then to a square of at least ``min_side`` px, kept inside the
    image (shifted at the edges, cut to the image when larger). ``None`` when no pixel counts.
    """
    arr = np.abs(np.asarray(magnitude, dtype=np.float64))
    if arr.ndim != 2:
        raise ValueError(f"expected an (H, W) map, got shape {arr.shape}")
    h, w = arr.shape
    mask = np.isfinite(arr) & (arr >= float(fraction) * float(limit)) & (arr > 0.0)
    if not mask.any():
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    support_h, support_w = bottom - top, right - left
    pad = max(2, math.ceil(float(margin) * max(support_h, support_w)))
    side = max(support_h + 2 * pad, support_w + 2 * pad, int(min_side))
    y0, y1 = _span(top, bottom, side, h)
    x0, x1 = _span(left, right, side, w)
    return FieldBox(y0, y1, x0, x1, support_h, support_w, h, w)


def value_text(value: float) -> str:
    """A colour-bar or caption number: three significant digits, a real minus sign."""
    return f"{value:.3g}".replace("-", "\u2212")


def saturating_colorbar(title: str, limit: float, low: float, high: float, *, signed: bool) -> dict:
    """A horizontal colour bar under the plot whose ticks show real values.

    ``limit`` is where the colours end, ``low`` and ``high`` the smallest and largest values of
    the map: an end the map goes beyond is labelled ``≥ limit`` (``≤ −limit``), so a reader
    knows that the colour there stands for that value or more. All maps drawn with it reserve
    the same space under the plot, so figures of the same height have plots of the same size.
    """
    # Three ticks: their labels stay apart on a narrow panel and inside the figure's margins.
    ticks = [-limit, 0.0, limit] if signed else [0.0, limit / 2, limit]
    text = [value_text(t) for t in ticks]
    tolerance = 1e-9 * limit
    if high > limit + tolerance:
        text[-1] = "\u2265 " + text[-1]
    if signed and low < -limit - tolerance:
        text[0] = "\u2264 " + text[0]
    return dict(
        orientation="h",
        x=0.5,
        xanchor="center",
        y=-0.03,
        yanchor="top",
        len=0.8,
        thickness=10,
        tickmode="array",
        tickvals=ticks,
        ticktext=text,
        tickangle=0,  # level labels: the bar reserves the same height whatever they say
        tickfont=dict(size=11),
        title=dict(text=html(title), side="top", font=dict(size=12)),
        outlinewidth=0,
    )


def bottom_colorbar(
    fig: go.Figure, title: str, *, signed: bool, limit: float | None = None
) -> go.Figure:
    """Move the colour bar of ``fig``'s first heatmap under the plot (see
    :func:`saturating_colorbar`); ``limit`` defaults to the heatmap's ``zmax``."""
    heat = next(t for t in fig.data if t.type == "heatmap")
    z = np.asarray(heat.z, dtype=np.float64)
    finite = z[np.isfinite(z)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0
    end = float(limit if limit is not None else heat.zmax)
    heat.update(colorbar=saturating_colorbar(title, end, low, high, signed=signed))
    # A panel narrower than it is tall leaves room above or below its square plot: keep the
    # plot on its colour bar, so the room goes above, the same in every panel.
    fig.update_yaxes(constraintoward="bottom")
    return fig


def gradient_panel(
    image: np.ndarray,
    grad2d: np.ndarray,
    *,
    signed: bool,
    limit: float,
    opacity: float = 0.9,
    height: int = 360,
    crop: FieldBox | None = None,
) -> go.Figure:
    """:func:`gradient_overlay` with its colours ending at ``limit`` (an honest colour bar under
    the plot, see :func:`saturating_colorbar`), optionally zoomed to ``crop``.

    The map keeps its real values (hover shows them); only the colours saturate.
    """
    fig = gradient_overlay(image, grad2d, signed=signed, opacity=opacity, height=height, zmax=limit)
    bottom_colorbar(fig, "gradient" if signed else "|gradient|", signed=signed, limit=limit)
    return zoom_to(fig, crop)


def zoom_to(fig: go.Figure, crop: FieldBox | None) -> go.Figure:
    """Show only ``crop`` of every image-like subplot of ``fig`` (``None``: leave it whole)."""
    if crop is not None:
        fig.update_xaxes(range=[crop.left - 0.5, crop.right - 0.5])
        fig.update_yaxes(range=[crop.bottom - 0.5, crop.top - 0.5])
    return fig


def gradient_channels(
    grad: np.ndarray, names: Sequence[str] = ("red", "green", "blue"), height: int = 300
) -> go.Figure:
    """The signed gradient of each colour channel side by side, one shared scale."""
    from plotly.subplots import make_subplots

    arr = np.asarray(grad, dtype=np.float64)
    c = arr.shape[0]
    labels = [html(n) for n in names] if c == len(names) else [f"channel {i}" for i in range(c)]
    limit = symmetric_limit(arr)
    fig = make_subplots(rows=1, cols=c, subplot_titles=labels, horizontal_spacing=0.03)
    for i in range(c):
        fig.add_trace(
            go.Heatmap(
                z=arr[i],
                colorscale=SIGNED_SCALE,
                zmid=0.0,
                zmin=-limit,
                zmax=limit,
                showscale=i == c - 1,
                colorbar=_signed_colorbar("gradient"),
                hovertemplate=f"{labels[i]} (y=%{{y}}, x=%{{x}})<br>%{{z:.3g}}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
    _base_layout(fig, height)
    fig.update_layout(clickmode="none", hoverdistance=0, margin=dict(l=8, r=8, t=30, b=8))
    h, w = arr.shape[1:]
    for i in range(c):
        axis = "x" if i == 0 else f"x{i + 1}"
        fig.update_xaxes(
            range=[-0.5, w - 0.5], constrain="domain", row=1, col=i + 1, **_CONFIG_AXIS
        )
        fig.update_yaxes(
            range=[h - 0.5, -0.5],
            scaleanchor=axis,
            constrain="domain",
            row=1,
            col=i + 1,
            **_CONFIG_AXIS,
        )
    return fig


def neighbour_tiles(
    maps: Sequence[np.ndarray],
    neurons: Sequence[tuple[int, ...]],
    activations: Sequence[float],
    *,
    current: tuple[int, ...] | None = None,
    ncols: int = 5,
    tile_px: int = 110,
) -> go.Figure:
    """|gradient| thumbnails of neighbouring neurons in one figure; clicking one selects it.

    ``customdata`` of a tile is the neuron's index tuple.
    """
    n = len(maps)
    ncols = max(1, min(ncols, n)) if n else 1
    nrows = max(1, math.ceil(n / ncols))
    tiles = [_pool_tile(np.asarray(m, dtype=np.float64), max_side=48) for m in maps]
    th, tw = tiles[0].shape if tiles else (1, 1)
    gap_x = max(1, round(tw * 0.08))
    label_h = max(1.0, th * 0.22)
    row_h = th + label_h
    col_w = tw + gap_x
    mosaic = np.full((max(1, round(nrows * row_h)) + 1, ncols * col_w), np.nan)
    xs, ys, hover, annotations, shapes = [], [], [], [], []
    width = len(neurons[0]) if neurons else 1
    for k, (neuron, tile) in enumerate(zip(neurons, tiles, strict=True)):
        r, c = divmod(k, ncols)
        y0 = round(r * row_h + label_h)
        x0 = c * col_w
        peak = symmetric_limit(tile)
        mosaic[y0 : y0 + th, x0 : x0 + tw] = tile / peak  # each tile on its own 0..1 scale
        xs.append(x0 + (tw - 1) / 2)
        ys.append(y0 + (th - 1) / 2)
        name = ", ".join(str(i) for i in neuron)
        hover.append(f"neuron ({name})<br>activation {activations[k]:.4g}")
        annotations.append(
            dict(
                x=x0 - 0.5,
                y=y0 - 0.5,
                text=f"({name})",
                showarrow=False,
                xanchor="left",
                yanchor="bottom",
                font=dict(size=10, color="#555"),
            )
        )
        if current is not None and tuple(neuron) == tuple(current):
            shapes.append(
                dict(
                    type="rect",
                    x0=x0 - 0.5,
                    x1=x0 + tw - 0.5,
                    y0=y0 - 0.5,
                    y1=y0 + th - 0.5,
                    line=dict(color=ACCENT_COLOUR, width=3),
                    layer="above",
                )
            )
    fig = go.Figure(
        go.Heatmap(
            z=mosaic.astype(np.float32),
            colorscale=MAGNITUDE_SCALE,
            zmin=0.0,
            zmax=1.0,
            hoverinfo="skip",
            showscale=False,
        )
    )
    custom = np.array([list(nr) for nr in neurons]).reshape(-1, width)
    fig.add_trace(_click_layer(np.array(xs), np.array(ys), custom, hover, tile_px * 0.9))
    _base_layout(fig, int(nrows * tile_px * row_h / th) + 16)
    fig.update_layout(annotations=annotations, shapes=shapes)
    _image_axes(fig, mosaic.shape[1], mosaic.shape[0])
    return fig


# --- convergence --------------------------------------------------------------------------------
def convergence_plot(
    points: Sequence[tuple[str, int, float]],
    *,
    method_names: dict[str, str] | None = None,
    tolerance: float | None = None,
    relative: bool = False,
    height: int = 380,
) -> go.Figure:
    """|delta| against n_steps (log-log), one line per method, with the tolerance as a dashed line.

    Parameters
    ----------
    points : sequence of (method, n_steps, value)
        ``value`` is |delta| (or the relative |delta| when ``relative``).
    tolerance : float, optional
        Drawn as a horizontal line in the same units.
    """
    names = method_names or {}
    methods = list(dict.fromkeys(p[0] for p in points))
    fig = go.Figure()
    floor = 1e-12
    for i, method in enumerate(methods):
        rows = sorted((s, v) for m, s, v in points if m == method)
        name = html(names.get(method, method))
        fig.add_trace(
            go.Scatter(
                x=[s for s, _ in rows],
                y=[max(abs(v), floor) for _, v in rows],
                mode="lines+markers",
                name=name,
                line=dict(color=METHOD_COLOURS[i % len(METHOD_COLOURS)], width=2),
                hovertemplate=f"%{{x}} steps: %{{y:.3g}}<extra>{name}</extra>",
            )
        )
    _base_layout(fig, height)
    fig.update_layout(
        showlegend=True,
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0),
        margin=dict(l=8, r=8, t=40, b=8),
        hovermode="x unified",
        clickmode="none",
        hoverdistance=20,
    )
    if tolerance is not None and tolerance > 0:
        fig.add_hline(
            y=tolerance,
            line=dict(color="#555", dash="dash"),
            annotation_text="tolerance",
            annotation_position="top left",
        )
    steps = sorted({int(p[1]) for p in points})
    fig.update_xaxes(
        type="log", title="n_steps", showgrid=True, tickvals=steps, ticktext=[str(s) for s in steps]
    )
    values = [max(abs(float(p[2])), floor) for p in points]
    if tolerance is not None and tolerance > 0:
        values.append(float(tolerance))
    tickvals = decade_ticks(min(values), max(values)) if values else []
    fig.update_yaxes(
        type="log",
        title="|delta| in % of the score difference" if relative else "|delta|",
        showgrid=True,
        tickvals=tickvals,
        ticktext=[percent_text(v) if relative else f"{v:.0e}" for v in tickvals],
        minor=dict(showgrid=False, ticks=""),
    )
    return fig


def decade_ticks(low: float, high: float, most: int = 7) -> list[float]:
    """Tick values for a log axis from ``low`` to ``high``: powers of ten only (every second or
    third one when there are more than ``most``), with 2 and 5 between them when the range
    covers less than two decades, so the axis never crowds its labels."""
    low, high = max(min(low, high), 1e-300), max(low, high, 1e-300)
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    powers = list(range(first, last + 1))
    if len(powers) <= 2:
        return [
            m * 10.0**p for p in powers for m in (1, 2, 5) if low / 2 <= m * 10.0**p <= high * 2
        ]
    stride = max(1, math.ceil(len(powers) / most))
    return [10.0**p for p in powers[::stride]]


def percent_text(fraction: float) -> str:
    """``fraction`` as a short percentage: 0.5 -> "50%", 0.001 -> "0.1%", 1e-6 -> "1e-4%"."""
    value = fraction * 100.0
    if value >= 1:
        return f"{value:.0f}%"
    if value >= 1e-3:
        return f"{value:.3g}%"
    return f"{value:.0e}%"


# --- channel ordering (pure helpers for the conductance page) -----------------------------------
RANKINGS: dict[str, str] = {
    "abs": "largest |conductance|",
    "pos": "most positive",
    "neg": "most negative",
    "index": "channel number",
}


def parse_channel_filter(text: str, num_channels: int) -> list[int] | None:
    """Channels named by ``"3, 10-20, 40"``; ``None`` for an empty filter.

    Raises
    ------
    ValueError
        With a readable message when the text is not a list of numbers and ranges.
    """
    text = text.strip()
    if not text:
        return None
    picked: list[int] = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if lo > hi:
                    lo, hi = hi, lo
                picked.extend(range(lo, hi + 1))
            else:
                picked.append(int(part))
        except ValueError:
            raise ValueError(
                f"{part!r} is not a channel number or range; write e.g. 3, 10-20, 40."
            ) from None
    inside = [c for c in dict.fromkeys(picked) if 0 <= c < num_channels]
    if not inside:
        raise ValueError(
            f"No channel in {text!r} exists: this layer has channels 0 to {num_channels - 1}."
        )
    return inside


def rank_channels(
    totals: np.ndarray, rank: str = "abs", only: Sequence[int] | None = None
) -> list[int]:
    """Channel indices ordered by ``rank`` (see :data:`RANKINGS`), optionally only ``only``."""
    values = np.asarray(totals, dtype=np.float64)
    pool = np.arange(values.size) if only is None else np.asarray(list(only), dtype=int)
    if pool.size == 0:
        return []
    if rank == "pos":
        order = np.argsort(-values[pool], kind="stable")
    elif rank == "neg":
        order = np.argsort(values[pool], kind="stable")
    elif rank == "index":
        order = np.argsort(pool, kind="stable")
    else:
        order = np.argsort(-np.abs(values[pool]), kind="stable")
    return [int(c) for c in pool[order]]


# --- layer overview -----------------------------------------------------------------------------
def overview_chart(
    layers: Sequence[str],
    shares: Sequence[float],
    concentration: Sequence[float],
    relative_deltas: Sequence[float],
    *,
    tolerance: float,
    selected: str | None = None,
    height: int = 460,
) -> go.Figure:
    """Layers in network order: each layer's share of F(x) − F(baseline) (top) and how much of
    its conductance its strongest channels hold (bottom); clicking a bar picks the layer.

    Bars of layers whose relative convergence delta exceeds ``tolerance`` are hatched and
    labelled with the delta; the others are labelled ✓. Every bar carries its layer's index in
    ``customdata``.

    Parameters
    ----------
    layers : sequence of str
        Layer names, in network order.
    shares : sequence of float
        Total conductance over F(x) − F(baseline), per layer (NaN when the difference is zero).
    concentration : sequence of float
        Share of the layer's absolute conductance held by its top channels, in [0, 1].
    relative_deltas : sequence of float
        |delta| / |F(x) − F(baseline)| per layer.
    tolerance : float
        Relative delta above which completeness is marked as not holding.
    selected : str, optional
        The chosen layer, outlined.
    """
    from plotly.subplots import make_subplots

    names = [str(n) for n in layers]
    share = np.asarray(shares, dtype=np.float64) * 100.0
    conc = np.asarray(concentration, dtype=np.float64) * 100.0
    rel = np.asarray(relative_deltas, dtype=np.float64)
    ok = rel <= tolerance
    labels = [html(n) for n in names]
    custom = [[i] for i in range(len(names))]
    outline = [3 if n == selected else 0 for n in names]
    colours = [POSITIVE_COLOUR if not v < 0 else NEGATIVE_COLOUR for v in np.nan_to_num(share)]
    marks = ["✓" if good else f"⚠ {r:.0%}" for good, r in zip(ok, rel, strict=True)]
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.64, 0.36], vertical_spacing=0.05
    )
    fig.add_trace(
        go.Bar(
            x=labels,
            y=np.nan_to_num(share),
            text=marks,
            textposition="outside",
            cliponaxis=False,
            textfont=dict(size=11),
            marker=dict(
                color=colours,
                line=dict(color=SELECTED_COLOUR, width=outline),
                pattern=dict(shape=["" if good else "/" for good in ok], fgcolor="#ffffff"),
            ),
            customdata=[[i, r * 100.0] for i, r in enumerate(rel)],
            hovertemplate="%{x}<br>share of F(x) − F(baseline): %{y:.1f}%"
            "<br>|delta| relative: %{customdata[1]:.2f}%<br>click to open<extra></extra>",
            selected=dict(marker=dict(opacity=1.0)),
            unselected=dict(marker=dict(opacity=1.0)),
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=labels,
            y=conc,
            marker=dict(color="#7f8c8d", line=dict(color=SELECTED_COLOUR, width=outline)),
            customdata=custom,
            hovertemplate="%{x}<br>top channels hold %{y:.1f}% of |conductance|"
            "<br>click to open<extra></extra>",
            selected=dict(marker=dict(opacity=1.0)),
            unselected=dict(marker=dict(opacity=1.0)),
        ),
        row=2,
        col=1,
    )
    fig.add_hline(y=100.0, line=dict(color="#888", dash="dot", width=1), row=1, col=1)
    _base_layout(fig, height)
    fig.update_layout(hoverdistance=20, bargap=0.25, margin=dict(l=8, r=8, t=24, b=8))
    top = float(np.nanmax(np.abs(share))) if share.size and np.isfinite(share).any() else 100.0
    low = float(np.nanmin(np.nan_to_num(share))) if share.size else 0.0
    fig.update_yaxes(
        title="share of F(x) − F(baseline) (%)",
        range=[min(0.0, low * 1.15), max(110.0, top * 1.15)],
        showgrid=True,
        zeroline=True,
        zerolinecolor="#888",
        title_font=dict(size=11),
        row=1,
        col=1,
    )
    fig.update_yaxes(
        title="top channels (%)",
        range=[0, 105],
        showgrid=True,
        title_font=dict(size=11),
        row=2,
        col=1,
    )
    fig.update_xaxes(type="category", tickangle=-40 if len(names) > 6 else 0, row=2, col=1)
    fig.update_xaxes(type="category", row=1, col=1)
    return fig
