"""The conductance page's first look: a coarse map at once, the asked-for one refined behind it.

These tests set ``EXPLAINER_FIRST_LOOK_AFTER_S`` to a millisecond, so the page never waits for
the full map: it draws the first look and leaves the full job running in the background. Each
test uses settings no other test uses, so the server's shared cache cannot already hold them.
AppTest does not fire a fragment's timer, so the tests wait on the job and rerun the page.
"""

from __future__ import annotations

import pytest
from apphelpers import PAGE_CONDUCTANCE, PAGE_LAYER, TIMEOUT, count_jobs, open_page, visible

from webapp import backend, refine
from webapp.state import AttributionSettings, ModelRef

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def first_look(monkeypatch):
    monkeypatch.setenv("EXPLAINER_FIRST_LOOK_AFTER_S", "0.001")
    monkeypatch.setattr(refine, "ORPHAN_S", 600.0)  # AppTest has no fragment heartbeat


def _metrics(at) -> dict[str, str]:
    return {m.label: visible(m.value) for m in at.metric}


def _texts(at) -> str:
    parts = [p.proto.text for p in at.get("progress")]
    parts += [e.value for e in (*at.info, *at.warning)]
    return "\n".join(parts)


def _open(app, settings: AttributionSettings):
    app.session_state["attr_settings"] = settings
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.exception, [e.value for e in app.exception]
    return app.session_state["refinement"] if "refinement" in app.session_state else None


def test_first_look_then_the_refined_map(app, first_look, monkeypatch):
    calls = count_jobs(monkeypatch, "conductance")
    settings = AttributionSettings(n_steps=300, baseline="constant", constant=0.31)
    refinement = _open(app, settings)
    # Two jobs: the full one in the background, and the first look the page waited for.
    assert sorted(c["n_steps"] for c in calls) == [4, 300]
    assert sorted(c["method"] for c in calls) == ["gausslegendre", "gausslegendre"]
    text = _texts(app)
    assert "First look at 4 steps shown" in text
    assert "Refining to 300 Gauss-Legendre steps" in text
    assert [b.key for b in app.button if b.key == "refine_stop"] == ["refine_stop"]
    first_sum = float(_metrics(app)["Sum of conductance"])

    full = refinement.handle.result(timeout=TIMEOUT)
    app.run()  # what the fragment's timer does in a browser
    assert not app.exception, [e.value for e in app.exception]
    assert "First look" not in _texts(app)
    assert not [b for b in app.button if b.key == "refine_stop"]
    refined_sum = float(_metrics(app)["Sum of conductance"])
    assert refined_sum == pytest.approx(float(full.channel_totals.sum()), rel=1e-3)
    assert full.n_steps == 300
    assert refined_sum != pytest.approx(first_sum, rel=1e-6)  # the page did change maps
    # Once refined, the map comes from the cache: no new job on a rerun.
    calls.clear()
    app.run()
    assert calls == []


def test_stop_keeps_the_first_look_and_offers_to_refine(app, first_look):
    settings = AttributionSettings(n_steps=1024, baseline="constant", constant=0.27)
    refinement = _open(app, settings)
    assert refinement.running
    next(b for b in app.button if b.key == "refine_stop").click()
    app.run()
    assert refinement.stopped and refinement.handle.cancel_requested
    text = _texts(app)
    assert "you stopped the refinement to 1024 Gauss-Legendre steps" in text
    assert float(_metrics(app)["Sum of conductance"]) != 0.0  # the first look stays
    # A rerun neither restarts the stopped job nor loses the first look.
    app.run()
    assert app.session_state["refinement"] is refinement
    next(b for b in app.button if b.key == "refine_again").click()
    app.run()
    again = app.session_state["refinement"]
    assert again is not refinement and again.key == refinement.key
    again.handle.cancel()


def test_a_newer_request_replaces_the_older_one(app, first_look):
    older = _open(app, AttributionSettings(n_steps=1024, baseline="constant", constant=0.23))
    assert older.running
    newer = _open(app, AttributionSettings(n_steps=1000, baseline="constant", constant=0.23))
    assert newer is not older and newer.key != older.key
    assert older.handle.cancel_requested
    assert "Refining to 1000 Gauss-Legendre steps" in _texts(app)
    newer.handle.cancel()


def test_a_failed_refinement_keeps_the_first_look_and_says_so(app, first_look):
    refinement = _open(app, AttributionSettings(n_steps=1024, baseline="constant", constant=0.19))
    refinement.handle.cancel()  # ended by the server, not by the user (e.g. its worker stopped)
    with pytest.raises(Exception):  # noqa: B017 - whatever the cancellation raises
        refinement.handle.result(timeout=TIMEOUT)
    app.run()
    assert not app.exception
    warning = " ".join(w.value for w in app.warning)
    assert "refining to 1024 Gauss-Legendre steps failed" in warning
    assert "cancelled" in warning
    assert [b.key for b in app.button if b.key == "refine_again"] == ["refine_again"]
    assert float(_metrics(app)["Sum of conductance"]) != 0.0


