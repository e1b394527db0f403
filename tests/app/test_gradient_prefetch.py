"""The conductance page computes the shown channel's cell gradients in the background, so that a
click on a cell of its map is answered from the cache instead of waiting for a worker.

Each test uses settings no other test uses (the server's cache is shared by the whole run).
"""

from __future__ import annotations

import numpy as np
import pytest
from apphelpers import PAGE_CONDUCTANCE, TIMEOUT, count_jobs, open_page, plotly_specs, png_bytes

from webapp import backend, refine
from webapp.state import AttributionSettings, ImageEntry, ModelRef, PrepSpec

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _prefetch(app) -> backend.GradientPrefetch | None:
    value = (
        app.session_state["gradient_prefetch"] if "gradient_prefetch" in app.session_state else None
    )
    return value if isinstance(value, backend.GradientPrefetch) else None


def _open(app, layer: str, channel: int, settings: AttributionSettings) -> None:
    app.session_state["layer"] = layer
    app.session_state["channel"] = channel
    app.session_state["attr_settings"] = settings
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.exception, [e.value for e in app.exception]


def test_a_click_on_the_shown_channel_is_answered_from_the_prefetch(app, monkeypatch):
    _open(app, "block2", 3, AttributionSettings(n_steps=17, baseline="constant", constant=0.41))
    pending = _prefetch(app)
    assert pending is not None and pending.handle is not None
    lm = backend.resolve_model(ModelRef())
    layer_output = backend.run(lm, "activation", {"layer": "block2", "x": pending.args["x"]})
    rows, cols = layer_output.shape[-2:]
    # Every cell of channel 3's map, in one job.
    assert sorted(pending.args["neurons"]) == [(3, y, x) for y in range(rows) for x in range(cols)]
    pending.handle.result(timeout=TIMEOUT)

    calls = count_jobs(monkeypatch, "neuron_gradients")
    app.session_state["neuron"] = (3, rows - 1, 0)  # what a click on a cell does
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert calls == []  # answered from the cache: no worker job for the click, none started
    assert "cond_preview" in plotly_specs(app)
    assert _prefetch(app).kept

    # The prefetched gradient is the one a request for that neuron alone computes.
    index = pending.args["neurons"].index((3, rows - 1, 0))
    cached = backend.result_cache().get(pending.keys[index])
    alone = backend.run(
        lm,
        "neuron_gradients",
        {"layer": "block2", "x": pending.args["x"], "neurons": [(3, rows - 1, 0)]},
    )[0]
    np.testing.assert_allclose(cached.gradient, alone.gradient, rtol=1e-5, atol=1e-7)
    assert cached.activation == pytest.approx(alone.activation, rel=1e-6)

    # Another channel: a new job for its cells replaces nothing (the old one is done).
    app.session_state["channel"] = 4
    app.run()
    assert sorted(_prefetch(app).args["neurons"])[0] == (4, 0, 0)


def test_a_refinement_keeps_the_background_worker_to_itself(app, monkeypatch):
    monkeypatch.setenv("EXPLAINER_FIRST_LOOK_AFTER_S", "0.001")
    monkeypatch.setattr(refine, "ORPHAN_S", 600.0)  # AppTest has no fragment heartbeat
    _open(app, "block2", 2, AttributionSettings(n_steps=700, baseline="constant", constant=0.43))
    refinement = app.session_state["refinement"]
    assert refinement.running
    assert _prefetch(app) is None  # no prefetch queued behind the refinement
    refinement.handle.cancel()


def test_a_new_refinement_cancels_a_pending_prefetch(app, monkeypatch):
    monkeypatch.setattr(refine, "ORPHAN_S", 600.0)
    _open(app, "block1", 1, AttributionSettings(n_steps=19, baseline="constant", constant=0.45))
    pending = _prefetch(app)
    assert pending is not None
    cancelled: list[bool] = []
    monkeypatch.setattr(backend.GradientPrefetch, "cancel", lambda self: cancelled.append(True))
    monkeypatch.setenv("EXPLAINER_FIRST_LOOK_AFTER_S", "0.001")
    app.session_state["attr_settings"] = AttributionSettings(
        n_steps=900, baseline="constant", constant=0.45
    )
    app.run()
    assert cancelled == [True]
    assert _prefetch(app) is None
    app.session_state["refinement"].handle.cancel()


def test_no_prefetch_beyond_the_byte_limit_or_when_everything_is_cached(monkeypatch):
    lm = backend.resolve_model(ModelRef())
    prep = backend.preprocessing(PrepSpec(), lm)
    image = ImageEntry.from_bytes("prefetch.png", png_bytes((17, 160, 90)))
    x = backend.input_tensor(image, prep)
    monkeypatch.setattr(backend, "PREFETCH_BYTES", 2 * 4 * x.numel() - 1)
    assert backend.plan_gradient_prefetch(lm, image, prep, "block3", [(5, 0, 0), (5, 0, 1)]) is None
    monkeypatch.setattr(backend, "PREFETCH_BYTES", 2 * 4 * x.numel())
    plan = backend.plan_gradient_prefetch(lm, image, prep, "block3", [(5, 0, 0), (5, 0, 1)])
    assert plan is not None and plan.args["neurons"] == [(5, 0, 0), (5, 0, 1)]
    backend.neuron_gradients(lm, image, prep, "block3", [(5, 0, 1)])
    plan = backend.plan_gradient_prefetch(lm, image, prep, "block3", [(5, 0, 0), (5, 0, 1)])
    assert plan is not None and plan.args["neurons"] == [(5, 0, 0)]  # only what is missing
    assert plan.handle is None  # planned, not started
    backend.neuron_gradients(lm, image, prep, "block3", [(5, 0, 0)])
    assert backend.plan_gradient_prefetch(lm, image, prep, "block3", [(5, 0, 0)]) is None
