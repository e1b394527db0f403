"""Local compute workers: one process per model, with hard limits, behind the job interface.

:class:`LocalExecutor` starts a worker process (:mod:`explainer.compute.worker`) for each model
the first time a job names it, and keeps at most ``EXPLAINER_MAX_WORKERS`` of them: the least
recently used one is stopped to make room. Each worker runs one job at a time; a dispatcher
thread per worker sends it the next job and watches it:

- **time**: a job (or the loading of its model) that runs past ``EXPLAINER_REQUEST_TIMEOUT_S`` has
  its worker killed and ends in a :class:`~explainer.errors.WorkerLimitError` naming the limit;
- **memory**: the worker limits its own data memory to ``EXPLAINER_WORKER_MEMORY_MB`` (a failed
  allocation comes back as an error), and the dispatcher kills it if its resident memory goes
  over the limit anyway; where the operator provides a control group
  (``EXPLAINER_WORKER_CGROUP``), every worker is moved into it as well;
- **cancellation**: :meth:`JobHandle.cancel` asks the worker to stop the job at the next module
  it enters; a worker that has not stopped within :data:`CANCEL_GRACE_S` is killed;
- **death**: a worker that dies is started again for the next job; a job it was running when it
  died unexpectedly is tried once more, then reported.

Only :mod:`explainer.compute.wire` frames cross the pipes, so nothing a worker sends can run code
in the server. A killed worker takes nothing with it but its own jobs: the server, other
workers and other jobs carry on.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explainer import errors, limits
from explainer.compute import wire
from explainer.compute.jobs import MEMORY_ENV, JobHandle, ModelSource
from explainer.compute.tasks import info_problem, result_fits
from explainer.memory import format_mib

__all__ = ["CANCEL_GRACE_S", "CGROUP_ENV", "LocalExecutor", "WorkerStatus"]

LOG = logging.getLogger(__name__)

CGROUP_ENV = "EXPLAINER_WORKER_CGROUP"
"""An operator's control group (a cgroup directory, v1 or v2) every worker is moved into, so
that its limits (memory, CPU) apply to the workers on top of their own."""

CANCEL_GRACE_S = 1.0
"""How long a cancelled job may take to stop on its own before its worker is killed."""

BACKGROUND_SUFFIX = "+background"
"""Appended to a model's key for the worker that runs its background jobs."""

_POLL_S = 0.05
_MAX_QUEUED = 256  # replies waiting for the dispatcher; the reader waits beyond that
_RSS_EVERY_S = 0.1
_EOF = object()
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

_ERRORS: dict[str, type[errors.ExplainerError]] = {
    cls.__name__: cls
    for cls in (
        errors.ExplainerError,
        errors.AttributionError,
        errors.AttributionTypeError,
        errors.ModelLoadError,
        errors.ImageLoadError,
        errors.WorkerError,
        errors.JobCancelled,
    )
}


@dataclass(frozen=True)
class WorkerStatus:
    """What one worker is doing, for monitoring and tests."""

    model_key: str
    pid: int | None
    busy: bool
    queued: int
    jobs_done: int
    restarts: int
    peak_rss_bytes: int
    network_isolated: bool
    background: bool = False
    """Whether it runs the model's background jobs (see :meth:`LocalExecutor.submit`)."""


@dataclass
class _Job:
    handle: JobHandle
    args: Mapping[str, Any]
    timeout_s: float
    tries: int = 0


class _Stopped(Exception):
    """The worker process is gone; ``reason`` says why (for the job's error)."""

    def __init__(self, error: errors.ExplainerError, retry: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry = retry


def _operator_settings() -> dict[str, str]:
    """The server's ``EXPLAINER_*`` settings now: a worker applies them before each job, so
    limits read at call time (the memory budget, the step limit) are the server's current ones."""
    return {k: v for k, v in os.environ.items() if k.startswith("EXPLAINER_") and k != MEMORY_ENV}


def _put_now(replies: queue.Queue, item: Any) -> None:
    """Queue ``item`` even when the queue is full (the oldest message gives way)."""
    while True:
        try:
            replies.put_nowait(item)
            return
        except queue.Full:
            try:
                replies.get_nowait()
            except queue.Empty:
                pass


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first found, then theirs), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rss_bytes(pid: int) -> tuple[int, int]:
    """Resident and peak resident memory of ``pid`` from /proc, or (0, 0) if unreadable."""
    rss = peak = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, peak


