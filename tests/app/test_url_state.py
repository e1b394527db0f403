"""Views in the address: state to URL, URL to state, bad links and content this server lost."""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from apphelpers import (
    APP,
    PAGE_CONDUCTANCE,
    PAGE_MODEL,
    PAGE_NEURON,
    TIMEOUT,
    open_page,
    png_bytes,
    upload_model,
    visible,
    widget,
)
from streamlit.testing.v1 import AppTest

from explainer.demo import sample_image_paths
from explainer.intake import load_demo_model
from webapp.persist import LINK_PREFIX, UploadStore
from webapp.state import AttributionSettings, PrepSpec


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


@functools.lru_cache(maxsize=1)
def demo_weights() -> bytes:
    """The demo network's weights, changed a little: an upload that is not the built-in model."""
    model = load_demo_model().model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["classifier.weight"] = state["classifier.weight"] * 1.5
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def sample_digest(index: int) -> str:
    return hashlib.sha256(sample_image_paths()[index].read_bytes()).hexdigest()


# --- state -> URL -------------------------------------------------------------------------------
def test_the_address_follows_the_view(app):
    assert app.query_params == {"layer": app.session_state["layer"]}  # defaults are left out
    app.session_state["attr_settings"] = replace(
        AttributionSettings(),
        target=2,
        baseline="blur",
        blur_sigma=3.5,
        method="riemann_left",
        n_steps=20,
    )
    app.session_state["prep"] = PrepSpec("custom", (0.5, 0.4, 0.3), (0.2, 0.2, 0.25))
    app.session_state["active_image"] = sample_digest(2)
    open_page(app, PAGE_NEURON)
    params = app.query_params
    assert params["target"] == "2"
    assert params["baseline"] == "blur" and params["sigma"] == "3.5"
    assert params["method"] == "riemann_left" and params["steps"] == "20"
    assert params["prep"] == "custom" and params["mean"] == "0.5,0.4,0.3"
    assert params["std"] == "0.2,0.2,0.25"
    assert params["image"] == sample_digest(2)[:LINK_PREFIX]
    assert "images" not in params  # the sample images: any server has them
    assert "model" not in params  # the built-in model
    neuron = app.session_state["neuron"]
    assert params["neuron"] == ",".join(map(str, neuron))


def test_a_click_in_a_fragment_updates_the_address(app):
    open_page(app, PAGE_NEURON)
    c, y, x = app.session_state["neuron"]
    widget(app, "number_input", "_w_n1").set_value((y + 1) % 2)
    app.run()
    assert app.session_state["neuron"] == (c, (y + 1) % 2, x)
    assert app.query_params["neuron"] == f"{c},{(y + 1) % 2},{x}"


# --- URL -> state -------------------------------------------------------------------------------
def test_a_link_opens_the_same_view_in_a_new_session(app):
    app.session_state["attr_settings"] = replace(
        AttributionSettings(), target=1, baseline="constant", constant=0.25, n_steps=16
    )
    app.session_state["active_image"] = sample_digest(1)
    open_page(app, PAGE_LAYER_NAME := PAGE_NEURON)
    widget(app, "number_input", "_w_n0").set_value(1)
    app.run()
    link = dict(app.query_params)
    fresh = open_link(link, PAGE_LAYER_NAME)
    for key in ("layer", "neuron", "channel", "attr_settings", "active_image", "prep"):
        assert fresh.session_state[key] == app.session_state[key], key
    assert fresh.query_params == link
    assert not fresh.warning


def test_a_demo_link_works_without_any_store(store_dir):
    params = {
        "layer": "block2",
        "neuron": "1,2,3",
        "method": "riemann_trapezoid",
        "steps": "12",
        "image": sample_digest(3)[:LINK_PREFIX],
    }
    at = open_link(params, PAGE_NEURON)
    assert at.session_state["layer"] == "block2"
    assert at.session_state["neuron"] == (1, 2, 3)
    assert at.session_state["attr_settings"].method == "riemann_trapezoid"
    assert at.session_state["attr_settings"].n_steps == 12
    assert at.session_state["active_image"] == sample_digest(3)
    assert not at.warning and not at.error
    assert not store_dir.exists() or not any(store_dir.rglob("*.meta"))