def test_few_steps_need_no_first_look(app, first_look, monkeypatch):
    calls = count_jobs(monkeypatch, "conductance")
    _open(app, AttributionSettings(n_steps=7, baseline="constant", constant=0.17))
    assert [c["n_steps"] for c in calls] == [7]
    assert "First look" not in _texts(app)
    assert float(_metrics(app)["Sum of conductance"]) != 0.0


class _Handle:
    """A job handle that runs until it is cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    def done(self) -> bool:
        return self.cancelled

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def test_the_watchdog_cancels_refinements_no_page_looks_at():
    watchdog = refine._Watchdog()
    looked_at = refine.Refinement("a", _Handle(), "50 steps", started=100.0)
    forgotten = refine.Refinement("b", _Handle(), "50 steps", started=100.0)
    looked_at.seen = 100.0 + 10 * refine.ORPHAN_S
    watchdog._watched = [looked_at, forgotten]
    assert watchdog.sweep(100.0 + 10 * refine.ORPHAN_S + 0.1)
    assert forgotten.orphaned and forgotten.handle.cancelled
    assert not looked_at.orphaned and not looked_at.handle.cancelled
    assert watchdog._watched == [looked_at]
    # A closed tab is cancelled at once, however recently its page looked.
    closed = refine.Refinement("c", _Handle(), "50 steps", started=100.0)
    closed.session_id = "gone"
    watchdog._watched.append(closed)
    refine_closed = refine._closed
    try:
        refine._closed = lambda session_id: session_id == "gone"
        assert watchdog.sweep(100.0)
    finally:
        refine._closed = refine_closed
    assert closed.orphaned and closed.handle.cancelled and not looked_at.orphaned


def test_an_orphaned_refinement_starts_again_when_its_page_is_back(app, first_look):
    refinement = _open(app, AttributionSettings(n_steps=1024, baseline="constant", constant=0.13))
    refinement.orphaned = True  # what the watchdog does when the user went elsewhere
    refinement.handle.cancel()
    with pytest.raises(Exception):  # noqa: B017 - the cancellation
        refinement.handle.result(timeout=TIMEOUT)
    app.run()
    again = app.session_state["refinement"]
    assert again is not refinement and again.key == refinement.key and again.running
    assert "failed" not in " ".join(w.value for w in app.warning)
    again.handle.cancel()


def test_first_look_settings_rule():
    asked = AttributionSettings(n_steps=50, method="riemann_trapezoid", internal_batch_size=5)
    quick = backend.first_look_settings(asked)
    assert (quick.n_steps, quick.method, quick.internal_batch_size) == (
        backend.FIRST_LOOK_STEPS,
        "gausslegendre",
        None,
    )
    assert quick.baseline == asked.baseline and quick.target == asked.target
    twice = 2 * backend.FIRST_LOOK_STEPS
    assert backend.first_look_settings(AttributionSettings(n_steps=twice + 1)) is not None
    assert backend.first_look_settings(AttributionSettings(n_steps=twice)) is None


def test_a_model_whose_first_look_is_slow_gets_one_without_waiting(app, monkeypatch):
    monkeypatch.setattr(refine, "ORPHAN_S", 600.0)
    lm = backend.resolve_model(ModelRef())
    seconds = refine._first_look_seconds()
    monkeypatch.setitem(seconds, lm.source.key, 0.0)
    # A first look is timed when it is computed.
    monkeypatch.setenv("EXPLAINER_FIRST_LOOK_AFTER_S", "0.001")
    first = _open(app, AttributionSettings(n_steps=1000, baseline="constant", constant=0.17))
    assert seconds[lm.source.key] > 0.0
    first.handle.cancel()
    # The page would wait up to 300 s for the asked-for map; a model whose last first look
    # took longer than that wait gets its first look at once, the full map still running.
    monkeypatch.setenv("EXPLAINER_FIRST_LOOK_AFTER_S", "300")
    seconds[lm.source.key] = 301.0
    refinement = _open(app, AttributionSettings(n_steps=1001, baseline="constant", constant=0.19))
    assert refinement is not None and refinement.running
    assert "First look at 4 steps shown" in _texts(app)
    refinement.handle.cancel()


def test_going_to_another_page_stops_the_refinement_at_once(app, first_look):
    refinement = _open(app, AttributionSettings(n_steps=1000, baseline="constant", constant=0.23))
    assert refinement.running
    open_page(app, PAGE_LAYER)
    assert not app.exception, [e.value for e in app.exception]
    assert refinement.orphaned and refinement.handle.cancel_requested
    # Back on its page: the same map is refined again.
    open_page(app, PAGE_CONDUCTANCE)
    again = app.session_state["refinement"]
    assert again is not refinement and again.key == refinement.key and again.running
    # A rerun of the page itself (a click, a fragment) keeps it.
    app.run()
    assert app.session_state["refinement"] is again and not again.orphaned
    again.handle.cancel()
