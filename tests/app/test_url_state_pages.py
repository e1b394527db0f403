"""The pages' own settings in the address (tolerance, sweep, channel grid, presentation mode,
gradient maps), and a link's missing image explained again once it is uploaded."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from apphelpers import (
    APP,
    PAGE_CONDUCTANCE,
    PAGE_CONVERGENCE,
    PAGE_MODEL,
    PAGE_NEURON,
    TIMEOUT,
    open_page,
    png_bytes,
    visible,
    widget,
)
from streamlit.testing.v1 import AppTest

from webapp import persist
from webapp.persist import LINK_PREFIX
from webapp.state import AttributionSettings, GridView, SweepSettings

PAGE_VALUES = {
    "tol": "2.5",
    "sweep": "riemann_left",
    "sweep_steps": "2,4",
    "sweep_abs": "1",
    "rank": "neg",
    "top": "7",
    "tiles": "16",
    "tile_page": "3",
    "only": "8-60",
    "present": "1",
    "range": "full",
    "zoom": "1",
}
"""Every page setting a link carries, none at its default (layer block2 has 64 channels)."""


@pytest.fixture(autouse=True)
def store_dir(tmp_path: Path, monkeypatch) -> Path:
    """Every test gets its own upload store."""
    folder = tmp_path / "uploads"
    monkeypatch.setenv("EXPLAINER_UPLOAD_DIR", str(folder))
    monkeypatch.delenv("EXPLAINER_UPLOAD_STORE_MB", raising=False)
    return folder


def open_link(params: dict[str, str], page: str | None = None) -> AppTest:
    """A new browser session opening a link: the app's first run with these query parameters."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(params)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page is not None:
        open_page(at, page)
    return at


def link_notes(at: AppTest) -> str:
    return visible("\n".join(str(w.value) for w in at.warning))


def labelled(at: AppTest, kind: str, label: str):
    """The widget of ``kind`` (e.g. ``"multiselect"``) with this label."""
    return next(w for w in getattr(at, kind) if w.label == label)


def page_widgets(at: AppTest) -> dict[str, object]:
    """What the widgets of the page drawn last show, by link parameter."""
    out: dict[str, object] = {"present": widget(at, "toggle", "_w_presentation").value}
    if any(n.key == "_w_tolerance" for n in at.number_input):
        out["tol"] = widget(at, "number_input", "_w_tolerance").value
        out["sweep"] = labelled(at, "multiselect", "Methods").value
        out["sweep_steps"] = labelled(at, "multiselect", "n_steps").value
        out["relative"] = labelled(at, "toggle", "Relative |delta|").value
    if any(n.key == "_w_rank" for n in at.selectbox):
        out["rank"] = widget(at, "selectbox", "_w_rank").value
        out["top"] = widget(at, "slider", "_w_topk").value
        out["tiles"] = widget(at, "selectbox", "_w_page_size").value
        out["only"] = widget(at, "text_input", "_w_filter").value
        out["tile_page"] = widget(at, "number_input", "_w_page").value
    if any(n.key == "_w_grad_range" for n in at.radio):
        out["range"] = widget(at, "radio", "_w_grad_range").value
        out["zoom"] = widget(at, "toggle", "_w_grad_zoom").value
    return out


EXPECTED_WIDGETS = {
    PAGE_CONVERGENCE: {
        "tol": 2.5,
        "sweep": ["riemann_left"],
        "sweep_steps": [2, 4],
        "relative": False,
    },
    PAGE_CONDUCTANCE: {"rank": "neg", "top": 7, "tiles": 16, "only": "8-60", "tile_page": 3},
    PAGE_NEURON: {"range": "full", "zoom": True},
}


