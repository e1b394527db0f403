"""Presentation mode: large type, full-width figures and the controls tucked away.

Meant for showing the explorer on a projector (1024x768 is the smallest screen it is checked
on). The mode is one session-state flag (:data:`webapp.state.PRESENTATION`), switched by the
toggle in the sidebar; while it is on every page gets :data:`CSS`, the sidebar starts collapsed
(:func:`sidebar_state`) and every block of controls (the settings form, the sweep form, the
dataset page's choices, the Compare page's choices) sits in a closed expander: see
:func:`controls`, the one helper pages draw such a block with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

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