_ATTRIBUTIONS = frozenset({"conductance", "sweep", "neuron_gradients", "activation"})


def _advice(op: str) -> str:
    if op in _ATTRIBUTIONS:
        return "Use fewer steps, a smaller batch size or an earlier layer"
    if op in ("load", "info"):
        return "The model file needs that much to load: check that it is the file you meant"
    return (
        "The model itself needs that much for one image: check that it is the model you meant "
        "to load"
    )


def _memory_message(limit: int, op: str) -> str:
    return (
        f"{_what(op)} needed more memory than a worker may use ({format_mib(limit)}), so its "
        f"worker was stopped. {_advice(op)}, or ask the server's operator to raise "
        "EXPLAINER_WORKER_MEMORY_MB (or lower EXPLAINER_MEMORY_BUDGET_MB, which sizes each "
        "attribution pass). The server and your other work are unaffected."
    )


def _time_message(timeout: float, op: str) -> str:
    return (
        f"{_what(op)} took longer than the {timeout:g} s a request may run, so its worker was "
        f"stopped. {_advice(op)}, or ask the server's operator to raise "
        "EXPLAINER_REQUEST_TIMEOUT_S. The server and your other work are unaffected."
    )


def _what(op: str) -> str:
    return {
        "load": "Loading the model",
        "info": "Loading the model",
        "tree": "Discovering the layers",
        "score_shape": "Reading the model's scores",
        "scores": "Predicting",
        "conductance": "Computing conductance",
        "neuron_gradients": "Computing neuron gradients",
        "activation": "Reading the layer's output",
        "sweep": "The convergence sweep",
    }.get(op, "The request")


