"""A segmentation-style model (a score per class at every output pixel) on every page.

The model is uploaded as a ``torch.export`` program, as a user would; the expected targets, shares
and score differences are computed here independently with plain torch and numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_CONVERGENCE,
    PAGE_LAYER,
    PAGE_NEURON,
    TIMEOUT,
    check_every_image,
    error_text,
    open_page,
    pixel_model_bytes,
    plotly_specs,
    upload_model,
    values,
    visible,
    widget,
)
from streamlit.testing.v1 import AppTest

from explainer.baselines import make_baseline
from explainer.images import Preprocessing, load_image, preprocess
from explainer.intake import load_model
from webapp.state import AttributionSettings


@pytest.fixture
def pixel_app(app: AppTest) -> AppTest:
    upload_model(app, pixel_model_bytes(), "pixels.pt2", arch="resnet18")
    assert not app.error, error_text(app)
    return app


def _scores_and_input(app: AppTest) -> tuple[np.ndarray, torch.Tensor, Preprocessing]:
    """The model's (2, 32, 32) scores for the active image, computed outside the app."""
    lm = load_model(pixel_model_bytes())
    prep = Preprocessing.for_model(lm.input_size, lm.mean, lm.std)
    active = app.session_state["active_image"]
    entry = next(e for e in app.session_state["images"] if e.digest == active)
    x = preprocess(load_image(entry.data), prep)
    with torch.no_grad():
        scores = lm.model(x)[0].double().numpy()
    return scores, x, prep


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: visible(m.value) for m in at.metric}


def _target(at: AppTest) -> str:
    """The Target metric in full: the class, then the output position under it."""
    metric = next(m for m in at.metric if m.label == "Target")
    return visible(f"{metric.value} {metric.delta}")


def test_the_model_page_shows_shares_of_the_output(pixel_app):
    app = pixel_app
    assert app.session_state["model_ref"].kind == "upload"
    metrics = _metrics(app)
    assert metrics["Classes"] == "2" and metrics["Input (C×H×W)"] == "3×32×32"
    assert any("scores every position of its 32 × 32 output" in c.value for c in app.caption)
    scores, _, _ = _scores_and_input(app)
    shares = np.bincount(scores.argmax(axis=0).ravel(), minlength=2) / scores[0].size
    top = int(np.argmax(shares))
    caption = app.sidebar.caption[-1].value
    assert caption == (
        f"Top class: **class {top}** (#{top}) · covers {shares[top]:.0%} of the output"
    )
    active = app.session_state["active_image"]
    bars = plotly_specs(app)[f"_top_{active[:16]}"]["data"][0]
    # Bars run bottom-up: the top class is last; the two shares add up to the whole output.
    assert bars["customdata"][-1] == f"class {top} (#{top})"
    np.testing.assert_allclose(sorted(values(bars["x"])), sorted(shares), atol=1e-9)
    assert "of the output" in bars["hovertemplate"]


def test_every_page_explains_the_model_at_the_top_score_position(pixel_app):
    app = pixel_app
    open_page(app, PAGE_LAYER)
    assert not app.error, error_text(app)

    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)
    scores, _, _ = _scores_and_input(app)
    top = int(np.argmax(np.bincount(scores.argmax(axis=0).ravel(), minlength=2)))
    row, col = np.unravel_index(int(np.argmax(scores[top])), scores[top].shape)
    metrics = _metrics(app)
    assert _target(app) == f"class {top} (#{top}) at row {row}, column {col}"
    assert float(metrics["Explained score"]) == pytest.approx(scores[top, row, col], rel=1e-3)
    delta = float(metrics["Convergence delta"])
    diff = float(metrics["F(image) − F(baseline)"])
    total = float(metrics["Sum of conductance"])
    assert total - diff == pytest.approx(delta, abs=2e-3)
    # The map shows the class's score everywhere and circles the explained position.
    figure = plotly_specs(app)["cond_scores"]
    heat = figure["data"][0]
    np.testing.assert_allclose(values(heat["z"]), scores[top], rtol=1e-4, atol=1e-5)
    marker = figure["data"][-1]
    assert (marker["x"], marker["y"]) == ([col], [row])
    assert "chosen automatically" in visible(" ".join(str(m.value) for m in app.markdown))

    open_page(app, PAGE_NEURON)
    assert not app.error, error_text(app)
    assert "Activation" in _metrics(app)

    open_page(app, PAGE_CONVERGENCE)
    assert not app.error, error_text(app)
    check_every_image(app)
    table = app.dataframe[0].value
    assert list(table["image"]) == [e.name for e in app.session_state["images"]]
    assert all(" at row " in target for target in table["target"])
    assert any("where it scores highest" in c.value for c in app.caption)


