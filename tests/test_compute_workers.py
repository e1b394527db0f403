"""Local compute workers: results equal in-process ones; limits, cancellation and crashes end
in messages while the server and the other workers carry on."""

from __future__ import annotations

import io
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import Bomb, Spin, export_bytes

from explainer import analysis
from explainer.baselines import make_baseline
from explainer.compute import LocalExecutor, ModelSource
from explainer.demo import sample_image_paths
from explainer.errors import JobCancelled, ModelLoadError, WorkerError, WorkerLimitError
from explainer.images import Preprocessing, load_image, preprocess
from explainer.intake import load_demo_model

BUILTIN = ModelSource("builtin")
START_S = 120  # a worker imports torch before it can answer


@pytest.fixture(scope="module")
def pool():
    executor = LocalExecutor(max_workers=2, timeout_s=120)
    yield executor
    executor.shutdown()


@pytest.fixture(scope="module")
def demo():
    lm = load_demo_model()
    prep = Preprocessing.for_model(lm.input_size, lm.mean, lm.std)
    x = preprocess(load_image(sample_image_paths()[0]), prep)
    baseline = make_baseline("black", x, prep)
    return lm, x, baseline


def _conductance_args(x, baseline, **extra):
    args = {
        "layer": "block2",
        "x": x.numpy(),
        "target": 1,
        "baseline": baseline.numpy(),
        "method": "gausslegendre",
        "n_steps": 16,
        "internal_batch_size": None,
    }
    args.update(extra)
    return args


