"""Hostile weights-only files: declared layouts that outgrow their bytes are refused up front."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from explainer.demo import build_demo_model
from explainer.errors import ModelLoadError
from explainer.intake import LoadedModel, ModelInfo, describe_model, load_model
from explainer.intake.state_dict import layout_problem


@pytest.fixture(autouse=True)
def _server_defaults(monkeypatch):
    for name in ("EXPLAINER_MAX_CLASSES", "EXPLAINER_MAX_UPLOAD_MB", "EXPLAINER_ALLOW_PICKLE"):
        monkeypatch.delenv(name, raising=False)


def _save(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _demo_state(num_classes: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_demo_model(num_classes).state_dict()


def _head(state: dict[str, torch.Tensor]) -> str:
    return [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1]


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _stride0_classifier(classes: int) -> dict[str, torch.Tensor]:
    state = dict(_demo_state())
    head = _head(state)
    features = state[head].shape[1]
    state[head] = torch.randn(features).as_strided((classes, features), (0, 1))
    state[head[: -len("weight")] + "bias"] = torch.randn(1).as_strided((classes,), (0,))
    return state


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_stride0_classifier_of_40_million_classes_is_refused(legacy):
    data = _save(_stride0_classifier(40_000_000), _use_new_zipfile_serialization=not legacy)
    assert len(data) < 300_000
    before = _rss_kib()
    with pytest.raises(ModelLoadError, match="stride 0") as info:
        load_model(data, arch="demo_cnn", filename="bomb.pt")
    assert _rss_kib() - before < 200 * 1024
    assert str(info.value).startswith("Tensor ")
    assert "bomb.pt" in str(info.value)


def test_the_refusal_holds_under_a_memory_limit():
    """In a process that cannot take 3 GB, the file is refused with a message, not killed."""
    script = textwrap.dedent(
        """
        import io, resource, torch
        resource.setrlimit(resource.RLIMIT_DATA, (3 * 2**30, 3 * 2**30))
        from explainer.demo import build_demo_model
        from explainer.errors import ModelLoadError
        from explainer.intake import load_model
        state = build_demo_model().state_dict()
        head = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1]
        n = state[head].shape[1]
        state[head] = torch.randn(n).as_strided((40_000_000, n), (0, 1))
        state[head[:-6] + "bias"] = torch.randn(1).as_strided((40_000_000,), (0,))
        buffer = io.BytesIO()
        torch.save(state, buffer)
        try:
            load_model(buffer.getvalue(), arch="demo_cnn")
        except ModelLoadError as exc:
            print("refused:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "stride 0" in done.stdout


def test_overlapping_strides_are_refused():
    state = dict(_demo_state())
    head = _head(state)
    rows, cols = state[head].shape
    state[head] = torch.randn(rows + cols).as_strided((rows, cols), (1, 1))
    with pytest.raises(ModelLoadError, match="share memory"):
        load_model(_save(state), arch="demo_cnn")


def test_gaps_between_elements_are_refused():
    state = dict(_demo_state())
    head = _head(state)
    state[head] = torch.randn(state[head].shape[0], state[head].shape[1] * 2)[:, ::2]
    with pytest.raises(ModelLoadError, match="gaps"):
        load_model(_save(state), arch="demo_cnn")


def test_a_storage_shorter_than_its_tensor_is_refused():
    data = _save({"w": torch.zeros(5, 7)})
    # In the pickle, size (5, 7) is "K\x05K\x07\x86"; declare (9, 7) over the 35 stored floats.
    assert data.count(b"K\x05K\x07\x86") == 1
    hostile = data.replace(b"K\x05K\x07\x86", b"K\x09K\x07\x86")
    with pytest.raises(ModelLoadError):
        load_model(hostile, arch="demo_cnn")
    assert "more than its storage" in layout_problem((9, 7), (7, 1), 0, 35 * 4, 4)
    assert "more than its storage" in layout_problem((5, 7), (7, 1), 1, 35 * 4, 4)
    assert layout_problem((5, 7), (7, 1), 0, 35 * 4, 4) is None
    assert layout_problem((7, 5), (1, 7), 0, 35 * 4, 4) is None  # a transposed view is dense


def test_the_class_count_is_bounded_by_the_operator(monkeypatch):
    data = _save(_demo_state(200))
    assert load_model(data, arch="demo_cnn").num_classes == 200
    monkeypatch.setenv("EXPLAINER_MAX_CLASSES", "100")
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_CLASSES") as info:
        load_model(data, arch="demo_cnn")
    assert "200 classes" in str(info.value)
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_CLASSES"):
        load_model(_save(_demo_state()), arch="demo_cnn", num_classes=101)


def test_a_broken_limit_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("EXPLAINER_MAX_CLASSES", "many")
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_CLASSES='many'"):
        load_model(_save(_demo_state()), arch="demo_cnn")


def test_model_info_is_plain_data():
    lm = load_model(_save(_demo_state()), arch="demo_cnn", filename="demo.pt")
    assert isinstance(lm, LoadedModel)
    info = lm.info()
    assert isinstance(info, ModelInfo)
    assert info.labels == tuple(lm.labels) and info.num_classes == lm.num_classes
    assert info.notes == tuple(lm.notes)
    assert describe_model(info) == describe_model(lm)
    assert pickle.loads(pickle.dumps(info)) == info
    with pytest.raises(AttributeError):
        info.name = "other"  # frozen

    def plain(value) -> bool:
        if isinstance(value, tuple):
            return all(plain(v) for v in value)
        return value is None or type(value) in (str, int, float)

    for field in info.__dataclass_fields__:
        assert plain(getattr(info, field)), field
