"""The Ray executor on a real cluster: the job interface of the local workers, the same results,
the model put into the object store once, actors spread over the nodes, limits and cancellation.

The cluster comes from ``.ci/run`` (``EXPLAINER_TEST_RAY_ADDRESS``: a head and a second node on
loopback addresses). Without it these tests are skipped, except under ``CI=true``, where they
fail: CI must run them.
"""

from __future__ import annotations

import importlib.util
import os
import time
from unittest import mock

import numpy as np
import pytest

from explainer import analysis
from explainer.baselines import make_baseline
from explainer.compute import LocalExecutor, ModelSource
from explainer.demo import sample_image_paths
from explainer.errors import AttributionError, JobCancelled, ModelLoadError, WorkerLimitError
from explainer.images import Preprocessing, load_image, preprocess
from explainer.intake import load_demo_model

ADDRESS_ENV = "EXPLAINER_TEST_RAY_ADDRESS"
NODES_ENV = "EXPLAINER_TEST_RAY_NODES"
BUILTIN = ModelSource("builtin")
WAIT_S = 300  # a bound on every wait, never reached when all is well


def cluster_address() -> str:
    """The test cluster's address; skips (fails under CI=true) when there is none."""
    address = os.environ.get(ADDRESS_ENV, "").strip()
    why = None
    if importlib.util.find_spec("ray") is None:
        why = 'ray is not installed (pip install -e ".[ray]")'
    elif not address:
        why = f"no Ray cluster: {ADDRESS_ENV} is not set (bash .ci/run --ray-only starts one)"
    if why is not None:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs the Ray tests on a cluster, but {why}.")
        pytest.skip(why)
    return address


@pytest.fixture
def ray_pool():
    """A fresh executor per test: actors reserve the cluster's CPUs, so two executors at once
    would leave the second one's actors waiting for room."""
    from explainer.compute.ray_executor import RayExecutor

    executor = RayExecutor(cluster_address(), actors=2, timeout_s=WAIT_S)
    yield executor
    executor.shutdown()


@pytest.fixture(scope="module")
def demo():
    lm = load_demo_model()
    prep = Preprocessing.for_model(lm.input_size, lm.mean, lm.std)
    x = preprocess(load_image(sample_image_paths()[1]), prep)
    return lm, x, make_baseline("black", x, prep)


def _conductance_args(x, baseline, **extra):
    args = {"layer": "block2", "x": x.numpy(), "target": 1, "baseline": baseline.numpy(),
            "method": "gausslegendre", "n_steps": 16, "internal_batch_size": None}  # fmt: skip
    args.update(extra)
    return args


def test_results_equal_the_local_workers_and_the_library(ray_pool, demo):
    lm, x, baseline = demo
    info = ray_pool.submit(BUILTIN, "info").result(timeout=WAIT_S)
    assert info == lm.info()
    remote = ray_pool.submit(BUILTIN, "conductance", _conductance_args(x, baseline))
    scores = ray_pool.submit(BUILTIN, "scores", {"x": x.numpy()})
    here = analysis.compute_conductance(lm.model, "block2", x, 1, baseline, n_steps=16)
    local = LocalExecutor(max_workers=1, timeout_s=WAIT_S)
    try:
        there = local.submit(BUILTIN, "conductance", _conductance_args(x, baseline))
        there = there.result(timeout=WAIT_S)
    finally:
        local.shutdown()
    result = remote.result(timeout=WAIT_S)
    for other in (here, there):
        assert np.array_equal(result.attributions, other.attributions)
        assert np.array_equal(result.channel_totals, other.channel_totals)
        assert result.delta == other.delta
    assert np.array_equal(scores.result(timeout=WAIT_S), analysis.class_scores(lm.model, x))


def test_the_model_goes_into_the_object_store_once_and_actors_spread(demo):
    import ray

    from explainer.compute.ray_executor import RayExecutor

    _, x, baseline = demo
    with mock.patch.object(ray, "put", wraps=ray.put) as put:
        executor = RayExecutor(cluster_address(), actors=2, timeout_s=WAIT_S)
        try:
            jobs = [executor.submit(BUILTIN, "scores", {"x": x.numpy()}) for _ in range(8)]
            for job in jobs:
                job.result(timeout=WAIT_S)
            assert put.call_count == 1  # the model, once, for both actors and every job
            nodes = executor.nodes()
            statuses = executor.workers()
        finally:
            executor.shutdown()
    assert len(nodes) == 2
    expected_nodes = int(os.environ.get(NODES_ENV, "2"))
    assert len(set(nodes)) == min(2, expected_nodes)  # one actor per node (1 CPU each)
    assert len(statuses) == 2 and all(s.peak_rss_bytes > 50 * 2**20 for s in statuses)
    assert sum(s.jobs_done for s in statuses) == 8


def test_errors_come_back_as_the_project_errors(ray_pool, demo):
    _, x, baseline = demo
    job = ray_pool.submit(BUILTIN, "conductance", _conductance_args(x, baseline, layer="blok2"))
    with pytest.raises(AttributionError, match="no layer named 'blok2'"):
        job.result(timeout=WAIT_S)
    broken = ModelSource("file", b"\x00 not a model \x00" * 8, "broken.pt")
    with pytest.raises(ModelLoadError):
        ray_pool.submit(broken, "info").result(timeout=WAIT_S)
    # The executor goes on with the good model.
    assert ray_pool.submit(BUILTIN, "score_shape").result(timeout=WAIT_S) == (8,)


def test_a_running_job_is_cancelled_and_its_actor_goes_on(ray_pool, demo):
    _, x, baseline = demo
    ray_pool.submit(BUILTIN, "info").result(timeout=WAIT_S)  # the actors are up
    long = {"layer": "block1", "x": x.numpy(), "target": 1, "baseline": baseline.numpy(),
            "methods": ["riemann_trapezoid"], "steps": [1000] * 40}  # fmt: skip
    jobs = [ray_pool.submit(BUILTIN, "sweep", long) for _ in range(2)]  # one per actor
    time.sleep(2.0)
    started = time.monotonic()
    for job in jobs:
        assert job.cancel()
    for job in jobs:
        with pytest.raises(JobCancelled):
            job.result(timeout=60)
    assert time.monotonic() - started < 30
    again = ray_pool.submit(BUILTIN, "conductance", _conductance_args(x, baseline))
    assert again.result(timeout=WAIT_S).layer == "block2"


def test_a_job_over_the_time_limit_is_stopped(demo):
    from explainer.compute.ray_executor import RayExecutor

    _, x, baseline = demo
    executor = RayExecutor(cluster_address(), actors=1, timeout_s=3, start_timeout_s=WAIT_S)
    try:
        executor.submit(BUILTIN, "info").result(timeout=WAIT_S)
        long = {"layer": "block1", "x": x.numpy(), "target": 1, "baseline": baseline.numpy(),
                "methods": ["riemann_trapezoid"], "steps": [1000] * 40}  # fmt: skip
        job = executor.submit(BUILTIN, "sweep", long)
        with pytest.raises(WorkerLimitError, match="longer than the 3 s") as caught:
            job.result(timeout=WAIT_S)
        assert caught.value.limit == "time"
        after = executor.submit(BUILTIN, "score_shape")  # a new actor takes the old one's place
        assert after.result(timeout=WAIT_S) == (8,)
    finally:
        executor.shutdown()
