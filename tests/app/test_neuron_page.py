"""Neuron gradient page: the selected neuron, its gradients and its neighbours."""

from __future__ import annotations

import json

import numpy as np
import pytest
from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_NEURON,
    open_page,
    plotly_specs,
    resnet18_state_dict_bytes,
    upload_model,
    values,
    widget,
)

from explainer import analysis
from webapp import figures as F


def _neuron_line(at) -> str:
    return " ".join(str(m.value) for m in at.markdown if "Neuron **" in str(m.value))


def test_injected_neuron_is_shown_with_its_gradients(app):
    app.session_state["layer"] = "block3"
    app.session_state["neuron"] = (5, 3, 4)
    open_page(app, PAGE_NEURON)
    assert app.title[0].value == "Neuron gradient"
    assert not app.error
    assert "Neuron **(5, 3, 4)**" in _neuron_line(app)
    metrics = {m.label: m.value for m in app.metric}
    assert set(metrics) >= {"Activation", "Max |gradient|"}
    specs = plotly_specs(app)
    assert {"ng_activation", "ng_signed", "ng_abs", "ng_neighbours"} <= set(specs)
    signed = specs["ng_signed"]["data"][1]
    assert signed["zmid"] == 0  # signed maps are centred at zero
    # The activation map outlines the neuron's cell (x=4, y=3).
    shape = specs["ng_activation"]["layout"]["shapes"][0]
    assert shape["x0"] == pytest.approx(3.5) and shape["y0"] == pytest.approx(2.5)
    # Neighbours: 8 spatial + 2 channels, plus the neuron itself, in one figure.
    tiles = specs["ng_neighbours"]["data"][1]["customdata"]
    assert [5, 3, 4] in tiles and len(tiles) == 11


def test_gradient_matches_the_service(app):
    app.session_state["layer"] = "block2"
    app.session_state["neuron"] = (1, 2, 2)
    open_page(app, PAGE_NEURON)
    activation = float({m.label: m.value for m in app.metric}["Activation"])
    from webapp import backend

    lm = backend.resolve_model(app.session_state["model_ref"])
    active = app.session_state["active_image"]
    image = next(e for e in app.session_state["images"] if e.digest == active)
    prep = backend.preprocessing(app.session_state["prep"], lm)
    from explainer.intake import load_demo_model

    expected = analysis.compute_neuron_gradient(  # the same neuron, computed in this process
        load_demo_model().model, "block2", backend.input_tensor(image, prep), (1, 2, 2)
    )
    assert activation == pytest.approx(expected.activation, rel=1e-3, abs=1e-3)
    drawn = values(plotly_specs(app)["ng_signed"]["data"][1]["z"])
    np.testing.assert_allclose(drawn, expected.gradient.sum(axis=0), rtol=1e-4, atol=1e-6)


def test_without_selection_the_strongest_neuron_is_shown(app):
    open_page(app, PAGE_NEURON)
    assert not app.error
    neuron = app.session_state["neuron"]
    assert neuron is not None and len(neuron) == 3
    assert app.session_state["channel"] == neuron[0]


def test_number_inputs_and_neighbour_buttons_move_the_neuron(app):
    app.session_state["layer"] = "block3"
    app.session_state["neuron"] = (5, 3, 4)
    open_page(app, PAGE_NEURON)
    widget(app, "number_input", "_w_n1").set_value(6)
    app.run()
    assert app.session_state["neuron"] == (5, 6, 4)
    next(b for b in app.button if b.label == "→ right").click()
    app.run()
    assert app.session_state["neuron"] == (5, 6, 5)
    next(b for b in app.button if b.label == "channel +1").click()
    app.run()
    assert app.session_state["neuron"] == (6, 6, 5)
    assert app.session_state["channel"] == 6
    assert "Neuron **(6, 6, 5)**" in _neuron_line(app)
    # The choice is shared: the conductance page shows the same neuron.
    open_page(app, PAGE_CONDUCTANCE)
    assert "neuron **(6, 6, 5)**" in " ".join(str(i.value) for i in app.info)