class _Slot:
    """One model's worker process, its queue of jobs and the thread that feeds it."""

    def __init__(self, owner: LocalExecutor, source: ModelSource, background: bool = False) -> None:
        self.owner = owner
        self.source = source
        self.key = source.key
        self.background = background
        # How many interactive jobs of the same model hold this (background) worker paused.
        self.paused = 0
        self.pause_lock = threading.Lock()
        self.cond = threading.Condition()
        self.queue: collections.deque[_Job] = collections.deque()
        self.closed = False
        self.close_reason = ""
        self.proc: subprocess.Popen | None = None
        self.request_fd: int | None = None
        # Guards the process and its request pipe: the dispatcher and close() may both stop it.
        self.io_lock = threading.Lock()
        self.replies: queue.Queue[Any] = queue.Queue()
        self.info: Any = None
        self.isolated = False
        self.running: _Job | None = None
        self.jobs_done = 0
        self.restarts = 0
        self.peak_rss = 0
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self.thread = threading.Thread(target=self._dispatch, name="worker-dispatch", daemon=True)
        self.thread.start()

    # --- called by the executor ---------------------------------------------------------------
    def enqueue(self, job: _Job) -> None:
        with self.cond:
            if self.closed:
                job.handle.set_cancelled(self.close_reason)
                return
            self.queue.append(job)
            self.cond.notify_all()
        job.handle.on_cancel(lambda: self._cancel_queued(job))

    def _cancel_queued(self, job: _Job) -> None:
        """A job cancelled before it started ends at once; a running one is stopped by
        :meth:`_await`, which this wakes."""
        with self.cond:
            try:
                self.queue.remove(job)
            except ValueError:
                self.cond.notify_all()
                return
        job.handle.set_cancelled()

    def close(self, reason: str) -> None:
        """Stop the worker; queued and running jobs end cancelled with ``reason``."""
        with self.cond:
            if self.closed:
                return
            self.closed, self.close_reason = True, reason
            pending = list(self.queue)
            self.queue.clear()
            self.cond.notify_all()
        for job in pending:
            job.handle.set_cancelled(reason)
        self._kill()

    def status(self) -> WorkerStatus:
        with self.cond:
            return WorkerStatus(
                model_key=self.key,
                pid=self.proc.pid if self.proc is not None and self.proc.poll() is None else None,
                busy=self.running is not None,
                queued=len(self.queue),
                jobs_done=self.jobs_done,
                restarts=self.restarts,
                peak_rss_bytes=self.peak_rss,
                network_isolated=self.isolated,
                background=self.background,
            )

    # --- the dispatcher thread ----------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed:
                    break
                job = self.queue.popleft()
                self.running = job
            try:
                self._serve(job)
            except Exception as exc:  # noqa: BLE001 - the dispatcher must survive anything
                LOG.exception("Worker dispatcher failed")
                self._kill()  # a worker nobody watches must not run on
                job.handle.set_exception(
                    errors.WorkerError(f"{_what(job.handle.op)} failed in the server ({exc}).")
                )
            finally:
                with self.cond:
                    self.running = None
                    self.jobs_done += 1
        self._kill()

    def _serve(self, job: _Job) -> None:
        handle = job.handle
        deadline = time.monotonic() + job.timeout_s  # for the job and any retry of it
        while True:
            if handle.cancel_requested:
                handle.set_cancelled()
                return
            job.tries += 1
            self.job_peak = 0
            # An interactive job has the CPU to itself: the model's background worker (a long
            # refinement) is paused while it runs, and resumed after.
            sibling = None if self.background else self.owner._background_slot(self.key)
            if sibling is not None:
                sibling.pause()
            try:
                self._ensure_worker(job, deadline)
                if handle.op == "info":
                    handle.set_result(self.info)
                    return
                self._send(
                    {
                        "kind": "job",
                        "id": handle.id,
                        "op": handle.op,
                        "args": job.args,
                        "settings": _operator_settings(),
                    },
                    job,
                    deadline,
                )
                reply = self._await(job, deadline, handle.id)
            except _Stopped as stop:
                if stop.retry and job.tries < 2 and not self.closed:
                    LOG.warning("A worker stopped unexpectedly; trying the job once more.")
                    continue
                handle.set_exception(stop.error)
                return
            finally:
                if sibling is not None:
                    sibling.resume()
            if reply["kind"] == "result":
                value = reply.get("value")
                if not result_fits(handle.op, value):
                    self._kill()
                    handle.set_exception(
                        errors.WorkerError(
                            f"{_what(handle.op)} failed: the worker sent a result of the wrong "
                            "kind, so it was stopped."
                        )
                    )
                else:
                    handle.set_result(value)
            else:
                handle.set_exception(self._error(reply.get("error"), job))
            return

    def _error(self, error: Any, job: _Job) -> errors.ExplainerError:
        if not isinstance(error, dict):
            return errors.WorkerError(f"{_what(job.handle.op)} failed in its worker.")
        message = str(error.get("message") or "")
        if error.get("limit") == "memory":
            return errors.WorkerLimitError(
                _memory_message(self.owner.memory_bytes(), job.handle.op)
                + (f" ({message})" if message else ""),
                "memory",
            )
        cls = _ERRORS.get(str(error.get("type")), errors.WorkerError)
        if cls is errors.WorkerError and not message:
            message = f"{_what(job.handle.op)} failed in its worker."
        return cls(message)

    # --- the worker process -------------------------------------------------------------------
    def _ensure_worker(self, job: _Job, deadline: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            self.restarts += 1
            self._kill()
        self._start()
        self._send({"kind": "load", "model": self.source.as_message()}, job, deadline)
        reply = self._await(job, deadline, None)
        if reply["kind"] == "failed":
            error = self._error(reply.get("error"), _Job(JobHandle("load"), {}, job.timeout_s))
            self._kill()
            # The model cannot be loaded: this slot is done, and so are the jobs queued on it.
            with self.cond:
                self.closed, self.close_reason = True, str(error)
                pending = list(self.queue)
                self.queue.clear()
            for other in pending:
                other.handle.set_exception(error)
            raise _Stopped(error)
        problem = info_problem(reply.get("info"))
        if problem is not None:
            self._kill()
            raise _Stopped(
                errors.WorkerError(
                    "Loading the model failed: its worker described it inconsistently "
                    f"({problem}), so it was stopped."
                )
            )
        self.info = reply.get("info")
        self.isolated = bool(reply.get("isolated"))
        if not self.isolated:
            LOG.warning("A worker runs without network isolation (no network namespace here).")

    def _start(self) -> None:
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        env = dict(os.environ)
        env[MEMORY_ENV] = str(self.owner.memory_bytes())
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        try:
            proc = subprocess.Popen(
                [self.owner.python, "-m", "explainer.compute.worker",
                 str(request_read), str(reply_write)],
                pass_fds=(request_read, reply_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )  # fmt: skip
        except BaseException:
            os.close(request_write)
            os.close(reply_read)
            raise
        finally:
            os.close(request_read)
            os.close(reply_write)
        os.set_blocking(request_write, False)  # a worker that stops reading cannot stall us
        with self.io_lock:
            self.proc, self.request_fd = proc, request_write
        with self.pause_lock:
            if self.paused:  # paused before its process existed: it starts paused
                self._signal(signal.SIGSTOP)
        self.replies = queue.Queue(maxsize=_MAX_QUEUED)
        self.reader_stop = threading.Event()
        self.job_peak = 0
        threading.Thread(
            target=self._read_replies,
            args=(reply_read, self.replies, self.reader_stop),
            daemon=True,
        ).start()
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        # Before the model is sent: nothing from the file has been read yet.
        cgroup = os.environ.get(CGROUP_ENV, "").strip()
        if cgroup:
            self._join_cgroup(proc, cgroup)

    def _join_cgroup(self, proc: subprocess.Popen, cgroup: str) -> None:
        """Put the new worker into the operator's control group; a worker that cannot be
        contained there is not used."""
        try:
            Path(cgroup, "cgroup.procs").write_text(f"{proc.pid}\n", encoding="ascii")
        except OSError as exc:
            self._kill()
            raise _Stopped(
                errors.WorkerError(
                    f"The server could not start a worker in the control group {cgroup} "
                    f"({exc.strerror or exc}); the operator must fix {CGROUP_ENV}."
                )
            ) from exc

    def _read_replies(self, fd: int, replies: queue.Queue, stop: threading.Event) -> None:
        """Reader thread: frames from the worker into ``replies`` until EOF or ``stop``.

        It stops when the worker is killed even if something the worker left behind still holds
        the pipe open, and it waits (the worker then blocks) while the dispatcher has
        :data:`_MAX_QUEUED` messages to read: what a worker sends cannot pile up here.
        """
        buffer = bytearray()
        try:
            while not stop.is_set():
                ready, _, _ = select.select([fd], [], [], _POLL_S)
                if not ready:
                    continue
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 8:
                    size = int.from_bytes(buffer[:8], "big")
                    if size > wire.MAX_FRAME_BYTES:
                        raise wire.WireError(f"a reply announced {size:,} bytes, over the limit")
                    if len(buffer) < 8 + size:
                        break
                    message = wire.decode(bytes(buffer[8 : 8 + size]))
                    del buffer[: 8 + size]
                    while not stop.is_set():
                        try:
                            replies.put(message, timeout=_POLL_S)
                            break
                        except queue.Full:
                            continue
        except (wire.WireError, OSError) as exc:
            _put_now(replies, ("malformed", str(exc)))
        finally:
            os.close(fd)
            _put_now(replies, _EOF)

    def _drain(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in iter(lambda: proc.stdout.readline(4096), b""):
            self.output.append(line.decode("utf-8", "replace").rstrip()[:500])
        proc.stdout.close()

    def _send(self, message: Mapping[str, Any], job: _Job, deadline: float) -> None:
        """Write one request; a worker that does not take it before ``deadline`` (or before the
        job is cancelled or the slot closed) is killed, with the reason as :class:`_Stopped`."""
        view = memoryview(wire.frame(message))
        while view:
            with self.io_lock:
                fd = self.request_fd
                if fd is None:
                    return  # the worker is gone; the reply loop sees it and says why
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    pass
                except OSError:
                    return
            if not view:
                return
            if self.closed:
                self._kill()
                raise _Stopped(errors.JobCancelled(self.close_reason))
            if message.get("kind") != "cancel" and job.handle.cancel_requested:
                self._kill()
                raise _Stopped(errors.JobCancelled("The request was cancelled."))
            if time.monotonic() > deadline:
                self._kill()
                op = "load" if message.get("kind") == "load" else job.handle.op
                raise _Stopped(errors.WorkerLimitError(_time_message(job.timeout_s, op), "time"))
            select.select([], [fd], [], _POLL_S)

    def pause(self) -> None:
        """Stop this worker's process (SIGSTOP) until :meth:`resume`; calls nest."""
        with self.pause_lock:
            self.paused += 1
            if self.paused == 1:
                self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        with self.pause_lock:
            self.paused = max(0, self.paused - 1)
            if self.paused == 0:
                self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for pid in (proc.pid, *_descendants(proc.pid)):
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # The worker is its descendants' subreaper: while it lives, every process it started
            # is below it. Stop them (in rounds, in case one forks meanwhile), then the worker.
            for _ in range(5):
                below = _descendants(proc.pid)
                if not below:
                    break
                for pid in below:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        with self.io_lock:
            fd, self.request_fd = self.request_fd, None
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        stop = getattr(self, "reader_stop", None)
        if stop is not None:
            stop.set()
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                LOG.error("Worker %s did not exit after SIGKILL", proc.pid)

    def _await(self, job: _Job, deadline: float, job_id: int | None) -> dict[str, Any]:
        """Wait for the reply to the load (``job_id`` None) or to job ``job_id``, enforcing the
        time and memory limits and the job's cancellation."""
        handle = job.handle
        op = "load" if job_id is None else handle.op
        what = _what(op)
        limit = self.owner.memory_bytes()
        cancel_sent: float | None = None
        watched = 0.0
        while True:
            try:
                message = self.replies.get(timeout=_POLL_S)
            except queue.Empty:
                message = None
            if message is _EOF:
                raise self._died(op, limit)
            if isinstance(message, tuple):
                self._kill()
                raise _Stopped(errors.WorkerError(
                    f"{what} failed: the worker sent a malformed reply ({message[1]}), so it was "
                    "stopped."
                ))  # fmt: skip
            if isinstance(message, dict):
                kind = message.get("kind")
                if job_id is None and kind in ("ready", "failed"):
                    return message
                if message.get("id") == job_id and job_id is not None:
                    if kind == "progress":
                        done, total = message.get("done"), message.get("total")
                        if isinstance(done, int) and isinstance(total, int):
                            handle.set_progress(done, total)
                    elif kind in ("result", "error"):
                        return message
            now = time.monotonic()
            if self.closed:
                self._kill()
                raise _Stopped(errors.JobCancelled(self.close_reason))
            if job_id is not None and handle.cancel_requested:
                if cancel_sent is None:
                    cancel_sent = now
                    self._send({"kind": "cancel", "id": job_id}, job, now + CANCEL_GRACE_S)
                elif self.paused:
                    cancel_sent = now  # a paused worker cannot stop yet: its grace waits
                elif now - cancel_sent > CANCEL_GRACE_S:
                    self._kill()
                    raise _Stopped(errors.JobCancelled("The request was cancelled."))
            if now > deadline:
                self._kill()
                raise _Stopped(errors.WorkerLimitError(_time_message(job.timeout_s, op), "time"))
            if self.proc is not None and now - watched >= _RSS_EVERY_S:
                watched = now
                rss, peak = _rss_bytes(self.proc.pid)
                self.peak_rss = max(self.peak_rss, rss, peak)
                self.job_peak = max(self.job_peak, rss)
                if rss > limit:
                    self._kill()
                    raise _Stopped(errors.WorkerLimitError(_memory_message(limit, op), "memory"))

    def _died(self, op: str, limit: int) -> _Stopped:
        proc = self.proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
                code = proc.returncode
        self._kill()
        if self.closed:
            return _Stopped(errors.JobCancelled(self.close_reason))
        if self.job_peak >= 0.7 * limit:  # what this job's worker held, not its lifetime peak
            return _Stopped(errors.WorkerLimitError(_memory_message(limit, op), "memory"))
        if code is not None and code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        else:
            how = f"exit code {code}"
        tail = " | ".join(list(self.output)[-5:])
        LOG.warning("Worker for %s stopped (%s). Last output: %s", self.key[:12], how, tail)
        return _Stopped(
            errors.WorkerError(
                f"{_what(op)} failed: the model's worker stopped unexpectedly ({how}). It is "
                "started again for the next request; if this happens again, the model itself is "
                "the cause."
            ),
            retry=True,
        )


class LocalExecutor:
    """Run jobs in local worker processes, one per model, within the operator's limits.

    Parameters
    ----------
    max_workers : int, optional
        Most worker processes at once; default ``EXPLAINER_MAX_WORKERS`` (read at each new
        model).
    memory_bytes : int, optional
        Memory limit of each worker; default ``EXPLAINER_WORKER_MEMORY_MB``.
    timeout_s : float, optional
        Wall-clock limit of each request; default ``EXPLAINER_REQUEST_TIMEOUT_S``.
    python : str, optional
        The interpreter that runs the workers (default: this one).
    """

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        memory_bytes: int | None = None,
        timeout_s: float | None = None,
        python: str | None = None,
    ) -> None:
        self._max_workers = max_workers
        self._memory_bytes = memory_bytes
        self._timeout_s = timeout_s
        self.python = python or sys.executable
        self._lock = threading.Lock()
        self._slots: collections.OrderedDict[str, _Slot] = collections.OrderedDict()
        self._closed = False
        atexit.register(_shutdown_ref, weakref.ref(self))

    def memory_bytes(self) -> int:
        return self._memory_bytes or limits.worker_memory_bytes()

    def timeout_s(self) -> float:
        return self._timeout_s or limits.request_timeout_s()

    def max_workers(self) -> int:
        return max(1, self._max_workers or limits.max_workers())

    def submit(
        self,
        model: ModelSource,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        background: bool = False,
    ) -> JobHandle:
        """Queue ``op`` on ``model``'s worker (started on demand); return the job's handle.

        A ``background`` job runs on a second worker of the same model, so that a long
        refinement never makes a click wait behind it; that worker counts towards
        ``EXPLAINER_MAX_WORKERS`` like any other.
        """
        handle = JobHandle(op)
        job = _Job(handle, dict(args or {}), self.timeout_s())
        evicted: list[_Slot] = []
        key = model.key + BACKGROUND_SUFFIX if background else model.key
        with self._lock:
            if self._closed:
                handle.set_cancelled("The server is shutting down.")
                return handle
            slot = self._slots.get(key)
            if slot is None or slot.closed:
                evicted = self._make_room()
                slot = _Slot(self, model, background)
                self._slots[key] = slot
            self._slots.move_to_end(key)
        for old in evicted:  # outside the lock: stopping a worker can take a moment
            old.close(
                "The model's worker was stopped to make room for another model (this server "
                f"runs at most {self.max_workers()} at once); run the request again."
            )
        if op == "info" and slot.info is not None:
            handle.set_result(slot.info)  # known since the model loaded: no need to queue
        else:
            slot.enqueue(job)
        return handle

    def _background_slot(self, key: str) -> _Slot | None:
        """The background worker of the model whose key is ``key``, when it runs a job or has
        one queued (a job submitted a moment ago may not have reached the worker yet)."""
        with self._lock:
            slot = self._slots.get(key + BACKGROUND_SUFFIX)
        if slot is None or slot.closed or (slot.running is None and not slot.queue):
            return None
        return slot

    def _make_room(self) -> list[_Slot]:
        """Drop closed slots and take out the least recently used ones beyond the limit (the
        caller holds the lock, and closes what this returns after releasing it)."""
        for key in [k for k, s in self._slots.items() if s.closed]:
            del self._slots[key]
        evicted = []
        while len(self._slots) >= self.max_workers():
            evicted.append(self._slots.popitem(last=False)[1])
        return evicted

    def workers(self) -> list[WorkerStatus]:
        """The status of every worker, least recently used first."""
        with self._lock:
            slots = list(self._slots.values())
        return [s.status() for s in slots if not s.closed]

    def shutdown(self) -> None:
        """Stop every worker; queued and running jobs end cancelled."""
        with self._lock:
            self._closed = True
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            slot.close("The server is shutting down.")


def _shutdown_ref(ref: weakref.ref) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()
