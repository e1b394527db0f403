"""Non-square images: the fit mode on the Model & images page, what it shows, where it goes."""

from __future__ import annotations

import dataclasses

import torch
from apphelpers import (
    APP,
    PAGE_CONDUCTANCE,
    PAGE_MODEL,
    TIMEOUT,
    open_page,
    plotly_specs,
    png_bytes,
    visible,
    widget,
)
from streamlit.testing.v1 import AppTest

from explainer.cache import digest
from explainer.images import Preprocessing
from webapp import backend
from webapp.state import PrepSpec


def _upload(app: AppTest, *files: tuple[str, bytes]) -> None:
    widget(app, "file_uploader", "_w_image_files").set_value(
        [(name, data, "image/png") for name, data in files]
    )
    app.run()
    assert not app.exception, [e.value for e in app.exception]


def _set_fit(app: AppTest, fit: str) -> None:
    widget(app, "radio", "_w_prep_fit").set_value(fit)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.session_state["prep"].fit == fit


def _captions(app: AppTest) -> str:
    return visible("\n".join(str(c.value) for c in app.caption))


def test_the_cut_is_shown_for_a_non_square_image_in_each_mode_and_not_for_a_square_one(app):
    # 96 x 48 on the demo model (64 x 64 input, shorter side scaled to 73, centre 64 x 64 kept).
    _upload(
        app,
        ("wide.png", png_bytes((30, 60, 220), (96, 48))),
        ("square.png", png_bytes((20, 180, 20), (48, 48))),
    )
    assert app.session_state["prep"].fit == "crop"  # the default
    fit_radio = widget(app, "radio", "_w_prep_fit")
    assert fit_radio.label == "Non-square images"
    assert list(fit_radio.options) == [
        "Crop the centre",
        "Pad to a square",
        "Stretch",
    ]
    text = _captions(app)
    assert (
        "wide.png** (96 × 48 px): Cut 27 px left and right (56% of the width) and 3 px top and "
        "bottom (12% of the height)." in text
    )
    assert "square.png" not in text  # square images get no notice
    previews = len(app.get("image"))

    _set_fit(app, "pad")
    text = _captions(app)
    assert "wide.png** (96 × 48 px): Nothing cut: scaled to 64 × 32 px and padded 16 px top " in (
        text
    )
    assert "square.png" not in text
    assert "pad the rest with the mean colour" in text  # the settings text names the mode

    _set_fit(app, "resize")
    text = _captions(app)
    assert "wide.png** (96 × 48 px): Nothing cut: stretched from 96 × 48 to 64 × 64 px" in text
    assert "stretch to 64×64 (aspect ratio not kept)" in text
    assert len(app.get("image")) == previews

    _set_fit(app, "crop")
    assert "Cut 27 px left" in _captions(app)


def test_only_square_images_show_no_notice(app):
    _upload(app, ("square_only.png", png_bytes((200, 200, 10), (40, 40))))
    images_before = len(app.get("image"))
    assert "Non-square images" not in " ".join(str(m.value) for m in app.markdown)
    _upload(app, ("tall.png", png_bytes((200, 10, 10), (30, 90))))
    assert "Non-square images" in " ".join(str(m.value) for m in app.markdown)
    # The new card and the preview of the one non-square image.
    assert len(app.get("image")) == images_before + 2
    assert "tall.png** (30 × 90 px): Cut 2 px left and right (13% of the width) and 32 px top " in (
        _captions(app)
    )


def test_the_conductance_page_explains_the_input_of_each_mode(app, monkeypatch):
    _upload(app, ("wide_for_conductance.png", png_bytes((240, 120, 0), (120, 40))))
    active = app.session_state["active_image"]
    used: dict[str, torch.Tensor] = {}
    real = backend.input_tensor

    def recording(image, prep):
        x = real(image, prep)
        if image.digest == active:
            used[prep.fit] = x
        return x

    monkeypatch.setattr(backend, "input_tensor", recording)
    for fit in ("crop", "pad", "resize"):
        open_page(app, PAGE_MODEL)
        _set_fit(app, fit)
        used.pop(fit, None)
        open_page(app, PAGE_CONDUCTANCE)
        assert not app.error, visible("\n".join(str(e.value) for e in app.error))
        assert plotly_specs(app), "the conductance page drew nothing"
        assert fit in used, f"the conductance page did not use the {fit} input"
    assert not torch.equal(used["crop"], used["pad"])
    assert not torch.equal(used["crop"], used["resize"])
    assert not torch.equal(used["pad"], used["resize"])
    # Pad: the rows above and below the picture are exactly zero once normalised.
    assert torch.equal(used["pad"][0, :, 0], torch.zeros_like(used["pad"][0, :, 0]))
    # A report of the view (made in the last mode, stretch) names the fit mode.
    next(b for b in app.button if b.label == "Add this view to the report").click()
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    rows = dict(app.session_state["report_views"][-1].model)
    assert rows["Preprocessing"].startswith("stretch to 64×64 (aspect ratio not kept); ")


def test_the_link_carries_the_fit_mode_and_old_links_mean_crop(app):
    assert "fit" not in app.query_params  # crop, the default, is left out
    _set_fit(app, "pad")
    assert app.query_params["fit"] == "pad"
    widget(app, "radio", "_w_prep_preset").set_value("imagenet")
    app.run()
    assert app.session_state["prep"] == PrepSpec("imagenet", fit="pad")  # a preset keeps it
    params = dict(app.query_params)

    opened = AppTest.from_file(APP, default_timeout=TIMEOUT)
    opened.query_params.update(params)
    opened.run()
    assert not opened.exception
    assert opened.session_state["prep"] == PrepSpec("imagenet", fit="pad")
    assert widget(opened, "radio", "_w_prep_fit").value == "pad"

    old = AppTest.from_file(APP, default_timeout=TIMEOUT)
    old.query_params.update({"prep": "imagenet"})
    old.run()
    assert old.session_state["prep"] == PrepSpec("imagenet", fit="crop")

    bad = AppTest.from_file(APP, default_timeout=TIMEOUT)
    bad.query_params.update({"fit": "squash"})
    bad.run()
    assert not bad.exception
    assert bad.session_state["prep"].fit == "crop"
    assert "crop, pad, resize" in visible("\n".join(str(w.value) for w in bad.warning))


def test_crop_keys_are_the_keys_made_before_the_choice():
    prep = Preprocessing.imagenet(224)
    before = digest("prep", repr((prep.mean, prep.std, prep.size, prep.resize, 3, "imagenet")))
    assert backend.prep_key(prep) == before
    keys = {backend.prep_key(dataclasses.replace(prep, fit=f)) for f in ("crop", "pad", "resize")}
    assert len(keys) == 3