def test_edge_neurons_cannot_step_outside_the_layer(app):
    app.session_state["layer"] = "block3"
    app.session_state["neuron"] = (0, 0, 0)
    open_page(app, PAGE_NEURON)
    disabled = {b.label: b.disabled for b in app.button if b.key and b.key.startswith("_w_move_")}
    assert disabled["↑ up"] and disabled["← left"] and disabled["channel −1"]
    assert not disabled["↓ down"] and not disabled["→ right"] and not disabled["channel +1"]


def test_neuron_outside_the_layer_falls_back_with_a_warning(app):
    app.session_state["layer"] = "block3"
    app.session_state["neuron"] = (999, 0, 0)
    open_page(app, PAGE_NEURON)
    assert not app.exception
    assert any("(999, 0, 0)" in str(w.value) for w in app.warning)
    assert app.session_state["neuron"][0] < 999


def test_linear_layer_uses_a_strip_of_units(app):
    app.session_state["layer"] = "classifier"
    app.session_state["neuron"] = (2,)
    open_page(app, PAGE_NEURON)
    assert not app.error
    specs = plotly_specs(app)
    assert "ng_strip" in specs and "ng_activation" not in specs
    assert "Neuron **(2,)**" in _neuron_line(app)
    tiles = specs["ng_neighbours"]["data"][1]["customdata"]
    assert sorted(t[0] for t in tiles) == [1, 2, 3]


def test_per_colour_channel_view_on_request(app):
    app.session_state["layer"] = "block3"
    app.session_state["neuron"] = (1, 1, 1)
    open_page(app, PAGE_NEURON)
    assert "ng_channels" not in plotly_specs(app)
    widget(app, "toggle", "_w_per_channel").set_value(True)
    app.run()
    figure = plotly_specs(app)["ng_channels"]
    assert len(figure["data"]) == 3
    assert {trace["zmin"] for trace in figure["data"]} == {-figure["data"][0]["zmax"]}


# --- colour range, equal panels and zoom ------------------------------------------------------
def _heat(spec: dict) -> dict:
    return next(t for t in spec["data"] if t["type"] == "heatmap")


def _captions(at) -> str:
    return " ".join(str(c.value) for c in at.caption)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), half-open, of the True pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def test_colours_saturate_at_the_percentile_and_the_choice_is_kept(app):
    app.session_state["layer"] = "block3"
    app.session_state["neuron"] = (5, 3, 4)
    open_page(app, PAGE_NEURON)
    specs = plotly_specs(app)
    signed, magnitude = _heat(specs["ng_signed"]), _heat(specs["ng_abs"])
    z_signed, z_abs = values(signed["z"]), values(magnitude["z"])
    robust = np.percentile(np.abs(z_signed[z_signed != 0]), 99.5)
    assert signed["zmax"] == pytest.approx(robust, rel=1e-5)
    assert signed["zmin"] == pytest.approx(-robust, rel=1e-5)
    assert magnitude["zmax"] == pytest.approx(np.percentile(z_abs[z_abs != 0], 99.5), rel=1e-5)
    assert magnitude["zmax"] < z_abs.max()
    bar = magnitude["colorbar"]
    assert bar["ticktext"][-1] == "≥ " + F.value_text(magnitude["zmax"])
    assert bar["tickvals"][-1] == pytest.approx(magnitude["zmax"])
    assert f"largest value is {F.value_text(z_abs.max())}" in _captions(app)
    assert "99.5th percentile" in _captions(app)

    widget(app, "radio", "_w_grad_range").set_value("full")
    app.run()
    assert app.session_state["gradient_range"] == "full"
    specs = plotly_specs(app)
    assert _heat(specs["ng_abs"])["zmax"] == pytest.approx(z_abs.max(), rel=1e-5)
    assert _heat(specs["ng_signed"])["zmax"] == pytest.approx(np.abs(z_signed).max(), rel=1e-5)
    assert not any("≥" in t for t in _heat(specs["ng_abs"])["colorbar"]["ticktext"])
    # The choice is remembered on the way back from another page.
    open_page(app, PAGE_CONDUCTANCE)
    open_page(app, PAGE_NEURON)
    assert widget(app, "radio", "_w_grad_range").value == "full"
    assert _heat(plotly_specs(app)["ng_abs"])["zmax"] == pytest.approx(z_abs.max(), rel=1e-5)


