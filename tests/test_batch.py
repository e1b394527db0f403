"""Dataset mode: a folder explained through the job interface gives exactly the numbers of
per-image library runs; bad images are recorded with their reason; a run killed or stopped with
Ctrl-C resumes to complete and correct results; the store keeps every column and never pickles.

The helpers at the top are shared with ``tests/test_ray_batch.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from explainer import LayerConductance, analysis
from explainer.baselines import make_baseline
from explainer.batch.cli import main as cli_main
from explainer.batch.dataset import DatasetError, class_map, find_images
from explainer.batch.record import record_problem
from explainer.batch.runner import BatchError, BatchSettings, run_batch
from explainer.batch.store import ResultsStore, StoreError
from explainer.compute import LocalExecutor, ModelSession, ModelSource
from explainer.compute.jobs import JobHandle
from explainer.demo import DEMO_LABELS, render_sample
from explainer.errors import AttributionError, WorkerError
from explainer.images import Preprocessing, load_image, preprocess
from explainer.intake import load_demo_model

REPO = Path(__file__).resolve().parents[1]
BUILTIN = ModelSource("builtin")
LAYERS = ("block1", "block2", "block3")
STEPS = 8
RUN_TIMEOUT_S = 300  # a bound on every wait for a subprocess, never reached when all is well


# --------------------------------------------------------------------------- shared helpers


def make_dataset(root: Path, count: int = 6, seed: int = 0, bad: bool = True) -> Path:
    """Class folders of the demo's shapes, a nested folder, and (``bad``) broken files."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = DEMO_LABELS[i % len(DEMO_LABELS)]
        folder = root / label / ("nested" if i % 3 == 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_sample(label, rng)).save(folder / f"img{i:02d}.png")
    if bad:
        (root / "circle" / "broken.png").write_bytes(b"this is not a picture")
        (root / "square").mkdir(exist_ok=True)
        (root / "square" / "empty.jpg").write_bytes(b"")
        (root / "circle" / "notes.txt").write_text("not an image, and not looked at")
    return root


def settings(**changes) -> BatchSettings:
    base = {"layers": LAYERS, "n_steps": STEPS, "labels_from_folders": True}
    base.update(changes)
    return BatchSettings(**base)


class InProcessExecutor:
    """The job interface on a ModelSession in this process: fast, for driver logic tests.

    ``fail`` decides, per ``dataset_record`` job (its number from 0), whether it raises.
    """

    parallelism = 1

    def __init__(self, fail=None) -> None:
        self.sessions: dict[str, ModelSession] = {}
        self.fail = fail or (lambda number: False)
        self.records = 0
        self.images_sent = 0

    def submit(self, model, op, args=None):
        handle = JobHandle(op)
        session = self.sessions.get(model.key) or ModelSession(model)
        self.sessions[model.key] = session
        try:
            if op == "dataset_record":
                number, self.records = self.records, self.records + 1
                self.images_sent += len(args["images"])
                if self.fail(number):
                    raise WorkerError("The worker stopped unexpectedly (a test's failure).")
            handle.set_result(session.run(op, args or {}))
        except Exception as exc:  # noqa: BLE001 - the handle carries it, as an executor's would
            handle.set_exception(exc)
        return handle

    def shutdown(self) -> None:
        pass


