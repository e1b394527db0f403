"""Image uploads against the operator's limits: one message per reason, nothing held is lost."""

from __future__ import annotations

import io

import numpy as np
from apphelpers import error_text, png_bytes, visible, widget
from PIL import Image

MIB = 2**20


def upload(app, files: list[tuple[str, bytes]]) -> None:
    widget(app, "file_uploader", "_w_image_files").set_value(
        [(name, data, "image/png") for name, data in files]
    )
    app.run()
    assert not app.exception, [e.value for e in app.exception]


def noisy_png(seed: int, side: int = 256) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about 3 * side**2 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_forty_broken_files_give_one_message_naming_the_count(app):
    before = [e.digest for e in app.session_state["images"]]
    upload(app, [(f"broken_{i:02d}.png", f"not an image {i}".encode()) for i in range(40)])
    errors = [visible(e.value) for e in app.main.error]
    assert 1 <= len(errors) <= 3, errors
    message = errors[0]
    assert "40 files were not added" in message
    assert (
        "(broken_00.png, broken_01.png, broken_02.png, broken_03.png, broken_04.png and 35 more)"
        in message
    )
    assert "broken_39.png" not in message
    assert "Convert or re-save" in message  # says what to do
    assert [e.digest for e in app.session_state["images"]] == before


def test_rejections_are_grouped_by_reason(app, monkeypatch):
    count = len(app.session_state["images"])
    monkeypatch.setenv("EXPLAINER_MAX_IMAGES", str(count + 2))
    files = [(f"bad_{i}.png", b"nope %d" % i) for i in range(3)]
    files += [(f"good_{i}.png", png_bytes((10 * i, 200, 10))) for i in range(4)]
    upload(app, files)
    assert len(app.session_state["images"]) == count + 2
    errors = [e.value for e in app.main.error]
    assert len(errors) == 2, errors
    text = error_text(app)
    assert "2 files were not added** (good_2.png, good_3.png)" in text
    assert f"at most {count + 2} images per session" in text
    assert "3 files were not added" in text


def test_a_file_over_the_per_file_limit_is_refused_before_decoding(app, monkeypatch):
    before = [e.digest for e in app.session_state["images"]]
    active = app.session_state["active_image"]
    monkeypatch.setenv("EXPLAINER_MAX_IMAGE_MB", "0.1")
    monkeypatch.setattr(
        "webapp.backend.validate_image",
        lambda data: (_ for _ in ()).throw(AssertionError("decoded a file over the limit")),
    )
    upload(app, [("big.png", noisy_png(0))])
    text = error_text(app)
    assert "big.png" in text and "at most 0.1 MB" in text and "EXPLAINER_MAX_IMAGE_MB" in text
    assert [e.digest for e in app.session_state["images"]] == before
    assert app.session_state["active_image"] == active


def test_the_session_byte_limit_keeps_what_was_there(app, monkeypatch):
    held = sum(len(e.data) for e in app.session_state["images"])
    first, second = noisy_png(1), noisy_png(2)
    limit = (held + len(first) + len(second) // 2) / MIB
    monkeypatch.setenv("EXPLAINER_MAX_SESSION_IMAGES_MB", f"{limit:.6f}")
    before = [e.digest for e in app.session_state["images"]]
    upload(app, [("first.png", first), ("second.png", second)])
    images = app.session_state["images"]
    assert [e.digest for e in images][: len(before)] == before
    names = [e.name for e in images]
    assert "first.png" in names and "second.png" not in names
    text = error_text(app)
    assert "second.png" in text and "EXPLAINER_MAX_SESSION_IMAGES_MB" in text
    assert "Remove some images first" in text


def test_a_broken_limit_setting_is_said_and_nothing_is_lost(app, monkeypatch):
    before = [e.digest for e in app.session_state["images"]]
    monkeypatch.setenv("EXPLAINER_MAX_IMAGE_MB", "lots")
    upload(app, [("fine.png", png_bytes())])
    assert "EXPLAINER_MAX_IMAGE_MB" in error_text(app)
    assert [e.digest for e in app.session_state["images"]] == before
