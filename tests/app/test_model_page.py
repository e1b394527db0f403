"""Model & images page: the built-in model and samples, uploads, and every intake error."""

from __future__ import annotations

import pytest
from apphelpers import (
    PAGE_CONDUCTANCE,
    PAGE_LAYER,
    PAGE_MODEL,
    error_text,
    export_bytes,
    open_page,
    plotly_specs,
    png_bytes,
    resnet18_state_dict_bytes,
    upload_model,
    visible,
    widget,
)

from explainer.demo import DEMO_LABELS, sample_image_paths
from explainer.intake import load_demo_model


def test_opens_on_builtin_model_with_samples_and_predictions(app):
    assert app.title[0].value == "Model & images"
    assert not app.error
    ref = app.session_state["model_ref"]
    assert ref.kind == "builtin"
    images = app.session_state["images"]
    assert [e.name for e in images] == [p.name for p in sample_image_paths()]
    assert app.session_state["active_image"] == images[0].digest
    # One top-5 chart per image, with probabilities of real demo classes.
    charts = [spec for key, spec in plotly_specs(app).items() if key.startswith("_top_")]
    assert len(charts) == len(images)
    bars = charts[0]["data"][0]
    assert len(bars["y"]) == 5
    assert all(label.split(" (#")[0] in DEMO_LABELS for label in bars["customdata"])
    assert all(0.0 <= p <= 1.0 for p in bars["x"])
    # The default layer is chosen once the model is loaded.
    assert app.session_state["layer"]
    sidebar_text = " ".join(str(m.value) for m in app.sidebar.markdown)
    assert "Demo CNN" in sidebar_text


def test_uploaded_image_is_added_and_becomes_active(app):
    before = len(app.session_state["images"])
    widget(app, "file_uploader", "_w_image_files").set_value(
        [("my_square.png", png_bytes(), "image/png")]
    )
    app.run()
    assert not app.exception
    images = app.session_state["images"]
    assert len(images) == before + 1
    assert images[-1].name == "my_square.png"
    assert app.session_state["active_image"] == images[-1].digest
    assert not app.error
    # The explanation pages now work on the upload.
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error
    assert app.session_state["active_image"] == images[-1].digest


def test_unreadable_image_shows_error_and_keeps_images(app):
    before = [e.digest for e in app.session_state["images"]]
    widget(app, "file_uploader", "_w_image_files").set_value(
        [("broken.png", b"this is not a png", "image/png")]
    )
    app.run()
    assert not app.exception
    assert "broken.png" in error_text(app)
    assert [e.digest for e in app.session_state["images"]] == before


def test_state_dict_upload_with_architecture_switches_model(app):
    upload_model(app, resnet18_state_dict_bytes(), "resnet18_weights.pt", "resnet18")
    assert not app.error, error_text(app)
    ref = app.session_state["model_ref"]
    assert ref.kind == "upload" and ref.arch == "resnet18"
    assert "resnet18" in " ".join(str(m.value) for m in app.markdown)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Classes"] == "10"
    assert metrics["Input (C×H×W)"] == "3×224×224"
    # A new model starts on its own default layer.
    assert app.session_state["layer"].startswith("layer")


def test_detect_from_the_file_uses_the_one_architecture_that_fits(app):
    upload_model(app, resnet18_state_dict_bytes(), "weights.pt", "")  # "Detect from the file"
    assert not app.error, error_text(app)
    ref = app.session_state["model_ref"]
    assert ref.kind == "upload" and ref.arch is None
    page = visible(" ".join(str(m.value) for m in [*app.markdown, *app.caption]))
    assert "Architecture detected from the file: resnet18" in page


def test_labels_file_names_the_classes(app):
    names = [f"thing{i}" for i in range(10)]
    upload_model(
        app,
        resnet18_state_dict_bytes(),
        "resnet18_weights.pt",
        "resnet18",
        labels="\n".join(names).encode(),
    )
    assert not app.error, error_text(app)
    assert list(app.session_state["labels_override"].labels) == names
    charts = [spec for key, spec in plotly_specs(app).items() if key.startswith("_top_")]
    assert charts and all(
        label.startswith("thing") for label in charts[0]["data"][0]["customdata"]
    )


def test_labels_with_wrong_count_keep_previous_model(app):
    upload_model(
        app,
        resnet18_state_dict_bytes(),
        "resnet18_weights.pt",
        "resnet18",
        labels=b"only\ntwo\n",
    )
    assert error_text(app)
    assert app.session_state["model_ref"].kind == "builtin"


def test_bad_model_file_shows_error_and_keeps_previous_model(app):
    layer = app.session_state["layer"]
    upload_model(app, b"definitely not a model", "garbage.pt", "resnet18")
    message = error_text(app)
    assert "garbage.pt" in message
    assert app.session_state["model_ref"].kind == "builtin"
    assert app.session_state["layer"] == layer
    # The rest of the app still runs on the built-in model.
    open_page(app, PAGE_LAYER)
    assert not app.error
    assert app.session_state["model_ref"].kind == "builtin"


