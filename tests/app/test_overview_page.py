"""Layer overview page: every layer from one pass, its numbers, a click that opens a layer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from apphelpers import (
    PAGE_OVERVIEW,
    count_jobs,
    error_text,
    open_page,
    plotly_specs,
    resnet18_state_dict_bytes,
    upload_model,
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

from explainer.errors import ExplainerError
from webapp import backend
from webapp import state as S


def test_every_layer_in_network_order_from_one_pass(app, monkeypatch):
    jobs = count_jobs(monkeypatch, "layer_overview")
    conductance_jobs = count_jobs(monkeypatch, "conductance")
    app.session_state[S.SETTINGS] = S.AttributionSettings(n_steps=23)  # not cached yet
    open_page(app, PAGE_OVERVIEW)
    assert app.title[0].value == "Layer overview"
    assert not app.error
    lm = backend.resolve_model(app.session_state[S.MODEL])
    layers, rule = backend.overview_plan(lm)
    table = app.dataframe[0].value
    assert list(table["layer"]) == layers
    assert layers[0] == "conv1.conv" and layers[-1] == "pool" and len(layers) == 16
    assert "All 16 usable layers" in visible(" ".join(str(c.value) for c in app.caption))
    # One job for all the layers, none per layer.
    assert len(jobs) == 1 and jobs[0]["layers"] == layers
    assert not conductance_jobs
    diff = float(app.metric[1].value)
    tolerance = app.session_state[S.TOLERANCE]
    for _, row in table.iterrows():
        assert row["share"] == pytest.approx(100 * row["total conductance"] / diff, rel=1e-3)
        assert row["positive"] + row["negative"] == pytest.approx(
            row["total conductance"], rel=1e-3, abs=1e-4
        )
        expected = "✓" if row["|delta| relative"] / 100 <= tolerance else "⚠"
        assert row["completeness"] == expected
        assert row["top channels"].startswith("#")
    chart = plotly_specs(app)["ovw_chart"]
    assert [t["type"] for t in chart["data"]] == ["bar", "bar"]
    assert list(chart["data"][0]["x"]) == layers
    # A second visit is served from the cache.
    open_page(app, PAGE_OVERVIEW)
    assert len(jobs) == 1


def test_a_clicked_layer_opens_on_the_conductance_page(app):
    open_page(app, PAGE_OVERVIEW)
    app.session_state[S.OVERVIEW_OPEN] = "block1"
    app.run()
    assert not app.exception
    assert app.title[0].value == "Layer conductance"
    assert app.session_state[S.LAYER] == "block1"
    assert app.session_state[S.OVERVIEW_OPEN] is None


def test_a_target_out_of_range_is_a_message_and_the_settings_stay(app):
    app.session_state[S.SETTINGS] = S.AttributionSettings(target=50)
    open_page(app, PAGE_OVERVIEW)
    message = error_text(app)
    assert "out of range" in message and "50" in message
    assert app.session_state[S.SETTINGS].target == 50
    assert not app.dataframe


def test_no_model_says_where_to_load_one(app, monkeypatch):
    def broken(*args, **kwargs):
        raise ExplainerError("The model file is damaged.")

    monkeypatch.setattr(backend, "resolve_model", broken)
    open_page(app, PAGE_OVERVIEW)
    assert "No model is ready" in " ".join(str(w.value) for w in app.warning)
    assert "The model file is damaged." in error_text(app)
    assert not app.dataframe


def test_a_worker_answering_for_other_layers_is_refused(app, monkeypatch):
    real = backend.run

    def wrong(lm, op, args=None, progress=None):
        result = real(lm, op, args, progress)
        if op == "layer_overview":
            result = dataclasses.replace(result, layers=result.layers[:-1])
        return result

    monkeypatch.setattr(backend, "run", wrong)
    app.session_state[S.SETTINGS] = S.AttributionSettings(n_steps=11)  # not cached yet
    open_page(app, PAGE_OVERVIEW)
    assert "answered for other layers" in error_text(app)
    assert not app.dataframe


def test_a_large_model_computes_only_when_asked(app, monkeypatch):
    upload_model(app, resnet18_state_dict_bytes(), "resnet18.pt", "resnet18")
    app.session_state[S.SETTINGS] = S.AttributionSettings(n_steps=400)
    jobs = count_jobs(monkeypatch, "layer_overview")
    open_page(app, PAGE_OVERVIEW)
    assert not app.error
    assert "runs when you ask" in " ".join(str(i.value) for i in app.info)
    assert [b.label for b in app.button if b.label.startswith("Compute the overview")]
    assert not jobs and not app.dataframe
    # The step count of the form is the only thing that made it large: fewer steps run at once.
    widget(app, "number_input", "ovw_steps").set_value(2)
    next(b for b in app.button if b.label == "Compute").click()
    app.run()
    assert not app.exception
    assert len(jobs) == 1 and app.dataframe
    assert app.dataframe[0].value["layer"].iloc[0] == "conv1"


def test_the_chart_and_the_table_download_as_the_page_shows_them(app, monkeypatch):
    offered = capture(monkeypatch)
    open_page(app, PAGE_OVERVIEW)
    assert not download_keys(app)  # the menu is closed: nothing is prepared yet
    open_menu(app, "ovw")
    assert not app.error, error_text(app)
    table = app.dataframe[0].value
    files = row_files(offered, "overview_")
    (npz,) = [name for name in files if name.endswith(".npz")]
    stem = npz[: -len(".npz")]
    assert stem.startswith("overview_16_layers_")
    columns = ["share", "total_conductance", "relative_delta", "top_share", "completeness_holds"]
    expected = {f"{stem}_overview.png", f"{stem}_overview.svg", npz}
    expected |= {f"{stem}_{name}.csv" for name in columns}
    assert expected <= set(files)
    keys = download_keys(app)
    assert {"ovw_dl_overview_png", "ovw_dl_overview_svg", "ovw_dl_share_csv", "ovw_dl_npz"} <= keys
    assert f"Save {stem}_share.csv" in download_helps(app)
    # The files hold the numbers of the table, in its row order.
    share = csv_array(files, f"{stem}_share.csv")
    np.testing.assert_allclose(100 * share, table["share"].to_numpy(), rtol=1e-12)
    arrays = npz_arrays(files, npz)
    np.testing.assert_allclose(arrays["total_conductance"], table["total conductance"].to_numpy())
    np.testing.assert_allclose(
        100 * arrays["relative_delta"], table["|delta| relative"].to_numpy(), rtol=1e-12
    )
    np.testing.assert_array_equal(
        arrays["completeness_holds"], (table["completeness"] == "✓").to_numpy().astype(int)
    )
    chart = plotly_specs(app)["ovw_chart"]
    np.testing.assert_allclose(np.asarray(values(chart["data"][0]["y"])) / 100, share, rtol=1e-6)