def test_the_chosen_class_and_position_are_explained(pixel_app):
    app = pixel_app
    open_page(app, PAGE_CONDUCTANCE)
    widget(app, "selectbox", "cond_target").set_value(1)
    widget(app, "number_input", "cond_pos0").set_value(5)
    widget(app, "number_input", "cond_pos1").set_value(7)
    app.button(key="FormSubmitter:cond_form-Compute").click()
    app.run()
    assert not app.exception and not app.error, error_text(app)
    settings = app.session_state["attr_settings"]
    assert (settings.target, settings.position) == (1, (5, 7))
    metrics = _metrics(app)
    assert _target(app) == "class 1 (#1) at row 5, column 7"
    # F(image) - F(baseline) is the score of class 1 at (5, 7), nothing else.
    lm = load_model(pixel_model_bytes())
    _, x, prep = _scores_and_input(app)
    baseline = make_baseline(settings.baseline, x, prep)
    with torch.no_grad():
        expected = float(lm.model(x)[0, 1, 5, 7] - lm.model(baseline)[0, 1, 5, 7])
    assert float(metrics["F(image) − F(baseline)"]) == pytest.approx(expected, rel=1e-3)
    assert "the position you chose" in visible(" ".join(str(m.value) for m in app.markdown))
    marker = plotly_specs(app)["cond_scores"]["data"][-1]
    assert (marker["x"], marker["y"]) == ([7], [5])


def test_a_half_chosen_position_fills_in_the_rest_where_the_class_scores_highest(pixel_app):
    app = pixel_app
    app.session_state["attr_settings"] = AttributionSettings(target=0, position=(None, 3))
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)
    scores, _, _ = _scores_and_input(app)
    row = int(np.argmax(scores[0, :, 3]))
    assert _target(app) == f"class 0 (#0) at row {row}, column 3"
    # The form shows what is fixed and leaves the automatic index empty.
    assert widget(app, "number_input", "cond_pos0").value is None
    assert widget(app, "number_input", "cond_pos1").value == 3


def test_a_position_outside_the_output_names_the_valid_range(pixel_app):
    app = pixel_app
    app.session_state["attr_settings"] = AttributionSettings(target=1, position=(40, 2))
    open_page(app, PAGE_CONDUCTANCE)
    message = error_text(app)
    assert "row 40" in message and "between 0 and 31" in message
    assert "Sum of conductance" not in _metrics(app)


CLICK_SCRIPT = """
import streamlit as st
from webapp import widgets as W
st.session_state["chart"] = {"selection": {"points": st.session_state["points"]}}
W.on_click_position("chart", st.session_state["shown"])()
"""


@pytest.mark.parametrize(
    ("shown", "points", "expected"),
    [
        ((1, 2), [{"customdata": [5, 7]}], (5, 7)),  # a cell of a (row, column) map
        ((3, 1, 2), [{"customdata": [5, 7]}], (3, 5, 7)),  # a plane of a 3-D output
        ((4,), [{"customdata": [9]}], (9,)),  # a point of a 1-D output
        ((1, 2), [], None),  # an empty selection changes nothing
    ],
)
def test_a_click_on_the_score_map_chooses_the_position(shown, points, expected):
    at = AppTest.from_string(CLICK_SCRIPT, default_timeout=TIMEOUT)
    at.session_state["points"] = points
    at.session_state["shown"] = shown
    at.session_state["attr_settings"] = AttributionSettings(target=1)
    at.run()
    assert not at.exception
    settings = at.session_state["attr_settings"]
    assert settings.target == 1
    assert settings.position == expected