def test_wrong_architecture_shows_error_and_keeps_previous_model(app):
    upload_model(app, resnet18_state_dict_bytes(), "resnet18_weights.pt", "resnet34")
    message = error_text(app)
    assert message
    assert "resnet34" in message
    assert app.session_state["model_ref"].kind == "builtin"


def test_switching_back_to_builtin_model(app):
    upload_model(app, resnet18_state_dict_bytes(), "resnet18_weights.pt", "resnet18")
    assert app.session_state["model_ref"].kind == "upload"
    widget(app, "radio", "_w_model_source").set_value("builtin")
    app.run()
    assert not app.exception
    assert app.session_state["model_ref"].kind == "builtin"
    demo_modules = {name for name, _ in load_demo_model().model.named_modules()}
    assert app.session_state["layer"] in demo_modules


def test_preprocessing_preset_is_shared(app):
    widget(app, "radio", "_w_prep_preset").set_value("none")
    app.run()
    assert not app.exception
    assert app.session_state["prep"].preset == "none"
    open_page(app, PAGE_CONDUCTANCE)
    assert app.session_state["prep"].preset == "none"
    assert not app.error


def test_custom_mean_std_with_wrong_length_keeps_previous_preset(app):
    widget(app, "radio", "_w_prep_preset").set_value("custom")
    app.run()
    widget(app, "text_input", "_w_prep_mean").set_value("0.5, 0.5")
    widget(app, "text_input", "_w_prep_std").set_value("0.2, 0.2")
    app.run()
    next(b for b in app.button if b.label == "Apply mean / std").click()
    app.run()
    assert not app.exception
    assert error_text(app)
    assert app.session_state["prep"].preset == "model"


def test_removed_image_leaves_the_list(app):
    images = app.session_state["images"]
    target = images[1]
    next(b for b in app.button if b.key == f"_w_remove_{target.digest[:16]}").click()
    app.run()
    assert not app.exception
    assert target.digest not in [e.digest for e in app.session_state["images"]]
    open_page(app, PAGE_MODEL)
    assert target.digest not in [e.digest for e in app.session_state["images"]]


def test_images_per_session_limit_is_enforced(app, monkeypatch):
    count = len(app.session_state["images"])
    monkeypatch.setenv("EXPLAINER_MAX_IMAGES", str(count))
    widget(app, "file_uploader", "_w_image_files").set_value(
        [("one_too_many.png", png_bytes((10, 200, 10)), "image/png")]
    )
    app.run()
    assert not app.exception
    assert len(app.session_state["images"]) == count
    assert f"at most {count} images" in error_text(app)


def test_hundred_megapixel_upload_is_refused_and_nothing_is_lost(app):
    """The header of a 10000 x 10000 PNG is enough to refuse it; no pixel is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
    before = [e.digest for e in app.session_state["images"]]
    active = app.session_state["active_image"]
    widget(app, "file_uploader", "_w_image_files").set_value([("huge.png", png, "image/png")])
    app.run()
    assert not app.exception
    message = error_text(app)
    assert "huge.png" in message and "Resize the image to at most 40,000,000 pixels" in message
    assert [e.digest for e in app.session_state["images"]] == before
    assert app.session_state["active_image"] == active


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("mean", "returns scores shaped (N,): one number per image"),
        ("pair", "returns a tuple of 2 tensors"),
        ("argmax", "(class indices?)"),
    ],
)
def test_model_without_class_scores_is_refused_and_the_previous_one_kept(app, output, expected):
    """Outputs that are neither (N, classes) nor (N, classes, ...) per position: one number per
    image, a tuple, or the class indices of a segmentation map."""
    from torch import nn

    class NotScores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            if output == "mean":
                return y.mean((1, 2, 3))
            if output == "pair":
                return y, -y
            return y.argmax(1)

    layer = app.session_state["layer"]
    upload_model(app, export_bytes(NotScores()), f"{output}.pt2", arch="resnet18")
    message = error_text(app)
    assert expected in message and f"{output}.pt2" in message
    assert "export" in message.lower()  # says what to do
    assert any("previous model is still in use" in info.value for info in app.info)
    assert app.session_state["model_ref"].kind == "builtin"
    assert app.session_state["layer"] == layer
    for page in (PAGE_LAYER, PAGE_CONDUCTANCE):
        open_page(app, page)
        assert not app.error
        assert app.session_state["model_ref"].kind == "builtin"


def test_model_returning_a_dict_is_explained_through_its_out_entry(app):
    """Like torchvision's segmentation models: {"out": scores, "aux": ...}."""
    from apphelpers import PixelScores

    class WithAux(PixelScores):
        def forward(self, x):
            scores = super().forward(x)
            return {"out": scores, "aux": scores * 2.0}

    upload_model(app, export_bytes(WithAux()), "with_aux.pt2", arch="resnet18")
    assert not app.error, error_text(app)
    assert app.session_state["model_ref"].kind == "upload"
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)
    metrics = {m.label: m.value for m in app.metric}
    assert next(m for m in app.metric if m.label == "Target").delta.startswith("at row ")
    assert float(metrics["Sum of conductance"]) == pytest.approx(
        float(metrics["F(image) − F(baseline)"]), rel=0.05, abs=1e-3
    )