# --- state -> URL -> a new session ---------------------------------------------------------------
def test_page_settings_set_with_the_widgets_travel_in_the_link(app):
    app.session_state["layer"] = "block2"
    widget(app, "toggle", "_w_presentation").set_value(True)
    app.run()
    open_page(app, PAGE_CONVERGENCE)
    widget(app, "number_input", "_w_tolerance").set_value(2.5)
    app.run()
    labelled(app, "multiselect", "Methods").set_value(["riemann_left"])
    labelled(app, "multiselect", "n_steps").set_value([2, 4])
    labelled(app, "toggle", "Relative |delta|").set_value(False)
    next(b for b in app.button if b.label == "Run sweep").click()
    app.run()
    assert not app.exception
    open_page(app, PAGE_CONDUCTANCE)
    widget(app, "selectbox", "_w_rank").set_value("neg")
    widget(app, "slider", "_w_topk").set_value(7)
    widget(app, "selectbox", "_w_page_size").set_value(16)
    widget(app, "text_input", "_w_filter").set_value("8-60")
    app.run()
    widget(app, "number_input", "_w_page").set_value(3)  # set last: a new filter starts at 1
    app.run()
    open_page(app, PAGE_NEURON)
    widget(app, "radio", "_w_grad_range").set_value("full")
    widget(app, "toggle", "_w_grad_zoom").set_value(True)
    app.run()
    assert not app.exception

    link = dict(app.query_params)
    assert {k: link.get(k) for k in PAGE_VALUES} == PAGE_VALUES
    fresh = open_link(link, PAGE_NEURON)
    assert not fresh.warning, link_notes(fresh)
    for key in ("tolerance", "sweep_settings", "grid_view", "presentation"):
        assert fresh.session_state[key] == app.session_state[key], key
    assert fresh.session_state["gradient_range"] == "full"
    assert fresh.session_state["gradient_zoom"] is True
    assert fresh.query_params == link
    for page, expected in EXPECTED_WIDGETS.items():
        open_page(fresh, page)
        shown = page_widgets(fresh)
        assert shown["present"] is True, page
        assert {k: shown[k] for k in expected} == expected, page


def test_a_link_with_the_page_settings_opens_each_page_with_them():
    at = open_link({"layer": "block2", **PAGE_VALUES})
    assert not at.warning, link_notes(at)
    # Presentation mode is on from the link's first run: its style sheet is on the page.
    assert any("font-size: 19px" in h.proto.body for h in at.get("html"))
    assert widget(at, "toggle", "_w_presentation").value is True
    assert at.session_state["tolerance"] == pytest.approx(0.025)
    assert at.session_state["sweep_settings"] == SweepSettings(("riemann_left",), (2, 4), False)
    assert at.session_state["grid_view"] == GridView("neg", 7, 3, 16, "8-60")
    for page, expected in EXPECTED_WIDGETS.items():
        open_page(at, page)
        shown = page_widgets(at)
        assert {k: shown[k] for k in expected} == expected, page


def test_defaults_are_left_out_of_the_address(app):
    open_page(app, PAGE_CONVERGENCE)
    assert not set(PAGE_VALUES) & set(app.query_params)


