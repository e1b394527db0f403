"""Automatic steps on the conductance page: the engine refines the map to the user's tolerance.

Each test uses a baseline constant no other test uses (the server's cache is shared by the run).
"""

from __future__ import annotations

import pytest
from apphelpers import PAGE_CONDUCTANCE, TIMEOUT, count_jobs, open_page, visible, widget

from webapp import refine
from webapp.state import AttributionSettings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _captions(at) -> str:
    return "\n".join(visible(c.value) for c in at.caption)


def _submit_form(at, prefix: str) -> None:
    next(b for b in at.button if b.proto.form_id == f"{prefix}_form").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def test_ticking_automatic_steps_refines_to_the_tolerance(app, monkeypatch):
    calls = count_jobs(monkeypatch, "conductance")
    app.session_state["tolerance"] = 0.004
    app.session_state["attr_settings"] = AttributionSettings(
        n_steps=200, baseline="constant", constant=0.53
    )
    open_page(app, PAGE_CONDUCTANCE)
    assert [c["n_steps"] for c in calls] == [200]
    box = widget(app, "checkbox", "cond_auto")
    assert box.value is False and "(0.4% of the score difference)" in box.label
    box.check()
    _submit_form(app, "cond")
    settings = app.session_state["attr_settings"]
    assert settings.tolerance == 0.004 and settings.n_steps == 200
    sent = calls[-1]
    assert (sent["n_steps"], sent["tolerance"], sent["steps_cap"]) == ("auto", 0.004, 200)
    captions = _captions(app)
    assert "Automatic steps: the engine used" in captions
    used = int(captions.split("the engine used ")[1].split()[0])
    assert 1 <= used < 200
    delta = next(m for m in app.metric if m.label == "Convergence delta")
    assert "≤ 0.4% tolerance" in visible(delta.proto.delta)

    # A new tolerance (set on the Convergence page or by a link) is followed.
    app.session_state["tolerance"] = 0.05
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.session_state["attr_settings"].tolerance == 0.05
    assert calls[-1]["tolerance"] == 0.05
    assert int(_captions(app).split("the engine used ")[1].split()[0]) <= used

    # Unticking goes back to exactly n_steps (already computed: from the cache).
    widget(app, "checkbox", "cond_auto").uncheck()
    count = len(calls)
    _submit_form(app, "cond")
    assert app.session_state["attr_settings"].tolerance is None
    assert len(calls) == count
    assert "Automatic steps" not in _captions(app)


def test_a_cap_too_low_for_the_tolerance_says_to_allow_more_steps(app):
    app.session_state["tolerance"] = 1e-7
    app.session_state["attr_settings"] = AttributionSettings(
        n_steps=3, baseline="constant", constant=0.57, tolerance=1e-7
    )
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.exception, [e.value for e in app.exception]
    assert "(the most you allow, n_steps = 3)" in _captions(app)
    warning = " ".join(w.value for w in app.warning)
    assert "Allow more steps" in warning


def test_the_background_refinement_says_it_chooses_its_steps(app, monkeypatch):
    monkeypatch.setenv("EXPLAINER_FIRST_LOOK_AFTER_S", "0.001")
    monkeypatch.setattr(refine, "ORPHAN_S", 600.0)
    app.session_state["tolerance"] = 1e-6
    app.session_state["attr_settings"] = AttributionSettings(
        n_steps=1000, baseline="constant", constant=0.59, tolerance=1e-6
    )
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.exception, [e.value for e in app.exception]
    refinement = app.session_state["refinement"]
    assert refinement.auto
    text = " ".join(p.proto.text for p in app.get("progress"))
    assert "Refining to a delta within 0.0001% (automatic steps, at most 1000)" in text
    assert "path points so far" in text
    result = refinement.handle.result(timeout=TIMEOUT)
    assert result.method == "auto" and result.status in ("converged", "cap", "stalled")
