"""Convergence page: per-image deltas with pass/warn, and the n_steps sweep."""

from __future__ import annotations

import pytest
from apphelpers import (
    PAGE_CONVERGENCE,
    check_every_image,
    error_text,
    open_page,
    plotly_specs,
    widget,
)

from webapp import backend
from webapp import state as S
from webapp.state import AttributionSettings, SweepSettings


def test_only_the_active_image_is_computed_until_the_user_asks(app):
    # Settings no other test uses: nothing of them is in this process's cache yet.
    app.session_state["attr_settings"] = AttributionSettings(n_steps=23)
    open_page(app, PAGE_CONVERGENCE)
    assert not app.error
    images = app.session_state["images"]
    active = app.session_state["active_image"]
    table = app.dataframe[0].value
    assert list(table["image"]) == [e.name for e in images if e.digest == active]
    others = len(images) - 1
    assert widget(app, "button", "check_all_images").label == f"Check all {others} other images"
    lm = backend.resolve_model(app.session_state["model_ref"])
    prep = backend.preprocessing(app.session_state["prep"], lm)
    layer = app.session_state["layer"]
    settings = app.session_state["attr_settings"]
    cached = [backend.conductance_cached(lm, e, prep, layer, settings) is not None for e in images]
    assert cached == [e.digest == active for e in images]


def test_every_image_gets_a_delta_and_a_status_on_request(app):
    open_page(app, PAGE_CONVERGENCE)
    check_every_image(app)
    assert not app.error
    table = app.dataframe[0].value
    assert list(table["image"]) == [e.name for e in app.session_state["images"]]
    assert set(table["status"]) <= {"✓ pass", "⚠ warn"}
    for _, row in table.iterrows():
        relative = abs(row["delta"]) / max(abs(row["F(x) − F(baseline)"]), 1e-8)
        assert row["|delta| relative"] == pytest.approx(relative, rel=1e-3, abs=1e-6)
        assert row["sum of conductance"] - row["F(x) − F(baseline)"] == pytest.approx(
            row["delta"], abs=1e-4
        )
        expected = "✓ pass" if row["|delta| relative"] <= 0.05 else "⚠ warn"
        assert row["status"] == expected
    # The request is done: no Stop button, no offer, and the next run keeps every row.
    assert not [b for b in app.button if b.key in ("stop_checking", "check_all_images")]
    assert app.session_state[S.CHECK_ALL] is None
    app.run()
    assert len(app.dataframe[0].value) == len(app.session_state["images"])


def test_a_tiny_tolerance_turns_passes_into_warnings(app):
    open_page(app, PAGE_CONVERGENCE)
    check_every_image(app)
    widget(app, "number_input", "_w_tolerance").set_value(0.001)
    app.run()
    assert app.session_state["tolerance"] == pytest.approx(1e-5)
    table = app.dataframe[0].value
    worst = table["|delta| relative"].max()
    assert worst > 1e-5  # a 50-step integral is not exact to 1e-5 on every image
    assert "⚠ warn" in set(table["status"])


def test_sweep_plots_delta_against_steps(app):
    app.session_state["sweep_settings"] = SweepSettings(
        methods=("gausslegendre", "riemann_left"), steps=(4, 16, 64)
    )
    open_page(app, PAGE_CONVERGENCE)
    assert not app.error
    plot = plotly_specs(app)["conv_plot"]
    lines = [t for t in plot["data"] if t.get("mode") == "lines+markers"]
    assert [t["name"] for t in lines] == ["Gauss-Legendre", "Riemann, left"]
    assert all(list(t["x"]) == [4, 16, 64] for t in lines)
    assert plot["layout"]["xaxis"]["type"] == "log"
    verdicts = " ".join(str(m.value) for m in app.markdown)
    assert "**Gauss-Legendre**" in verdicts and "**Riemann, left**" in verdicts


def test_target_out_of_range_is_reported_per_image(app):
    app.session_state["attr_settings"] = AttributionSettings(target=50)
    open_page(app, PAGE_CONVERGENCE)
    assert not app.exception
    message = error_text(app)
    assert "50" in message and "out of range" in message
    assert app.session_state["attr_settings"].target == 50
    # The same problem for every image is spelled out once, then recalled in one line each.
    assert len([e for e in app.error if "Conductance for" in e.value]) == 1
    reminders = [c.value for c in app.caption if "the same problem as above" in c.value]
    assert len(reminders) == len(app.session_state["images"]) - 1


def test_the_offer_comes_back_after_a_check_of_every_image(app):
    """After "Check all" ran (its callback set the request), images that are missing again
    bring the offer back without an error, as after Stop (whose callback withdraws the
    request). The request's state key had been the offer button's own key: Streamlit then
    refused to draw the button again."""
    app.session_state["attr_settings"] = AttributionSettings(n_steps=27)  # nothing cached yet
    open_page(app, PAGE_CONVERGENCE)
    widget(app, "button", "check_all_images").click()
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    app.session_state["attr_settings"] = AttributionSettings(n_steps=29)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    others = len(app.session_state["images"]) - 1
    assert widget(app, "button", "check_all_images").label == f"Check all {others} other images"