def test_model_whose_forward_raises_is_refused_and_the_previous_one_kept(app):
    """An exported model that loads but raises on every ordinary image."""
    import io

    import torch
    from torch import nn

    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            torch._check(x.max().item() > 100.0, lambda: "needs raw pixel values above 100")
            return self.fc(h)

    program = torch.export.export(
        Picky().eval(),
        (torch.full((2, 3, 32, 32), 200.0),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    upload_model(app, buffer.getvalue(), "picky.pt2", arch="resnet18")
    assert "forward pass failed" in error_text(app)
    assert any("previous model is still in use" in info.value for info in app.info)
    assert app.session_state["model_ref"].kind == "builtin"
    for page in (PAGE_LAYER, PAGE_CONDUCTANCE):
        open_page(app, page)
        assert not app.exception and not app.error


def test_own_model_and_own_images_set_the_samples_aside(app):
    samples = len(app.session_state["images"])
    upload_model(app, resnet18_state_dict_bytes(), "resnet18_weights.pt", "resnet18")
    # No image of the user's own yet: the samples stay, and the page says why.
    assert len(app.session_state["images"]) == samples
    assert any("stay until you upload images of your own" in i.value for i in app.info)
    widget(app, "file_uploader", "_w_image_files").set_value(
        [("mine.png", png_bytes((10, 200, 30)), "image/png")]
    )
    app.run()
    assert not app.exception
    assert [e.name for e in app.session_state["images"]] == ["mine.png"]
    assert app.session_state["active_image"] == app.session_state["images"][0].digest
    assert any("set aside" in i.value for i in app.info)
    # The sample picker shows none chosen; picking one brings it back.
    assert widget(app, "multiselect", "_w_samples").value == []


def test_user_images_then_own_model_set_the_samples_aside_at_once(app):
    widget(app, "file_uploader", "_w_image_files").set_value(
        [("mine.png", png_bytes((200, 200, 30)), "image/png")]
    )
    app.run()
    assert any(e.source == "sample" for e in app.session_state["images"])  # the demo keeps them
    upload_model(app, resnet18_state_dict_bytes(), "resnet18_weights.pt", "resnet18")
    assert [e.name for e in app.session_state["images"]] == ["mine.png"]


def test_several_fitting_architectures_are_offered_as_buttons(app, monkeypatch):
    from explainer.intake import load_model, registry
    from webapp import backend

    # No two torchvision architectures share every tensor. Here the intake finds two for the
    # file (the refusal is computed in this process, with the registry patched); any load with
    # an architecture picked goes to the real worker.
    monkeypatch.setattr(registry, "_fitting_architectures", lambda shapes: ["resnet18", "resnet34"])
    real = backend.resolve_model

    def resolve(ref, labels=None):
        if ref.kind == "upload" and ref.arch is None:
            load_model(ref.data, filename=ref.filename)
            raise AssertionError("the patched registry should have refused the file")
        return real(ref, labels)

    monkeypatch.setattr(backend, "resolve_model", resolve)
    widget(app, "file_uploader", "_w_image_files").set_value(
        [("mine.png", png_bytes((10, 200, 30)), "image/png")]
    )
    app.run()
    mine = [e.digest for e in app.session_state["images"] if e.name == "mine.png"]
    upload_model(app, resnet18_state_dict_bytes(), "weights.pt", "")  # "Detect from the file"
    assert "pick the architecture it was trained with" in error_text(app)
    assert app.session_state["model_ref"].kind == "builtin"
    offers = [b for b in app.button if b.label.startswith("Use ")]
    assert [b.label for b in offers] == ["Use resnet18", "Use resnet34"]
    # The offer stays on the next runs (the error message itself is shown once).
    app.run()
    assert [b.label for b in app.button if b.label.startswith("Use ")] == [b.label for b in offers]

    next(b for b in app.button if b.label == "Use resnet18").click()
    app.run()
    assert not app.exception and not app.error, error_text(app)
    ref = app.session_state["model_ref"]
    assert (ref.kind, ref.arch, ref.filename) == ("upload", "resnet18", "weights.pt")
    assert widget(app, "selectbox", "_w_arch").value == "resnet18"
    page = visible(" ".join(str(m.value) for m in [*app.markdown, *app.success]))
    assert "weights.pt" in page and "resnet18" in page
    # The user's image stays (the demo's samples are set aside, as with any model of one's own).
    assert [e.digest for e in app.session_state["images"]] == mine
    assert not [b for b in app.button if b.label.startswith("Use ")]  # the offer is gone
