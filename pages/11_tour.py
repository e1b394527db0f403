"""Guided tour: a short walk through the built-in model, one real page per step."""

from __future__ import annotations

import streamlit as st

import webapp
from webapp import presentation
from webapp import tour as T
from webapp import widgets as W

ctx = webapp.setup()
W.page_header(
    "Guided tour",
    f"{len(T.STEPS)} short steps through the built-in shape model, in plain words. Each step "
    "opens a real page of the app with the right picture, layer and neuron already chosen, "
    "and a box on top says what to look at. Use **Next** and **Back** in that box; "
    "**End tour** leaves you where you are, free to explore.",
)

running = T.current()
for number, step in enumerate(T.STEPS, start=1):
    marker = ":material/play_arrow:" if running == number - 1 else f"{number}."
    st.markdown(f"{marker} **{step.title}** — {step.text.split('. ')[0].rstrip('.')}.")

left, right, _ = st.columns([1.2, 1.2, 2])
if running is None:
    if left.button("Start the tour", key="tour_start", type="primary", icon=":material/school:"):
        T.go(0)
else:
    if left.button(
        f"Continue at step {running + 1}",
        key="tour_resume",
        type="primary",
        icon=":material/play_arrow:",
    ):
        T.go(running)
    if right.button("Start again", key="tour_restart", icon=":material/restart_alt:"):
        T.go(0)

st.caption(
    "The tour switches to the built-in model and one of its sample pictures; your uploads stay "
    "in the list. "
    + (
        "Presentation mode is on: large type for a projector."
        if presentation.active()
        else "Showing it to a room? Turn on **Presentation mode** in the sidebar first."
    )
)
