"""Tests for the built-in demo: generator, architecture, training script and shipped assets."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from explainer.demo import (
    ASSETS_DIR,
    DEMO_INPUT_SIZE,
    DEMO_LABELS,
    DEMO_MEAN,
    DEMO_STD,
    DemoNet,
    build_demo_model,
    demo_weights_path,
    make_dataset,
    render_sample,
    sample_image_paths,
    sample_label,
)
from explainer.errors import ModelLoadError
from explainer.intake import LoadedModel, load_demo_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "train_demo.py"
DEMO_DIR = ASSETS_DIR / "demo"


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(DEMO_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEMO_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_demo = _load_script()


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


def test_make_dataset_is_deterministic_per_seed() -> None:
    images, labels = make_dataset(24, seed=5)
    again_images, again_labels = make_dataset(24, seed=5)
    other_images, _ = make_dataset(24, seed=6)
    assert images.dtype == torch.uint8 and images.shape == (24, *DEMO_INPUT_SIZE)
    assert labels.dtype == torch.int64 and labels.shape == (24,)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert not torch.equal(images, other_images)


def test_make_dataset_is_balanced_over_all_classes() -> None:
    _, labels = make_dataset(len(DEMO_LABELS) * 3, seed=1)
    assert torch.bincount(labels, minlength=len(DEMO_LABELS)).tolist() == [3] * len(DEMO_LABELS)


def test_render_sample_by_name_equals_by_index_and_varies() -> None:
    by_name = render_sample("star", np.random.default_rng(11))
    by_index = render_sample(DEMO_LABELS.index("star"), np.random.default_rng(11))
    assert by_name.shape == (64, 64, 3) and by_name.dtype == np.uint8
    np.testing.assert_array_equal(by_name, by_index)
    rng = np.random.default_rng(11)
    first, second = render_sample("star", rng), render_sample("star", rng)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("label", ["hexagon", -1, len(DEMO_LABELS)])
def test_render_sample_rejects_unknown_classes(label: int | str) -> None:
    with pytest.raises(ValueError, match="(?i)demo class"):
        render_sample(label, np.random.default_rng(0))


def test_classes_differ_in_shape_not_only_in_colour() -> None:
    # Same generator state for every class: only the drawn shape differs between the images.
    images = [render_sample(i, np.random.default_rng(3)) for i in range(len(DEMO_LABELS))]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            changed = np.abs(images[i].astype(int) - images[j].astype(int)).max(axis=2) > 60
            assert changed.sum() >= 20, (DEMO_LABELS[i], DEMO_LABELS[j])


def test_normalisation_constants_match_generated_data() -> None:
    images, _ = make_dataset(400, seed=123)
    pixels = images.float().div(255.0)
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.tensor(DEMO_MEAN), atol=0.03, rtol=0)
    torch.testing.assert_close(std, torch.tensor(DEMO_STD), atol=0.03, rtol=0)


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


def test_demo_net_has_named_stages_and_no_inplace_ops() -> None:
    model = build_demo_model()
    assert isinstance(model, DemoNet)
    assert [name for name, _ in model.named_children()] == [
        "conv1",
        "block1",
        "block2",
        "block3",
        "pool",
        "classifier",
    ]
    for name, module in model.named_modules():
        assert not getattr(module, "inplace", False), name
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *DEMO_INPUT_SIZE))
        features = model.block3(model.block2(model.block1(model.conv1(torch.zeros(1, 3, 64, 64)))))
    assert out.shape == (2, len(DEMO_LABELS))
    assert features.shape == (1, 64, 8, 8)


def test_build_demo_model_honours_num_classes() -> None:
    assert build_demo_model(3).classifier.out_features == 3
    with pytest.raises(ModelLoadError):
        build_demo_model(0)


# --------------------------------------------------------------------------------------------
# Training script (tiny budget, never touches the shipped assets)
# --------------------------------------------------------------------------------------------

TINY = ["--epochs", "1", "--train-size", "128", "--val-size", "64", "--min-accuracy", "0"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """Two identical tiny training runs: (weights folder, samples folder) each."""
    runs = []
    for name in ("first", "second"):
        root = tmp_path_factory.mktemp(name)
        out, samples = root / "demo", root / "samples"
        assert train_demo.main([*TINY, "--out", str(out), "--samples-out", str(samples)]) == 0
        runs.append((out, samples))
    return runs


def test_tiny_training_run_writes_loadable_assets(tiny_runs: list[tuple[Path, Path]]) -> None:
    out, samples = tiny_runs[0]
    assert (out / "labels.txt").read_text().split() == DEMO_LABELS
    card = json.loads((out / "card.json").read_text())
    weights = demo_weights_path(out).read_bytes()
    assert card["arch"] == "demo_cnn"
    assert card["input_size"] == list(DEMO_INPUT_SIZE)
    assert card["mean"] == list(DEMO_MEAN) and card["std"] == list(DEMO_STD)
    assert card["labels"] == DEMO_LABELS
    assert (card["train_size"], card["val_size"], card["epochs"], card["seed"]) == (128, 64, 1, 0)
    assert 0.0 <= card["heldout_accuracy"] <= 1.0
    assert card["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert "Held-out accuracy" in (out / "card.md").read_text()

    loaded = load_demo_model(out)
    assert loaded.sha256 == hashlib.sha256(weights).hexdigest()
    assert not loaded.model.training
    with torch.no_grad():
        logits = loaded.model(torch.zeros(1, *DEMO_INPUT_SIZE))
    assert logits.shape == (1, len(DEMO_LABELS)) and bool(torch.isfinite(logits).all())

    paths = sample_image_paths(samples)
    assert [sample_label(p) for p in paths] == DEMO_LABELS


def test_training_is_reproducible(tiny_runs: list[tuple[Path, Path]]) -> None:
    (first, first_samples), (second, second_samples) = tiny_runs
    assert demo_weights_path(first).read_bytes() == demo_weights_path(second).read_bytes()
    for a, b in zip(
        sample_image_paths(first_samples), sample_image_paths(second_samples), strict=True
    ):
        assert a.read_bytes() == b.read_bytes()


def test_training_leaves_torch_settings_as_found(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    argv = [*TINY, "--train-size", "16", "--val-size", "8", "--threads", "1"]
    train_demo.main([*argv, "--out", str(tmp_path / "d"), "--samples-out", str(tmp_path / "s")])
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_training_script_fails_and_writes_nothing_below_min_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, samples = tmp_path / "demo", tmp_path / "samples"
    status = train_demo.main(
        ["--epochs", "1", "--train-size", "32", "--val-size", "32", "--min-accuracy", "1.01",
         "--out", str(out), "--samples-out", str(samples)]
    )  # fmt: skip
    assert status == 1
    assert "below --min-accuracy" in capsys.readouterr().err
    assert not out.exists() and not samples.exists()


def test_training_script_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_demo.main(["--epochs", "0"])
    assert exit_info.value.code == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err


def test_training_script_runs_as_a_program() -> None:
    # A fresh interpreter, as a user would run it: the script finds the package by itself.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=SCRIPT.parent,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--epochs", "--train-size", "--val-size", "--out", "--samples-out", "--seed"):
        assert option in result.stdout


# --------------------------------------------------------------------------------------------
# Shipped assets
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_demo_model()


def test_shipped_weights_card_and_labels(shipped: LoadedModel) -> None:
    weights = demo_weights_path()
    assert weights == DEMO_DIR / "demo_cnn.safetensors"
    assert weights.stat().st_size <= 5 * 1024 * 1024
    card = json.loads((DEMO_DIR / "card.json").read_text())
    assert card["heldout_accuracy"] >= 0.95
    assert card["val_size"] >= 1000
    assert card["labels"] == DEMO_LABELS
    assert (DEMO_DIR / "labels.txt").read_text().split() == DEMO_LABELS
    assert card["weights_sha256"] == shipped.sha256
    assert (DEMO_DIR / "card.md").is_file()


def test_load_demo_model_returns_eval_model_with_metadata(shipped: LoadedModel) -> None:
    assert isinstance(shipped, LoadedModel)
    assert shipped.arch == "demo_cnn" and shipped.source_format == "builtin"
    assert shipped.input_size == DEMO_INPUT_SIZE
    assert shipped.mean == DEMO_MEAN and shipped.std == DEMO_STD
    assert shipped.labels == DEMO_LABELS and shipped.num_classes == len(DEMO_LABELS)
    assert shipped.sha256 == hashlib.sha256(demo_weights_path().read_bytes()).hexdigest()
    assert shipped.num_params == sum(p.numel() for p in shipped.model.parameters())
    assert all(not m.training for m in shipped.model.modules())
    assert any("accuracy" in note for note in shipped.notes)
    assert all(p.dtype == torch.float32 for p in shipped.model.parameters())


def test_shipped_samples_cover_every_class() -> None:
    paths = sample_image_paths()
    assert 8 <= len(paths) <= 12
    assert paths == sorted(paths)
    labels = [sample_label(p) for p in paths]
    assert None not in labels
    assert set(labels) == set(DEMO_LABELS)
    for path in paths:
        assert _read_png(path).shape == (64, 64, 3)


def test_shipped_samples_come_from_the_generator() -> None:
    card = json.loads((DEMO_DIR / "card.json").read_text())
    rng = np.random.default_rng(card["seeds"]["samples"])
    for path in sample_image_paths():
        expected = render_sample(sample_label(path), rng)
        np.testing.assert_array_equal(_read_png(path), expected, err_msg=path.name)


def test_shipped_model_classifies_the_samples(shipped: LoadedModel) -> None:
    paths = sample_image_paths()
    images = torch.stack([torch.from_numpy(_read_png(p)).permute(2, 0, 1) for p in paths])
    with torch.no_grad():
        predicted = shipped.model(_normalise(images)).argmax(dim=1).tolist()
    truth = [shipped.labels.index(sample_label(p)) for p in paths]
    wrong = [p.name for p, a, b in zip(paths, predicted, truth, strict=True) if a != b]
    assert len(wrong) <= 1, wrong


def test_shipped_model_generalises_to_fresh_images(shipped: LoadedModel) -> None:
    # A seed used by neither training nor the held-out set of the shipped model.
    images, labels = make_dataset(96, seed=2024)
    with torch.no_grad():
        predicted = shipped.model(_normalise(images)).argmax(dim=1)
    assert float((predicted == labels).float().mean()) >= 0.9


# --------------------------------------------------------------------------------------------
# Loading errors
# --------------------------------------------------------------------------------------------


def _copy_shipped(tmp_path: Path) -> Path:
    target = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, target)
    return target


def test_missing_weights_raise_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="scripts/train_demo.py"):
        load_demo_model(tmp_path)


def test_corrupt_weights_raise_model_load_error(tmp_path: Path) -> None:
    folder = _copy_shipped(tmp_path)
    demo_weights_path(folder).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        load_demo_model(folder)


def test_labels_that_do_not_fit_raise_model_load_error(tmp_path: Path) -> None:
    folder = _copy_shipped(tmp_path)
    (folder / "labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(ModelLoadError, match="3 classes"):
        load_demo_model(folder)


def test_missing_card_is_noted_not_fatal(tmp_path: Path) -> None:
    folder = _copy_shipped(tmp_path)
    (folder / "card.json").unlink()
    loaded = load_demo_model(folder)
    assert any("No model card" in note for note in loaded.notes)


def test_sample_label_parses_names() -> None:
    assert sample_label("07_crescent.png") == "crescent"
    assert sample_label(Path("x/12_square.png")) == "square"
    assert sample_label("circle.png") is None
    assert sample_label("01_hexagon.png") is None


def test_each_load_returns_an_independent_model() -> None:
    # Loading twice gives independent models: editing one leaves the other untouched.
    first, second = load_demo_model(), load_demo_model()
    with torch.no_grad():
        first.model.classifier.bias.add_(1.0)
    assert not torch.equal(first.model.classifier.bias, second.model.classifier.bias)
    assert isinstance(first.model.classifier, nn.Linear)
