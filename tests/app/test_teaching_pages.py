"""Teaching features: the guided tour, the glossary page and presentation mode."""

from __future__ import annotations

import numpy as np
import pytest
from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_CONVERGENCE,
    PAGE_GLOSSARY,
    PAGE_LAYER,
    PAGE_MODEL,
    PAGE_NEURON,
    PAGE_TOUR,
    open_page,
    plotly_specs,
    values,
    visible,
    widget,
)

from webapp import glossary as G
from webapp import tour as T

STEP_TITLES = {
    PAGE_MODEL: "Model & images",
    PAGE_LAYER: "Layer picker",
    PAGE_NEURON: "Neuron gradient",
    PAGE_CONDUCTANCE: "Layer conductance",
    PAGE_CONVERGENCE: "Convergence",
    PAGE_GLOSSARY: "Glossary",
    PAGE_TOUR: "Guided tour",
}


def _text(at) -> str:
    """Every markdown and caption of the last run, as the reader sees it."""
    parts = [str(m.value) for m in at.markdown] + [str(c.value) for c in at.caption]
    return visible("\n".join(parts))


def _button(at, key: str):
    matches = [b for b in at.button if b.key == key]
    assert matches, f"no button {key!r}; buttons: {[b.key for b in at.button]}"
    return matches[0]


def _click(at, key: str, expected_page: str):
    """Click a tour button and check the page it opens; then stay on that page.

    A page switch made by the script shows the new page, but AppTest's next run would go
    back to the page it opened last, so it is opened again (as a browser stays on it).
    """
    _button(at, key).click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == STEP_TITLES[expected_page]
    return open_page(at, expected_page)


def _step(at) -> int | None:
    return at.session_state["tour_step"]


def _active_image_name(at) -> str:
    active = at.session_state["active_image"]
    return next(e.name for e in at.session_state["images"] if e.digest == active)


# --- the edge measure ---------------------------------------------------------------------------
def test_edge_fit_tells_an_edge_from_a_blob_and_a_flat_patch():
    patch = np.zeros((3, 9, 9))
    ramp = np.array([[-1.0, 0.0, 1.0]] * 3)  # rises to the right: a vertical edge
    patch[:, 3:6, 3:6] = ramp
    fit, angle = T.edge_fit(patch)
    assert fit == pytest.approx(1.0)
    assert angle == pytest.approx(0.0, abs=1e-9)
    assert T.side_name(angle) == "right" and T.opposite("right") == "left"
    # Rising downward: the red side is the bottom.
    assert T.side_name(T.edge_fit(patch.transpose(0, 2, 1))[1]) == "bottom"
    blob = np.zeros((3, 9, 9))
    blob[:, 3:6, 3:6] = [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]]
    assert T.edge_fit(blob)[0] == pytest.approx(0.0, abs=1e-9)
    flat = np.zeros((3, 9, 9))
    flat[:, 3:6, 3:6] = 2.0  # a colour or brightness detector, no edge
    assert T.edge_fit(flat)[0] == pytest.approx(0.0, abs=1e-9)
    assert T.edge_fit(np.zeros((3, 9, 9))) == (0.0, 0.0)


def test_line_fit_measures_slant_and_straightness():
    diagonal = np.zeros((40, 40))
    for i in range(40):
        diagonal[39 - i, i] = 1.0 + i / 100  # from lower left to upper right
    angle, straightness = T.line_fit(diagonal, share=40 / 1600)
    assert T.slant_difference(angle, 135.0) == pytest.approx(0.0, abs=1e-6)
    assert straightness == pytest.approx(1.0)
    blob = np.zeros((40, 40))
    blob[15:25, 15:25] = 1.0
    assert T.line_fit(blob, share=100 / 1600)[1] == pytest.approx(0.5)
    assert T.slant_difference(170.0, 10.0) == pytest.approx(20.0)
    assert T.slant_difference(-24.0, 156.0) == pytest.approx(0.0)


def test_edge_strength_rank_finds_the_outline():
    pixels = np.zeros((20, 20, 3))
    pixels[:, 10:] = 255.0
    assert T.edge_strength_rank(pixels, 5, 10) > 0.8
    assert T.edge_strength_rank(pixels, 5, 2) == 0.0


