"""Hostile uploads through the app: each ends in a plain message naming the cause or the limit,
the previous model stays in use, the server process keeps answering, and no process is left
spinning."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from apphelpers import PAGE_CONDUCTANCE, error_text, open_page, pixel_model_bytes, upload_model
from hostile import (
    Bomb,
    Spin,
    export_bytes,
    json_edit,
    outside_folder_archive,
    rewrite_zip,
    two_program_archive,
    with_input_size,
)

from webapp import backend


def _busy_workers() -> list[int]:
    return [w.pid for w in backend.executor().workers() if w.busy and w.pid is not None]


def _still_on_builtin(app) -> None:
    assert app.session_state["model_ref"].kind == "builtin"
    assert "previous model is still in use" in " ".join(str(i.value) for i in app.info)
    # The server still answers: the explanation pages work on the previous model.
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error, error_text(app)


def test_a_pickle_payload_is_refused_and_never_runs(app, tmp_path):
    marker = tmp_path / "owned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"classifier.weight": Payload()}, buffer)
    upload_model(app, buffer.getvalue(), "weights.pt", "demo_cnn")
    assert "pickled" in error_text(app).lower()
    assert not marker.exists()
    _still_on_builtin(app)


@pytest.mark.parametrize("build", [two_program_archive, outside_folder_archive])
def test_export_archives_that_smuggle_a_pickle_are_refused_and_it_never_runs(app, tmp_path, build):
    marker = tmp_path / "owned"
    upload_model(app, build(pixel_model_bytes(), marker), "smuggler.pt2", "")
    assert "smuggler.pt2" in error_text(app)
    assert not marker.exists()
    _still_on_builtin(app)


def test_a_program_declaring_a_huge_input_is_refused_before_it_runs(app):
    upload_model(app, with_input_size(pixel_model_bytes(), 16000, 16000), "huge.pt2", "")
    text = error_text(app)
    assert "EXPLAINER_MAX_INPUT_PIXELS" in text and "16000x16000" in text, text
    _still_on_builtin(app)


def test_malformed_json_in_a_program_is_said_plainly(app):
    def graph_as_list(program):
        program["graph_module"]["graph"] = [program["graph_module"]["graph"]]
        return program

    broken = rewrite_zip(pixel_model_bytes(), json_edit("models/model.json", graph_as_list))
    upload_model(app, broken, "broken.pt2", "")
    assert "broken.pt2" in error_text(app)
    assert not app.exception
    _still_on_builtin(app)


def test_an_oversized_labels_file_is_refused_and_the_model_not_switched(app, monkeypatch):
    from explainer.demo import demo_weights_path

    monkeypatch.setenv("EXPLAINER_MAX_LABELS_MB", "1")
    labels = "\n".join(f"class number {i} " + "x" * 150 for i in range(8_000)).encode()
    assert len(labels) > 2**20
    upload_model(app, demo_weights_path().read_bytes(), "demo.safetensors", "demo_cnn", labels)
    assert "EXPLAINER_MAX_LABELS_MB" in error_text(app)
    _still_on_builtin(app)


def test_a_stride_zero_weights_file_is_refused_without_blowing_up(app):
    from explainer.demo import build_demo_model

    state = build_demo_model().state_dict()
    # 40 million classes from a few bytes of storage, as a hostile file declares them.
    state["classifier.weight"] = torch.zeros(1, 64).expand(40_000_000, 64)
    state["classifier.bias"] = torch.zeros(1).expand(40_000_000)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert len(buffer.getvalue()) < 1_000_000
    upload_model(app, buffer.getvalue(), "stretched.pt", "demo_cnn")
    assert "stretched.pt" in error_text(app)
    _still_on_builtin(app)


@pytest.mark.slow
def test_a_model_that_never_returns_ends_at_the_time_limit(app, monkeypatch):
    monkeypatch.setenv("EXPLAINER_REQUEST_TIMEOUT_S", "20")
    upload_model(app, export_bytes(Spin()), "spin.pt2", "")
    text = error_text(app)
    assert "20 s" in text and "EXPLAINER_REQUEST_TIMEOUT_S" in text, text
    assert not _busy_workers()  # the spinning worker was stopped, not left on a core
    _still_on_builtin(app)


@pytest.mark.slow
def test_a_memory_bomb_ends_at_the_memory_limit(app, monkeypatch):
    monkeypatch.setenv("EXPLAINER_WORKER_MEMORY_MB", "2048")
    upload_model(app, export_bytes(Bomb()), "bomb.pt2", "")
    text = error_text(app)
    assert "EXPLAINER_WORKER_MEMORY_MB" in text, text
    assert not _busy_workers()
    _still_on_builtin(app)


def test_a_worker_killed_by_hand_leaves_the_app_working(app):
    open_page(app, PAGE_CONDUCTANCE)
    assert not app.error
    for status in backend.executor().workers():
        if status.pid is not None:
            os.kill(status.pid, 9)
    backend.result_cache().clear()  # make the page compute again, on a fresh worker
    app.run()
    assert not app.exception and not app.error, error_text(app)
    assert np.isfinite(float(app.metric[2].value))
