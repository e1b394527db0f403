"""Operator limits and broken models as the app's users meet them: a message, nothing lost."""

from __future__ import annotations

from dataclasses import replace

import torch
from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_CONVERGENCE,
    PAGE_MODEL,
    PAGE_NEURON,
    error_text,
    export_bytes,
    open_page,
    upload_model,
    widget,
)
from torch import nn


def test_a_memory_budget_too_small_for_one_pass_is_said_and_nothing_is_lost(app, monkeypatch):
    open_page(app, PAGE_CONDUCTANCE)
    image, layer = app.session_state["active_image"], app.session_state["layer"]
    # Settings not computed before, so that nothing comes from the cache.
    app.session_state["attr_settings"] = replace(app.session_state["attr_settings"], n_steps=37)
    monkeypatch.setenv("EXPLAINER_MEMORY_BUDGET_MB", "0.01")
    app.run()
    assert not app.exception
    message = error_text(app)
    assert "memory budget of 10.2 KiB (EXPLAINER_MEMORY_BUDGET_MB)" in message, message
    assert "ask the operator to raise the budget" in message
    assert app.session_state["active_image"] == image and app.session_state["layer"] == layer
    # The operator raises the budget: the same view computes, nothing was cached from the failure.
    monkeypatch.delenv("EXPLAINER_MEMORY_BUDGET_MB")
    app.run()
    assert not app.exception and not app.error, error_text(app)
    assert app.metric, "no conductance metrics after the budget was raised"


class NaNScores(nn.Module):
    """Loads and runs, but every score is NaN (as after a diverged training run)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * float("nan")


def test_a_model_with_nan_scores_is_explained_in_words_on_every_page(app):
    upload_model(app, export_bytes(NaNScores()), "diverged.pt2", "resnet18")
    assert app.session_state["model_ref"].kind == "upload"
    # The predictions already say so, on the model page (once, then one line per image) and in
    # the sidebar.
    assert "scores contain NaN or infinite values" in error_text(app)
    page_errors = [e for e in app.main.error if "Predicting" in e.value]
    assert len(page_errors) == 1
    reminders = [c.value for c in app.main.caption if "the same problem as above" in c.value]
    assert len(reminders) == len(app.session_state["images"]) - 1
    assert not any("nan%" in c.value for c in app.sidebar.caption)
    for page in (PAGE_CONDUCTANCE, PAGE_NEURON, PAGE_CONVERGENCE):
        open_page(app, page)
        assert "scores contain NaN or infinite values" in error_text(app), page
    # Back to the built-in model: everything works again.
    open_page(app, PAGE_MODEL)
    widget(app, "radio", "_w_model_source").set_value("builtin")
    app.run()
    assert app.session_state["model_ref"].kind == "builtin"
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)


class SteppedScores(nn.Module):
    """The convolution's output reaches the scores only through a step (sign) function."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.sign(self.conv(x)).mean((2, 3)))


def test_a_layer_without_a_gradient_path_to_the_score_is_said_plainly(app):
    upload_model(app, export_bytes(SteppedScores()), "stepped.pt2", "resnet18")
    assert app.session_state["model_ref"].kind == "upload", error_text(app)
    app.session_state["layer"] = "conv"
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)
    notes = " ".join(info.value for info in app.info)
    assert "zero conductance" in notes and "no gradient reaches it" in notes
    assert {m.label: m.value for m in app.metric}["Sum of conductance"] == "0"


class ScaledHead(nn.Module):
    """Scores ``bias + scale * features``: with scale 0 every input gets the same scores, with a
    tiny scale the scores move by rounding noise only."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.mul_(scale)
            self.fc.bias.copy_(torch.tensor([0.5, 1.0, 2.0]))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _conductance_of(app, module: nn.Module, name: str):
    upload_model(app, export_bytes(module), name, "resnet18")
    assert app.session_state["model_ref"].kind == "upload", error_text(app)
    app.session_state["layer"] = "conv"
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.exception, [e.value for e in app.exception]
    return " ".join(m.value for m in [*app.info, *app.warning])


def test_a_score_that_ignores_the_image_is_named_as_the_cause(app):
    notes = _conductance_of(app, ScaledHead(0.0), "flat.pt2")
    assert "exactly the same for the image and the baseline" in notes
    assert "no gradient reaches it" not in notes  # not blamed on a missing gradient path


def test_a_negligible_score_difference_warns_that_the_maps_are_noise(app):
    notes = _conductance_of(app, ScaledHead(1e-5), "faint.pt2")
    assert "negligible" in notes and "rounding noise" in notes
    assert "exactly the same" not in notes


def test_a_clear_score_difference_gets_no_noise_warning(app):
    notes = _conductance_of(app, ScaledHead(1.0), "clear.pt2")
    assert "negligible" not in notes and "exactly the same" not in notes