# --- the tour -----------------------------------------------------------------------------------
def test_tour_page_lists_the_steps_and_starts_on_the_image(app):
    open_page(app, PAGE_TOUR)
    text = _text(app)
    for step in T.STEPS:
        assert step.title in text
    assert not [b for b in app.button if b.key == "tour_next"]  # no tour running yet
    _click(app, "tour_start", PAGE_MODEL)
    assert _step(app) == 0
    assert _active_image_name(app) == T.TOUR_IMAGE
    text = _text(app)
    assert f"Guided tour · step 1 of {len(T.STEPS)}" in text
    facts = app.session_state["tour_facts"]
    # The step quotes the model's real guess, as the sidebar shows it.
    assert facts["label"] == "triangle"
    assert f"the model's guess is **{facts['label']}**, {facts['prob']:.0%} sure" in text
    assert f"Predicted: **{facts['label']}**" in text


def test_tour_runs_from_start_to_end_and_sets_each_steps_state(app):
    open_page(app, PAGE_TOUR)
    _click(app, "tour_start", PAGE_MODEL)

    # 2: the layer picker, with the first layer chosen.
    _click(app, "tour_next", PAGE_LAYER)
    assert _step(app) == 1
    assert app.session_state["layer"] == T.EDGE_LAYER
    assert f"**Layer** · {T.EDGE_LAYER}" in _text(app)
    assert "16 channels" in _text(app)

    # 3: the edge neuron, measured, selected, and drawn on the neuron page.
    _click(app, "tour_next", PAGE_NEURON)
    facts = app.session_state["tour_facts"]
    neuron = tuple(facts["neuron"])
    assert app.session_state["layer"] == T.EDGE_LAYER
    assert app.session_state["neuron"] == neuron
    neuron_line = next(m for m in _text(app).splitlines() if m.startswith("Neuron **"))
    assert f"Neuron **{neuron}**" in neuron_line and f"layer {T.EDGE_LAYER}" in neuron_line
    assert f"channel **{neuron[0]}**" in _text(app)
    # The claim holds on what the page draws: the drawn gradient is the measured edge.
    drawn = values(plotly_specs(app)["ng_signed"]["data"][1]["z"])
    fit, angle = T.edge_fit(drawn)
    assert fit == pytest.approx(facts["fit"], abs=1e-3)
    assert fit > 0.9 and fit > facts["runner_up"]
    assert T.side_name(angle) == facts["red_side"]
    assert facts["edge_rank"] > 0.9  # the neuron sits on one of the picture's sharpest edges
    # Its channel's map lights up along one straight line of the edge's slant.
    assert facts["line_straightness"] > 0.9 and facts["line_off"] < 25
    assert "lie on one straight line" in _text(app)

    # 4: conductance in the app's default layer, its top channel selected.
    _click(app, "tour_next", PAGE_CONDUCTANCE)
    facts = app.session_state["tour_facts"]
    assert app.session_state["layer"] == facts["layer"] == "block3"
    assert app.session_state["channel"] == facts["top_channel"]
    metrics = {m.label: m.value for m in app.metric}
    assert float(metrics["F(image) − F(baseline)"]) == pytest.approx(facts["diff"], rel=1e-3)
    assert facts["cell_share"] > 2 * facts["even_share"]
    assert f"**{facts['cell_share']:.0%}** of all conductance" in _text(app)

    # 5: the delta, few steps against many, from the sweep the page draws.
    _click(app, "tour_next", PAGE_CONVERGENCE)
    facts = app.session_state["tour_facts"]
    assert app.session_state["sweep_settings"] == T.SWEEP
    assert facts["few_delta"] > facts["tolerance"] > facts["many_delta"]
    # The quoted deltas are the ones the page's chart draws.
    trace = next(
        t for t in plotly_specs(app)["conv_plot"]["data"] if t["name"] == "Riemann, trapezoid"
    )
    drawn = dict(zip(values(trace["x"]).tolist(), values(trace["y"]).tolist(), strict=True))
    assert drawn[T.FEW_STEPS] == pytest.approx(facts["few_delta"], rel=1e-6)
    assert drawn[T.MANY_STEPS] == pytest.approx(facts["many_delta"], rel=1e-6)
    assert all(v <= facts["tolerance"] for n, v in drawn.items() if n >= facts["stable"])
    assert f"**{facts['few_delta']:.0%}**" in _text(app)
    assert f"its delta is {facts['used_delta']:.1%}" in _text(app)

    # 6: the glossary, then Finish ends the tour on the tour page.
    _click(app, "tour_next", PAGE_GLOSSARY)
    assert _step(app) == len(T.STEPS) - 1
    assert _button(app, "tour_next").label == "Finish"
    _click(app, "tour_next", PAGE_TOUR)
    assert _step(app) is None
    assert not [b for b in app.button if b.key == "tour_next"]
    # Finishing keeps the state the tour set: the user explores on from there.
    assert app.session_state["layer"] == "block3"


