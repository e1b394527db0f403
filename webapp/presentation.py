"""Presentation mode: large type, full-width figures and the controls tucked away.

Meant for showing the explorer on a projector (1024x768 is the smallest screen it is checked
on). The mode is one session-state flag (:data:`webapp.state.PRESENTATION`), switched by the
toggle in the sidebar; while it is on every page gets :data:`CSS`, the sidebar starts collapsed
(:func:`sidebar_state`) and every block of controls (the settings form, the sweep form, the
dataset page's choices, the Compare page's choices) sits in a closed expander: see
:func:`controls`, the one helper pages draw such a block with. Chart text grows with the page's
type: the app's chart helpers draw every figure through :func:`chart`, which scales the text of
a copy of the figure (the figure itself, which downloads and the report use, keeps its sizes).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import plotly.graph_objects as go
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from webapp import state as S

CSS = """
<style>
/* Larger type everywhere: Streamlit sizes text in rem, so the root size scales it all. */
html { font-size: 19px; }
/* Figures and tables use the whole width: thin side margins, no maximum width. */
[data-testid="stMainBlockContainer"] {
  max-width: 100% !important;
  padding: 4.2rem 1.4rem 3rem 1.4rem !important; /* the top clears the app's header */
}
/* Headings sized for the back of a room, but not so large they wrap on 1024 px. */
[data-testid="stMainBlockContainer"] h1 { font-size: 2.1rem; }
[data-testid="stMainBlockContainer"] h2 { font-size: 1.6rem; }
[data-testid="stMainBlockContainer"] h3 { font-size: 1.3rem; }
/* Buttons keep their whole label at the larger type: less side padding, and a long label
   wraps at a space instead of ending in an ellipsis. */
[data-testid="stMainBlockContainer"] button {
  padding-left: 0.45rem !important;
  padding-right: 0.45rem !important;
}
[data-testid="stMainBlockContainer"] button * {
  white-space: normal !important;
  text-overflow: clip !important;
  overflow: visible !important;
}
/* Captions stay readable from a distance. */
[data-testid="stCaptionContainer"] { font-size: 0.95rem; }
</style>
"""
"""The style sheet of presentation mode (no outside fonts or files)."""

WIDGET_KEY = "_w_presentation"

CHART_SCALE = 1.3
"""How much larger chart text is while presenting: plotly's 12 px text becomes about 16 px, in
step with the page's type (16 px to 19 px) but a little more, as chart text starts smaller."""
PLOTLY_FONT_SIZE = 12
"""Plotly's text size where a figure sets none (its ``layout.font.size`` default)."""

# Whether the script is drawing inside a block of :func:`controls` right now. A context
# variable, not session state: it lasts exactly as long as the ``with`` block of this run.
_FOLDED: ContextVar[bool] = ContextVar("presentation_folded", default=False)


def active() -> bool:
    """Whether presentation mode is on for this session."""
    return bool(st.session_state.get(S.PRESENTATION, False))


def sidebar_state() -> str:
    """``initial_sidebar_state`` for the page config: collapsed while presenting."""
    return "collapsed" if active() else "expanded"


def apply() -> None:
    """Inject the presentation style sheet when the mode is on (call once per page run)."""
    if active():
        st.html(CSS)


def _on_toggle() -> None:
    st.session_state[S.PRESENTATION] = bool(st.session_state.get(WIDGET_KEY, False))


def toggle() -> None:
    """The sidebar switch that turns presentation mode on and off."""
    st.session_state[WIDGET_KEY] = active()
    st.toggle(
        "Presentation mode",
        key=WIDGET_KEY,
        on_change=_on_toggle,
        help="Large type and full-width figures for a projector; the settings forms fold away "
        "into expanders and this sidebar starts closed (open it with the arrow at the top "
        "left).",
    )


@contextmanager
def controls(
    label: str, *, expanded: bool = False, always: bool = False
) -> Iterator[DeltaGenerator]:
    """A block of controls: in an expander named ``label`` while presenting, in place otherwise.

    Yields the container the block is drawn in; a page may add more to it later (``with box:``
    or ``box.columns(...)``), so controls drawn further down the script still land in the fold.
    ``always`` folds the block also outside presentation mode; ``expanded`` opens the expander
    the first time it is drawn (for a block the page cannot work without yet).

    A block inside another block is drawn in place: one expander holds all of it, never an
    expander in an expander. Widgets keep their keys and values whether folded or not, so
    turning the mode on or off loses nothing the user set.
    """
    if _FOLDED.get() or not (always or active()):
        box = st.container()
        with box:
            yield box
        return
    token = _FOLDED.set(True)
    try:
        box = st.expander(label, expanded=expanded)
        with box:
            yield box
    finally:
        _FOLDED.reset(token)


