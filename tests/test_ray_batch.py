"""Dataset mode on a real Ray cluster: ``explainer batch --ray ADDRESS`` gives the same results
as the local workers (and as per-image library runs), and resumes like them.

Needs the cluster of ``.ci/run`` (see ``tests/test_ray_executor.py``: skipped without it,
failed under ``CI=true``).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from test_batch import (
    BUILTIN,
    LAYERS,
    RUN_TIMEOUT_S,
    assert_store_matches_library,
    cli,
    library_expectations,
    make_dataset,
    settings,
)
from test_ray_executor import cluster_address

from explainer.batch.runner import run_batch
from explainer.batch.store import ResultsStore
from explainer.compute import LocalExecutor


def _rows(out: Path) -> dict[str, list[tuple]]:
    """Every row of the store's tables but the timestamps, for comparing two runs."""
    with sqlite3.connect(f"file:{out}?mode=ro", uri=True) as db:
        return {
            "images": db.execute(
                "SELECT path, sha256, status, reason, true_label, true_name, predicted, "
                "predicted_name, score, top, target FROM images ORDER BY path"
            ).fetchall(),
            "layers": db.execute("SELECT * FROM layers ORDER BY path, layer").fetchall(),
            "settings": db.execute("SELECT value FROM run WHERE key='settings'").fetchall(),
        }


def assert_same_rows(got: dict[str, list[tuple]], want: dict[str, list[tuple]]) -> None:
    """The same rows, every text and count equal, every number and array equal within float32
    rounding: a worker's first call on a model meters its passes, later ones reuse the row
    cost, and the path may be split into other passes in another worker."""
    assert got.keys() == want.keys()
    for table in want:
        assert len(got[table]) == len(want[table]), table
        for row_got, row_want in zip(got[table], want[table], strict=True):
            assert len(row_got) == len(row_want)
            for a, b in zip(row_got, row_want, strict=True):
                if isinstance(b, bytes) and isinstance(a, bytes) and len(a) == len(b):
                    x, y = np.frombuffer(a, "<f4"), np.frombuffer(b, "<f4")
                    scale = float(np.abs(y).max()) if y.size else 0.0
                    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * max(scale, 1.0))
                elif isinstance(b, float) and isinstance(a, float):
                    assert a == pytest.approx(b, rel=1e-4, abs=1e-6), (table, row_want[:2])
                else:
                    assert a == b, (table, row_want[:2])


@pytest.fixture(scope="module")
def address() -> str:
    return cluster_address()  # first: no cluster, no local run either


@pytest.fixture(scope="module")
def dataset(address, tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("images"), count=8, seed=4)


@pytest.fixture(scope="module")
def local_run(address, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "local.sqlite"
    executor = LocalExecutor(max_workers=1, timeout_s=RUN_TIMEOUT_S)
    try:
        run_batch(BUILTIN, dataset, out, settings(target="true", maps=True), executor)
    finally:
        executor.shutdown()
    return out


def _ray_command(address: str, dataset: Path, out: Path) -> list[str]:
    return ["batch", "--ray", address, "--images", str(dataset), "--out", str(out),
            "--labels-from-folders", "--layers", ",".join(LAYERS), "--target", "true",
            "--n-steps", "8", "--maps", "--no-progress"]  # fmt: skip


def test_the_same_job_on_the_cluster_gives_the_local_results(address, dataset, local_run, tmp_path):
    out = tmp_path / "ray.sqlite"
    run = cli(*_ray_command(address, dataset, out))
    _, err = run.communicate(timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, err
    assert "10 images (8 explained, 2 bad, 0 failed)" in err
    assert_same_rows(_rows(out), _rows(local_run))  # every number, every map, every reason
    expected = library_expectations(dataset, settings(target="true"))
    assert_store_matches_library(out, expected, maps=True)

    # Run again: nothing left to do, nothing computed.
    again = cli(*_ray_command(address, dataset, out))
    _, err = again.communicate(timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, err
    assert "0 explained, 0 bad, 0 failed, 10 already done" in err


def test_a_run_on_the_cluster_resumes_a_local_one(address, dataset, local_run, tmp_path):
    """Where the results were computed does not change them: a store begun locally is finished
    on the cluster with the same numbers."""
    from explainer.compute.ray_executor import RayExecutor

    out = tmp_path / "mixed.sqlite"
    local = LocalExecutor(max_workers=1, timeout_s=RUN_TIMEOUT_S)
    stop_after = []

    def stop_soon(path: str) -> None:
        stop_after.append(path)
        if len(stop_after) == 4:
            stopper.set()

    stopper = threading.Event()
    try:
        first = run_batch(BUILTIN, dataset, out, settings(target="true", maps=True), local,
                          stop=stopper, on_record=stop_soon)  # fmt: skip
    finally:
        local.shutdown()
    assert first.interrupted
    executor = RayExecutor(address, timeout_s=RUN_TIMEOUT_S)
    try:
        second = run_batch(BUILTIN, dataset, out, settings(target="true", maps=True), executor)
    finally:
        executor.shutdown()
    assert second.skipped == first.computed and second.computed == 10 - first.computed
    assert_same_rows(_rows(out), _rows(local_run))
    with ResultsStore(out, readonly=True) as store:
        assert np.isfinite(store.channel_matrix("block3")[1]).all()