# --- bad values -----------------------------------------------------------------------------------
BAD = {
    "tol": "0",
    "auto": "maybe",
    "sweep": "gausslegendre,simpson",
    "sweep_steps": "4,5",
    "sweep_abs": "yes",
    "rank": "best",
    "top": "101",
    "tiles": "20",
    "tile_page": "0",
    "only": "0-999999",
    "present": "on",
    "range": "<b>wide</b>",
    "zoom": "2",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_page_value_is_named_and_the_rest_of_the_link_is_kept(name):
    good = {k: v for k, v in PAGE_VALUES.items() if k != name}
    at = open_link({"layer": "block2", "steps": "24", **good, name: BAD[name]})
    notes = link_notes(at)
    assert "could not be shown in full" in notes
    assert f"The link's **{name}** value" in notes
    assert not at.exception and not at.error
    assert at.session_state["attr_settings"].n_steps == 24
    expected = {
        "tolerance": 0.025 if name != "tol" else 0.05,
        "sweep_settings": SweepSettings(
            ("riemann_left",) if name != "sweep" else SweepSettings().methods,
            (2, 4) if name != "sweep_steps" else SweepSettings().steps,
            name == "sweep_abs",
        ),
        "grid_view": GridView(
            "neg" if name != "rank" else "abs",
            7 if name != "top" else 20,
            3 if name != "tile_page" else 1,
            16 if name != "tiles" else 36,
            "8-60" if name != "only" else "",
        ),
        "presentation": name != "present",
        "gradient_range": "full" if name != "range" else "robust",
        "gradient_zoom": name != "zoom",
    }
    assert at.session_state["tolerance"] == pytest.approx(expected.pop("tolerance"))
    for key, value in expected.items():
        assert at.session_state[key] == value, key


def test_automatic_steps_travel_with_the_tolerance(app):
    app.session_state["tolerance"] = 0.02
    app.session_state["attr_settings"] = replace(AttributionSettings(), tolerance=0.02)
    app.run()
    link = dict(app.query_params)
    assert (link["auto"], link["tol"]) == ("1", "2")
    fresh = open_link(link, PAGE_CONVERGENCE)
    assert not fresh.warning, link_notes(fresh)
    assert fresh.session_state["attr_settings"].tolerance == pytest.approx(0.02)
    assert widget(fresh, "checkbox", "conv_auto").value is True
    assert fresh.query_params == link


def test_a_tile_page_without_a_layer_is_reported():
    at = open_link({"tile_page": "2", "steps": "12"})
    assert "belong to a layer the link does not name" in link_notes(at)
    assert at.session_state["attr_settings"].n_steps == 12


# --- a link's image uploaded again ---------------------------------------------------------------
def _upload(at: AppTest, files: list[tuple[str, bytes]]) -> None:
    widget(at, "file_uploader", "_w_image_files").set_value(
        [(name, data, "image/png") for name, data in files]
    )
    at.run()
    assert not at.exception


def test_a_missing_linked_image_becomes_the_explained_one_when_uploaded_again(app, store_dir):
    first, second = png_bytes((10, 200, 30)), png_bytes((200, 20, 90))
    _upload(app, [("first.png", first), ("second.png", second)])
    first_digest = hashlib.sha256(first).hexdigest()
    second_digest = hashlib.sha256(second).hexdigest()
    app.session_state["active_image"] = first_digest  # explain the first of the two
    open_page(app, PAGE_NEURON)
    link = dict(app.query_params)
    assert link["image"] == first_digest[:LINK_PREFIX]
    shutil.rmtree(store_dir)  # evicted, or a link from another server

    fresh = open_link(link, PAGE_NEURON)
    notes = link_notes(fresh)
    assert "2 of the" in notes and "are no longer on this server" in notes
    assert "The image the link explains is not on this server" in notes
    assert fresh.session_state["active_image"] != first_digest
    # The address keeps the link's images and the explained one while they are missing.
    assert fresh.query_params["images"] == link["images"]
    assert fresh.query_params["image"] == link["image"]

    open_page(fresh, PAGE_MODEL)
    _upload(fresh, [("first again.png", first), ("second again.png", second)])
    # Uploading makes the last new file the explained one; the link's image wins.
    assert fresh.session_state["active_image"] == first_digest
    assert [e.digest for e in fresh.session_state["images"]][-2:] == [first_digest, second_digest]
    success = visible(" ".join(str(s.value) for s in fresh.success))
    assert "This is the image the link explains" in success
    assert not fresh.warning  # the messages about the missing images are gone
    assert fresh.query_params["image"] == link["image"]
    open_page(fresh, PAGE_NEURON)
    assert fresh.query_params == link


def test_a_missing_image_waits_while_other_images_are_uploaded(app, store_dir):
    wanted, other = png_bytes((30, 30, 220)), png_bytes((220, 220, 20))
    third = png_bytes((20, 120, 120))
    _upload(app, [("wanted.png", wanted)])
    link = dict(app.query_params)
    shutil.rmtree(store_dir)
    fresh = open_link(link, PAGE_MODEL)
    _upload(fresh, [("other.png", other)])
    other_digest = hashlib.sha256(other).hexdigest()
    assert fresh.session_state["active_image"] == other_digest  # the page's usual choice
    # Still waiting: the address names the link's image, and the next upload of it wins.
    assert fresh.query_params["image"] == hashlib.sha256(wanted).hexdigest()[:LINK_PREFIX]
    _upload(fresh, [("wanted.png", wanted), ("third.png", third)])
    assert fresh.session_state["active_image"] == hashlib.sha256(wanted).hexdigest()
    assert fresh.session_state["_url_images_pending"] is None  # nothing left to wait for


def test_dismissing_the_notes_forgets_the_missing_image(app, store_dir):
    _upload(app, [("gone.png", png_bytes((90, 10, 10)))])
    link = dict(app.query_params)
    shutil.rmtree(store_dir)
    fresh = open_link(link)
    next(b for b in fresh.button if b.key == "_w_link_dismiss").click()
    fresh.run()
    assert "image" not in fresh.query_params
    assert not fresh.warning


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_linked_image_uploaded_again_takes_its_place_in_the_links_order(app, store_dir):
    """Link order A, B, C with B missing: B uploaded again (after an image the link does not
    name) goes back between A and C; the image the link does not name keeps its place."""
    a, b, c = png_bytes((200, 30, 30)), png_bytes((30, 200, 30)), png_bytes((30, 30, 200))
    extra = png_bytes((200, 200, 30))
    app.session_state["images"] = []  # no sample images in the link
    _upload(app, [("a.png", a), ("b.png", b), ("c.png", c)])
    link = dict(app.query_params)
    short = [_digest(x)[:LINK_PREFIX] for x in (a, b, c)]
    assert link["images"] == ",".join(short)
    persist.default_store()._remove(_digest(b))  # B alone is gone from this server

    fresh = open_link(link, PAGE_MODEL)
    assert "1 of the 3 images in this link is no longer on this server" in link_notes(fresh)
    assert [e.digest for e in fresh.session_state["images"]] == [_digest(a), _digest(c)]
    _upload(fresh, [("extra.png", extra)])
    _upload(fresh, [("b again.png", b)])
    order = [e.digest for e in fresh.session_state["images"]]
    assert order == [_digest(a), _digest(b), _digest(c), _digest(extra)]
    assert fresh.session_state["_url_images_pending"] is None
    assert not fresh.warning


def test_linked_images_uploaded_again_in_another_order_keep_the_links_order(app, store_dir):
    """Link order A, B, C with A and C missing: uploaded again as C then A, they end up around
    B in the link's order."""
    a, b, c = png_bytes((120, 30, 30)), png_bytes((30, 120, 30)), png_bytes((30, 30, 120))
    app.session_state["images"] = []  # no sample images in the link
    _upload(app, [("a.png", a), ("b.png", b), ("c.png", c)])
    link = dict(app.query_params)
    store = persist.default_store()
    store._remove(_digest(a))
    store._remove(_digest(c))

    fresh = open_link(link, PAGE_MODEL)
    assert [e.digest for e in fresh.session_state["images"]] == [_digest(b)]
    _upload(fresh, [("c again.png", c)])
    assert [e.digest for e in fresh.session_state["images"]] == [_digest(b), _digest(c)]
    _upload(fresh, [("a again.png", a)])
    assert [e.digest for e in fresh.session_state["images"]] == [
        _digest(a),
        _digest(b),
        _digest(c),
    ]
    assert fresh.session_state["active_image"] == _digest(a)  # the link explains its first
    open_page(fresh, PAGE_NEURON)
    assert fresh.query_params["images"] == link["images"]
