"""Labels files within the operator's limits: bytes, count, name length, plain text."""

from __future__ import annotations

import json

import pytest

from explainer.errors import ModelLoadError
from explainer.intake import load_labels
from explainer.limits import MAX_LABEL_CHARS


@pytest.fixture(autouse=True)
def _server_defaults(monkeypatch):
    monkeypatch.delenv("EXPLAINER_MAX_LABELS_MB", raising=False)
    monkeypatch.delenv("EXPLAINER_MAX_CLASSES", raising=False)


def test_a_labels_file_over_its_byte_limit_is_refused(monkeypatch, tmp_path):
    data = "\n".join(f"class number {i}" for i in range(200)).encode()
    assert len(load_labels(data)) == 200
    monkeypatch.setenv("EXPLAINER_MAX_LABELS_MB", "0.001")  # 1,048 bytes
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_LABELS_MB"):
        load_labels(data)
    path = tmp_path / "labels.txt"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_LABELS_MB"):
        load_labels(path)


@pytest.mark.parametrize(
    "source",
    [
        b"a\nb\nc\nd",
        json.dumps(["a", "b", "c", "d"]).encode(),
        json.dumps({str(i): n for i, n in enumerate("abcd")}).encode(),
        ["a", "b", "c", "d"],
    ],
    ids=["lines", "json-list", "json-dict", "sequence"],
)
def test_more_names_than_the_class_limit_are_refused(monkeypatch, source):
    assert len(load_labels(source)) == 4
    monkeypatch.setenv("EXPLAINER_MAX_CLASSES", "3")
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_CLASSES"):
        load_labels(source)


def test_a_name_longer_than_the_limit_is_refused():
    fits = "x" * MAX_LABEL_CHARS
    assert load_labels([fits, "b"]) == [fits, "b"]
    with pytest.raises(ModelLoadError, match=f"more than the {MAX_LABEL_CHARS}"):
        load_labels(f"a\n{fits}y\n".encode())


@pytest.mark.parametrize(
    "name",
    ["tab\there", "nul\x00", "escape\x1b[31m", "\u202eevil", "iso\u2066late", "c1\x85inside"],
)
def test_names_with_control_characters_are_refused(name):
    with pytest.raises(ModelLoadError, match="control character"):
        load_labels(json.dumps(["ok", name]).encode())
    with pytest.raises(ModelLoadError, match="control character"):
        load_labels(["ok", name])


def test_a_newline_inside_a_json_name_is_refused():
    with pytest.raises(ModelLoadError, match="U\\+000A"):
        load_labels(json.dumps({"0": "two\nlines", "1": "b"}).encode())


def test_json_that_is_neither_list_nor_object_is_refused():
    with pytest.raises(ModelLoadError):
        load_labels(b"[1, 2")
