"""Neuron gradient page: the selected neuron, its gradients and its neighbours."""

from __future__ import annotations

import numpy as np
import pytest
from apphelpers import PAGE_CONDUCTANCE, PAGE_NEURON, open_page, plotly_specs, values, widget

from explainer import analysis


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
