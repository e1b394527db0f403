"""The cached boundary: content keys, batching of neighbours, progress, shared workers, and a
server process that never holds a model."""

from __future__ import annotations

import dataclasses
import hashlib
import io

import pytest
import torch
from apphelpers import count_jobs, png_bytes

from explainer.compute import ModelSource
from explainer.demo import sample_image_paths
from webapp import backend
from webapp.state import AttributionSettings, ImageEntry, LabelsOverride, ModelRef, PrepSpec


@pytest.fixture(scope="module")
def demo():
    lm = backend.resolve_model(ModelRef())
    prep = backend.preprocessing(PrepSpec(), lm)
    path = sample_image_paths()[0]
    image = ImageEntry.from_bytes(path.name, path.read_bytes(), source="sample")
    return lm, prep, image


def test_chunk_size_defaults_to_about_eight_chunks():
    assert backend.chunk_size(AttributionSettings(n_steps=50)) == 7
    assert backend.chunk_size(AttributionSettings(n_steps=3)) == 1
    assert backend.chunk_size(AttributionSettings(n_steps=50, internal_batch_size=20)) == 20


def test_conductance_reports_progress_and_is_computed_once(demo, monkeypatch):
    lm, prep, image = demo
    calls = count_jobs(monkeypatch, "conductance")
    settings = AttributionSettings(n_steps=41, baseline="constant", constant=0.3)
    seen: list[tuple[int, int]] = []
    first = backend.conductance(
        lm, image, prep, "block2", settings, lambda d, t: seen.append((d, t))
    )
    assert seen and seen[-1][0] == seen[-1][1]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # Same content under new objects: a cache hit, whatever the chunk size.
    copy = ImageEntry.from_bytes("renamed.png", image.data)
    again = backend.conductance(
        lm, copy, prep, "block2", dataclasses.replace(settings, internal_batch_size=5)
    )
    assert again is first
    assert len(calls) == 1


def test_different_content_gets_a_different_result(demo):
    lm, prep, image = demo
    settings = AttributionSettings(n_steps=12)
    other = ImageEntry.from_bytes("other.png", png_bytes())
    a = backend.conductance(lm, image, prep, "block3", settings)
    b = backend.conductance(lm, other, prep, "block3", settings)
    assert a is not b
    c = backend.conductance(lm, image, prep, "block3", dataclasses.replace(settings, target=1))
    assert c.target == 1 and c is not a


def test_neighbours_are_computed_in_one_batch_and_cached_one_by_one(demo, monkeypatch):
    lm, prep, image = demo
    calls = count_jobs(monkeypatch, "neuron_gradients")
    first = backend.neuron_gradients(lm, image, prep, "block1", [(0, 1, 1), (0, 1, 2), (1, 1, 1)])
    assert [c["neurons"] for c in calls] == [[(0, 1, 1), (0, 1, 2), (1, 1, 1)]]
    second = backend.neuron_gradients(lm, image, prep, "block1", [(0, 1, 2), (2, 1, 1)])
    assert calls[1]["neurons"] == [(2, 1, 1)]
    assert second[0] is first[1]
    assert [r.neuron for r in second] == [(0, 1, 2), (2, 1, 1)]


def test_labels_override_shares_the_worker(demo):
    lm, _, _ = demo
    names = tuple(f"name{i}" for i in range(lm.num_classes))
    renamed = backend.resolve_model(ModelRef(), LabelsOverride("names.txt", names))
    assert renamed.source == lm.source  # the same worker serves both
    assert renamed.labels == names
    assert backend.model_key(renamed) == backend.model_key(lm)
    # A labels file of the wrong length is ignored here (the page refuses it on upload).
    assert backend.resolve_model(ModelRef(), LabelsOverride("x.txt", ("a",))).labels == lm.labels


def test_model_key_comes_from_the_source_not_from_the_worker(demo):
    """The key names the file and its loading options as the server saw them: a worker that
    describes its model as another one's (same digest, architecture...) gets its own key."""
    lm, _, _ = demo
    data = b"weights"
    digest = hashlib.sha256(data).hexdigest()
    upload = backend.ServedModel(lm.info, ModelSource("file", data, "w.pt", arch="demo_cnn"))
    assert backend.model_key(upload) != backend.model_key(lm)
    other_arch = ModelSource("file", data, "w.pt", arch="resnet18", data_digest=digest)
    assert backend.model_key(backend.ServedModel(lm.info, other_arch)) != backend.model_key(upload)
    same = ModelSource("file", data, "w.pt", arch="demo_cnn", data_digest=digest)
    assert backend.model_key(backend.ServedModel(lm.info, same)) == backend.model_key(upload)