def library_expectations(root: Path, run: BatchSettings) -> dict[str, dict]:
    """What per-image runs through the library give, in this process, for every good image."""
    lm = load_demo_model()
    model = lm.model
    prep = Preprocessing.for_model(lm.input_size, lm.mean, lm.std)
    expected = {}
    for image in find_images(root, class_folders=run.labels_from_folders):
        try:
            x = preprocess(load_image(image.path), prep)
        except Exception:  # noqa: BLE001 - the bad ones are checked elsewhere
            continue
        scores = analysis.class_scores(model, x)
        top = analysis.rank_classes(scores, lm.labels, k=5)
        if run.target == "true":
            target = DEMO_LABELS.index(image.class_name)
        elif isinstance(run.target, int):
            target = run.target
        else:
            target = top[0][1]
        baseline = make_baseline(run.baseline, x, prep)
        overview = analysis.compute_layer_overview(
            model, list(run.layers), x, target, baseline, method=run.method,
            n_steps=run.n_steps,
        )  # fmt: skip
        layers = {}
        for name in run.layers:
            activation = analysis.layer_activation(model, name, x)
            flat = activation.reshape(activation.shape[0], -1)
            layers[name] = (overview[name], flat.max(axis=1), flat.mean(axis=1, dtype=np.float64))
        expected[image.key] = {"top": top, "target": target, "layers": layers, "x": x,
                               "baseline": baseline, "sha256": _sha256(image.path)}  # fmt: skip
    return expected


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal within float32 rounding (summed in another order), same shape and type.

    A channel's total adds positive and negative terms as large as the largest total, so a
    small total carries the rounding of those terms: differences of up to 3.2e-6 of the largest
    total have been seen between two pass splits; 1e-5 of it is allowed."""
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def assert_store_matches_library(out: Path, expected: dict[str, dict], maps: bool) -> None:
    """Every explained image in the store holds the library's numbers (float32 rounding apart:
    how the engine splits the path into passes depends on what the process computed before,
    see ``_row_cost``)."""
    with ResultsStore(out, readonly=True) as store:
        rows = {row.path: row for row in store.images("ok")}
        assert sorted(rows) == sorted(expected)
        for key, want in expected.items():
            row = rows[key]
            assert row.sha256 == want["sha256"]
            assert row.predicted == want["top"][0][1]
            assert row.predicted_name == want["top"][0][0]
            assert row.top == [(i, v) for _, i, v in want["top"]]
            assert row.score == want["top"][0][2]
            assert row.target == want["target"]
            assert row.true_name == key.split("/")[0]
            assert row.true_label == DEMO_LABELS.index(row.true_name)
            for name, (result, act_max, act_mean) in want["layers"].items():
                got = store.layer_row(key, name)
                assert got is not None
                close(got["conductance"], result.channel_totals)
                # the delta is a float32 sum minus the output change: it rounds at the
                # size of that change, not its own
                scale = max(abs(result.output_diff), 1.0)
                assert got["delta"] == pytest.approx(result.delta, rel=1e-4, abs=1e-5 * scale)
                assert got["output_diff"] == pytest.approx(result.output_diff, rel=1e-6)
                assert got["relative_delta"] == pytest.approx(
                    result.relative_delta, rel=1e-4, abs=1e-5
                )
                assert got["n_steps"] == result.n_steps
                assert got["steps_status"] == "fixed"
                assert got["layer_moves"] == result.layer_moves
                assert got["shape"] == result.attributions.shape
                assert np.array_equal(got["act_max"], act_max.astype(np.float32))
                assert np.array_equal(got["act_mean"], act_mean.astype(np.float32))
                if maps:
                    close(got["map"], result.attributions)
                else:
                    assert got["map"] is None


def cli(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """``python -m explainer ...`` in a subprocess, as a user would run it."""
    return subprocess.Popen(
        [sys.executable, "-m", "explainer", *args], cwd=REPO,
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **popen,
    )  # fmt: skip


def stored_count(out: Path) -> int:
    """Images with a row in the store so far (0 while it does not exist yet)."""
    if not out.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{out}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def expected(dataset) -> dict[str, dict]:
    return library_expectations(dataset, settings(target="true"))


@pytest.fixture(scope="module")
def local_pool():
    executor = LocalExecutor(max_workers=1, timeout_s=120)
    yield executor
    executor.shutdown()


# --------------------------------------------------------------------------- the numbers


def test_batch_gives_exactly_the_numbers_of_per_image_library_runs(
    dataset, expected, local_pool, tmp_path
):
    out = tmp_path / "results.sqlite"
    seen: list[str] = []
    summary = run_batch(BUILTIN, dataset, out, settings(target="true", maps=True), local_pool,
                        on_record=seen.append)  # fmt: skip
    assert (summary.total, summary.ok, summary.bad, summary.failed) == (8, 6, 2, 0)
    assert sorted(seen) == sorted([*expected, "circle/broken.png", "square/empty.jpg"])
    assert_store_matches_library(out, expected, maps=True)

    # Also what the Captum-compatible engine gives one layer at a time (one pass for all three
    # layers roots the graph elsewhere, so float32 rounding differs in the last bits).
    lm = load_demo_model()
    with ResultsStore(out, readonly=True) as store:
        for key, want in expected.items():
            for name in LAYERS:
                engine = LayerConductance(lm.model, lm.model.get_submodule(name))
                single = engine.attribute(want["x"], baselines=want["baseline"],
                                          target=want["target"], n_steps=STEPS)  # fmt: skip
                totals = single[0].detach().flatten(1).sum(dim=1).numpy()
                got = store.layer_row(key, name)["conductance"]
                # a total is a sum of many float32 cells: its rounding follows their size
                scale = float(np.abs(totals).max())
                np.testing.assert_allclose(got, totals, rtol=1e-5, atol=1e-5 * scale)


def test_store_records_settings_digests_and_bad_images_with_reasons(dataset, local_pool, tmp_path):
    out = tmp_path / "results.sqlite"
    run_batch(BUILTIN, dataset, out, settings(), local_pool)
    with ResultsStore(out, readonly=True) as store:
        run = store.meta("settings")
        assert run["layers"] == list(LAYERS)
        assert run["n_steps"] == STEPS and run["method"] == "gausslegendre"
        assert run["target"] == "predicted" and run["baseline"] == {"kind": "black"}
        assert run["model"] == BUILTIN.key
        assert run["classes"]["mode"] == "model"
        model = store.meta("model")
        assert model["arch"] == "demo_cnn" and model["labels"] == DEMO_LABELS
        assert len(model["sha256"]) == 64
        bad = {row.path: row for row in store.images("bad")}
        assert set(bad) == {"circle/broken.png", "square/empty.jpg"}
        broken = bad["circle/broken.png"].reason
        assert "'broken.png' is not an image in a supported format" in broken
        assert "empty" in bad["square/empty.jpg"].reason
        assert bad["circle/broken.png"].true_name == "circle"
        assert bad["circle/broken.png"].sha256 == _sha256(dataset / "circle" / "broken.png")
        assert store.counts() == {"ok": 6, "bad": 2, "failed": 0}
    raw = out.read_bytes()
    assert b"\x80\x04\x95" not in raw and b"\x80\x05\x95" not in raw  # no pickle frames


def test_target_class_index_and_predicted(dataset, tmp_path):
    executor = InProcessExecutor()
    for target in (3, "predicted"):
        out = tmp_path / f"{target}.sqlite"
        run = settings(target=target)
        run_batch(BUILTIN, dataset, out, run, executor)
        assert_store_matches_library(out, library_expectations(dataset, run), maps=False)


# --------------------------------------------------------------------------- resuming


def test_rerun_skips_what_is_done_and_redoes_failed_and_changed_images(dataset, tmp_path):
    out = tmp_path / "results.sqlite"
    first = InProcessExecutor(fail=lambda number: number == 1)  # the second job fails
    summary = run_batch(BUILTIN, dataset, out, settings(), first)
    assert (summary.ok, summary.bad, summary.failed) == (5, 2, 1)
    with ResultsStore(out, readonly=True) as store:
        failed = store.images("failed")
        assert len(failed) == 1 and "stopped unexpectedly" in failed[0].reason
        finished = {row.path: row.finished for row in store.images()}

    again = InProcessExecutor()
    summary = run_batch(BUILTIN, dataset, out, settings(), again)
    assert (summary.skipped, summary.ok, summary.bad, summary.failed) == (7, 1, 0, 0)
    assert again.images_sent == 1  # only the failed one went to the model again
    with ResultsStore(out, readonly=True) as store:
        assert store.counts() == {"ok": 6, "bad": 2, "failed": 0}
        for row in store.images():
            if row.path != failed[0].path:
                assert row.finished == finished[row.path], row.path

    # A file whose bytes changed is explained again; the others are not.
    changed = tmp_path / "changed"
    make_dataset(changed)
    run_batch(BUILTIN, changed, tmp_path / "c.sqlite", settings(), InProcessExecutor())
    first_image = sorted(changed.glob("circle/*.png"))[0]
    if first_image.name == "broken.png":
        first_image = sorted(changed.glob("circle/img*.png"))[0]
    Image.fromarray(render_sample("circle", np.random.default_rng(99))).save(first_image)
    third = InProcessExecutor()
    summary = run_batch(BUILTIN, changed, tmp_path / "c.sqlite", settings(), third)
    assert (summary.skipped, summary.ok, third.images_sent) == (7, 1, 1)


def test_an_image_the_model_cannot_explain_is_bad_but_running_out_of_memory_is_retried(
    dataset, tmp_path, monkeypatch
):
    import explainer.batch.record as record

    real = record.image_record
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise AttributionError("The model's scores contain NaN values for this image.")
        if len(calls) == 4:
            try:
                raise MemoryError("can't allocate memory")
            except MemoryError as exc:
                raise AttributionError("Ran out of memory computing layer conductance.") from exc
        return real(*args, **kwargs)

    monkeypatch.setattr(record, "image_record", flaky)
    out = tmp_path / "r.sqlite"
    summary = run_batch(BUILTIN, dataset, out, settings(), InProcessExecutor())
    assert (summary.ok, summary.bad, summary.failed) == (4, 3, 1)
    with ResultsStore(out, readonly=True) as store:
        reasons = {row.status: row.reason for row in store.images() if row.reason}
        assert "Ran out of memory" in reasons["failed"]
        assert any("NaN" in row.reason for row in store.images("bad"))
    monkeypatch.setattr(record, "image_record", real)
    again = run_batch(BUILTIN, dataset, out, settings(), InProcessExecutor())
    assert (again.skipped, again.ok) == (7, 1)  # the failed one only; bad ones stay bad


def test_resume_refuses_a_store_of_other_settings(dataset, tmp_path):
    out = tmp_path / "results.sqlite"
    executor = InProcessExecutor()
    run_batch(BUILTIN, dataset, out, settings(), executor)
    with pytest.raises(StoreError, match=r"other settings \(n_steps: 8 before, 9 now\)"):
        run_batch(BUILTIN, dataset, out, settings(n_steps=9), executor)
    with pytest.raises(StoreError, match="layers"):
        run_batch(BUILTIN, dataset, out, settings(layers=("block1",)), executor)


def test_two_runs_cannot_write_one_store(tmp_path):
    out = tmp_path / "results.sqlite"
    with ResultsStore(out):
        with pytest.raises(StoreError, match="Another run is writing"):
            ResultsStore(out)
        with ResultsStore(out, readonly=True) as reader:  # readers are welcome
            assert reader.counts() == {"ok": 0, "bad": 0, "failed": 0}


def _resume_command(dataset: Path, out: Path) -> list[str]:
    return ["batch", "--images", str(dataset), "--out", str(out), "--labels-from-folders",
            "--layers", ",".join(LAYERS), "--target", "true", "--n-steps", "48",
            "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def slow_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("more"), count=14, seed=1)


def _check_complete_and_correct(dataset: Path, out: Path) -> None:
    expected = library_expectations(dataset, settings(target="true", n_steps=48))
    assert_store_matches_library(out, expected, maps=False)
    with ResultsStore(out, readonly=True) as store:
        assert store.counts() == {"ok": 14, "bad": 2, "failed": 0}
        with sqlite3.connect(f"file:{out}?mode=ro", uri=True) as db:
            per_image = db.execute("SELECT count(*) FROM layers GROUP BY path").fetchall()
        assert per_image == [(len(LAYERS),)] * 14  # every explained image has every layer


def test_a_killed_run_resumes_to_complete_and_correct_results(slow_dataset, tmp_path):
    out = tmp_path / "results.sqlite"
    run = cli(*_resume_command(slow_dataset, out), start_new_session=True)
    try:
        wait_for(lambda: stored_count(out) >= 4, RUN_TIMEOUT_S, "4 images stored", run)
        os.killpg(run.pid, signal.SIGKILL)  # the driver and anything in its session, at once
    finally:
        if run.poll() is None:
            run.kill()
        run.communicate(timeout=RUN_TIMEOUT_S)
    killed_at = stored_count(out)
    assert 4 <= killed_at < 16, "the kill should land midway"
    with ResultsStore(out, readonly=True) as store:
        before = {row.path: row.finished for row in store.images()}

    resumed = cli(*_resume_command(slow_dataset, out))
    _, err = resumed.communicate(timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, err
    assert f"{killed_at} already done" in err
    _check_complete_and_correct(slow_dataset, out)
    with ResultsStore(out, readonly=True) as store:
        after = {row.path: row.finished for row in store.images()}
    assert all(after[path] == when for path, when in before.items())  # nothing done twice


def test_ctrl_c_stops_cleanly_keeping_what_is_done(slow_dataset, tmp_path):
    out = tmp_path / "results.sqlite"
    run = cli(*_resume_command(slow_dataset, out))
    try:
        wait_for(lambda: stored_count(out) >= 3, RUN_TIMEOUT_S, "3 images stored", run)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 130, err
    assert "Stopped:" in err and "Run the same command again to resume" in err
    assert "Traceback" not in err
    stopped_at = stored_count(out)
    assert 3 <= stopped_at < 16
    with ResultsStore(out) as store:  # the lock was released, the store is whole
        assert store.counts()["failed"] == 0

    resumed = cli(*_resume_command(slow_dataset, out))
    _, err = resumed.communicate(timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, err
    _check_complete_and_correct(slow_dataset, out)


def test_a_stop_request_ends_the_run_between_images(dataset, tmp_path):
    stop = threading.Event()
    seen: list[str] = []

    def record(path: str) -> None:
        seen.append(path)
        if len(seen) == 3:
            stop.set()

    summary = run_batch(BUILTIN, dataset, tmp_path / "r.sqlite", settings(), InProcessExecutor(),
                        stop=stop, on_record=record)  # fmt: skip
    assert summary.interrupted and summary.computed == len(seen) < 8


# --------------------------------------------------------------------------- checks


def test_worker_records_are_checked_before_they_are_stored():
    channels = {"block1": 32}
    good = {
        "top": [(1, 0.9), (0, 0.1)], "predicted": 1, "target": 1,
        "layers": [{
            "name": "block1", "shape": (32, 16, 16),
            "conductance": np.zeros(32, np.float32), "act_max": np.zeros(32, np.float32),
            "act_mean": np.zeros(32, np.float32), "delta": 0.0, "output_diff": 1.0,
            "relative_delta": 0.0, "n_steps": 8, "steps_status": "fixed", "layer_moves": True,
            "map": None,
        }],
    }  # fmt: skip
    assert record_problem(good, list(channels), 8, maps=False) is None
    assert record_problem({"error": "NaN scores"}, list(channels), 8, maps=False) is None

    def broken(**changes):
        record = json.loads(json.dumps({k: v for k, v in good.items() if k != "layers"}))
        record["top"] = [tuple(t) for t in record["top"]]
        layer = dict(good["layers"][0])
        layer.update(changes.pop("layer", {}))
        record["layers"] = [layer]
        record.update(changes)
        return record_problem(record, list(channels), 8, maps=False)

    assert broken() is None
    assert "channels" in broken(layer={"conductance": np.zeros(31, np.float32)})
    assert "channels" in broken(layer={"act_max": np.zeros(32, np.float64)})
    assert "map" in broken(layer={"map": np.zeros((32, 16, 16), np.float32)})
    assert "layer" in broken(layer={"name": "block2"})
    assert "predicted" in broken(predicted=8)
    assert "target" in broken(target=-1)
    assert "steps" in broken(layer={"n_steps": 0})
    assert "status" in broken(layer={"steps_status": "whatever"})
    assert "number" in broken(layer={"delta": "0"})
    assert "fields" in broken(extra=1)
    assert record_problem("not a record", list(channels), 8, maps=False) is not None


def test_a_malformed_record_is_stored_as_failed_not_trusted(dataset, tmp_path):
    class Liar(InProcessExecutor):
        def submit(self, model, op, args=None):
            handle = super().submit(model, op, args)
            if op != "dataset_record":
                return handle
            records = handle.result()
            records[0]["layers"][0]["conductance"] = np.zeros(3, np.float32)
            lie = JobHandle(op)
            lie.set_result(records)
            return lie

    summary = run_batch(BUILTIN, dataset, tmp_path / "r.sqlite", settings(), Liar())
    assert (summary.ok, summary.failed) == (0, 6)
    with ResultsStore(tmp_path / "r.sqlite", readonly=True) as store:
        assert "do not match the layer's 32 channels" in store.images("failed")[0].reason


def test_the_store_keeps_every_column_it_is_given(tmp_path):
    rng = np.random.default_rng(3)
    layers = [
        {"name": "a", "shape": (4, 3, 2), "conductance": rng.random(4, np.float32),
         "act_max": rng.random(4, np.float32), "act_mean": rng.random(4, np.float32),
         "delta": -1e-3, "output_diff": 2.5, "relative_delta": 4e-4, "n_steps": 7,
         "steps_status": "converged", "layer_moves": False,
         "map": rng.random((4, 3, 2), np.float32)},
        {"name": "b", "shape": (5,), "conductance": rng.random(5, np.float32),
         "act_max": rng.random(5, np.float32), "act_mean": rng.random(5, np.float32),
         "delta": float("nan"), "output_diff": 0.0, "relative_delta": 0.0, "n_steps": 7,
         "steps_status": "cap", "layer_moves": True, "map": rng.random(5, np.float32)},
    ]  # fmt: skip
    record = {"top": [(2, 0.75), (0, 0.25)], "predicted": 2, "target": (2, 1, 0), "layers": layers}
    with ResultsStore(tmp_path / "s.sqlite") as store:
        store.begin({"layers": ["a", "b"]}, {"name": "m"})
        store.add_record("x/y.png", "ab" * 32, record, labels=["p", "q", "r"], true_label=1,
                         true_name="q")  # fmt: skip
        store.add_problem("z.png", "cd" * 32, "unreadable", true_label=0, true_name="p")
    with ResultsStore(tmp_path / "s.sqlite", readonly=True) as store:
        row, bad = store.images()
        assert (row.path, row.sha256, row.status, row.reason) == ("x/y.png", "ab" * 32, "ok", None)
        assert (row.true_label, row.true_name) == (1, "q")
        assert (row.predicted, row.predicted_name) == (2, "r")
        assert (row.score, row.top, row.target) == (0.75, [(2, 0.75), (0, 0.25)], (2, 1, 0))
        assert (bad.path, bad.status, bad.reason) == ("z.png", "bad", "unreadable")
        assert (bad.true_label, bad.true_name) == (0, "p")
        for layer in layers:
            got = store.layer_row("x/y.png", layer["name"])
            for key, value in layer.items():
                if key == "name":
                    continue
                if isinstance(value, np.ndarray):
                    assert np.array_equal(got[key], value), key
                elif key == "delta" and np.isnan(value):
                    assert got[key] is None  # SQLite has no NaN
                else:
                    assert got[key] == value, key
        assert store.meta("settings") == {"layers": ["a", "b"]}


def test_top_images_rank_by_each_channel(dataset, tmp_path):
    out = tmp_path / "r.sqlite"
    run_batch(BUILTIN, dataset, out, settings(), InProcessExecutor())
    with ResultsStore(out, readonly=True) as store:
        for by in ("act_max", "act_mean", "conductance"):
            paths, values = store.channel_matrix("block3", by)
            assert values.shape == (6, 64)
            for channel in (0, 17, 63):
                order = np.argsort(-values[:, channel].astype(np.float64), kind="stable")[:4]
                want = [(paths[i], float(values[i, channel])) for i in order]
                assert store.top_images("block3", channel, k=4, by=by) == want
        with pytest.raises(StoreError, match="64 channels"):
            store.top_images("block3", 64)
        with pytest.raises(StoreError, match="no results for layer 'fc'"):
            store.top_images("fc", 0)


# --------------------------------------------------------------------------- the dataset


def test_images_are_found_recursively_and_labelled_like_image_folder(tmp_path):
    root = make_dataset(tmp_path / "d", count=9)
    Image.new("RGB", (8, 8)).save(root / "at_root.png")
    found = find_images(root, class_folders=True)
    keys = [f.key for f in found]
    assert "at_root.png" not in keys and "circle/notes.txt" not in keys
    assert "triangle/nested/img02.png" in keys and keys == sorted(keys)
    assert "at_root.png" in [f.key for f in find_images(root)]
    mapping = class_map(found, DEMO_LABELS)
    assert mapping.mode == "model" and mapping.label("triangle") == 2
    folders = class_map(found, ["x"] * 10)  # names that are not the model's: ImageFolder order
    assert folders.mode == "sorted"
    assert folders.classes == tuple(sorted(folders.classes))
    assert [folders.label(c) for c in folders.classes] == list(range(len(folders.classes)))
    with pytest.raises(DatasetError, match="class folders but the model has 2 classes"):
        class_map(found, ["a", "b"])
    with pytest.raises(DatasetError, match="No images"):
        find_images(_empty(tmp_path / "e"))
    with pytest.raises(DatasetError, match="No folder"):
        find_images(tmp_path / "missing")


def _empty(path: Path) -> Path:
    path.mkdir()
    (path / "readme.md").write_text("no images here")
    return path


def test_settings_are_checked_before_anything_runs(dataset, tmp_path):
    executor = InProcessExecutor()
    with pytest.raises(BatchError, match="--labels-from-folders"):
        run_batch(BUILTIN, dataset, tmp_path / "r", settings(target="true",
                  labels_from_folders=False), executor)  # fmt: skip
    with pytest.raises(BatchError, match="out of range: the model has 8 classes"):
        run_batch(BUILTIN, dataset, tmp_path / "r", settings(target=8), executor)
    with pytest.raises(Exception, match="no module named 'blok2'.*'block2'"):
        run_batch(BUILTIN, dataset, tmp_path / "r", settings(layers=("blok2",)), executor)
    with pytest.raises(BatchError, match="--tolerance"):
        run_batch(BUILTIN, dataset, tmp_path / "r", settings(n_steps="auto"), executor)
    assert executor.records == 0 and not (tmp_path / "r").exists()


def test_default_layers_are_the_models_suggested_ones(dataset, tmp_path):
    summary = run_batch(BUILTIN, dataset, tmp_path / "r.sqlite", settings(layers=()),
                        InProcessExecutor())  # fmt: skip
    assert summary.layers and summary.ok == 6


# --------------------------------------------------------------------------- the command line


def test_auto_steps_give_the_engines_numbers(dataset, tmp_path):
    out = tmp_path / "auto.sqlite"
    run = settings(n_steps="auto", tolerance=0.05, target="true")
    summary = run_batch(BUILTIN, dataset, out, run, InProcessExecutor())
    assert summary.ok == 6
    lm = load_demo_model()
    prep = Preprocessing.for_model(lm.input_size, lm.mean, lm.std)
    modules = [lm.model.get_submodule(name) for name in LAYERS]
    with ResultsStore(out, readonly=True) as store:
        assert store.meta("settings")["tolerance"] == 0.05
        for row in store.images("ok"):
            x = preprocess(load_image(dataset / row.path), prep)
            engine = LayerConductance(lm.model, modules)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unconverged ones: the status says it
                attributions, deltas = engine.attribute(
                    x, baselines=make_baseline("black", x, prep), target=row.target,
                    n_steps="auto", tolerance=0.05, return_convergence_delta=True,
                )  # fmt: skip
            for name, attribution, delta in zip(LAYERS, attributions, deltas, strict=True):
                got = store.layer_row(row.path, name)
                totals = attribution[0].detach().double().flatten(1).sum(dim=1).float().numpy()
                close(got["conductance"], totals)
                # The store's delta is the maps' sum against F(x) - F(baseline) of the probe
                # pass; the engine's comes from its own forward passes: float32 rounding apart.
                assert got["delta"] == pytest.approx(float(delta[0]), abs=1e-5)
                assert got["n_steps"] == engine.last_steps[0] - 1
                assert got["steps_status"] == engine.last_status[0]
                if got["steps_status"] == "converged":
                    assert got["relative_delta"] <= 0.05


def test_usage_errors_are_messages(tmp_path, capsys):
    assert cli_main(["batch", "--images", str(tmp_path), "--out", str(tmp_path / "r"),
                     "--target", "true"]) == 1  # fmt: skip
    assert "add --labels-from-folders" in capsys.readouterr().err
    assert cli_main(["batch", "--images", str(tmp_path), "--out", str(tmp_path / "r"),
                     "--weights", "w.pt"]) == 1  # fmt: skip
    assert "name the architecture with --arch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["batch", "--images", str(tmp_path), "--out", "r", "--n-steps", "many"])
    assert exit_info.value.code == 2


def test_console_script_and_module_run_the_same_command():
    done = subprocess.run([sys.executable, "-m", "explainer", "batch", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "--labels-from-folders" in done.stdout
    text = (REPO / "pyproject.toml").read_text()
    assert 'explainer = "explainer.__main__:main"' in text


def test_weights_file_and_top_command(tmp_path, capsys):
    """``--arch --weights``: a file from the user, loaded with the intake checks; then ``top``."""
    lm = load_demo_model()
    weights = tmp_path / "demo.pt"
    torch.save(lm.model.state_dict(), weights)
    root = make_dataset(tmp_path / "d", count=3, bad=False)
    out = tmp_path / "r.sqlite"
    args = ["batch", "--arch", "demo_cnn", "--weights", str(weights), "--images", str(root),
            "--out", str(out), "--layers", "block3", "--n-steps", "4", "--no-progress"]  # fmt: skip
    assert cli_main(args) == 0
    with ResultsStore(out, readonly=True) as store:
        assert store.meta("model")["file_sha256"] == _sha256(weights)
        assert store.counts()["ok"] == 3
        best = store.top_images("block3", 5, k=2)
    capsys.readouterr()
    assert cli_main(["top", str(out), "--layer", "block3", "--channel", "5", "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == [path for path, _ in best]


def test_importing_explainer_imports_neither_ray_nor_the_driver():
    code = (
        "import sys, explainer, explainer.compute, explainer.batch, explainer.compute.tasks, "
        "explainer.compute.ray_executor, explainer.batch.record; "
        "print(sorted(m for m in ('ray', 'explainer.batch.runner') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
