"""Layer conductance page: settings, charts, selection, caching and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_NEURON,
    TIMEOUT,
    count_jobs,
    error_text,
    open_page,
    plotly_specs,
    values,
    visible,
    widget,
)
from streamlit.testing.v1 import AppTest

from webapp.state import AttributionSettings, GridView


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: visible(m.value) for m in at.metric}


def test_default_view_explains_the_predicted_class(app):
    open_page(app, PAGE_CONDUCTANCE)
    assert app.title[0].value == "Layer conductance"
    assert not app.error
    metrics = _metrics(app)
    predicted = app.sidebar.caption[-1].value  # "Predicted: **label** (#i) · p"
    label = predicted.split("**")[1]
    assert metrics["Target"].startswith(label)
    # Completeness: the sum of conductance is close to the score difference.
    diff = float(metrics["F(image) − F(baseline)"])
    total = float(metrics["Sum of conductance"])
    assert total == pytest.approx(diff, rel=0.05, abs=1e-3)
    specs = plotly_specs(app)
    assert {"cond_bars", "cond_grid", "cond_channel_map", "cond_overlay"} <= set(specs)
    # The first channel selected is the one with the largest |conductance| (first bar).
    bars = specs["cond_bars"]["data"][0]
    assert app.session_state["channel"] == bars["customdata"][0][0]
    heights = np.abs(values(bars["y"]))
    assert np.all(np.diff(heights) <= 1e-12)
    links = {link.proto.page: link.proto.label for link in app.main.get("page_link")}
    assert links["neuron_gradient"].startswith("Next")


def test_grid_is_one_figure_with_one_shared_signed_scale(app):
    open_page(app, PAGE_CONDUCTANCE)
    grid = plotly_specs(app)["cond_grid"]
    heat, click = grid["data"]
    assert heat["type"] == "heatmap" and click["type"] == "scatter"
    assert heat["zmid"] == 0 and heat["zmin"] == -heat["zmax"]
    page_size = app.session_state["grid_view"].page_size
    assert len(click["customdata"]) == page_size or len(click["customdata"]) < page_size


def test_target_change_through_the_form(app):
    open_page(app, PAGE_CONDUCTANCE)
    widget(app, "selectbox", "cond_target").set_value(3)
    app.button(key="FormSubmitter:cond_form-Compute").click()
    app.run()
    assert not app.exception
    assert app.session_state["attr_settings"].target == 3
    assert _metrics(app)["Target"].endswith("(#3)")
    assert not app.error


def test_target_out_of_range_shows_error_and_keeps_the_choice(app):
    app.session_state["attr_settings"] = AttributionSettings(target=999)
    open_page(app, PAGE_CONDUCTANCE)
    message = error_text(app)
    assert "999" in message and "out of range" in message
    assert app.session_state["attr_settings"].target == 999
    assert "Sum of conductance" not in _metrics(app)


def test_settings_errors_are_shown_not_raised(app):
    app.session_state["attr_settings"] = AttributionSettings(method="simpson")
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.exception
    assert "simpson" in error_text(app)
    assert app.session_state["attr_settings"].method == "simpson"


def test_injected_neuron_is_shown_and_previewed(app):
    app.session_state["layer"] = "block3"
    app.session_state["neuron"] = (5, 3, 4)
    app.session_state["channel"] = 5
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error
    info = " ".join(str(i.value) for i in app.info)
    assert "neuron **(5, 3, 4)**" in info
    specs = plotly_specs(app)
    assert "cond_preview" in specs
    # The selected cell is the channel map's selected point (the browser rings it).
    clicks = specs["cond_channel_map"]["data"][1]
    width = np.asarray(values(specs["cond_channel_map"]["data"][0]["z"])).shape[1]
    assert clicks["selectedpoints"] == [3 * width + 4]
    assert clicks["customdata"][3 * width + 4] == [5, 3, 4]
    assert clicks["selected"]["marker"]["opacity"] == 1.0
    assert clicks["unselected"]["marker"]["opacity"] == 0.0
    assert clicks["marker"]["opacity"] == 0.0  # no ring anywhere else


def _map(app: AppTest) -> tuple[str, dict]:
    spec = plotly_specs(app)["cond_channel_map"]
    return json.dumps(spec, sort_keys=True), spec


def _click_map(app: AppTest, chart: str, neuron: tuple[int, ...]) -> None:
    """What ``W.on_click_neuron(chart)`` does for a click on ``neuron``; then the rerun."""
    app.session_state["neuron"] = neuron
    app.session_state["channel"] = neuron[0]
    app.session_state["neuron_click"] = (chart, neuron)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert f"neuron **{neuron}**" in " ".join(str(i.value) for i in app.info)


@pytest.fixture
def fragment_reruns(monkeypatch):
    """Runs count as reruns of the page's fragments, as after a click in the browser (an
    AppTest run is always a run of the whole page)."""
    from webapp import widgets

    monkeypatch.setattr(widgets, "fragment_rerun", lambda: True)
    return monkeypatch


def test_a_click_on_the_channel_map_keeps_the_figure_the_browser_shows(app, fragment_reruns):
    open_page(app, PAGE_CONDUCTANCE)
    channel = int(app.session_state["channel"])
    first, spec = _map(app)
    width = np.asarray(values(spec["data"][0]["z"])).shape[1]
    # The browser rings the clicked cell itself: the page sends the same figure, so that
    # Streamlit does not draw the chart again.
    _click_map(app, "cond_channel_map", (channel, 1, 2))
    assert _map(app)[0] == first
    _click_map(app, "cond_channel_map", (channel, 2, 0))
    assert _map(app)[0] == first
    # Selected by a click elsewhere (the summed map): the map is sent the new cell.
    _click_map(app, "cond_overlay", (channel, 3, 1))
    moved, spec = _map(app)
    assert moved != first
    assert spec["data"][1]["selectedpoints"] == [3 * width + 1]
    # Then a click on the map, and the summed map's cell again: the browser shows the map's
    # own click, so the same cell is sent once more, in a figure that differs from the last.
    _click_map(app, "cond_channel_map", (channel, 0, 0))
    assert _map(app)[0] == moved
    _click_map(app, "cond_overlay", (channel, 3, 1))
    again, spec = _map(app)
    assert again != moved
    assert spec["data"][1]["selectedpoints"] == [3 * width + 1]
    # A rerun that changes nothing sends the same figure.
    app.run()
    assert _map(app)[0] == again


def test_a_run_of_the_whole_page_sends_the_cell_the_browser_rings(app, fragment_reruns):
    """After the page was left and opened again, the map is drawn anew from its figure: a run
    of the whole page sends the selected cell when the figure has another one."""
    open_page(app, PAGE_CONDUCTANCE)
    channel = int(app.session_state["channel"])
    _click_map(app, "cond_overlay", (channel, 3, 1))
    _click_map(app, "cond_channel_map", (channel, 1, 2))
    kept, spec = _map(app)
    width = np.asarray(values(spec["data"][0]["z"])).shape[1]
    assert spec["data"][1]["selectedpoints"] == [3 * width + 1]  # the browser rings (1, 2)
    fragment_reruns.undo()
    app.run()
    sent, spec = _map(app)
    assert sent != kept
    assert spec["data"][1]["selectedpoints"] == [1 * width + 2]
    # Once the figure has the browser's cell, further runs of the page keep it.
    app.run()
    assert _map(app)[0] == sent


def test_a_second_click_on_the_ringed_cell_gets_the_ring_back(app, fragment_reruns):
    """A click on the selected point clears the browser's selection (plotly toggles it): the
    callback sees no point, and the map is sent its ring again."""
    open_page(app, PAGE_CONDUCTANCE)
    channel = int(app.session_state["channel"])
    _click_map(app, "cond_channel_map", (channel, 1, 2))
    before, spec = _map(app)
    width = np.asarray(values(spec["data"][0]["z"])).shape[1]
    # What the callback does with an empty selection on this chart.
    app.session_state["neuron_click"] = None
    app.session_state["browser_marks"]["cond_channel_map"]["shown"] = None
    app.run()
    after, spec = _map(app)
    assert after != before
    assert spec["data"][1]["selectedpoints"] == [1 * width + 2]
    assert "neuron **" + str((channel, 1, 2)) + "**" in " ".join(str(i.value) for i in app.info)


def test_selection_and_revisits_never_recompute_conductance(app, monkeypatch):
    calls = count_jobs(monkeypatch, "conductance")
    # Settings no other test uses, so the shared cache cannot already hold the result.
    app.session_state["attr_settings"] = AttributionSettings(n_steps=23, baseline="zeros")
    open_page(app, PAGE_CONDUCTANCE)
    assert len(calls) == 1
    # What a click on a map does: change the selection, then rerun.
    app.session_state["neuron"] = (2, 1, 1)
    app.session_state["channel"] = 2
    app.run()
    app.session_state["grid_view"] = GridView(rank="neg", page_size=16)
    app.run()
    open_page(app, PAGE_NEURON)
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error
    assert len(calls) == 1


def test_channel_filter_and_ranking_drive_bars_and_tiles(app):
    app.session_state["grid_view"] = GridView(rank="index", filter="4-9", top_k=3, page_size=16)
    open_page(app, PAGE_CONDUCTANCE)
    specs = plotly_specs(app)
    tiles = [c[0] for c in specs["cond_grid"]["data"][1]["customdata"]]
    assert tiles == [4, 5, 6, 7, 8, 9]
    bars = [c[0] for c in specs["cond_bars"]["data"][0]["customdata"]]
    assert bars == [4, 5, 6]


def test_bad_channel_filter_warns_and_shows_all_channels(app):
    app.session_state["grid_view"] = GridView(filter="abc", page_size=16)
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.exception
    assert any("abc" in str(w.value) for w in app.warning)
    tiles = plotly_specs(app)["cond_grid"]["data"][1]["customdata"]
    assert len(tiles) == 16


def test_linear_layer_gets_a_clickable_strip(app):
    app.session_state["layer"] = "classifier"
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error
    specs = plotly_specs(app)
    assert "cond_strip" in specs and "cond_grid" not in specs
    strip = specs["cond_strip"]["data"][0]
    assert strip["type"] == "bar"
    assert [c[0] for c in strip["customdata"]] == sorted(c[0] for c in strip["customdata"])


CLICK_SCRIPT = """
import streamlit as st
from webapp import widgets as W
st.session_state.setdefault("channel", 7)
st.session_state["chart"] = {"selection": {"points": st.session_state["points"]}}
if st.session_state.get("mode") == "channel":
    W.on_click_channel("chart")()
