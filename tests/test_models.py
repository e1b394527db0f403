"""Tests for explainer.intake: format detection, safe loading, architectures, labels."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import socket
import zipfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save as save_safetensors
from torch import nn

from explainer.analysis import compute_conductance, score_shape
from explainer.errors import ModelLoadError
from explainer.intake import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    build_model,
    describe_model,
    export,
    list_architectures,
    load_labels,
    load_model,
    pickle_allowed,
    registry,
)

# --------------------------------------------------------------------------- helpers


def _save(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _export_bytes(program) -> bytes:
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def _as(kind: str, data: bytes, tmp_path: Path, name: str):
    """The same file as bytes or as a path."""
    if kind == "bytes":
        return data
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _rewrite_zip(data: bytes, mutate: Callable[[str, bytes], bytes]) -> bytes:
    """Copy a zip archive, passing every member through ``mutate``."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            dst.writestr(name, mutate(name, src.read(name)))
    return out.getvalue()


class TinyCNN(nn.Module):
    """A small image classifier that exports in well under a second."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


class _RunsCode:
    """A pickle payload: unpickling it calls ``func(*args)``."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(target: Path) -> list[_RunsCode]:
    return [
        _RunsCode(exec, f"open({str(target)!r}, 'w').write('pwned')"),
        _RunsCode(Path.write_text, target, "pwned"),
    ]


@pytest.fixture(autouse=True)
def _no_pickle_opt_in(monkeypatch):
    # Tests start from the server default, whatever the environment running them says.
    monkeypatch.delenv("EXPLAINER_ALLOW_PICKLE", raising=False)
    monkeypatch.delenv("EXPLAINER_MAX_UPLOAD_MB", raising=False)


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=10).eval()


@pytest.fixture(scope="module")
def mobilenet_sd_bytes(mobilenet) -> bytes:
    return _save(mobilenet.state_dict())