def test_back_and_end_tour(app):
    open_page(app, PAGE_TOUR)
    _click(app, "tour_start", PAGE_MODEL)
    assert _button(app, "tour_back").disabled
    _click(app, "tour_next", PAGE_LAYER)
    _click(app, "tour_back", PAGE_MODEL)
    assert _step(app) == 0
    _button(app, "tour_end").click()
    app.run()
    assert _step(app) is None
    assert not [b for b in app.button if b.key in ("tour_next", "tour_back")]
    # The tour page offers to start again, not to resume.
    open_page(app, PAGE_TOUR)
    assert _button(app, "tour_start")


def test_step_box_shows_a_failed_measurement_and_keeps_the_page(app, monkeypatch):
    from explainer.errors import ExplainerError
    from webapp import backend

    def broken(*args, **kwargs):
        raise ExplainerError("The worker stopped.")

    open_page(app, PAGE_TOUR)
    _click(app, "tour_start", PAGE_MODEL)
    monkeypatch.setattr(backend, "tree", broken)
    _button(app, "tour_next").click()
    app.run()
    assert not app.exception
    assert _step(app) == 1
    assert "could not measure what it shows: The worker stopped." in visible(
        "\n".join(str(w.value) for w in app.warning)
    )


def test_tour_switches_back_to_the_builtin_model(app):
    from webapp import state as S

    app.session_state[S.MODEL] = S.ModelRef(kind="upload", digest="x", filename="other.pt")
    app.session_state[S.LAYER] = "somewhere"
    open_page(app, PAGE_TOUR)
    _click(app, "tour_start", PAGE_MODEL)
    assert app.session_state[S.MODEL] == S.ModelRef()
    assert not app.error


# --- glossary -----------------------------------------------------------------------------------
def test_glossary_page_shows_every_term(app):
    open_page(app, PAGE_GLOSSARY)
    text = _text(app)
    for entry in G.TERMS:
        assert f"#### {entry.name}" in text
        assert entry.text in text
    assert "F(image) − F(baseline)" in text  # the formula is explained on the page


def test_glossary_search(app):
    open_page(app, PAGE_GLOSSARY)
    widget(app, "text_input", "_w_glossary_query").set_value("gauss").run()
    headings = [str(m.value) for m in app.markdown if str(m.value).startswith("#### ")]
    assert headings == ["#### Integration method (Gauss-Legendre, Riemann)"]
    widget(app, "text_input", "_w_glossary_query").set_value("zebra").run()
    assert "No entry mentions zebra" in visible(str(app.info[0].value))


def test_glossary_is_linked_from_every_page(app):
    for page in (PAGE_MODEL, PAGE_NEURON, PAGE_TOUR):
        open_page(app, page)
        links = [p.proto.page for p in app.get("page_link")]
        assert "glossary" in links, page


def test_formulas_on_pages_come_with_an_explanation(app):
    open_page(app, PAGE_CONDUCTANCE)
    labels = [p.proto.popover.label for p in app.get("popover")]
    assert "What do these numbers mean?" in labels
    open_page(app, PAGE_CONVERGENCE)
    assert "The words on this page" in [p.proto.popover.label for p in app.get("popover")]
    helps = {s.label: s.help for s in app.selectbox}
    assert "Gauss-Legendre" in helps["Integration method"]
    assert G.term("integration-method").short in helps["Integration method"]


# --- presentation mode --------------------------------------------------------------------------
def _style_sheets(at) -> list[str]:
    return [h.proto.body for h in at.get("html")]


def test_presentation_toggle(app):
    open_page(app, PAGE_CONDUCTANCE)
    assert not any("font-size: 19px" in s for s in _style_sheets(app))
    assert "Settings: target, baseline, steps" not in [e.label for e in app.expander]
    assert "Baseline options" in [e.label for e in app.expander]

    widget(app, "toggle", "_w_presentation").set_value(True).run()
    assert app.session_state["presentation"] is True
    assert any("font-size: 19px" in s for s in _style_sheets(app))
    labels = [e.label for e in app.expander]
    assert "Settings: target, baseline, steps" in labels
    assert "Baseline options" not in labels  # no expander inside an expander
    assert not app.exception

    # The mode stays on across pages until switched off.
    open_page(app, PAGE_GLOSSARY)
    assert any("font-size: 19px" in s for s in _style_sheets(app))
    assert widget(app, "toggle", "_w_presentation").value is True
    widget(app, "toggle", "_w_presentation").set_value(False).run()
    assert app.session_state["presentation"] is False
    assert not any("font-size: 19px" in s for s in _style_sheets(app))
