"""Compare page: panes side by side, their colour scales, the shared selection, error paths."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from apphelpers import (
    PAGE_COMPARE,
    PAGE_OVERVIEW,
    error_text,
    open_page,
    plotly_specs,
    values,
    visible,
    widget,
)
from downloadhelpers import (
    capture,
    csv_array,
    download_helps,
    download_keys,
    npz_arrays,
    open_menu,
    row_files,
)
from test_literal_text import assert_literal, hostile_app  # noqa: F401 - a fixture

from explainer.errors import ExplainerError
from webapp import backend, export
from webapp import state as S
from webapp.compare import CompareSpec


def _panes(app) -> dict[str, dict]:
    return {k: v for k, v in plotly_specs(app).items() if k.startswith("cmp_map")}


def _zmax(spec: dict) -> float:
    return float(spec["data"][0]["zmax"])


def _text(app) -> str:
    parts = [m.value for m in app.markdown] + [c.value for c in app.caption]
    parts += [i.value for i in app.info] + [w.value for w in app.warning]
    return visible("\n".join(str(p) for p in parts))


def test_two_images_side_by_side_on_one_scale_when_the_target_is_fixed(app):
    app.session_state[S.SETTINGS] = S.AttributionSettings(target=2)
    open_page(app, PAGE_COMPARE)
    assert app.title[0].value == "Compare"
    assert not app.error
    spec = app.session_state[S.COMPARE]
    images = app.session_state[S.IMAGES]
    assert spec.mode == "images" and spec.panes == (images[0].digest, images[1].digest)
    panes = _panes(app)
    assert list(panes) == ["cmp_map0", "cmp_map1"]
    # Both explain class 2: one symmetric range, the larger of the two maps' peaks.
    assert _zmax(panes["cmp_map0"]) == _zmax(panes["cmp_map1"])
    lm = backend.resolve_model(app.session_state[S.MODEL])
    prep = backend.preprocessing(app.session_state[S.PREP], lm)
    layer = app.session_state[S.LAYER]
    settings = app.session_state[S.SETTINGS]
    results = [backend.conductance(lm, e, prep, layer, settings) for e in images[:2]]
    channels = [int(np.argmax(np.abs(r.channel_totals))) for r in results]
    peak = max(np.abs(r.attributions[c]).max() for r, c in zip(results, channels, strict=True))
    assert _zmax(panes["cmp_map0"]) == pytest.approx(float(peak), rel=1e-5)
    assert "share one colour scale" in _text(app)


def test_panes_of_different_targets_get_their_own_scales_and_say_so(app):
    app.session_state[S.COMPARE] = CompareSpec("targets", (0, 4, 7))
    open_page(app, PAGE_COMPARE)
    assert not app.error
    panes = _panes(app)
    assert len(panes) == 3
    assert len({_zmax(p) for p in panes.values()}) == 3
    assert "explain different scores" in _text(app)
    # The toggle off: every pane has its own scale even where the units agree.
    app.session_state[S.COMPARE] = CompareSpec("baselines", ("black", "zeros"), shared=False)
    app.session_state[S.SETTINGS] = S.AttributionSettings(target=1)
    app.run()
    panes = _panes(app)
    assert _zmax(panes["cmp_map0"]) != _zmax(panes["cmp_map1"])
    widget(app, "toggle", "_w_cmp_shared").set_value(True).run()
    panes = _panes(app)
    assert _zmax(panes["cmp_map0"]) == _zmax(panes["cmp_map1"])
    assert app.session_state[S.COMPARE].shared is True


def test_a_selected_neuron_shows_in_every_pane_that_has_it(app):
    app.session_state[S.LAYER] = "block2"
    app.session_state[S.COMPARE] = CompareSpec("layers", ("block2", "block1", "block2.conv"))
    app.session_state[S.COMPARE_SELECTION] = ("block2", (5, 3, 6))
    open_page(app, PAGE_COMPARE)
    assert not app.error
    panes = _panes(app)
    box = panes["cmp_map0"]["layout"]["shapes"][0]
    assert (box["x0"] + box["x1"]) / 2 == 6 and (box["y0"] + box["y1"]) / 2 == 3
    assert panes["cmp_map0"]["layout"]["title"]["text"] == "channel 5"
    for key in ("cmp_map1", "cmp_map2"):
        assert not panes[key]["layout"].get("shapes")
    text = _text(app)
    assert "Neuron **(5, 3, 6)**: conductance" in text
    assert text.count("belongs to layer block2; this pane shows layer") == 2
    # The same neuron in a baselines comparison exists in both panes.
    app.session_state[S.COMPARE] = CompareSpec("baselines", ("black", "blur"))
    app.run()
    panes = _panes(app)
    for key in ("cmp_map0", "cmp_map1"):
        box = panes[key]["layout"]["shapes"][0]
        assert (box["x0"] + box["x1"]) / 2 == 6
        # Clicking a cell of either pane selects in the same channel.
        assert {tuple(c)[0] for c in panes[key]["data"][1]["customdata"]} == {5}
    assert _text(app).count("Neuron **(5, 3, 6)**") == 2


def test_model_against_its_randomised_copy_leaves_the_model_alone(app):
    app.session_state[S.SETTINGS] = S.AttributionSettings(target=0, n_steps=9)
    lm = backend.resolve_model(app.session_state[S.MODEL])
    prep = backend.preprocessing(app.session_state[S.PREP], lm)
    image = app.session_state[S.IMAGES][0]
    settings = app.session_state[S.SETTINGS]
    before = backend.conductance(lm, image, prep, "block1", settings)
    app.session_state[S.LAYER] = "block1"
    app.session_state[S.COMPARE] = CompareSpec("random", ("model", "random"))
    open_page(app, PAGE_COMPARE)
    assert not app.error
    random = backend.random_conductance(lm, image, prep, "block1", settings)
    assert not np.allclose(random.attributions, before.attributions)
    assert random.target == before.target
    # The served model is unchanged: the same conductance computed afresh after the copy.
    again = backend.run(
        lm,
        "conductance",
        {
            "layer": "block1",
            "x": backend.input_tensor(image, prep).numpy(),
            "target": 0,
            "baseline": backend.baseline_tensor(
                backend.input_tensor(image, prep), prep, settings
            ).numpy(),
            "method": settings.method,
            "n_steps": 9,
        },
    )
    np.testing.assert_allclose(again.attributions, before.attributions, rtol=1e-5, atol=1e-7)
    panes = _panes(app)
    assert len(panes) == 2 and _zmax(panes["cmp_map0"]) == _zmax(panes["cmp_map1"])
    assert "Randomised copy" in _text(app)


def test_one_image_only_cannot_be_compared_with_itself(app):
    app.session_state[S.IMAGES] = app.session_state[S.IMAGES][:1]
    open_page(app, PAGE_COMPARE)
    assert "needs at least two images" in _text(app)
    assert not _panes(app)
    # Other comparisons of the one image still work.
    widget(app, "radio", "_w_cmp_mode").set_value("baselines").run()
    assert not app.exception and len(_panes(app)) == 2


def test_a_pane_value_the_model_lacks_is_replaced_and_said(app):
    app.session_state[S.COMPARE] = CompareSpec("layers", ("block3", "layer4.1.conv2"))
    open_page(app, PAGE_COMPARE)
    assert not app.error
    assert "no layer 'layer4.1.conv2'" in _text(app)
    assert app.session_state[S.COMPARE].panes[0] == "block3"
    assert "layer4.1.conv2" not in app.session_state[S.COMPARE].panes
    assert len(_panes(app)) == 2


def test_duplicate_panes_are_pointed_out(app):
    app.session_state[S.COMPARE] = CompareSpec("baselines", ("blur", "blur"))
    open_page(app, PAGE_COMPARE)
    assert "Panes 1 and 2 show the same thing" in _text(app)


def test_a_failing_pane_is_a_message_and_the_others_stay(app, monkeypatch):
    real = backend.conductance

    def failing(lm, image, prep, layer, settings, progress=None):
        if settings.baseline == "noise":
            raise ExplainerError("The worker ran out of memory.")
        return real(lm, image, prep, layer, settings, progress)

    monkeypatch.setattr(backend, "conductance", failing)
    app.session_state[S.COMPARE] = CompareSpec("baselines", ("black", "noise"))
    open_page(app, PAGE_COMPARE)
    assert "The worker ran out of memory." in error_text(app)
    assert list(_panes(app)) == ["cmp_map0"]
    assert app.session_state[S.COMPARE].panes == ("black", "noise")


def test_no_model_says_where_to_load_one(app, monkeypatch):
    def broken(*args, **kwargs):
        raise ExplainerError("The model file is damaged.")

    monkeypatch.setattr(backend, "resolve_model", broken)
    open_page(app, PAGE_COMPARE)
    assert "No model is ready" in _text(app)
    assert not _panes(app)


def test_hostile_class_names_stay_literal_on_both_pages(hostile_app):  # noqa: F811
    app, labels = hostile_app
    app.session_state[S.COMPARE] = CompareSpec("targets", (0, 1, 2))
    open_page(app, PAGE_COMPARE)
    assert not app.error, error_text(app)
    assert len(_panes(app)) == 3
    assert_literal(app, labels, shown=3)
    open_page(app, PAGE_OVERVIEW)
    assert not app.error, error_text(app)
    assert_literal(app, labels)


def test_each_panes_map_downloads_as_drawn(app, monkeypatch):
    offered = capture(monkeypatch)
    app.session_state[S.SETTINGS] = S.AttributionSettings(target=2)
    open_page(app, PAGE_COMPARE)
    open_menu(app, "cmp")
    assert not app.error, error_text(app)
    panes = _panes(app)
    assert len(panes) == 2
    files = row_files(offered, "compare_")
    (npz,) = [name for name in files if name.endswith(".npz")]
    stem = npz[: -len(".npz")]
    for i in (1, 2):
        assert {f"{stem}_pane{i}_map.png", f"{stem}_pane{i}_map.svg"} <= set(files)
        assert f"cmp_dl_pane{i}_map_csv" in download_keys(app)
        # The CSV holds the map the pane draws, cell for cell.
        drawn = np.asarray(values(panes[f"cmp_map{i - 1}"]["data"][0]["z"]), dtype=np.float64)
        np.testing.assert_allclose(csv_array(files, f"{stem}_pane{i}_map.csv"), drawn, rtol=1e-6)
    arrays = npz_arrays(files, npz)
    assert {"pane1_map", "pane2_map", "pane1_channel_totals", "pane2_channel_totals"} <= set(arrays)
    # Both panes explain class 2: one shared scale, and different images give different maps.
    assert not np.allclose(arrays["pane1_map"], arrays["pane2_map"])
    assert f"Save {stem}_pane1_map.png" in download_helps(app)


# --- colour bars: every pane readable on its own ------------------------------------------------
def _bar(spec: dict) -> dict:
    heat = spec["data"][0]
    assert heat["type"] == "heatmap"
    assert heat.get("showscale", True) is not False  # plotly's default draws the bar
    return heat["colorbar"]


def test_every_pane_draws_the_colour_bar_of_its_scale(app):
    app.session_state[S.SETTINGS] = S.AttributionSettings(target=2)
    app.session_state[S.COMPARE] = CompareSpec("baselines", ("black", "zeros", "blur"))
    open_page(app, PAGE_COMPARE)
    assert not app.error, error_text(app)
    panes = _panes(app)
    assert len(panes) == 3
    bars = [_bar(panes[f"cmp_map{i}"]) for i in range(3)]
    limit = _zmax(panes["cmp_map0"])
    for spec, bar in zip(panes.values(), bars, strict=True):
        # One scale, labelled the same in every pane: the same range, the same ticks.
        assert _zmax(spec) == limit and float(spec["data"][0]["zmin"]) == -limit
        assert bar["tickvals"] == pytest.approx([-limit, 0.0, limit])
        assert bar["ticktext"] == bars[0]["ticktext"]
        assert bar["title"]["text"] == "conductance<br>shared by panes 1–3"
        # Under the map (horizontal), so that every pane's map keeps the same size.
        assert bar["orientation"] == "h"

    # Panes of different scores: each its own bar, titled without a claim of sharing.
    app.session_state[S.COMPARE] = CompareSpec("targets", (0, 4))
    app.run()
    panes = _panes(app)
    bars = [_bar(panes[f"cmp_map{i}"]) for i in range(2)]
    assert bars[0]["tickvals"] != pytest.approx(bars[1]["tickvals"])
    for i, bar in enumerate(bars):
        assert bar["title"]["text"] == "conductance"
        assert bar["tickvals"][-1] == pytest.approx(_zmax(panes[f"cmp_map{i}"]))


needs_chromium = pytest.mark.skipif(
    export.chromium_path() is None and os.environ.get("CI") != "true",
    reason="Chromium is not installed (apt-get install chromium)",
)


@needs_chromium
def test_one_panes_svg_download_carries_its_colour_bar(app, monkeypatch):
    offered = capture(monkeypatch)
    app.session_state[S.SETTINGS] = S.AttributionSettings(target=2)
    open_page(app, PAGE_COMPARE)
    open_menu(app, "cmp")
    assert not app.error, error_text(app)
    bar = _bar(_panes(app)["cmp_map0"])
    files = row_files(offered, "compare_")
    (svg,) = [name for name in files if name.endswith("_pane1_map.svg")]
    drawing = files[svg].data().decode("utf-8")
    assert re.search(r'class="[^"]*\bcolorbar\b', drawing)
    assert "shared by panes 1, 2" in drawing  # the title's second line
    for tick in bar["ticktext"]:
        assert f">{tick}<" in drawing