@pytest.fixture(scope="module")
def mobilenet_export_bytes(mobilenet) -> bytes:
    program = torch.export.export(
        mobilenet,
        (torch.randn(2, 3, 64, 64),),
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    return _export_bytes(program)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(1)
    return TinyCNN().eval()


@pytest.fixture(scope="module")
def tiny_dynamic_export(tiny) -> bytes:
    program = torch.export.export(
        tiny, (torch.randn(2, 3, 16, 16),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    return _export_bytes(program)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _check_common(lm: LoadedModel, data: bytes) -> None:
    assert isinstance(lm, LoadedModel)
    assert not lm.model.training
    assert all(not m.training for m in lm.model.modules())
    assert lm.sha256 == hashlib.sha256(data).hexdigest()
    assert lm.num_params == sum(p.numel() for p in lm.model.parameters())


# --------------------------------------------------------------------------- architectures


def test_list_architectures_is_torchvision_plus_demo():
    names = list_architectures()
    assert names == sorted(names)
    assert len(names) == len(set(names))
    assert "demo_cnn" in names
    assert {"resnet18", "mobilenet_v3_small", "vit_b_16", "inception_v3"} <= set(names)
    assert {"fcn_resnet50", "deeplabv3_resnet101", "lraspp_mobilenet_v3_large"} <= set(names)
    assert set(names) - {"demo_cnn"} == set(
        torchvision.models.list_models(module=torchvision.models)
    ) | set(SEGMENTATION_ARCHS)


def test_unknown_architecture_suggests_close_names(mobilenet_sd_bytes):
    with pytest.raises(ModelLoadError, match="resnet19") as info:
        load_model(mobilenet_sd_bytes, arch="resnet19")
    assert "resnet18" in str(info.value)
    with pytest.raises(ModelLoadError, match="mobilenet_v3_small"):
        build_model("mobilenet_v3_smal")


def test_architecture_name_is_case_insensitive(mobilenet_sd_bytes):
    assert load_model(mobilenet_sd_bytes, arch="MobileNet_V3_Small").arch == "mobilenet_v3_small"


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("kind", ["path", "bytes"])
def test_state_dict_round_trip(kind, tmp_path, mobilenet, mobilenet_sd_bytes, image):
    source = _as(kind, mobilenet_sd_bytes, tmp_path, "weights.pth")
    lm = load_model(source, arch="mobilenet_v3_small")
    _check_common(lm, mobilenet_sd_bytes)
    assert lm.arch == "mobilenet_v3_small"
    assert lm.source_format == "state_dict"
    assert lm.num_classes == 10  # read from the classifier's weight
    assert lm.labels == [f"class {i}" for i in range(10)]
    assert lm.input_size == (3, 224, 224)
    assert lm.mean == IMAGENET_MEAN and lm.std == IMAGENET_STD
    assert lm.static_batch is None
    assert lm.name == ("weights.pth" if kind == "path" else "the uploaded model file")
    with torch.no_grad():
        assert torch.equal(lm.model(image), mobilenet(image))


def test_filename_names_an_upload(mobilenet_sd_bytes):
    lm = load_model(mobilenet_sd_bytes, filename="/some/dir/mine.pt", arch="mobilenet_v3_small")
    assert lm.name == "mine.pt"


def test_legacy_non_zip_state_dict(mobilenet, image):
    data = _save(mobilenet.state_dict(), _use_new_zipfile_serialization=False)
    assert not data.startswith(b"PK")
    lm = load_model(data, arch="mobilenet_v3_small")
    with torch.no_grad():
        assert torch.equal(lm.model(image), mobilenet(image))


@pytest.mark.parametrize(
    "wrapper, prefix",
    [
        ("state_dict", ""),
        ("model", ""),
        ("model_state_dict", ""),
        ("net", ""),
        ("state_dict", "module."),
    ],
)
def test_wrapped_and_prefixed_state_dicts(wrapper, prefix, mobilenet, image):
    state = {prefix + k: v for k, v in mobilenet.state_dict().items()}
    data = _save({wrapper: state, "epoch": 7, "optimizer": {"lr": 0.1}})
    lm = load_model(data, arch="mobilenet_v3_small")
    assert any(wrapper in note for note in lm.notes)
    assert any("module." in note for note in lm.notes) == bool(prefix)
    with torch.no_grad():
        assert torch.equal(lm.model(image), mobilenet(image))


def test_module_prefix_without_wrapper(mobilenet, image):
    data = _save({"module." + k: v for k, v in mobilenet.state_dict().items()})
    lm = load_model(data, arch="mobilenet_v3_small")
    with torch.no_grad():
        assert torch.equal(lm.model(image), mobilenet(image))


def test_num_classes_given_must_match_the_file(mobilenet_sd_bytes):
    assert (
        load_model(mobilenet_sd_bytes, arch="mobilenet_v3_small", num_classes=10).num_classes == 10
    )
    with pytest.raises(ModelLoadError, match=r"10 outputs.*7 classes"):
        load_model(mobilenet_sd_bytes, arch="mobilenet_v3_small", num_classes=7)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "10"])
def test_num_classes_must_be_a_positive_int(bad, mobilenet_sd_bytes):
    with pytest.raises(ModelLoadError, match="number of classes"):
        load_model(mobilenet_sd_bytes, arch="mobilenet_v3_small", num_classes=bad)


def test_missing_architecture_uses_the_one_that_fits(mobilenet_sd_bytes):
    lm = load_model(mobilenet_sd_bytes, filename="w.pt")
    assert lm.arch == "mobilenet_v3_small"  # mobilenet_v3_large: same layer names, other shapes
    assert any("detected from the file: mobilenet_v3_small" in note for note in lm.notes)


def test_missing_architecture_with_several_fits_lists_them(mobilenet_sd_bytes, monkeypatch):
    from explainer.intake import registry

    monkeypatch.setattr(
        registry, "_fitting_architectures", lambda shapes: ["mobilenet_v3_small", "resnet18"]
    )
    with pytest.raises(ModelLoadError, match="pick the architecture") as info:
        load_model(mobilenet_sd_bytes, filename="w.pt")
    message = str(info.value)
    assert "w.pt" in message
    assert "match this file: mobilenet_v3_small, resnet18." in message


def test_missing_architecture_with_no_fit_says_so(monkeypatch, mobilenet_sd_bytes):
    from explainer.intake import registry

    monkeypatch.setattr(registry, "_fitting_architectures", lambda shapes: [])
    with pytest.raises(ModelLoadError, match="pick the architecture") as info:
        load_model(mobilenet_sd_bytes, filename="w.pt")
    assert "export it with torch.export" in str(info.value)


def test_key_mismatch_names_keys_and_suggests_fitting_architectures(mobilenet_sd_bytes):
    with pytest.raises(ModelLoadError) as info:
        load_model(mobilenet_sd_bytes, arch="resnet18", filename="w.pt")
    message = str(info.value)
    assert "do not fit resnet18" in message
    assert "conv1.weight" in message  # a missing key
    assert "features.0.0.weight" in message  # an unexpected key
    assert "match this file: mobilenet_v3_small" in message


def test_shape_mismatch_is_explained():
    torch.manual_seed(0)
    small = torchvision.models.mnasnet0_5(num_classes=3)
    data = _save(small.state_dict())
    with pytest.raises(ModelLoadError, match="other shapes") as info:
        load_model(data, arch="mnasnet1_0")
    assert "mnasnet0_5" in str(info.value)  # same names, and the shapes fit this one


def test_weights_of_no_known_architecture():
    data = _save(TinyCNN().state_dict())
    with pytest.raises(ModelLoadError, match="torch.export"):
        load_model(data, arch="resnet18")


def test_half_precision_weights_are_converted(mobilenet, image):
    data = _save(
        {k: v.half() if v.is_floating_point() else v for k, v in mobilenet.state_dict().items()}
    )
    lm = load_model(data, arch="mobilenet_v3_small")
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert any("float16" in note for note in lm.notes)
    with torch.no_grad():
        assert torch.allclose(lm.model(image), mobilenet(image), atol=0.05)


def test_missing_batchnorm_counters_are_tolerated(mobilenet, image):
    state = {k: v for k, v in mobilenet.state_dict().items() if "num_batches_tracked" not in k}
    lm = load_model(_save(state), arch="mobilenet_v3_small")
    with torch.no_grad():
        assert torch.equal(lm.model(image), mobilenet(image))


def test_googlenet_weights_with_and_without_aux_heads(image):
    torch.manual_seed(0)
    with_aux = torchvision.models.googlenet(aux_logits=True, init_weights=True, num_classes=4)
    state = with_aux.eval().state_dict()
    lm = load_model(_save(state), arch="googlenet")
    assert lm.model.aux1 is None and lm.model.aux2 is None  # training-only heads removed
    assert any("auxiliary" in note for note in lm.notes)
    assert lm.num_classes == 4
    with torch.no_grad():
        assert torch.equal(lm.model(image), with_aux(image))
    no_aux = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    assert load_model(_save(no_aux), arch="googlenet").num_classes == 4


# --------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("kind", ["path", "bytes"])
def test_safetensors_round_trip(kind, tmp_path, mobilenet, image):
    data = save_safetensors({k: v.contiguous() for k, v in mobilenet.state_dict().items()})
    source = _as(kind, data, tmp_path, "model.bin")  # the extension does not matter
    lm = load_model(source, arch="mobilenet_v3_small")
    _check_common(lm, data)
    assert lm.source_format == "safetensors"
    assert lm.num_classes == 10
    with torch.no_grad():
        assert torch.equal(lm.model(image), mobilenet(image))


def test_truncated_safetensors(mobilenet):
    data = save_safetensors({k: v.contiguous() for k, v in mobilenet.state_dict().items()})
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(data[: len(data) // 2], arch="mobilenet_v3_small")


# --------------------------------------------------------------------------- segmentation

SEGMENTATION_ARCHS = sorted(torchvision.models.list_models(module=torchvision.models.segmentation))
VOC_CATEGORIES = torchvision.models.segmentation.DeepLabV3_ResNet50_Weights.DEFAULT.meta[
    "categories"
]


class _DownloadAttemptedError(AssertionError):
    """Raised by the download guard: something tried to fetch weights."""


@pytest.fixture
def no_downloads(monkeypatch):
    """Make every way torchvision fetches weights (and any network connection) raise."""
    import torchvision._internally_replaced_utils as replaced
    import torchvision.models._api as api

    def refuse(*args, **kwargs):
        raise _DownloadAttemptedError(f"a download was attempted ({args[:1]})")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(replaced, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _segmentation_net(arch: str, num_classes: int, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.get_model(
        arch, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )
    return net.eval()


@pytest.fixture(scope="module")
def lraspp() -> nn.Module:
    return _segmentation_net("lraspp_mobilenet_v3_large", 3)


@pytest.fixture
def small_image() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_the_download_guard_catches_torchvisions_default_backbone_weights(no_downloads):
    # Without weights_backbone=None the builder fetches ImageNet weights: the guard must see it.
    with pytest.raises(_DownloadAttemptedError):
        torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, num_classes=3)


@pytest.mark.parametrize("aux", [True, False], ids=["with_aux", "without_aux"])
def test_segmentation_state_dict_with_and_without_aux_head(aux, small_image):
    net = _segmentation_net("deeplabv3_mobilenet_v3_large", 4, aux_loss=aux)
    state = net.state_dict()
    assert any(k.startswith("aux_classifier.") for k in state) == aux
    data = _save(state)
    lm = load_model(data, arch="deeplabv3_mobilenet_v3_large")
    _check_common(lm, data)
    assert lm.arch == "deeplabv3_mobilenet_v3_large"
    assert lm.source_format == "state_dict"
    assert lm.num_classes == 4  # read from the classifier's last convolution
    assert lm.labels == [f"class {i}" for i in range(4)]
    assert lm.input_size == (3, 224, 224)
    assert lm.output_shape == (4, 224, 224)
    assert lm.mean == IMAGENET_MEAN and lm.std == IMAGENET_STD
    assert lm.model.aux_classifier is None  # the training-only head is not kept
    assert any("aux_classifier" in note for note in lm.notes) == aux
    assert any("224 × 224" in note and "520" in note for note in lm.notes)
    with torch.no_grad():
        got, want = lm.model(small_image), net(small_image)
    assert list(got) == ["out"]
    assert list(want) == (["out", "aux"] if aux else ["out"])
    assert torch.equal(got["out"], want["out"])
    with pytest.raises(ModelLoadError, match=r"classifier\.4\.weight\) has 4 outputs"):
        load_model(data, arch="deeplabv3_mobilenet_v3_large", num_classes=7)


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_lraspp_round_trip(fmt, lraspp, small_image):
    state = lraspp.state_dict()
    if fmt == "safetensors":
        data = save_safetensors({k: v.contiguous() for k, v in state.items()})
    else:
        data = _save(state)
    lm = load_model(data, arch="lraspp_mobilenet_v3_large", filename="seg.bin")
    _check_common(lm, data)
    assert lm.source_format == fmt
    assert (lm.arch, lm.num_classes, lm.output_shape) == (
        "lraspp_mobilenet_v3_large",
        3,
        (3, 224, 224),
    )
    assert not any("aux" in note for note in lm.notes)  # LR-ASPP has no auxiliary head
    with torch.no_grad():
        assert torch.equal(lm.model(small_image)["out"], lraspp(small_image)["out"])
    rows = describe_model(lm)
    assert rows["Output"] == "3 class scores at each of 224 × 224 positions"
    # The shape the loader reports is the one a forward pass at the default input size gives.
    assert score_shape(lm.model, torch.zeros(1, *lm.input_size)) == lm.output_shape


def test_segmentation_file_under_the_wrong_architecture_names_the_fitting_one(lraspp):
    data = _save(lraspp.state_dict())
    for wrong in ("deeplabv3_mobilenet_v3_large", "mobilenet_v3_large"):
        with pytest.raises(ModelLoadError) as info:
            load_model(data, arch=wrong, filename="seg.pt")
        message = str(info.value)
        assert f"seg.pt do not fit {wrong}" in message
        assert message.endswith(
            "Architectures whose layers match this file: lraspp_mobilenet_v3_large."
        )
    detected = load_model(data, filename="seg.pt")
    assert detected.arch == "lraspp_mobilenet_v3_large"


def test_voc_labels_for_21_class_segmentation_files(small_image):
    net = _segmentation_net("lraspp_mobilenet_v3_large", 21)
    lm = load_model(_save(net.state_dict()), arch="lraspp_mobilenet_v3_large")
    assert lm.labels == VOC_CATEGORIES
    assert lm.labels[:2] == ["__background__", "aeroplane"]
    # Other class counts get generic names; a 21-class classifier does not get VOC's.
    assert build_model("resnet18", num_classes=21).labels[0] == "class 0"


@pytest.mark.parametrize("arch", SEGMENTATION_ARCHS)
def test_segmentation_architectures_build_and_load_without_downloading(arch, no_downloads):
    built = build_model(arch)
    assert built.arch == arch and built.source_format == "torchvision"
    assert built.labels == VOC_CATEGORIES  # 21 classes by default
    assert built.output_shape == (21, 224, 224)
    assert getattr(built.model, "aux_classifier", None) is None
    assert any("random weights" in note for note in built.notes)
    data = _save(built.model.state_dict())
    lm = load_model(data, arch=arch)
    assert (lm.arch, lm.num_classes) == (arch, 21)
    for a, b in zip(lm.model.state_dict().values(), built.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if "mobilenet" in arch:  # the resnet ones are too slow to run here
        with torch.no_grad():
            out = lm.model(torch.zeros(1, 3, 48, 40))
        assert list(out) == ["out"] and out["out"].shape == (1, 21, 48, 40)


def test_pickled_segmentation_model_is_identified(monkeypatch, small_image):
    monkeypatch.setenv("EXPLAINER_ALLOW_PICKLE", "1")
    net = _segmentation_net("deeplabv3_mobilenet_v3_large", 2, aux_loss=True)
    lm = load_model(_save(net))
    assert lm.arch == "deeplabv3_mobilenet_v3_large"
    assert lm.source_format == "pickle"
    assert lm.input_size == (3, 224, 224)
    assert lm.num_classes == 2
    assert any("224 × 224" in note for note in lm.notes)


def test_pretrained_segmentation_from_cache(monkeypatch, tmp_path, small_image, no_downloads):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(registry, "_HASH_IN_NAME", re.compile(r"(?!)"))
    weights = torchvision.models.segmentation.DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT
    path = tmp_path / "checkpoints" / Path(weights.url).name
    path.parent.mkdir()
    reference = _segmentation_net("deeplabv3_mobilenet_v3_large", 21, aux_loss=True)
    path.write_bytes(_save(reference.state_dict()))  # torchvision's file holds the aux head too
    lm = build_model("deeplabv3_mobilenet_v3_large", pretrained=True)
    assert lm.labels == VOC_CATEGORIES
    assert lm.output_shape == (21, 224, 224)
    assert lm.model.aux_classifier is None
    assert any("aux_classifier" in note for note in lm.notes)
    with torch.no_grad():
        assert torch.equal(lm.model(small_image)["out"], reference(small_image)["out"])


def test_conductance_through_a_loaded_segmentation_model(lraspp):
    lm = load_model(_save(lraspp.state_dict()), arch="lraspp_mobilenet_v3_large")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    result = compute_conductance(
        lm.model, "classifier.cbr", x, (1, 30, 17), torch.zeros_like(x), n_steps=4
    )
    assert result.target == (1, 30, 17)
    assert result.attributions.shape == (128, 4, 4)  # output stride 16
    assert np.isfinite(result.attributions).all()
    assert np.isfinite(result.delta) and np.isfinite(result.output_diff)
    with torch.no_grad():
        want = (lm.model(x)["out"] - lm.model(torch.zeros_like(x))["out"])[0, 1, 30, 17].item()
    assert result.output_diff == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert result.delta == pytest.approx(float(result.attributions.sum()) - want, abs=1e-4)


# --------------------------------------------------------------------------- torch.export


@pytest.mark.parametrize("kind", ["path", "bytes"])
def test_export_dynamic_batch(kind, tmp_path, tiny, tiny_dynamic_export):
    source = _as(kind, tiny_dynamic_export, tmp_path, "model.pt2")
    lm = load_model(source)
    _check_common(lm, tiny_dynamic_export)
    assert lm.source_format == "export"
    assert lm.static_batch is None
    assert not any("fixed batch" in note for note in lm.notes)
    assert lm.input_size == (3, 16, 16)  # from the exported input shape
    assert lm.arch == "custom"
    assert lm.labels == [f"class {i}" for i in range(5)]
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(lm.model(x), tiny(x), atol=1e-6)


def test_export_of_a_torchvision_model(mobilenet, mobilenet_export_bytes, image):
    lm = load_model(mobilenet_export_bytes, filename="mobilenet.pt2")
    _check_common(lm, mobilenet_export_bytes)
    assert lm.arch == "mobilenet_v3_small"  # recognised from its tensors
    assert lm.num_classes == 10
    assert lm.input_size == (3, 64, 64)
    assert lm.mean == IMAGENET_MEAN
    batch4 = torch.cat([image, image[:1]])
    seen = []
    # Unflattened programs keep their submodules, so hooks on a layer fire.
    handle = lm.model.features.get_submodule("0").register_forward_hook(
        lambda module, args, out: seen.append(tuple(out.shape))
    )
    try:
        with torch.no_grad():
            out = lm.model(batch4)
    finally:
        handle.remove()
    assert seen == [(4, 16, 32, 32)]
    with torch.no_grad():
        assert torch.allclose(out, mobilenet(batch4), atol=1e-5)


def test_export_static_batch_loads_with_a_note(tiny):
    program = torch.export.export(tiny, (torch.randn(2, 3, 16, 16),))
    data = _export_bytes(program)
    lm = load_model(data, filename="fixed.pt2", arch="resnet18")
    assert lm.static_batch == 2
    assert lm.arch == "custom"
    assert lm.input_size == (3, 16, 16)
    assert lm.num_classes == 5
    note = " ".join(lm.notes)
    assert "fixed batch size of 2" in note
    assert "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}" in note
    assert "architecture (resnet18) was not needed" in note
    assert "normalisation" in note
    assert describe_model(lm)["Batch size"] == "fixed at 2"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(lm.model(x), tiny(x), atol=1e-6)


def test_export_dynamic_image_size():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.MaxPool2d(3, 2, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(
        net,
        (torch.randn(2, 3, 40, 48),),
        dynamic_shapes={"input": {0: torch.export.Dim("batch"), 2: auto, 3: auto}},
    )
    lm = load_model(_export_bytes(program))  # shape expressions with Add, Mul, FloorDiv pass
    assert lm.input_size == (3, 40, 48)  # the example input's size
    assert any("several image sizes" in note for note in lm.notes)
    x = torch.randn(3, 3, 56, 72)
    with torch.no_grad():
        assert torch.allclose(lm.model(x), net(x), atol=1e-6)


class _PerPixel(nn.Module):
    """Two class scores at every pixel, ``(N, 2, H, W)``, optionally inside another output."""

    def __init__(self, wrap: str = "") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)
        self.wrap = wrap

    def forward(self, x: torch.Tensor):
        scores = self.head(torch.relu(self.conv(x)))
        if self.wrap == "dict":
            return {"aux": scores[:, :1], "out": scores}
        if self.wrap == "columns":
            return scores.mean(dim=2)  # (N, 2, W)
        if self.wrap == "tuple":
            return scores, scores
        if self.wrap == "keys":
            return {"masks": scores}
        if self.wrap == "mean":
            return scores.mean(dim=(1, 2, 3))
        if self.wrap == "argmax":
            return scores.argmax(dim=1)
        return scores


def _export_per_pixel(wrap: str = "", dynamic_size: bool = False) -> bytes:
    torch.manual_seed(6)
    dims = {0: torch.export.Dim("batch")}
    if dynamic_size:
        dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    program = torch.export.export(
        _PerPixel(wrap).eval(), (torch.randn(2, 3, 32, 24),), dynamic_shapes={"x": dims}
    )
    return _export_bytes(program)


@pytest.mark.parametrize(
    ("wrap", "shape"), [("", (2, 32, 24)), ("dict", (2, 32, 24)), ("columns", (2, 24))]
)
def test_export_with_scores_per_position_takes_classes_from_dimension_1(wrap, shape):
    lm = load_model(_export_per_pixel(wrap), filename="seg.pt2")
    assert lm.num_classes == 2  # not 24, the last dimension
    assert lm.labels == ["class 0", "class 1"]
    assert lm.output_shape == shape
    assert lm.input_size == (3, 32, 24)
    grid = " × ".join(str(d) for d in shape[1:])
    assert describe_model(lm)["Output"] == f"2 class scores at each of {grid} positions"
    with pytest.raises(ModelLoadError, match="2 outputs, but 3 classes"):
        load_model(_export_per_pixel(wrap), num_classes=3)


def test_export_with_a_dynamic_output_size_leaves_the_output_shape_open():
    lm = load_model(_export_per_pixel(dynamic_size=True))
    assert lm.num_classes == 2
    assert lm.output_shape is None
    assert "Output" not in describe_model(lm)


@pytest.mark.parametrize(
    ("wrap", "pattern"),
    [
        ("tuple", r"returns a tuple of 2 tensors.*return self\.model\(x\)\[0\]"),
        ("keys", r"returns a dict \(keys: 'masks'\).*return self\.model\(x\)\['masks'\]"),
        ("mean", r"returns scores shaped \(N,\): one number per image"),
        ("argmax", r"returns torch\.int64 values shaped \(N, 32, 24\) \(class indices\?\)"),
    ],
)
def test_export_without_class_scores_is_refused_with_what_to_do(wrap, pattern):
    with pytest.raises(ModelLoadError, match=pattern) as info:
        load_model(_export_per_pixel(wrap), filename=f"{wrap}.pt2")
    assert str(info.value).startswith(f"{wrap}.pt2 returns")
    assert "export" in str(info.value).lower()


def test_classifiers_know_their_output_shape(tiny_dynamic_export, mobilenet_sd_bytes):
    assert load_model(tiny_dynamic_export).output_shape == (5,)
    lm = load_model(mobilenet_sd_bytes, arch="mobilenet_v3_small")
    assert lm.output_shape == (10,)
    assert build_model("resnet18", num_classes=7).output_shape == (7,)


def test_export_num_classes_mismatch(tiny_dynamic_export):
    with pytest.raises(ModelLoadError, match="5 outputs"):
        load_model(tiny_dynamic_export, num_classes=3)


def test_export_with_code_in_a_shape_expression_is_refused(tmp_path, tiny_dynamic_export):
    target = tmp_path / "pwned.txt"

    def inject(name: str, content: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return content
        text = content.decode()
        assert '"expr_str": "' in text
        code = f"__import__('pathlib').Path('{target}').write_text('x') and "
        return text.replace('"expr_str": "', '"expr_str": "' + code, 1).encode()

    with pytest.raises(ModelLoadError, match="shape expression"):
        load_model(_rewrite_zip(tiny_dynamic_export, inject))
    assert not target.exists()


def test_export_example_inputs_are_never_unpickled(tmp_path, tiny_dynamic_export):
    target = tmp_path / "pwned.txt"
    evil = _save(((_payloads(target)[0],), {}))

    def swap(name: str, content: bytes) -> bytes:
        return evil if "sample_inputs" in name else content

    lm = load_model(_rewrite_zip(tiny_dynamic_export, swap))  # the example inputs are ignored
    assert lm.input_size == (3, 16, 16)  # read from the program's own shape hints
    assert not target.exists()


def test_export_calling_an_arbitrary_function_is_refused(tiny_dynamic_export):
    def retarget(name: str, content: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return content
        text = content.decode()
        return text.replace('"torch.ops.aten.relu.default"', '"torch.os.system"', 1).encode()

    with pytest.raises(ModelLoadError, match="torch.os.system"):
        load_model(_rewrite_zip(tiny_dynamic_export, retarget))


def test_export_with_pickled_weights_is_refused(tiny_dynamic_export):
    def flag(name: str, content: bytes) -> bytes:
        if not name.endswith("_weights_config.json"):
            return content
        config = json.loads(content)
        for payload in config["config"].values():
            payload["use_pickle"] = True
        return json.dumps(config).encode()

    with pytest.raises(ModelLoadError, match="pickled tensors"):
        load_model(_rewrite_zip(tiny_dynamic_export, flag))


@pytest.mark.parametrize(
    "expr, safe",
    [
        ("Symbol('s77', positive=True, integer=True)", True),
        ("FloorDiv(s0 - 1, 2) + 1", True),
        ("Max(1, 2*s0 + u1) // 3", True),
        ("Eq(Mod(s0, 2), 0)", True),
        ("Mul(Integer(64), Pow(Symbol('s1', positive=True, integer=True), Integer(-1)))", True),
        ("Float('0.5', precision=53)", True),
        ("Pow(Integer(9), Integer(99999999))", False),
        ("__import__('os').system('ls')", False),
        ("s0.__class__", False),
        ("Symbol('x; import os')", False),
        ("9**9**9**9", False),
        ("PowByNatural(9, 99999999)", False),
        ("lambda: 1", False),
    ],
)
def test_shape_expression_check(expr, safe):
    assert (export._unsafe_expression(expr) is None) is safe


# --------------------------------------------------------------------------- refused formats


def test_torchscript_is_refused(tiny, tmp_path):
    path = tmp_path / "scripted.pt"
    with pytest.warns(FutureWarning):  # TorchScript itself is deprecated
        torch.jit.save(torch.jit.script(tiny), path)
    with pytest.raises(ModelLoadError, match="TorchScript") as info:
        load_model(path)
    message = str(info.value)
    assert "hooks" in message
    assert "state_dict" in message and "safetensors" in message and ".pt2" in message


def test_pickled_module_is_refused_by_default(mobilenet):
    assert not pickle_allowed()
    with pytest.raises(ModelLoadError, match="pickle") as info:
        load_model(_save(mobilenet), filename="whole.pt")
    message = str(info.value)
    assert "MobileNetV3" in message
    assert "runs code" in message
    assert "EXPLAINER_ALLOW_PICKLE=1" in message


@pytest.mark.parametrize("payload", [0, 1], ids=["exec", "write_text"])
@pytest.mark.parametrize("container", ["torch.save", "pickle"])
def test_malicious_pickle_never_runs(payload, container, tmp_path):
    target = tmp_path / "pwned.txt"
    evil = _payloads(target)[payload]
    data = _save(evil) if container == "torch.save" else pickle.dumps(evil)
    with pytest.raises(ModelLoadError, match="refuses"):
        load_model(data)
    assert not target.exists()
    path = tmp_path / "model.pth"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError):
        load_model(path, arch="resnet18")
    assert not target.exists()


@pytest.mark.parametrize(
    "value, expected", [("1", True), ("true", True), ("0", False), ("", False)]
)
def test_pickle_allowed_reads_the_environment_each_call(value, expected, monkeypatch):
    monkeypatch.setenv("EXPLAINER_ALLOW_PICKLE", value)
    assert pickle_allowed() is expected


def test_pickled_module_loads_when_the_operator_allows(monkeypatch, tmp_path):
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6)
    ).eval()
    data = _save(net)
    with pytest.raises(ModelLoadError):
        load_model(data)
    monkeypatch.setenv("EXPLAINER_ALLOW_PICKLE", "1")
    for source in (data, _as("path", data, tmp_path, "net.pt"), _save({"model": net, "epoch": 1})):
        lm = load_model(source)
        assert lm.source_format == "pickle"
        assert lm.arch == "custom"
        assert lm.num_classes == 6
        assert lm.input_size == (1, 224, 224)
        assert not lm.model.training
        x = torch.randn(2, 1, 20, 20)
        with torch.no_grad():
            assert torch.equal(lm.model(x), net(x))


def test_allowed_pickle_of_a_torchvision_model_is_recognised(monkeypatch, mobilenet, image):
    monkeypatch.setenv("EXPLAINER_ALLOW_PICKLE", "1")
    lm = load_model(_save(mobilenet))
    assert lm.arch == "mobilenet_v3_small"
    assert lm.num_classes == 10
    with torch.no_grad():
        assert torch.equal(lm.model(image), mobilenet(image))


def test_allowed_pickle_must_hold_a_module(monkeypatch):
    monkeypatch.setenv("EXPLAINER_ALLOW_PICKLE", "1")
    with pytest.raises(ModelLoadError, match="not a torch.nn.Module"):
        load_model(_save(Fraction(1, 3)))


# --------------------------------------------------------------------------- broken files


def test_empty_file(tmp_path):
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(b"")
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.pt is empty"):
        load_model(path)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no model file"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="folder"):
        load_model(tmp_path)


def test_truncated_zip(mobilenet_sd_bytes):
    with pytest.raises(ModelLoadError, match="damaged or incomplete"):
        load_model(mobilenet_sd_bytes[: len(mobilenet_sd_bytes) // 2], arch="mobilenet_v3_small")


def test_corrupt_archive(mobilenet_sd_bytes):
    data = bytearray(mobilenet_sd_bytes)
    middle = len(data) // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    with pytest.raises(ModelLoadError, match="damaged"):
        load_model(bytes(data), arch="mobilenet_v3_small")


def test_corrupt_export_archive(tiny_dynamic_export):
    data = bytearray(tiny_dynamic_export)
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    with pytest.raises(ModelLoadError):
        load_model(bytes(data))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(seed):
    data = random.Random(seed).randbytes(4096)
    with pytest.raises(ModelLoadError):
        load_model(data, arch="resnet18")


def test_random_bytes_behind_a_pickle_header():
    with pytest.raises(ModelLoadError, match="plain Python pickle"):
        load_model(b"\x80\x02" + random.Random(5).randbytes(512), arch="resnet18")
    legacy = _save({}, _use_new_zipfile_serialization=False)[:14]  # torch's legacy magic number
    with pytest.raises(ModelLoadError, match="could not be read"):
        load_model(legacy + random.Random(5).randbytes(512), arch="resnet18")


@pytest.mark.parametrize(
    "data, filename, expected",
    [
        (b"just some text, not a model\n" * 20, "notes.pt", "not a model file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "cat.pt", "PNG image"),
        (b"\x89HDF\r\n\x1a\n" + bytes(100), "keras.h5", "HDF5"),
        (b"\x08\x07\x12\x04onnx" + bytes(100), "model.onnx", "ONNX"),
    ],
)
def test_unknown_formats(data, filename, expected):
    with pytest.raises(ModelLoadError, match=expected) as info:
        load_model(data, filename=filename)
    assert ".safetensors" in str(info.value)


def test_zip_that_pytorch_did_not_write():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError, match="not one PyTorch wrote"):
        load_model(buf.getvalue())


def test_non_tensor_contents():
    with pytest.raises(ModelLoadError, match="not tensors"):
        load_model(_save({"epoch": 3, "name": "run"}), arch="resnet18")
    with pytest.raises(ModelLoadError, match="holds a list"):
        load_model(_save([1, 2, 3]), arch="resnet18")
    with pytest.raises(ModelLoadError, match="empty dictionary"):
        load_model(_save({}), arch="resnet18")


def test_size_limit(monkeypatch, tmp_path, mobilenet_sd_bytes):
    monkeypatch.setenv("EXPLAINER_MAX_UPLOAD_MB", "1")
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_UPLOAD_MB"):
        load_model(mobilenet_sd_bytes, arch="mobilenet_v3_small")
    path = tmp_path / "big.pt"
    path.write_bytes(mobilenet_sd_bytes)
    with pytest.raises(ModelLoadError, match="more than the 1 MB"):
        load_model(path, arch="mobilenet_v3_small")
    monkeypatch.setenv("EXPLAINER_MAX_UPLOAD_MB", "lots")
    with pytest.raises(ModelLoadError, match="EXPLAINER_MAX_UPLOAD_MB='lots' is not a number"):
        load_model(mobilenet_sd_bytes, arch="mobilenet_v3_small")


def test_wrong_source_type():
    with pytest.raises(TypeError):
        load_model(12345)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "content",
    [
        "cat\ndog\nbird\n",
        "\ufeffcat\r\ndog\r\nbird",
        '["cat", "dog", "bird"]',
        '{"0": "cat", "1": "dog", "2": "bird"}',
        '{"2": "bird", "0": "cat", "1": "dog"}',
        '{"0": ["n001", "cat"], "1": ["n002", "dog"], "2": ["n003", "bird"]}',
    ],
    ids=["lines", "bom-crlf", "json-list", "json-dict", "json-dict-unordered", "class-index"],
)
@pytest.mark.parametrize("kind", ["path", "bytes"])
def test_labels_formats(content, kind, tmp_path):
    source = _as(kind, content.encode("utf-8"), tmp_path, "labels.txt")
    assert load_labels(source) == ["cat", "dog", "bird"]
    assert load_labels(source, num_classes=3) == ["cat", "dog", "bird"]


def test_labels_from_a_list():
    assert load_labels(["a", "b"], num_classes=2) == ["a", "b"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("cat\ndog\n", "names 2 classes, but the model has 3"),
        ('["cat", "dog", "bird", "fish"]', "names 4 classes, but the model has 3"),
        ('{"0": "cat", "2": "bird", "3": "fish"}', "no name for class 1"),
        ('{"0": "cat", "one": "dog", "2": "bird"}', "class indices"),
        ("cat\n\ndog\nbird", "Line 2"),
        ('["cat", "dog",', "not valid JSON"),
        ('["cat", {"x": 1}, "bird"]', "Label 1"),
        ('["cat", "", "bird"]', "Label 1 .* is empty"),
        ("   \n\n", "empty"),
    ],
)
def test_labels_errors(content, expected):
    with pytest.raises(ModelLoadError, match=expected):
        load_labels(content.encode("utf-8"), num_classes=3)


def test_labels_not_utf8():
    with pytest.raises(ModelLoadError, match="UTF-8"):
        load_labels(b"\xff\xfe\x00c\x00a\x00t")


def test_load_model_with_labels(mobilenet_sd_bytes):
    names = "\n".join(f"thing {i}" for i in range(10)).encode()
    lm = load_model(mobilenet_sd_bytes, arch="mobilenet_v3_small", labels=names)
    assert lm.labels[3] == "thing 3"
    with pytest.raises(ModelLoadError, match="names 2 classes, but the model has 10"):
        load_model(mobilenet_sd_bytes, arch="mobilenet_v3_small", labels=b"a\nb\n")


def test_imagenet_labels_for_a_1000_class_torchvision_model(image):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=1000).eval()
    data = _save(resnet.state_dict())
    lm = load_model(data, arch="resnet18")
    assert lm.num_classes == 1000
    assert lm.labels[0] == "tench"
    assert lm.labels == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    with torch.no_grad():
        assert torch.equal(lm.model(image), resnet(image))


# --------------------------------------------------------------------------- build_model


def test_build_model_random_weights_are_reproducible():
    state = torch.random.get_rng_state()
    first = build_model("resnet18")
    second = build_model("resnet18")
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    assert first.source_format == "torchvision"
    assert any("random weights" in note for note in first.notes)
    assert first.labels[0] == "tench" and first.num_classes == 1000
    assert first.input_size == (3, 224, 224)
    assert not first.model.training
    assert first.sha256 == second.sha256
    for a, b in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    other = build_model("resnet18", num_classes=4)
    assert other.sha256 != first.sha256
    assert other.labels == ["class 0", "class 1", "class 2", "class 3"]


def test_build_model_input_size_from_weights_metadata():
    lm = build_model("inception_v3", num_classes=3)
    assert lm.input_size == (3, 299, 299)
    assert lm.model.AuxLogits is None
    with torch.no_grad():
        assert lm.model(torch.randn(1, 3, 299, 299)).shape == (1, 3)


def test_pretrained_without_cache_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelLoadError, match="never downloads") as info:
        build_model("resnet18", pretrained=True)
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message


def test_pretrained_from_cache(monkeypatch, tmp_path, image):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    path = tmp_path / "checkpoints" / Path(weights.url).name
    path.parent.mkdir()
    torch.manual_seed(0)
    reference = torchvision.models.squeezenet1_1(num_classes=1000).eval()
    path.write_bytes(_save(reference.state_dict()))
    # Random stand-in weights cannot carry the official checksum in their name.
    with pytest.raises(ModelLoadError, match="checksum"):
        build_model("squeezenet1_1", pretrained=True)
    monkeypatch.setattr(registry, "_HASH_IN_NAME", re.compile(r"(?!)"))
    lm = build_model("squeezenet1_1", pretrained=True)
    assert lm.labels == weights.meta["categories"]
    assert lm.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        assert torch.equal(lm.model(image), reference(image))
    with pytest.raises(ModelLoadError, match="1000 classes"):
        build_model("squeezenet1_1", pretrained=True, num_classes=10)


def test_describe_model(mobilenet_sd_bytes):
    rows = describe_model(load_model(mobilenet_sd_bytes, arch="mobilenet_v3_small"))
    assert set(rows) == {"Architecture", "Parameters", "Input size", "Classes", "Format"}
    assert rows["Architecture"] == "mobilenet_v3_small"
    assert rows["Parameters"].endswith("M)")
    assert rows["Input size"] == "3 × 224 × 224"
    assert rows["Classes"] == "10"
    assert "state_dict" in rows["Format"]


# --------------------------------------------------------------------------- demo architecture


def test_demo_architecture(image):
    demo = pytest.importorskip("explainer.demo", reason="explainer.demo is not available")
    torch.manual_seed(0)
    net = demo.build_demo_model().eval()
    data = _save(net.state_dict())
    detected = load_model(data)  # the only architecture whose layers fit
    assert detected.arch == "demo_cnn"
    assert any("detected from the file: demo_cnn" in note for note in detected.notes)
    lm = load_model(data, arch="demo_cnn")
    assert lm.input_size == tuple(demo.DEMO_INPUT_SIZE)
    assert lm.mean == tuple(demo.DEMO_MEAN) and lm.std == tuple(demo.DEMO_STD)
    assert lm.labels == list(demo.DEMO_LABELS)
    with torch.no_grad():
        assert torch.equal(lm.model(image), net(image))
    built = build_model("demo_cnn", num_classes=3)
    assert built.source_format == "builtin"
    assert built.labels == ["class 0", "class 1", "class 2"]


def test_zip_bomb_is_refused_before_unpacking(monkeypatch):
    """An archive whose members unpack far beyond the upload limit is refused from its
    directory alone."""
    monkeypatch.setenv("EXPLAINER_MAX_UPLOAD_MB", "1")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("model/data/0", bytes(8 * 2**20))  # 8 MiB of zeros, a few KiB packed
    data = buffer.getvalue()
    assert len(data) < 64 * 1024
    with pytest.raises(ModelLoadError, match="unpacks to more than"):
        load_model(data, filename="bomb.pt", arch="resnet18")


def test_several_fitting_architectures_are_offered_by_name(monkeypatch):
    from explainer.intake import registry

    data = _save(torchvision.models.resnet18(weights=None, num_classes=4).state_dict())
    # No two torchvision architectures share every tensor: two of them are made to here.
    monkeypatch.setattr(registry, "_fitting_architectures", lambda shapes: ["resnet18", "resnet34"])
    with pytest.raises(ModelLoadError) as info:
        load_model(data, filename="resnet50 resnet101.pt")  # names in the file name do not count
    message = str(info.value)
    assert "pick the architecture it was trained with" in message
    assert registry.offered_architectures(message) == ["resnet18", "resnet34"]


def test_offered_architectures_reads_only_known_names_of_the_final_hint():
    from explainer.intake.registry import offered_architectures

    hint = "Architectures whose layers match this file:"
    assert offered_architectures("The file is damaged.") == []
    found = offered_architectures(f"x. {hint} resnet18, not_an_arch, vgg11.")
    assert found == ["resnet18", "vgg11"]
    many = "resnet18, resnet34, resnet50, vgg11, vgg13, vgg16, vgg19, alexnet"
    assert offered_architectures(f"{hint} {many} and 2 more.")[-1] == "alexnet"
    # A hint quoted in a file name earlier in the message is not the one read.
    assert offered_architectures(f"a {hint} vgg11.pt b. {hint} resnet18.") == ["resnet18"]