def _pid(executor: LocalExecutor, source: ModelSource) -> int | None:
    return next(
        (w.pid for w in executor.workers() if w.model_key == source.key and not w.background), None
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split()[2] != "Z"


def test_results_equal_in_process_results(pool, demo):
    lm, x, baseline = demo
    info = pool.submit(BUILTIN, "info").result(START_S)
    assert info == lm.info()
    scores = pool.submit(BUILTIN, "scores", {"x": x.numpy()}).result(60)
    np.testing.assert_allclose(scores, analysis.class_scores(lm.model, x), rtol=1e-5, atol=1e-6)

    handle = pool.submit(BUILTIN, "conductance", _conductance_args(x, baseline))
    result = handle.result(60)
    solo = analysis.compute_conductance(lm.model, "block2", x, 1, baseline, n_steps=16)
    np.testing.assert_allclose(result.attributions, solo.attributions, rtol=1e-4, atol=1e-6)
    assert result.delta == pytest.approx(solo.delta, abs=1e-5)
    assert handle.progress is not None and handle.progress[0] == handle.progress[1]

    tree = pool.submit(BUILTIN, "tree").result(60)
    assert "block2" in tree.nodes and tree.nodes["block2"].usable
    grads = pool.submit(
        BUILTIN, "neuron_gradients", {"layer": "block1", "x": x.numpy(), "neurons": [(0, 1, 1)]}
    ).result(60)
    expected = analysis.compute_neuron_gradients(lm.model, "block1", x, [(0, 1, 1)])[0]
    np.testing.assert_allclose(grads[0].gradient, expected.gradient, rtol=1e-4, atol=1e-7)


def test_a_project_error_in_the_worker_comes_back_as_itself(pool, demo):
    _, x, baseline = demo
    handle = pool.submit(BUILTIN, "conductance", _conductance_args(x, baseline, layer="nope"))
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        handle.result(60)


def test_cancel_stops_a_running_job_and_keeps_the_worker(pool, demo):
    _, x, baseline = demo
    pid = _pid(pool, BUILTIN)
    args = _conductance_args(x, baseline, n_steps=1024, internal_batch_size=1, layer="conv1")
    handle = pool.submit(BUILTIN, "conductance", args)
    deadline = time.monotonic() + 60
    while handle.progress is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert handle.progress is not None and not handle.done()
    asked = time.monotonic()
    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.result(30)
    print(f"cancelled job ended {time.monotonic() - asked:.2f} s after cancel()")
    assert _pid(pool, BUILTIN) == pid and _alive(pid)  # stopped cooperatively: no restart
    scores = pool.submit(BUILTIN, "scores", {"x": x.numpy()}).result(60)
    assert scores.shape == (8,)


def test_a_background_job_runs_beside_the_interactive_ones(pool, demo):
    """A long refinement submitted as a background job does not hold up a click: the model's
    interactive jobs run on its other worker meanwhile, and both give the usual results."""
    lm, x, baseline = demo
    args = _conductance_args(x, baseline, n_steps=1024, internal_batch_size=1, layer="conv1")
    long = pool.submit(BUILTIN, "conductance", args, background=True)
    deadline = time.monotonic() + START_S
    while long.progress is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert long.progress is not None and not long.done()
    grads = pool.submit(
        BUILTIN, "neuron_gradients", {"layer": "block1", "x": x.numpy(), "neurons": [(0, 1, 1)]}
    ).result(60)
    assert not long.done(), "the click waited for the background job"
    expected = analysis.compute_neuron_gradients(lm.model, "block1", x, [(0, 1, 1)])[0]
    np.testing.assert_allclose(grads[0].gradient, expected.gradient, rtol=1e-4, atol=1e-7)
    workers = [w for w in pool.workers() if w.model_key == BUILTIN.key]
    assert sorted(w.background for w in workers) == [False, True]
    assert len({w.pid for w in workers}) == 2
    long.cancel()
    with pytest.raises(JobCancelled):
        long.result(30)
    quick = pool.submit(BUILTIN, "conductance", _conductance_args(x, baseline), background=True)
    solo = analysis.compute_conductance(lm.model, "block2", x, 1, baseline, n_steps=16)
    np.testing.assert_allclose(
        quick.result(60).attributions, solo.attributions, rtol=1e-4, atol=1e-7
    )


def test_an_interactive_job_pauses_a_background_job_that_has_not_reached_its_worker_yet():
    """Right after a refinement is submitted, its job may still wait in the background worker's
    queue when the first look arrives: the first look must pause that worker all the same
    (without, the two shared the CPU and a resnet50 first look took 3.6 s instead of 1.2 s)."""
    import collections
    from types import SimpleNamespace

    from explainer.compute.local import BACKGROUND_SUFFIX

    executor = LocalExecutor(max_workers=2)
    try:
        waiting = SimpleNamespace(closed=False, running=None, queue=collections.deque(["job"]))
        executor._slots["model" + BACKGROUND_SUFFIX] = waiting
        assert executor._background_slot("model") is waiting
        waiting.queue.clear()
        assert executor._background_slot("model") is None  # idle: nothing to pause
        waiting.running = "job"
        assert executor._background_slot("model") is waiting
        waiting.closed = True
        assert executor._background_slot("model") is None
    finally:
        executor._slots.clear()
        executor.shutdown()


def test_a_worker_killed_mid_request_is_restarted_and_the_job_retried(pool, demo):
    lm, x, baseline = demo
    args = _conductance_args(x, baseline, n_steps=256, internal_batch_size=1, layer="conv1")
    handle = pool.submit(BUILTIN, "conductance", args)
    deadline = time.monotonic() + 60
    while handle.progress is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = _pid(pool, BUILTIN)
    os.kill(pid, 9)
    result = handle.result(START_S)
    solo = analysis.compute_conductance(
        lm.model, "conv1", x, 1, baseline, n_steps=256, internal_batch_size=1
    )
    np.testing.assert_allclose(result.attributions, solo.attributions, rtol=1e-4, atol=1e-6)
    status = next(w for w in pool.workers() if w.model_key == BUILTIN.key and not w.background)
    assert status.restarts == 1 and status.pid != pid and not _alive(pid)


def test_a_pickle_payload_never_runs_in_a_worker(pool, tmp_path):
    marker = tmp_path / "owned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"fc.weight": Payload()}, buffer)
    source = ModelSource("file", buffer.getvalue(), "weights.pt", arch="demo_cnn")
    with pytest.raises(ModelLoadError):
        pool.submit(source, "info").result(START_S)
    assert not marker.exists()
    bare = ModelSource("file", pickle.dumps(Payload()), "model.pkl")
    with pytest.raises(ModelLoadError):
        pool.submit(bare, "info").result(START_S)
    assert not marker.exists()


@pytest.mark.slow
def test_a_hanging_model_hits_the_time_limit_and_the_rest_carries_on(demo):
    _, x, _ = demo
    executor = LocalExecutor(max_workers=2, timeout_s=25)
    try:
        assert executor.submit(BUILTIN, "info").result(START_S) is not None
        spin = ModelSource("file", export_bytes(Spin()), "spin.pt2")
        assert executor.submit(spin, "info").result(START_S).arch == "custom"
        pid = _pid(executor, spin)
        with pytest.raises(WorkerLimitError, match="EXPLAINER_REQUEST_TIMEOUT_S") as caught:
            executor.submit(spin, "scores", {"x": np.zeros((1, 3, 8, 8), np.float32)}).result(60)
        assert caught.value.limit == "time"
        assert not _alive(pid)  # no busy process is left behind
        scores = executor.submit(BUILTIN, "scores", {"x": x.numpy()}).result(60)
        assert scores.shape == (8,)
    finally:
        executor.shutdown()


@pytest.mark.slow
def test_a_memory_bomb_hits_the_memory_limit_and_the_server_stays_small(demo):
    _, x, _ = demo
    executor = LocalExecutor(max_workers=1, timeout_s=120, memory_bytes=2 * 2**30)
    try:
        bomb = ModelSource("file", export_bytes(Bomb()), "bomb.pt2")
        assert executor.submit(bomb, "info").result(START_S).arch == "custom"
        with pytest.raises(WorkerLimitError, match="EXPLAINER_WORKER_MEMORY_MB") as caught:
            executor.submit(bomb, "scores", {"x": np.zeros((1, 3, 8, 8), np.float32)}).result(60)
        assert caught.value.limit == "memory"
        # One worker at most: the built-in model takes the bomb's place and answers.
        scores = executor.submit(BUILTIN, "scores", {"x": x.numpy()}).result(START_S)
        assert scores.shape == (8,)
        assert [w.model_key for w in executor.workers()] == [BUILTIN.key]
    finally:
        executor.shutdown()


def test_a_model_that_cannot_load_reports_why_and_frees_its_worker(pool):
    source = ModelSource("file", b"not a model at all", "junk.pt")
    with pytest.raises(ModelLoadError, match="junk.pt"):
        pool.submit(source, "info").result(START_S)
    assert source.key not in [w.model_key for w in pool.workers()]


def test_an_unknown_operation_is_refused(pool):
    with pytest.raises(ValueError, match="Unknown operation"):
        pool.submit(BUILTIN, "format_disk").result(60)


_CONNECT = """
import socket, sys
from explainer.compute.worker import isolate
cut = isolate()
probe = socket.socket()
probe.settimeout(2)
try:
    probe.connect(("127.0.0.1", int(sys.argv[1])))
    print("connected", cut)
except OSError:
    print("unreachable", cut)
"""


def test_a_worker_cannot_reach_the_network(pool):
    import socket
    import subprocess
    import sys

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
        done = subprocess.run(
            [sys.executable, "-c", _CONNECT, str(port)], capture_output=True, text=True, timeout=60
        )
    finally:
        listener.close()
    outcome, cut = done.stdout.split()
    if cut != "True":
        pytest.skip("this machine cannot give a process a network namespace of its own")
    assert outcome == "unreachable"
    pool.submit(BUILTIN, "info").result(START_S)
    assert all(w.network_isolated for w in pool.workers())


def _own_memory_cgroup() -> Path | None:
    """A fresh memory cgroup (v1) below this process's own, where one can be made."""
    try:
        line = next(
            row for row in Path("/proc/self/cgroup").read_text().splitlines()
            if row.split(":")[1] == "memory"
        )  # fmt: skip
        group = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/")
        made = group / f"explainer-test-{os.getpid()}"
        made.mkdir()
        return made
    except (StopIteration, IndexError, OSError):
        return None


def test_workers_join_the_operators_control_group(demo, monkeypatch):
    group = _own_memory_cgroup()
    if group is None:
        pytest.skip("no memory control group can be made here")
    monkeypatch.setenv("EXPLAINER_WORKER_CGROUP", str(group))
    executor = LocalExecutor(max_workers=1, timeout_s=120)
    try:
        executor.submit(BUILTIN, "info").result(START_S)
        pid = _pid(executor, BUILTIN)
        assert str(pid) in (group / "cgroup.procs").read_text().split()
    finally:
        executor.shutdown()
        time.sleep(0.5)
        group.rmdir()


def test_a_control_group_that_cannot_be_joined_is_said(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPLAINER_WORKER_CGROUP", str(tmp_path / "missing"))
    executor = LocalExecutor(max_workers=1, timeout_s=120)
    try:
        with pytest.raises(WorkerError, match="EXPLAINER_WORKER_CGROUP"):
            executor.submit(BUILTIN, "info").result(START_S)
        assert not executor.workers() or executor.workers()[0].pid is None
    finally:
        executor.shutdown()


def test_what_a_worker_reports_is_checked_before_the_server_uses_it():
    import dataclasses

    from explainer.analysis import ConvergencePoint
    from explainer.compute.tasks import info_problem, result_fits

    info = load_demo_model().info()
    assert info_problem(info) is None
    huge = dataclasses.replace(info, input_size=(3, 40_000, 40_000))
    assert "40000" in info_problem(huge)
    assert info_problem(dataclasses.replace(info, labels=())) is not None
    assert info_problem(dataclasses.replace(info, labels=("x" * 5000,) * 8)) is not None
    assert info_problem(dataclasses.replace(info, output_shape=(3,))) is not None
    assert info_problem("a string") is not None
    assert result_fits("scores", np.zeros(8, np.float32))
    assert not result_fits("scores", [1.0, 2.0])
    assert result_fits("sweep", [ConvergencePoint("riemann_left", 4, 0.1, 0.1)])
    assert not result_fits("sweep", [info])
    assert not result_fits("format_disk", None)


def test_a_worker_that_stops_reading_is_stopped_at_the_time_limit(tmp_path):
    """A worker that never reads its requests cannot stall the dispatcher, the time limit or
    the executor: its load ends at the limit and other models' submissions go through."""
    import threading

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    executor = LocalExecutor(max_workers=1, timeout_s=3, python=str(fake))
    try:
        big = ModelSource("file", b"\0" * 4_000_000, "big.pt")  # far more than a pipe holds
        handle = executor.submit(big, "info")
        with pytest.raises(WorkerLimitError, match="EXPLAINER_REQUEST_TIMEOUT_S"):
            handle.result(60)
        stuck = executor.submit(ModelSource("file", b"\0" * 4_000_000, "other.pt"), "info")
        time.sleep(0.5)  # its load is now blocked on the pipe
        submitted = threading.Event()
        threading.Thread(
            target=lambda: (executor.submit(big, "info"), submitted.set()), daemon=True
        ).start()
        assert submitted.wait(30)  # evicting the stuck worker did not block the executor
        with pytest.raises(Exception, match="make room|cancelled|took longer"):
            stuck.result(60)
    finally:
        executor.shutdown()


_ESCAPING_WORKER = """#!{python}
import os, sys, time
sys.path.insert(0, {root!r})
from explainer.compute.worker import isolate
isolate()
if os.fork() == 0:  # detach twice: the grandchild's parent exits, it is nobody's child
    os.setsid()
    if os.fork() == 0:
        open({marker!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def test_processes_a_worker_started_are_stopped_with_it(tmp_path):
    import sys

    marker = tmp_path / "escaped.pid"
    fake = tmp_path / "python"
    root = str(Path(__file__).resolve().parents[1])
    fake.write_text(_ESCAPING_WORKER.format(python=sys.executable, root=root, marker=str(marker)))
    fake.chmod(0o755)
    # The time limit must leave the fake worker time to import the package (about 5 s on a
    # loaded 2-core machine) and start its escaping grandchild before the kill.
    executor = LocalExecutor(max_workers=1, timeout_s=20, python=str(fake))
    try:
        with pytest.raises(WorkerLimitError):
            executor.submit(ModelSource("file", b"x", "x.pt"), "info").result(90)
        assert marker.exists()
        escaped = int(marker.read_text())
        for _ in range(50):  # bounded: the kill is synchronous, reaping may lag a little
            if not _alive(escaped):
                break
            time.sleep(0.1)
        assert not _alive(escaped)
    finally:
        executor.shutdown()
