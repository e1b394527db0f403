"""Layer outputs of every common layout in the app: a vision transformer's tokens, a Swin
transformer's channels-last stages, and the real module types of a ``.pt2`` program.

Both models are small torchvision classes with random weights, exported with ``torch.export``
and uploaded as a user would; expected values are computed here with plain torch.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_LAYER,
    PAGE_NEURON,
    error_text,
    export_bytes,
    open_page,
    plotly_specs,
    upload_model,
    values,
    visible,
    widget,
)
from streamlit.testing.v1 import AppTest
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from explainer.images import Preprocessing, load_image, preprocess
from explainer.intake import load_model

VIT_LAYER = "encoder.layers.encoder_layer_1"
SWIN_STAGE = "features.3"  # (N, 4, 4, 16): channels last, sure
SWIN_AMBIGUOUS = "features.1"  # (N, 8, 8, 8): both orders fit


def tiny_vit() -> VisionTransformer:
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip
    # torchvision starts the head at zero (every score 0): give it weights so scores vary.
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def tiny_swin() -> SwinTransformer:
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2],
        num_classes=5,
    )  # fmt: skip


@functools.cache
def model_bytes(kind: str) -> bytes:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return export_bytes(tiny_vit() if kind == "vit" else tiny_swin(), 32)


def raw_output(app: AppTest, kind: str, layer: str) -> np.ndarray:
    """The layer's output for the active image, computed outside the app (no batch dim)."""
    lm = load_model(model_bytes(kind), filename="m.pt2")
    prep = Preprocessing.for_model(lm.input_size, lm.mean, lm.std)
    active = app.session_state["active_image"]
    entry = next(e for e in app.session_state["images"] if e.digest == active)
    x = preprocess(load_image(entry.data), prep)
    seen = []
    handle = lm.model.get_submodule(layer).register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            lm.model(x)
    finally:
        handle.remove()
    return seen[0][0].double().numpy()


@pytest.fixture
def vit_app(app: AppTest) -> AppTest:
    upload_model(app, model_bytes("vit"), "vit.pt2", arch="resnet18")
    assert not app.error, error_text(app)
    app.session_state["layer"] = VIT_LAYER
    return app


@pytest.fixture
def swin_app(app: AppTest) -> AppTest:
    upload_model(app, model_bytes("swin"), "swin.pt2", arch="resnet18")
    assert not app.error, error_text(app)
    app.session_state["layer"] = SWIN_STAGE
    return app


def _all_text(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    return visible(" ".join(str(p) for p in parts))


# --------------------------------------------------------------------------- vision transformer


def test_vit_layer_picker_shows_the_layout_and_real_types(vit_app):
    app = open_page(vit_app, PAGE_LAYER)
    assert not app.error, error_text(app)
    metrics = {m.label: visible(m.value) for m in app.metric}
    assert metrics["Type"] == "EncoderBlock"
    assert metrics["Output (tokens×features)"] == "17×16"
    assert "17 tokens × 16 features: a class token and a 4×4 grid of image patches" in (
        _all_text(app)
    )
    # The module tree names the original classes, not the rebuilt InterpreterModule.
    types = set()
    for frame in app.dataframe:
        types.update(frame.value["type"])
    assert {"Conv2d", "Encoder", "EncoderBlock", "Sequential", "LayerNorm"} <= types
    assert not any("Interpreter" in t for t in types), types


def test_vit_conductance_shows_the_patch_grid_and_the_class_token(vit_app):
    app = vit_app
    app.session_state["neuron"] = (3, 1, 2)
    app.session_state["channel"] = 3
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)
    specs = plotly_specs(app)
    # Feature 3 over the 4×4 patch grid, the class token beside it, the patches over the image.
    grid = values(specs["cond_channel_map"]["data"][0]["z"])
    assert np.asarray(grid).shape == (4, 4)
    assert "cond_class_token" in specs and "cond_overlay" in specs
    assert specs["cond_class_token"]["data"][1]["customdata"] == [[3]]
    # The bars are the 16 features' totals, class token included, and add up to the sum.
    bars = specs["cond_bars"]["data"][0]
    assert all(label.startswith("#") for label in bars["x"])
    assert max(int(label[1:]) for label in bars["x"]) < 16
    info = " ".join(str(i.value) for i in app.info)
    assert "zero conductance" not in info  # the model's scores depend on the image
    assert "neuron **(3, 1, 2)** (feature 3 at patch row 1, column 2)" in visible(info)
    assert "cond_preview" in specs  # the selected neuron's gradient
    # Feature 3's bar is its patches plus its class token; all bars add up to the sum.
    token = float(specs["cond_class_token"]["data"][0]["z"][0][0])
    total = dict(zip(bars["x"], values(bars["y"]), strict=True))
    assert total["#3"] == pytest.approx(float(np.sum(grid)) + token, rel=1e-4, abs=1e-6)
    assert len(total) == 16
    metrics = {m.label: m.value for m in app.metric}
    assert float(metrics["Sum of conductance"]) == pytest.approx(sum(total.values()), rel=1e-3)