else:
    W.on_click_neuron("chart")()
"""


@pytest.mark.parametrize(
    ("points", "expected_neuron"),
    [
        ([{"customdata": [3, 2, 5]}], (3, 2, 5)),
        ([{"customdata": {"0": 3, "1": 2, "2": 5}}], (3, 2, 5)),  # typed-array form
        ([{"customdata": [-1, 4, 0]}], (7, 4, 0)),  # a cell without channel: keep channel 7
        ([{"customdata": [12]}], (12,)),  # a unit of a linear layer
        ([], None),  # an empty selection (the figure was redrawn) changes nothing
    ],
)
def test_click_callbacks_copy_the_clicked_point(points, expected_neuron):
    at = AppTest.from_string(CLICK_SCRIPT, default_timeout=TIMEOUT)
    at.session_state["points"] = points
    at.session_state["browser_marks"] = {"chart": {"shown": (1, 1)}}
    at.run()
    assert not at.exception
    if expected_neuron is None:
        assert at.session_state["channel"] == 7
        assert "neuron" not in at.session_state
        # The browser cleared its own ring: the chart is to be sent its selection again.
        assert at.session_state["neuron_click"] is None
        assert at.session_state["browser_marks"]["chart"]["shown"] is None
    else:
        assert at.session_state["neuron"] == expected_neuron
        assert at.session_state["channel"] == expected_neuron[0]
        # The browser rings what was clicked on this chart.
        assert at.session_state["neuron_click"] == ("chart", expected_neuron)
        assert at.session_state["browser_marks"]["chart"]["shown"] == (1, 1)


def test_channel_click_moves_the_neuron_to_that_channel():
    at = AppTest.from_string(CLICK_SCRIPT, default_timeout=TIMEOUT)
    at.session_state["points"] = [{"customdata": [3, 2, 5]}]
    at.run()
    at.session_state["points"] = [{"customdata": [9]}]
    at.session_state["mode"] = "channel"
    at.run()
    assert not at.exception
    assert at.session_state["channel"] == 9
    assert at.session_state["neuron"] == (9, 2, 5)


def test_zero_conductance_is_said_plainly(app):
    """A black image against the black baseline: nothing moves along the path."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 0)).save(buffer, format="PNG")
    widget(app, "file_uploader", "_w_image_files").set_value(
        [("black.png", buffer.getvalue(), "image/png")]
    )
    app.run()
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.exception and not app.error
    assert any("the same for the image and the baseline" in info.value for info in app.info)
    assert float(_metrics(app)["Sum of conductance"]) == 0.0