def test_target_out_of_range_is_a_readable_error(demo):
    lm, prep, image = demo
    with pytest.raises(ValueError, match="out of range"):
        backend.conductance(lm, image, prep, "block3", AttributionSettings(target=lm.num_classes))


_SERVER_SCRIPT = """
import gc, hashlib, sys, warnings
import torch
sys.path[:0] = [{tests!r}, {hostile!r}]
from apphelpers import pixel_model_bytes
from explainer.demo import sample_image_paths
from webapp import backend
from webapp.state import AttributionSettings, ImageEntry, ModelRef, PrepSpec

lm = backend.resolve_model(ModelRef())
prep = backend.preprocessing(PrepSpec(), lm)
path = sample_image_paths()[0]
image = ImageEntry.from_bytes(path.name, path.read_bytes(), source="sample")
backend.conductance(lm, image, prep, "block3", AttributionSettings(n_steps=9))
backend.neuron_gradients(lm, image, prep, "block3", [(0, 0, 0)])
backend.predictions(lm, image, prep)
upload = backend.resolve_model(
    ModelRef(
        kind="upload",
        digest=hashlib.sha256(pixel_model_bytes()).hexdigest(),
        filename="pixels.pt2",
        data=pixel_model_bytes(),
    )
)
backend.tree(upload)
gc.collect()
with warnings.catch_warnings():  # isinstance() on some torch objects warns of deprecations
    warnings.simplefilter("ignore")
    found = [
        type(o).__name__ for o in gc.get_objects()
        if isinstance(o, torch.nn.Module) and any(True for _ in o.parameters())
    ]
print("modules with weights:", found)
sys.exit(1 if found else 0)
"""


def test_the_server_process_never_holds_a_model():
    """Loading, predicting and explaining happen in workers: in a fresh server process that
    explains the built-in model and loads an upload, no module with weights ever exists."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    script = _SERVER_SCRIPT.format(tests=str(here), hostile=str(here.parent))
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "modules with weights: []" in done.stdout


def test_default_layer_has_a_spatial_map(demo):
    lm, _, _ = demo
    name = backend.default_layer(lm)
    shape = backend.tree(lm).nodes[name].output_shapes[0]
    assert len(shape) == 4 and shape[2] * shape[3] > 1


def test_sessions_computing_at_once_get_their_solo_results(demo):
    """Several sessions computing on the model's one worker at the same time (different layers,
    targets, images) get what each would get alone, up to float32 rounding: the first call on a
    layer splits its path points into passes differently from later calls, which moves cells by
    up to 3e-7 of the map's largest value. A job answered with another job's map, or run on
    another's layer or target, differs by far more."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    lm, prep, _ = demo
    paths = sample_image_paths()[:4]
    images = [ImageEntry.from_bytes(p.name, p.read_bytes(), source="sample") for p in paths]
    jobs = [
        (images[i % 4], layer, AttributionSettings(target=i % 8, n_steps=12))
        for i, layer in enumerate(["conv1", "block1", "block2", "block3", "block1.conv", "block3"])
    ]
    backend.result_cache().clear()
    solo = [backend.conductance(lm, image, prep, layer, s).attributions for image, layer, s in jobs]
    backend.result_cache().clear()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        together = list(
            pool.map(lambda job: backend.conductance(lm, job[0], prep, job[1], job[2]), jobs)
        )
    for alone, shared in zip(solo, together, strict=True):
        scale = float(np.abs(alone).max())
        np.testing.assert_allclose(shared.attributions, alone, rtol=1e-6, atol=2e-6 * scale)