def test_the_three_panels_share_height_and_colour_bar_layout(app):
    app.session_state["layer"] = "block3"
    app.session_state["neuron"] = (5, 3, 4)
    open_page(app, PAGE_NEURON)
    specs = plotly_specs(app)
    panels = [specs[k] for k in ("ng_activation", "ng_signed", "ng_abs")]
    assert len({p["layout"]["height"] for p in panels}) == 1
    assert len({json.dumps(p["layout"]["margin"], sort_keys=True) for p in panels}) == 1
    bars = [_heat(p)["colorbar"] for p in panels]
    layout = [(b["orientation"], b["len"], b["thickness"], b["y"], b["yanchor"]) for b in bars]
    assert len(set(layout)) == 1 and layout[0][0] == "h"  # under the plot, not beside it
    for p in panels:  # square pixels
        assert p["layout"]["yaxis"]["scaleanchor"] == "x"


def test_zoom_crops_both_maps_to_the_receptive_field(app):
    app.session_state["layer"] = "block2"
    app.session_state["neuron"] = (1, 4, 4)
    open_page(app, PAGE_NEURON)
    whole = plotly_specs(app)["ng_abs"]["layout"]["xaxis"]["range"]
    widget(app, "toggle", "_w_grad_zoom").set_value(True)
    app.run()
    assert app.session_state["gradient_zoom"] is True
    specs = plotly_specs(app)
    z_abs = values(_heat(specs["ng_abs"])["z"])
    robust = np.percentile(z_abs[z_abs != 0], 99.5)
    top, bottom, left, right = _bbox(z_abs >= 0.01 * robust)
    for key in ("ng_signed", "ng_abs"):
        x0, x1 = specs[key]["layout"]["xaxis"]["range"]
        y1, y0 = specs[key]["layout"]["yaxis"]["range"]
        assert x0 + 0.5 <= left and x1 + 0.5 >= right and y0 + 0.5 <= top and y1 + 0.5 >= bottom
        assert x1 - x0 == y1 - y0 >= 16  # square, at least 16 px
        assert (x0, x1) != tuple(whole)
    assert specs["ng_signed"]["layout"]["xaxis"] == specs["ng_abs"]["layout"]["xaxis"]
    h, w = z_abs.shape
    assert f"Receptive field about {right - left}×{bottom - top} px of {w}×{h}" in _captions(app)


def test_resnet18_on_224_pixel_images(app):
    """A torchvision resnet18 (random weights): an early neuron sees about 19 px of 224."""
    upload_model(app, resnet18_state_dict_bytes(), "resnet18_weights.pt", "resnet18")
    app.session_state["layer"] = "layer1.0.conv1"
    app.session_state["neuron"] = (3, 28, 28)
    app.session_state["gradient_zoom"] = True
    open_page(app, PAGE_NEURON)
    assert not app.error, [e.value for e in app.error]
    specs = plotly_specs(app)
    signed, magnitude = _heat(specs["ng_signed"]), _heat(specs["ng_abs"])
    z_signed, z_abs = values(signed["z"]), values(magnitude["z"])
    assert z_abs.shape == (224, 224)
    robust = np.percentile(z_abs[z_abs != 0], 99.5)
    assert magnitude["zmax"] == pytest.approx(robust, rel=1e-5)
    assert signed["zmax"] == pytest.approx(
        np.percentile(np.abs(z_signed[z_signed != 0]), 99.5), rel=1e-5
    )
    # conv 7x7 stride 2, max-pool 3x3 stride 2, conv 3x3: a field of at most 19 x 19 pixels.
    top, bottom, left, right = _bbox(z_abs >= 0.01 * robust)
    assert 0 < bottom - top <= 19 and 0 < right - left <= 19
    x0, x1 = specs["ng_abs"]["layout"]["xaxis"]["range"]
    y1, y0 = specs["ng_abs"]["layout"]["yaxis"]["range"]
    assert x0 + 0.5 <= left and x1 + 0.5 >= right and y0 + 0.5 <= top and y1 + 0.5 >= bottom
    assert 16 <= x1 - x0 == y1 - y0 <= 32
    assert "of 224×224" in _captions(app)