def test_the_delta_is_judged_against_the_users_tolerance(app):
    open_page(app, PAGE_CONDUCTANCE)
    delta = next(m for m in app.metric if m.label == "Convergence delta")
    assert "≤ 5% tolerance" in visible(delta.proto.delta)  # 50 Gauss-Legendre steps suffice
    assert not [w for w in app.warning if "not reliable" in w.value]
    app.session_state["tolerance"] = 1e-6
    app.run()
    delta = next(m for m in app.metric if m.label == "Convergence delta")
    assert "> 0.0001% tolerance" in visible(delta.proto.delta)
    assert delta.proto.color == "red" or "red" in str(delta.proto).lower()
    assert [w for w in app.warning if "not reliable" in w.value]


def test_every_baseline_is_previewed_for_the_active_image(app):
    from explainer.baselines import BASELINE_KINDS, make_baseline
    from explainer.images import deprocess
    from webapp import backend

    open_page(app, PAGE_CONDUCTANCE)
    captions = [c.value for c in app.caption]
    assert any("What each baseline looks like" in c for c in captions)
    settings = AttributionSettings(blur_sigma=3.0, noise_seed=7, constant=0.25)
    lm = backend.resolve_model(app.session_state["model_ref"])
    prep = backend.preprocessing(app.session_state["prep"], lm)
    image = next(
        e for e in app.session_state["images"] if e.digest == app.session_state["active_image"]
    )
    previews = backend.baseline_previews(image, prep, settings)
    assert list(previews) == list(BASELINE_KINDS)
    x = backend.input_tensor(image, prep)
    for kind, picture in previews.items():
        expected = deprocess(make_baseline(kind, x, prep, value=0.25, seed=7, blur_sigma=3.0), prep)
        np.testing.assert_array_equal(picture, expected)
    assert np.all(previews["black"] == 0)
    assert not np.array_equal(previews["blur"], previews["noise"])


def test_no_full_collection_of_the_libraries_holds_up_a_click():
    """A full garbage collection over every object of torch, plotly and streamlit takes about
    0.2 s and stops the server's threads: Streamlit ran one after every rerun, so each click's
    last messages waited for it. The libraries' objects are frozen when the app's widgets are
    imported, and the collection after every run is switched off."""
    import gc
    import re
    from pathlib import Path

    import webapp.widgets  # noqa: F401 - importing it freezes what is loaded by then

    assert gc.get_freeze_count() > 100_000
    config = (Path(__file__).resolve().parents[2] / ".streamlit" / "config.toml").read_text()
    runner = re.search(r"^\[runner\]\n(.*?)(?=^\[|\Z)", config, re.M | re.S)
    assert runner is not None, "no [runner] section in .streamlit/config.toml"
    assert re.search(r"^postScriptGC\s*=\s*false\s*$", runner.group(1), re.M)