def test_soak_of_hundreds_of_requests_keeps_memory_bounded(demo, monkeypatch):
    """Three hundred different conductance and gradient requests through the service: the cache
    stays within its bounds, and neither the server nor the model's worker keeps growing."""
    from explainer.cache import ContentCache

    def rss_mib(pid: str | int = "self") -> float:
        with open(f"/proc/{pid}/status") as fh:
            line = next(row for row in fh if row.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def worker_pid() -> int:
        return next(
            w.pid
            for w in backend.executor().workers()
            if w.model_key == lm.source.key and not w.background
        )

    lm, prep, _ = demo
    cache = ContentCache(max_bytes=16 * 2**20, max_entries=64)
    monkeypatch.setattr(backend, "result_cache", lambda: cache)
    images = [
        ImageEntry.from_bytes(p.name, p.read_bytes(), source="sample") for p in sample_image_paths()
    ]
    layers = ["conv1", "block1", "block2", "block3"]
    levels = []
    for i in range(300):
        image, layer = images[i % len(images)], layers[(i // len(images)) % len(layers)]
        settings = AttributionSettings(target=i % 8, n_steps=4 + i % 5)
        result = backend.conductance(lm, image, prep, layer, settings)
        backend.neuron_gradients(lm, image, prep, layer, [(0, 0, 0), (1, 1, 1)])
        assert result.attributions.shape[0] == result.channel_totals.shape[0]
        stats = cache.stats()
        assert stats["bytes"] <= 16 * 2**20 and stats["entries"] <= 64
        if i in (50, 299):
            levels.append((rss_mib(), rss_mib(worker_pid())))
    assert levels[1][0] - levels[0][0] < 150, levels  # the server
    assert levels[1][1] - levels[0][1] < 150, levels  # the model's worker


def test_score_shape_is_read_from_the_model_or_probed_once(demo, monkeypatch):
    lm, _, _ = demo
    assert lm.output_shape is None  # the demo's loader does not record it: one probe reads it
    assert backend.score_shape(lm) == (lm.num_classes,)
    assert not backend.per_position(lm)
    calls = count_jobs(monkeypatch, "score_shape")
    assert backend.score_shape(lm) == (lm.num_classes,)  # cached
    stated = dataclasses.replace(
        lm, info=dataclasses.replace(lm.info, sha256="other", output_shape=(3, 5, 7))
    )
    assert backend.score_shape(stated) == (3, 5, 7) and backend.per_position(stated)
    assert calls == []


def test_per_position_targets_are_resolved_in_full_and_keyed_by_position(monkeypatch):
    from apphelpers import pixel_model_bytes

    backend.result_cache().clear()  # count computations from a clean slate
    served = backend.resolve_model(
        ModelRef(
            kind="upload",
            digest=hashlib.sha256(pixel_model_bytes()).hexdigest(),
            filename="pixels.pt2",
            data=pixel_model_bytes(),
        )
    )
    lm = dataclasses.replace(served, info=dataclasses.replace(served.info, output_shape=None))
    prep = backend.preprocessing(PrepSpec(), lm)
    image = ImageEntry.from_bytes("square.png", png_bytes())
    assert backend.score_shape(lm) == (2, 32, 32)
    scores = backend.scores(lm, image, prep)
    top = backend.predicted_class(lm, image, prep)
    automatic = backend.resolve_target(lm, image, prep, AttributionSettings())
    assert automatic == (top, *divmod(int(scores[top].argmax()), 32))
    chosen = AttributionSettings(target=1, position=(4, None))
    assert backend.resolve_target(lm, image, prep, chosen) == (1, 4, int(scores[1, 4].argmax()))

    calls = count_jobs(monkeypatch, "conductance")
    row = int(scores[1, :, 9].argmax())  # where class 1 scores highest in column 9
    settings = AttributionSettings(target=1, position=(row, 9), n_steps=8)
    first = backend.conductance(lm, image, prep, "conv", settings)
    assert first.target == (1, row, 9)
    other = (row + 1) % 32
    moved = backend.conductance(
        lm, image, prep, "conv", dataclasses.replace(settings, position=(other, 9))
    )
    assert moved.target == (1, other, 9) and moved is not first
    # A row left automatic that resolves to the same output is the same computation.
    again = backend.conductance(
        lm, image, prep, "conv", dataclasses.replace(settings, position=(None, 9))
    )
    assert again is first
    assert [c["target"] for c in calls] == [(1, row, 9), (1, other, 9)]
    view = backend.score_view(lm, image, prep, first.target)
    assert view.shape == (32, 32) and view[row, 9] == pytest.approx(float(scores[1, row, 9]))
    with pytest.raises(ValueError, match="row 40 is not between 0 and 31"):
        backend.conductance(
            lm, image, prep, "conv", dataclasses.replace(settings, position=(40, 1))
        )


def test_models_scoring_every_position_see_the_whole_image_not_its_centre():
    """The model-default preprocessing crops the centre for classifiers, but scales the whole
    image for segmentation models, whose map should cover all of it."""
    import torchvision

    from explainer.intake import load_model

    def lm_of(model: torch.nn.Module, arch: str):
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        source = ModelSource("file", buffer.getvalue(), "weights.pt", arch=arch)
        return backend.ServedModel(load_model(source.data, arch=arch).info(), source)

    torch.manual_seed(0)
    seg = lm_of(
        torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=3
        ),
        "lraspp_mobilenet_v3_large",
    )
    cls = lm_of(
        torchvision.models.mobilenet_v3_small(weights=None, num_classes=3), "mobilenet_v3_small"
    )
    seg_prep = backend.preprocessing(PrepSpec(), seg)
    cls_prep = backend.preprocessing(PrepSpec(), cls)
    assert seg_prep.size == cls_prep.size == (224, 224)
    assert seg_prep.resize is None and cls_prep.resize is not None