# --- bad links ----------------------------------------------------------------------------------
BAD = {
    "steps": "many",
    "method": "simpson",
    "baseline": "<img src=x onerror=alert(1)>",
    "neuron": "1,x,3",
    "target": "-4",
    "constant": "nan",
    "prep": "sepia",
    "model": "../../etc/passwd",
    "image": "ZZZZ",
    "layout": "diagonal",
    "position": "1,2,3,4,5",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_value_is_named_and_the_rest_of_the_link_is_kept(name):
    at = open_link({"layer": "block2", "steps": "24", "channel": "5", name: BAD[name]})
    notes = link_notes(at)
    assert "could not be shown in full" in notes
    assert f"The link's **{name}** value" in notes
    assert not at.exception and not at.error
    assert at.session_state["layer"] == "block2"
    assert at.session_state["channel"] == 5
    if name != "steps":
        assert at.session_state["attr_settings"].n_steps == 24
    assert at.session_state["model_ref"].kind == "builtin"


def test_a_layer_the_model_lacks_is_reported_and_the_settings_kept():
    at = open_link({"layer": "block9.conv", "neuron": "1,1,1", "steps": "8"}, PAGE_CONDUCTANCE)
    notes = link_notes(at)
    assert "block9.conv" in notes and "is not in this model" in notes
    assert at.session_state["layer"] != "block9.conv"  # the suggested layer instead
    assert at.session_state["attr_settings"].n_steps == 8


def test_a_target_past_the_last_class_is_reported():
    at = open_link({"target": "9999", "layer": "block2"})
    assert "#9999 does not exist in this model" in link_notes(at)
    assert at.session_state["attr_settings"].target is None


def test_unknown_parameters_are_ignored_and_dismiss_clears_the_notes():
    at = open_link({"utm_source": "mail", "steps": "x"})
    assert "steps" in link_notes(at)
    next(b for b in at.button if b.key == "_w_link_dismiss").click()
    at.run()
    assert not at.warning


# --- content this server does not hold ----------------------------------------------------------
def _upload_everything(at: AppTest) -> AppTest:
    upload_model(at, demo_weights(), "tweaked.pt", "demo_cnn")
    assert at.session_state["model_ref"].kind == "upload"
    widget(at, "file_uploader", "_w_image_files").set_value(
        [("mine.png", png_bytes((10, 200, 30)), "image/png")]
    )
    at.run()
    open_page(at, PAGE_NEURON)
    return at


def test_uploads_come_back_from_the_store_in_a_new_session(app, store_dir):
    at = _upload_everything(app)
    link = dict(at.query_params)
    model_digest = hashlib.sha256(demo_weights()).hexdigest()
    assert link["model"] == model_digest[:LINK_PREFIX] and link["arch"] == "demo_cnn"
    mine = hashlib.sha256(png_bytes((10, 200, 30))).hexdigest()[:LINK_PREFIX]
    assert link["images"].split(",")[-1] == mine
    assert link.get("image", mine) == mine  # written only when it is not the first image
    fresh = open_link(link, PAGE_NEURON)
    ref = fresh.session_state["model_ref"]
    assert (ref.kind, ref.digest, ref.filename, ref.arch) == (
        "upload",
        model_digest,
        "tweaked.pt",
        "demo_cnn",
    )
    assert ref.data == demo_weights()
    assert [e.name for e in fresh.session_state["images"]][-1] == "mine.png"
    assert fresh.session_state["neuron"] == at.session_state["neuron"]
    assert not fresh.warning


def test_an_evicted_model_is_named_and_the_view_returns_when_uploaded_again(app, store_dir):
    at = _upload_everything(app)
    link = dict(at.query_params)
    shutil.rmtree(store_dir)  # evicted, or a link from another server
    fresh = open_link(link, PAGE_NEURON)
    notes = link_notes(fresh)
    assert "The model in this link is no longer on this server" in notes
    assert "upload it again" in notes
    total = len(link["images"].split(","))
    which = "The image" if total == 1 else f"1 of the {total} images"
    assert f"{which} in this link is no longer on this server" in notes
    assert fresh.session_state["model_ref"].kind == "builtin"
    # The address keeps the link's model and the parts that belong to it.
    for key in ("model", "arch", "layer", "neuron"):
        assert fresh.query_params[key] == link[key], key
    open_page(fresh, PAGE_MODEL)
    upload_model(fresh, demo_weights(), "again.pt", "demo_cnn")
    open_page(fresh, PAGE_NEURON)
    assert fresh.session_state["model_ref"].kind == "upload"
    assert fresh.session_state["layer"] == link["layer"]
    assert fresh.session_state["neuron"] == tuple(int(i) for i in link["neuron"].split(","))
    assert not fresh.warning


def test_keeping_the_builtin_model_drops_the_waiting_parts(app, store_dir):
    link = dict(_upload_everything(app).query_params)
    shutil.rmtree(store_dir)
    fresh = open_link(link)
    next(b for b in fresh.button if b.key == "_w_link_dismiss").click()
    fresh.run()
    assert "model" not in fresh.query_params
    assert not fresh.warning


def test_a_damaged_upload_is_reported_as_missing(app, store_dir):
    link = dict(_upload_everything(app).query_params)
    model_digest = hashlib.sha256(demo_weights()).hexdigest()
    path = store_dir / "objects" / model_digest[:2] / model_digest
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    fresh = open_link(link)
    assert "The model in this link is no longer on this server" in link_notes(fresh)
    assert not path.exists()


def test_an_ambiguous_digest_is_not_guessed(store_dir):
    prefix = "ab" * 8
    store = UploadStore(store_dir, 2**20)
    folder = store_dir / "objects" / "ab"
    folder.mkdir(parents=True)
    for tail in ("0" * 48, "1" * 48):
        (folder / (prefix + tail)).write_bytes(b"x")
    del store
    at = open_link({"model": prefix, "layer": "block2"})
    assert "matches more than one file" in link_notes(at)
    assert at.session_state["model_ref"].kind == "builtin"


def test_a_missing_image_falls_back_to_the_samples():
    at = open_link({"images": "0123456789abcdef", "steps": "10"})
    notes = link_notes(at)
    assert "The image in this link is no longer on this server" in notes
    assert "sample images are shown" in notes
    assert len(at.session_state["images"]) == len(sample_image_paths())
    assert at.session_state["attr_settings"].n_steps == 10


def test_a_store_that_keeps_nothing_says_so_on_upload(app, monkeypatch):
    monkeypatch.setenv("EXPLAINER_UPLOAD_STORE_MB", "0")
    widget(app, "file_uploader", "_w_image_files").set_value(
        [("mine.png", png_bytes(), "image/png")]
    )
    app.run()
    assert app.session_state["images"][-1].name == "mine.png"  # the upload still works
    assert "EXPLAINER_UPLOAD_STORE_MB=0" in visible(" ".join(str(i.value) for i in app.info))


def test_a_broken_store_setting_is_a_message_not_a_traceback(monkeypatch):
    monkeypatch.setenv("EXPLAINER_UPLOAD_STORE_MB", "lots")
    at = open_link({"model": "0123456789abcdef", "layer": "block2"})
    notes = link_notes(at)
    assert "EXPLAINER_UPLOAD_STORE_MB" in notes
    assert "no longer on this server" in notes


# --- the parser on its own ----------------------------------------------------------------------
def test_parse_keeps_valid_values_and_names_each_bad_one():
    from webapp.urlstate import parse

    values, notes = parse(
        {
            "neuron": "3,4,5",
            "channel": "9",  # contradicts the neuron: the neuron wins
            "position": "_,7",
            "steps": "0",
            "layer": "features.0\n",
            "images": "0123456789abcdef,not-a-digest,0123456789abcdef",
            "mean": "0.5,0.5,0.5",
            "std": "0.2,0,0.2",
        }
    )
    assert values["neuron"] == (3, 4, 5) and "channel" not in values
    assert values["position"] == (None, 7)
    assert values["images"] == ("0123456789abcdef",)  # duplicates once, bad ones dropped
    assert values["mean"] == (0.5, 0.5, 0.5)
    assert set(values) == {"neuron", "position", "images", "mean"}
    text = " ".join(notes)
    for name in ("steps", "layer", "std"):
        assert f"**{name}**" in text
    assert "1 of the link's image references is not a valid digest" in text


def test_the_layout_chosen_for_the_layer_travels_with_the_link(app):
    app.session_state["layer"] = "block2"
    app.session_state["layouts"] = {"block2": "channels_first", "block1": "channels_first"}
    app.run()
    assert app.query_params["layout"] == "channels_first"
    fresh = open_link(dict(app.query_params))
    assert fresh.session_state["layouts"] == {"block2": "channels_first"}
    assert fresh.session_state["layer"] == "block2"