def test_vit_neuron_gradient_of_a_patch_and_of_the_class_token(vit_app):
    app = vit_app
    raw = raw_output(app, "vit", VIT_LAYER)
    app.session_state["neuron"] = (5, 2, 3)
    open_page(app, PAGE_NEURON)
    assert not app.error, error_text(app)
    specs = plotly_specs(app)
    assert {"ng_activation", "ng_class_token", "ng_signed", "ng_abs"} <= set(specs)
    assert np.asarray(values(specs["ng_activation"]["data"][0]["z"])).shape == (4, 4)
    activation = next(m for m in app.metric if m.label == "Activation")
    # Patch (2, 3) is token 1 + 2 * 4 + 3 = 12 of the raw output.
    assert float(activation.value) == pytest.approx(raw[12, 5], rel=1e-3, abs=1e-4)
    line = " ".join(str(m.value) for m in app.markdown if "Neuron **" in str(m.value))
    assert "feature 5 at patch row 2, column 3" in visible(line)
    # Neighbours are patches of the same feature and the features next to it.
    tiles = specs["ng_neighbours"]["data"][1]["customdata"]
    assert [5, 1, 2] in tiles and [4, 2, 3] in tiles and [6, 2, 3] in tiles

    # The class token: its own neuron, with its own gradient.
    app.session_state["neuron"] = (5,)
    app.run()
    assert not app.error, error_text(app)
    activation = next(m for m in app.metric if m.label == "Activation")
    assert float(activation.value) == pytest.approx(raw[0, 5], rel=1e-3, abs=1e-4)
    specs = plotly_specs(app)
    assert "ng_signed" in specs
    assert widget(app, "toggle", "_w_ncls").value is True
    tiles = specs["ng_neighbours"]["data"][1]["customdata"]
    assert sorted(tiles) == [[4], [5], [6]]


def test_a_neuron_that_does_not_exist_gives_one_consistent_message(vit_app):
    app = vit_app
    # "unit 100" of the old reading of a 197×768 output: not a neuron of this layout.
    app.session_state["neuron"] = (100, 0)
    open_page(app, PAGE_NEURON)
    assert not app.error, error_text(app)
    warnings = [visible(str(w.value)) for w in app.warning]
    assert len(warnings) == 1, warnings
    assert "(100, 0) does not exist" in warnings[0]
    assert "showing the most active neuron instead" in warnings[0]
    assert "No neuron selected yet" not in _all_text(app)
    neuron = app.session_state["neuron"]
    assert len(neuron) == 3 and neuron[0] < 16 and neuron[1] < 4 and neuron[2] < 4
    assert "ng_signed" in plotly_specs(app)
    # Without a selection: only the caption, no warning.
    app.session_state["neuron"] = None
    app.run()
    assert not app.warning
    assert "No neuron selected yet" in _all_text(app)


# --------------------------------------------------------------------------- channels last


def test_swin_stage_is_a_channels_last_map(swin_app):
    app = swin_app
    raw = raw_output(app, "swin", SWIN_STAGE)
    assert raw.shape == (4, 4, 16)
    app.session_state["neuron"] = (9, 1, 2)
    app.session_state["channel"] = 9
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)
    assert "16 channels on a 4×4 map (channels last)" in _all_text(app)
    specs = plotly_specs(app)
    assert np.asarray(values(specs["cond_channel_map"]["data"][0]["z"])).shape == (4, 4)
    assert "cond_class_token" not in specs
    open_page(app, PAGE_NEURON)
    activation = next(m for m in app.metric if m.label == "Activation")
    assert float(activation.value) == pytest.approx(raw[1, 2, 9], rel=1e-3, abs=1e-4)
    assert np.asarray(values(plotly_specs(app)["ng_activation"]["data"][0]["z"])).shape == (4, 4)


def test_an_unsure_layout_can_be_chosen_and_is_remembered(swin_app):
    app = swin_app
    app.session_state["layer"] = SWIN_AMBIGUOUS
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)
    assert any("a guess" in str(w.value) for w in app.warning)
    choice = widget(app, "selectbox", "_w_layout_cond")
    assert choice.value == "channels_first"
    assert set(choice.options) >= {
        "Feature map, channels first (C×H×W)  (detected)",
        "Feature map, channels last (H×W×C)",
    }
    choice.set_value("channels_last").run()
    assert app.session_state["layouts"] == {SWIN_AMBIGUOUS: "channels_last"}
    assert not any("a guess" in str(w.value) for w in app.warning)
    raw = raw_output(app, "swin", SWIN_AMBIGUOUS)
    app.session_state["neuron"] = (2, 5, 6)
    open_page(app, PAGE_NEURON)
    activation = next(m for m in app.metric if m.label == "Activation")
    assert float(activation.value) == pytest.approx(raw[5, 6, 2], rel=1e-3, abs=1e-4)
    # Another layer and back: the choice is kept for this layer, and shown on the picker.
    app.session_state["layer"] = SWIN_STAGE
    open_page(app, PAGE_NEURON)
    app.session_state["layer"] = SWIN_AMBIGUOUS
    open_page(app, PAGE_LAYER)
    assert widget(app, "selectbox", "_w_layout_picker").value == "channels_last"
