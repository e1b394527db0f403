"""The app's own style sheet, on every page: small fixes to Streamlit's defaults so nothing is
cut off on a 1024x768 screen (the smallest the explorer is checked on).

Streamlit ends a metric's label, value and delta in an ellipsis when it is wider than its
column: "class …" instead of the target's name, "Convergence de…". Here they wrap instead, and
on narrow windows metric values use a smaller type, so a number keeps all its digits on one line.
Labels of buttons, page links and toggles ("Add this view to the …", "Cla…" for "Class token")
wrap at spaces too.
"""

from __future__ import annotations

import streamlit as st

CSS = """
<style>
[data-testid="stMetricLabel"],
[data-testid="stMetricLabel"] *,
[data-testid="stMetricValue"],
[data-testid="stMetricValue"] *,
[data-testid="stMetricDelta"],
[data-testid="stMetricDelta"] * {
  white-space: normal !important;
  overflow: visible !important;
  text-overflow: clip !important;
  overflow-wrap: anywhere;
}
[data-testid="stMetricDelta"] { height: auto !important; }
/* Labels of buttons, page links and toggles wrap at spaces; a single word too long for its box
   still ends in an ellipsis. */
[data-testid="stMainBlockContainer"] button [data-testid="stMarkdownContainer"] p,
[data-testid="stMainBlockContainer"] [data-testid="stPageLink-NavLink"] span,
[data-testid="stMainBlockContainer"] [data-testid="stPageLink-NavLink"] p,
[data-testid="stMainBlockContainer"] [data-testid="stCheckbox"] p {
  white-space: normal !important;
}
/* The file uploader's hint (size limit and file types) wraps instead of ending in "G…". */
[data-testid="stFileUploaderDropzoneInstructions"] span,
[data-testid="stFileUploaderDropzoneInstructions"] small {
  white-space: normal !important;
  overflow: visible !important;
  text-overflow: clip !important;
}
@media (max-width: 1280px) {
  [data-testid="stMetricValue"] { font-size: 1.6rem !important; line-height: 1.25; }
}
</style>
"""
"""Rules every page gets (no outside fonts or files)."""


def apply() -> None:
    """Inject :data:`CSS` (call once per page run)."""
    st.html(CSS)