def folded() -> bool:
    """Whether the script is drawing inside a folded block of :func:`controls` (a sub-section
    there is a bordered container, not another expander)."""
    return _FOLDED.get()


# --- chart text ---------------------------------------------------------------------------------
def _scaled(size: Any, factor: float) -> Any:
    if isinstance(size, bool):
        return size
    if isinstance(size, int | float):
        return round(float(size) * factor, 1)
    if isinstance(size, list | tuple):
        return [_scaled(v, factor) for v in size]
    return size  # an array of sizes plotly keeps as binary data: left as it is


def _scale_fonts(node: Any, factor: float) -> None:
    """Scale, in place, the ``size`` of every font found under ``node`` (a figure's dict form):
    ``font``, ``tickfont``, ``textfont``, a title's or colour bar's ``font`` and so on."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("font") and isinstance(value, dict) and "size" in value:
                value["size"] = _scaled(value["size"], factor)
            _scale_fonts(value, factor)
    elif isinstance(node, list):
        for item in node:
            _scale_fonts(item, factor)


_CARTESIAN = {"scatter", "scattergl", "bar", "heatmap", "histogram", "box", "contour", "image"}
_SCALE_TRACES = {"heatmap", "contour", "histogram2d", "histogram2dcontour"}
"""Trace types that draw a colour bar unless told not to."""
TITLE_RATIO = 14 / 12
"""Axis and colour-bar titles are this much larger than tick labels (as Streamlit draws them)."""


def _font_at(holder: dict, *path: str, size: float) -> None:
    """Set ``holder[path...]["size"]`` to ``size`` unless the figure set one there."""
    node = holder
    for key in path:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            return  # e.g. a title given as plain text: left alone
        node = child
    node.setdefault("size", size)


def _colour_bars(spec: dict) -> list[dict]:
    """The colour bars of a figure's dict form (created empty where a trace draws one)."""
    bars: list[dict] = []
    for trace in spec.get("data", []):
        kind = trace.get("type", "scatter")
        if "colorbar" in trace or (kind in _SCALE_TRACES and trace.get("showscale", True)):
            if not trace.get("coloraxis"):
                bars.append(trace.setdefault("colorbar", {}))
        marker = trace.get("marker")
        if isinstance(marker, dict) and ("colorbar" in marker or marker.get("showscale")):
            bars.append(marker.setdefault("colorbar", {}))
    for key, value in spec.get("layout", {}).items():
        if key.startswith("coloraxis") and isinstance(value, dict):
            bars.append(value.setdefault("colorbar", {}))
    return bars


def scale_text(fig: go.Figure, factor: float) -> go.Figure:
    """A copy of ``fig`` with all its text ``factor`` times larger. ``fig`` is left as it was.

    Every size the figure sets (tick fonts, colour-bar ticks and titles, annotations, data
    labels) is scaled; the text that has no size of its own gets one: the base font, and the
    tick labels and titles of every axis and colour bar (which Streamlit's chart theme would
    otherwise size from the page's type, a smaller step than ``factor``).
    """
    spec = fig.to_dict()
    layout = spec.setdefault("layout", {})
    _scale_fonts(spec.get("data", []), factor)
    _scale_fonts(layout, factor)  # explicit sizes, the base font's too when it has one
    font = dict(layout.get("font") or {})
    if "size" not in font:
        font["size"] = _scaled(PLOTLY_FONT_SIZE, factor)
    layout["font"] = font
    tick = font["size"] if isinstance(font["size"], int | float) else PLOTLY_FONT_SIZE * factor
    title = round(tick * TITLE_RATIO, 1)
    axes = {key for key in layout if re.fullmatch(r"[xy]axis[0-9]*", key)}
    for trace in spec.get("data", []):
        if trace.get("type", "scatter") in _CARTESIAN:
            axes.add("xaxis" + str(trace.get("xaxis", "x"))[1:])
            axes.add("yaxis" + str(trace.get("yaxis", "y"))[1:])
    for name in axes:
        axis = layout.setdefault(name, {})
        if isinstance(axis, dict):
            _font_at(axis, "tickfont", size=tick)
            _font_at(axis, "title", "font", size=title)
    for bar in _colour_bars(spec):
        _font_at(bar, "tickfont", size=tick)
        _font_at(bar, "title", "font", size=title)
    return go.Figure(spec)


def chart(fig: Any) -> Any:
    """The figure to draw: ``fig`` itself, or while presenting a copy whose text is
    :data:`CHART_SCALE` times larger (:func:`scale_text`)."""
    if not active() or not isinstance(fig, go.Figure):
        return fig
    return scale_text(fig, CHART_SCALE)
