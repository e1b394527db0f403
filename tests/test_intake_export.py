"""Hostile torch.export archives: every one is refused, and no payload in them ever runs."""

from __future__ import annotations

import io
import logging
import pathlib

import pytest
import torch
from hostile import (
    RunsCode,
    json_edit,
    outside_folder_archive,
    rewrite_zip,
    torch_save_bytes,
    two_program_archive,
    with_input_size,
)
from torch import nn

from explainer.errors import ModelLoadError
from explainer.intake import load_model


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(autouse=True)
def _server_defaults(monkeypatch):
    for name in ("EXPLAINER_ALLOW_PICKLE", "EXPLAINER_MAX_INPUT_PIXELS", "EXPLAINER_MAX_CLASSES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pt2() -> bytes:
    torch.manual_seed(0)
    program = torch.export.export(
        _Tiny().eval(),
        (torch.randn(2, 3, 16, 16),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _torch_export_load_runs_it(data: bytes, target: pathlib.Path) -> bool:
    """Whether torch.export.load itself would run the payload (proves the file is hostile)."""
    logging.disable(logging.WARNING)
    try:
        torch.export.load(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - only the side effect matters here
        pass
    finally:
        logging.disable(logging.NOTSET)
    ran = target.exists()
    target.unlink(missing_ok=True)
    return ran


def test_a_second_program_with_pickled_weights_never_runs(pt2, tmp_path):
    target = tmp_path / "pwned.txt"
    hostile = two_program_archive(pt2, target)
    assert _torch_export_load_runs_it(hostile, target)
    with pytest.raises(ModelLoadError, match="2 programs, not one"):
        load_model(hostile, filename="two.pt2")
    assert not target.exists()


def test_an_entry_outside_the_archive_folder_never_runs(pt2, tmp_path):
    target = tmp_path / "pwned.txt"
    hostile = outside_folder_archive(pt2, target)
    assert _torch_export_load_runs_it(hostile, target)
    with pytest.raises(ModelLoadError, match="outside the archive's folder"):
        load_model(hostile)
    assert not target.exists()


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("archive/extra/notes.txt", b"hello", "unexpected entry"),
        ("archive/data/weights/model.pt", b"\x80\x02N.", "unexpected data file"),
        ("archive/data/constants/custom_obj_0", b"\x80\x02N.", "pickled Python objects"),
        ("archive/data/aotinductor/model/model.so", b"\x7fELF", "AOTInductor"),
        ("other/archive_format", b"pt2", "several top-level folders"),
        ("archive/../escape", b"x", "outside the archive's folder"),
        ("archive//double", b"x", "outside the archive's folder"),
    ],
)
def test_entries_off_the_allowlist_are_refused(pt2, name, content, pattern):
    with pytest.raises(ModelLoadError, match=pattern):
        load_model(rewrite_zip(pt2, extra={name: content}))


def test_pickled_weights_are_refused(pt2, tmp_path):
    target = tmp_path / "pwned.txt"

    def flag(config):
        for payload in config["config"].values():
            payload.update(use_pickle=True, path_name="weight_0")
        return config

    hostile = rewrite_zip(
        pt2,
        json_edit("_weights_config.json", flag),
    )
    hostile = rewrite_zip(
        hostile,
        lambda n, c: torch_save_bytes(RunsCode(target)) if n.endswith("weights/weight_0") else c,
    )
    with pytest.raises(ModelLoadError, match="pickled tensors"):
        load_model(hostile)
    assert not target.exists()


def _program_variants():
    def drop(key):
        def edit(program):
            del program[key]
            return program

        return edit

    def graph_list(program):
        program["graph_module"]["graph"]["tensor_values"] = []
        return program

    def node_target_int(program):
        program["graph_module"]["graph"]["nodes"][0]["target"] = 7
        return program

    def sizes_text(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        next(iter(values.values()))["sizes"] = "16x16"
        return program

    def union_two_keys(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        next(iter(values.values()))["sizes"][0] = {"as_int": 1, "as_expr": {}}
        return program

    def dtype_unknown(program):
        values = program["graph_module"]["graph"]["tensor_values"]
        next(iter(values.values()))["dtype"] = 999
        return program

    return {
        "list": lambda program: [program],
        "no-graph-module": drop("graph_module"),
        "no-schema-version": drop("schema_version"),
        "list-for-dict": graph_list,
        "int-for-str": node_target_int,
        "str-for-list": sizes_text,
        "union-with-two-kinds": union_two_keys,
        "enum-out-of-range": dtype_unknown,
    }


@pytest.mark.parametrize("variant", sorted(_program_variants()))
def test_malformed_program_json_is_a_model_load_error(pt2, variant):
    edit = _program_variants()[variant]
    with pytest.raises(ModelLoadError, match="torch.export archive this server can read"):
        load_model(rewrite_zip(pt2, json_edit("models/model.json", edit)))


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe{}", b'{"graph_module": ', b"", b"[" * 100_000 + b"]" * 100_000],
    ids=["not-utf8", "truncated", "empty", "deep"],
)
def test_unreadable_program_json_is_a_model_load_error(pt2, raw):
    with pytest.raises(ModelLoadError):
        load_model(rewrite_zip(pt2, lambda n, c: raw if n.endswith("models/model.json") else c))


@pytest.mark.parametrize(
    "edit",
    [
        lambda config: [],
        lambda config: {"config": []},
        lambda config: {"config": {"w": {"path_name": "weight_0"}}},
        lambda config: {"config": {"w": {**next(iter(config["config"].values())), "is_param": 1}}},
        lambda config: {
            "config": {k: {**v, "tensor_meta": None} for k, v in config["config"].items()}
        },
    ],
    ids=["list", "config-list", "missing-keys", "int-for-bool", "no-tensor-meta"],
)
def test_malformed_weights_config_is_a_model_load_error(pt2, edit):
    with pytest.raises(ModelLoadError):
        load_model(rewrite_zip(pt2, json_edit("_weights_config.json", edit)))


def _set_layout(fqn: str, sizes, strides, offset: int = 0):
    def edit(config):
        meta = config["config"][fqn]["tensor_meta"]
        meta["sizes"] = [{"as_int": s} for s in sizes]
        meta["strides"] = [{"as_int": s} for s in strides]
        meta["storage_offset"] = {"as_int": offset}
        return config

    return json_edit("_weights_config.json", edit)


@pytest.mark.parametrize(
    "sizes, strides, offset, pattern",
    [
        ((40_000_000, 4), (0, 1), 0, "stride 0"),
        ((5, 4), (1, 1), 0, "share memory"),
        ((5, 4), (4, 1), 8, "more than its storage"),
        ((50, 4), (4, 1), 0, "more than its storage"),
    ],
)
def test_weights_with_unsound_layouts_are_refused(pt2, sizes, strides, offset, pattern):
    with pytest.raises(ModelLoadError, match=pattern):
        load_model(rewrite_zip(pt2, _set_layout("fc.weight", sizes, strides, offset)))


def test_a_huge_input_is_refused_before_anything_is_loaded(pt2):
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_INPUT_PIXELS") as info:
        load_model(with_input_size(pt2, 16000, 16000))
    assert "16000x16000" in str(info.value)


def test_the_input_and_class_limits_are_the_operators(pt2, monkeypatch):
    assert load_model(pt2).input_size == (3, 16, 16)
    monkeypatch.setenv("EXPLAINER_MAX_INPUT_PIXELS", "255")
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_INPUT_PIXELS"):
        load_model(pt2)
    monkeypatch.delenv("EXPLAINER_MAX_INPUT_PIXELS")
    monkeypatch.setenv("EXPLAINER_MAX_CLASSES", "4")
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_CLASSES"):
        load_model(pt2)


def test_a_program_saved_by_torch_still_loads_and_runs(pt2):
    lm = load_model(pt2, filename="tiny.pt2")
    torch.manual_seed(0)
    reference = _Tiny().eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(lm.model(x), reference(x), atol=1e-6)
