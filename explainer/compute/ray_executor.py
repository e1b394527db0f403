"""Run jobs on a Ray cluster, behind the same job interface as the local workers.

:class:`RayExecutor` puts each model's :class:`~explainer.compute.jobs.ModelSource` into Ray's
object store once (``ray.put``) and starts actors that each load it into a
:class:`~explainer.compute.tasks.ModelSession`, the code a local worker process runs. Jobs queue
here and go to whichever actor is idle, so images run in parallel across the cluster; each
handle completes as its result comes back. Time limits, cancellation, the memory limit of each
actor and the check of every result work as in :mod:`explainer.compute.local`, and results
travel as :mod:`explainer.compute.wire` documents, checked before use.

Ray is optional (``pip install "layer-explainer[ray]"``): this module imports ``ray`` only when
a :class:`RayExecutor` is created, and importing :mod:`explainer` never imports it.

Ray is no sandbox: its actors run as the cluster's user with the network they need to reach
the cluster, and Ray moves data between processes with pickles. Run only models you trust on
a cluster; uploads from strangers belong in the local workers, which are isolated.
"""

from __future__ import annotations

import atexit
import collections
import importlib.metadata
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from explainer import errors, limits
from explainer.compute import wire
from explainer.compute.jobs import JobHandle, ModelSource
from explainer.compute.local import CANCEL_GRACE_S, WorkerStatus
from explainer.compute.tasks import info_problem, result_fits

__all__ = ["LOCAL", "RayExecutor", "SessionActor"]

LOG = logging.getLogger(__name__)

LOCAL = "local"
"""The address that starts a Ray instance on this machine instead of joining a cluster."""

_POLL_S = 0.05
_STATUS_TIMEOUT_S = 10.0
_MAX_FAILURES = 3  # an actor's place that fails this often in a row (no job done) is dropped
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


def _versions() -> dict[str, str]:
    import torch

    try:
        explainer = importlib.metadata.version("layer-explainer")
    except importlib.metadata.PackageNotFoundError:
        explainer = "unknown"
    return {"explainer": explainer, "torch": str(torch.__version__)}


def _memory() -> tuple[int, int]:
    """This process's resident and peak resident memory in bytes, from /proc."""
    rss = peak = 0
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, peak


class SessionActor:
    """What each Ray actor is: one :class:`~explainer.compute.tasks.ModelSession`, one job at a
    time, cancellable from another call (the actor runs calls in threads).

    A plain class: :class:`RayExecutor` makes it a Ray actor, so this module needs no ``ray``
    to import. Every reply is a :mod:`~explainer.compute.wire` document (bytes).
    """

    def __init__(self, source: Mapping[str, Any], memory_bytes: int | None, threads: int) -> None:
        from explainer.compute.worker import _error

        self._run_lock = threading.Lock()
        self._state = threading.Lock()
        self._cancel = threading.Event()
        self._current: int | None = None
        self._cancelled: set[int] = set()
        self._failure: dict[str, Any] | None = None
        self._session: Any = None
        try:
            import torch

            from explainer.compute.tasks import ModelSession, _device
            from explainer.compute.worker import _limit_self

            _limit_self(memory_bytes, _device().type == "cuda")
            torch.set_num_threads(max(1, int(threads)))
            self._session = ModelSession(ModelSource.from_message(source))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back as a message
            self._failure = _error(exc)

    def ready(self) -> bytes:
        """The model's description (or why it did not load), the versions, this process."""
        if self._failure is not None:
            return wire.encode({"kind": "failed", "error": self._failure})
        return wire.encode({"kind": "ready", "info": self._session.info,
                            "versions": _versions(), "pid": os.getpid()})  # fmt: skip

    def run(self, job_id: int, op: str, args: Mapping[str, Any], settings: Any) -> bytes:
        """Run one job; its result or its error as a wire document."""
        from explainer.compute.tasks import cancellable
        from explainer.compute.worker import _apply_settings, _error

        with self._run_lock:
            with self._state:
                if job_id in self._cancelled:
                    self._cancelled.discard(job_id)
                    cancelled = errors.JobCancelled("The request was cancelled.")
                    return wire.encode({"kind": "error", "error": _error(cancelled)})
                self._current = job_id
                self._cancel.clear()
            try:
                if self._session is None:
                    raise errors.WorkerError("The model did not load in this actor.")
                _apply_settings(settings)
                with cancellable(self._cancel):
                    value = self._session.run(str(op), args or {})
                reply = {"kind": "result", "value": value}
            except BaseException as exc:  # noqa: BLE001 - every failure goes back as a message
                reply = {"kind": "error", "error": _error(exc)}
            finally:
                with self._state:
                    self._current = None
            try:
                return wire.encode(reply)
            except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be encoded
                return wire.encode({"kind": "error", "error": _error(exc)})

    def cancel(self, job_id: int) -> None:
        """Stop job ``job_id`` at the next module it enters (or before it starts)."""
        with self._state:
            if self._current == job_id:
                self._cancel.set()
            else:
                self._cancelled.add(job_id)

    def status(self) -> bytes:
        """This actor's process, memory and Ray node, as a wire document."""
        import ray  # an actor runs inside Ray

        rss, peak = _memory()
        node = ray.get_runtime_context().get_node_id()
        return wire.encode({"pid": os.getpid(), "rss": rss, "peak": peak, "node": str(node)})


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise errors.WorkerError(
            'Running on Ray needs the ray package: pip install -e ".[ray]" (or '
            "pip install 'ray>=2.9')."
        ) from None
    return ray


@dataclass
class _Job:
    handle: JobHandle
    args: Mapping[str, Any]
    tries: int = 0


@dataclass
class _Actor:
    """One actor of a model's pool and what it is doing."""

    handle: Any
    ready_ref: Any = None
    ready: bool = False
    job: _Job | None = None
    ref: Any = None
    deadline: float = 0.0
    cancel_sent: float | None = None
    jobs_done: int = 0
    restarts: int = 0
    failures: int = 0
    pid: int | None = None


@dataclass
class _Pool:
    """A model's actors and the jobs waiting for one."""

    source: ModelSource
    source_ref: Any
    actors: list[_Actor] = field(default_factory=list)
    queue: collections.deque[_Job] = field(default_factory=collections.deque)
    info: Any = None
    failure: errors.ExplainerError | None = None
    started: float = field(default_factory=time.monotonic)
    make_actor: Any = None  # () -> a new actor handle holding the model


class RayExecutor:
    """Run jobs on Ray actors that each hold the model, within the operator's limits.

    Parameters
    ----------
    address : str
        ``"local"`` to start a Ray instance on this machine, or a cluster's address
        (``"127.0.0.1:6379"``, ``"ray://host:10001"``, ``"auto"``). Ignored when Ray is already
        initialised in this process (that connection is used, and left open at shutdown).
    actors : int, optional
        Actors per model; default: the cluster's CPUs divided by ``cpus_per_actor``.
    cpus_per_actor : float
        CPUs each actor reserves from Ray's scheduler; it runs that many torch threads.
    memory_bytes : int, optional
        Each actor's memory limit (its data segment); default ``EXPLAINER_WORKER_MEMORY_MB``.
        When given, it is also reserved from Ray's scheduler (``memory``), so actors only go
        to nodes with that much memory unreserved.
    timeout_s : float, optional
        Wall-clock limit of each job once an actor runs it; default
        ``EXPLAINER_REQUEST_TIMEOUT_S``. An actor over it is replaced by a new one.
    start_timeout_s : float, optional
        How long a model's first actor may take to be placed, start and load the model
        (default: ``timeout_s``, and at least 300 s); jobs fail after that with a message.
    max_models : int
        Models with actors at once; a new model's actors replace those of the least recently
        used one (its jobs end cancelled). By default actors reserve all of the cluster's CPUs,
        so a second model's actors could not start beside the first's.
    init_options : mapping, optional
        More keyword arguments for ``ray.init``.
    """

    def __init__(
        self,
        address: str = LOCAL,
        *,
        actors: int | None = None,
        cpus_per_actor: float = 1.0,
        memory_bytes: int | None = None,
        timeout_s: float | None = None,
        start_timeout_s: float | None = None,
        max_models: int = 1,
        init_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not cpus_per_actor > 0:
            raise errors.WorkerError(f"cpus_per_actor must be positive, not {cpus_per_actor!r}.")
        ray = _import_ray()
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False,
                       "logging_level": logging.WARNING, **dict(init_options or {})}  # fmt: skip
            try:
                ray.init(address=LOCAL if address in (None, "", LOCAL) else address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise errors.WorkerError(
                    f"Could not reach the Ray cluster at {address!r} ({exc}). Check the address "
                    "(ray status on a node shows it), or use --ray local."
                ) from exc
            self._owns_ray = True
        self.cpus_per_actor = float(cpus_per_actor)
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self.parallelism = int(actors) if actors else max(1, int(cpus // self.cpus_per_actor))
        self._memory_bytes = memory_bytes
        self._timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        self._pools: collections.OrderedDict[str, _Pool] = collections.OrderedDict()
        self._retired: list[_Pool] = []  # closed by the dispatcher thread
        self._max_models = max(1, int(max_models))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._versions = _versions()
        self._thread = threading.Thread(target=self._dispatch, name="ray-dispatch", daemon=True)
        self._thread.start()
        atexit.register(_shutdown_ref, weakref.ref(self))

    def memory_bytes(self) -> int:
        return self._memory_bytes or limits.worker_memory_bytes()

    def timeout_s(self) -> float:
        return self._timeout_s or limits.request_timeout_s()

    def start_timeout_s(self) -> float:
        return self._start_timeout_s or max(self.timeout_s(), 300.0)

    # --- the job interface
    def submit(
        self,
        model: ModelSource,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        background: bool = False,
    ) -> JobHandle:
        """Queue ``op`` on ``model``'s actors (started on demand); return the job's handle.

        ``background`` jobs share the model's actors: with more than one actor per model a
        refinement and a click run side by side anyway.
        """
        handle = JobHandle(op)
        job = _Job(handle, dict(args or {}))
        with self._lock:
            if self._closed:
                handle.set_cancelled("The executor is shutting down.")
                return handle
            pool = self._pools.get(model.key)
            if pool is None or pool.failure is not None:
                if pool is not None:
                    self._retired.append(self._pools.pop(model.key))
                while len(self._pools) >= self._max_models:
                    _, old = self._pools.popitem(last=False)
                    old.failure = errors.JobCancelled(
                        "The model's Ray actors were stopped to make room for another model "
                        f"(this executor holds {self._max_models} at once); run the request "
                        "again."
                    )
                    self._retired.append(old)
                pool = self._start_pool(model)
            self._pools.move_to_end(model.key)
            if op == "info" and pool.info is not None:
                handle.set_result(pool.info)
                return handle
            pool.queue.append(job)
        handle.on_cancel(self._wake.set)
        self._wake.set()
        return handle

    def _start_pool(self, source: ModelSource) -> _Pool:
        """The model into the object store once, and its actors (called with the lock)."""
        ray = self._ray
        pool = _Pool(source, ray.put(source.as_message()))
        reserve = {} if self._memory_bytes is None else {"memory": int(self._memory_bytes)}
        actor_class = ray.remote(SessionActor).options(
            num_cpus=self.cpus_per_actor,
            max_restarts=0,  # a lost actor is replaced here, from the same object in the store
            max_concurrency=4,  # run, plus cancel and status while it runs
            scheduling_strategy="SPREAD",
            **reserve,
        )
        threads = max(1, round(self.cpus_per_actor))
        memory = self.memory_bytes()
        ref = pool.source_ref

        def make_actor() -> Any:
            return actor_class.remote(ref, memory, threads)

        pool.make_actor = make_actor
        for _ in range(self.parallelism):
            handle = make_actor()
            pool.actors.append(_Actor(handle, ready_ref=handle.ready.remote()))
        self._pools[source.key] = pool
        return pool

    def _statuses(self) -> list[tuple[_Pool, _Actor, dict[str, Any]]]:
        with self._lock:
            pools = list(self._pools.values())
        found = []
        for pool in pools:
            for actor in list(pool.actors):
                try:
                    reply = wire.decode(
                        self._ray.get(actor.handle.status.remote(), timeout=_STATUS_TIMEOUT_S)
                    )
                    if not isinstance(reply, dict):
                        reply = {}
                except Exception:  # noqa: BLE001 - a lost actor has no status
                    reply = {}
                found.append((pool, actor, reply))
        return found

    def nodes(self) -> list[str]:
        """The Ray node of each actor that answers, e.g. to see that they spread."""
        return [str(reply["node"]) for _, _, reply in self._statuses() if "node" in reply]

    def workers(self) -> list[WorkerStatus]:
        """Each actor's status; ``peak_rss_bytes`` is the peak resident memory of its process."""
        found = []
        for pool, actor, reply in self._statuses():
            try:
                peak = max(int(reply.get("rss", 0)), int(reply.get("peak", 0)))
                pid = int(reply["pid"]) if "pid" in reply else actor.pid
            except (TypeError, ValueError):
                peak, pid = 0, actor.pid
            found.append(
                WorkerStatus(
                    model_key=pool.source.key, pid=pid, busy=actor.job is not None,
                    queued=len(pool.queue), jobs_done=actor.jobs_done,
                    restarts=actor.restarts, peak_rss_bytes=peak, network_isolated=False,
                )
            )  # fmt: skip
        return found

    def shutdown(self) -> None:
        """Stop every actor; queued and running jobs end cancelled. Disconnects from Ray (and
        stops the local instance) when this executor connected."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pools = [*self._pools.values(), *self._retired]
            self._pools.clear()
            self._retired.clear()
        self._wake.set()
        self._thread.join(timeout=10)
        for pool in pools:
            for job in pool.queue:
                job.handle.set_cancelled("The executor is shutting down.")
            for actor in pool.actors:
                if actor.job is not None:
                    actor.job.handle.set_cancelled("The executor is shutting down.")
                try:
                    self._ray.kill(actor.handle, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    # --- the dispatcher thread
    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                pools = list(self._pools.values())
                retired, self._retired = self._retired, []
            try:
                for pool in retired:
                    self._fail_queue(pool)
                refs = self._step(pools)
                if refs:
                    self._ray.wait(refs, num_returns=1, timeout=_POLL_S)
                else:
                    self._wake.wait(_POLL_S)
                self._wake.clear()
            except Exception:  # noqa: BLE001 - the dispatcher must survive anything
                LOG.exception("The Ray dispatcher failed a step")
                time.sleep(_POLL_S)

    def _refs(self, pools: list[_Pool]) -> list[Any]:
        return [
            ref
            for pool in pools
            for actor in list(pool.actors)
            for ref in (actor.ready_ref, actor.ref)
            if ref is not None
        ]

    def _step(self, pools: list[_Pool]) -> list[Any]:
        """Take finished replies, start queued jobs, enforce limits; return refs to wait on."""
        refs = self._refs(pools)
        done = set()
        if refs:
            done = set(self._ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        for pool in pools:
            for actor in list(pool.actors):
                if actor.ready_ref is not None and actor.ready_ref in done:
                    self._check_ready(pool, actor)
                if actor.ref is not None:
                    self._check_job(pool, actor, actor.ref in done)
            self._drop_cancelled(pool)
            if (
                pool.failure is None
                and pool.info is None
                and time.monotonic() - pool.started > self.start_timeout_s()
            ):
                pool.failure = errors.WorkerError(
                    f"No Ray actor could load the model within {self.start_timeout_s():g} s: "
                    "the cluster may lack the CPUs or memory asked for (see ray status; other "
                    "jobs' actors may hold them), or loading takes longer."
                )
            if pool.failure is not None:
                self._fail_queue(pool)
                continue
            for actor in pool.actors:
                if actor.ready and actor.job is None and pool.queue:
                    self._start_job(pool, actor, pool.queue.popleft())
        return self._refs(pools)

    def _check_ready(self, pool: _Pool, actor: _Actor) -> None:
        ref, actor.ready_ref = actor.ready_ref, None
        try:
            reply = wire.decode(self._ray.get(ref))
        except self._ray.exceptions.RayError as exc:
            self._actor_lost(pool, actor, exc)
            return
        except wire.WireError as exc:
            pool.failure = errors.WorkerError(f"An actor sent a malformed reply ({exc}).")
            return
        if not isinstance(reply, dict) or reply.get("kind") not in ("ready", "failed"):
            pool.failure = errors.WorkerError("An actor sent a malformed reply.")
            return
        if reply["kind"] == "failed":
            pool.failure = _as_error(reply.get("error"), "Loading the model failed in an actor.")
            return
        problem = info_problem(reply.get("info"))
        if problem is not None:
            pool.failure = errors.WorkerError(
                f"Loading the model failed: an actor described it inconsistently ({problem})."
            )
            return
        versions = reply.get("versions")
        if versions != self._versions:
            pool.failure = errors.WorkerError(
                f"The cluster runs {versions}, this machine {self._versions}: install the same "
                "versions of layer-explainer and torch on every node."
            )
            return
        pool.info = reply["info"]
        actor.pid = reply.get("pid") if isinstance(reply.get("pid"), int) else None
        actor.ready = True

    def _start_job(self, pool: _Pool, actor: _Actor, job: _Job) -> None:
        if job.handle.op == "info":  # known since an actor loaded the model
            job.handle.set_result(pool.info)
            return
        job.tries += 1
        settings = {k: v for k, v in os.environ.items() if k.startswith("EXPLAINER_")}
        actor.job = job
        actor.cancel_sent = None
        actor.deadline = time.monotonic() + self.timeout_s()
        actor.ref = actor.handle.run.remote(job.handle.id, job.handle.op, job.args, settings)

    def _check_job(self, pool: _Pool, actor: _Actor, finished: bool) -> None:
        job = actor.job
        assert job is not None
        handle = job.handle
        now = time.monotonic()
        if finished:
            ref, actor.ref, actor.job = actor.ref, None, None
            actor.jobs_done += 1
            try:
                reply = wire.decode(self._ray.get(ref))
            except self._ray.exceptions.RayError as exc:
                actor.jobs_done -= 1
                if job.tries < 2 and not handle.cancel_requested:
                    LOG.warning("A Ray actor stopped unexpectedly; trying the job once more.")
                    pool.queue.appendleft(job)
                else:
                    handle.set_exception(_lost_error(handle.op, exc))
                self._actor_lost(pool, actor, exc)
                return
            except wire.WireError as exc:
                handle.set_exception(
                    errors.WorkerError(f"An actor sent a malformed reply ({exc}).")
                )
                self._restart(pool, actor)
                return
            actor.failures = 0
            if not isinstance(reply, dict) or reply.get("kind") not in ("result", "error"):
                handle.set_exception(errors.WorkerError("An actor sent a malformed reply."))
                self._restart(pool, actor)
            elif reply["kind"] == "result":
                value = reply.get("value")
                if result_fits(handle.op, value):
                    handle.set_progress(1, 1)
                    handle.set_result(value)
                else:
                    handle.set_exception(errors.WorkerError(
                        "An actor sent a result of the wrong kind, so it was restarted."
                    ))  # fmt: skip
                    self._restart(pool, actor)
            else:
                handle.set_exception(self._job_error(reply.get("error"), handle.op))
            return
        if handle.cancel_requested:
            if actor.cancel_sent is None:
                actor.cancel_sent = now
                actor.handle.cancel.remote(handle.id)
            elif now - actor.cancel_sent > CANCEL_GRACE_S:
                handle.set_cancelled()
                self._abandon(pool, actor)
            return
        if now > actor.deadline:
            handle.set_exception(errors.WorkerLimitError(
                f"The request took longer than the {self.timeout_s():g} s a request may run, so "
                "its Ray actor was restarted. Use fewer steps or earlier layers, or raise "
                "EXPLAINER_REQUEST_TIMEOUT_S.",
                "time",
            ))  # fmt: skip
            self._abandon(pool, actor)

    def _job_error(self, error: Any, op: str) -> errors.ExplainerError:
        if isinstance(error, dict) and error.get("limit") == "memory":
            return errors.WorkerLimitError(
                f"The request needed more memory than an actor may use "
                f"({self.memory_bytes() / 2**20:,.0f} MiB). Use fewer steps or earlier layers, "
                f"or raise --worker-memory-mb / EXPLAINER_WORKER_MEMORY_MB "
                f"({error.get('message') or 'out of memory'}).",
                "memory",
            )
        return _as_error(error, f"The request ({op}) failed in its Ray actor.")

    def _abandon(self, pool: _Pool, actor: _Actor) -> None:
        """Give up on the actor's job: replace the actor (its result, if any, is dropped)."""
        actor.ref, actor.job = None, None
        self._restart(pool, actor)

    def _restart(self, pool: _Pool, actor: _Actor) -> None:
        """Stop an actor that cannot be trusted to go on, and start another in its place."""
        actor.failures += 1
        self._replace(pool, actor)

    def _actor_lost(self, pool: _Pool, actor: _Actor, exc: Exception) -> None:
        """An actor died: start another in its place, unless this one's place has failed
        :data:`_MAX_FAILURES` times in a row (then it is dropped, and the pool with its last)."""
        actor.failures += 1
        if actor.failures > _MAX_FAILURES:
            LOG.warning("A Ray actor was lost for good: %s", exc)
            self._kill(actor)
            pool.actors.remove(actor)
            if not pool.actors:
                pool.failure = errors.WorkerError(
                    f"Every Ray actor of the model was lost ({_short(exc)}); check the cluster "
                    "(ray status) and its memory."
                )
            return
        self._replace(pool, actor)

    def _replace(self, pool: _Pool, actor: _Actor) -> None:
        self._kill(actor)
        actor.ready, actor.pid = False, None
        actor.restarts += 1
        actor.handle = pool.make_actor()
        actor.ready_ref = actor.handle.ready.remote()

    def _kill(self, actor: _Actor) -> None:
        try:
            self._ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _drop_cancelled(self, pool: _Pool) -> None:
        for job in [j for j in pool.queue if j.handle.cancel_requested]:
            pool.queue.remove(job)
            job.handle.set_cancelled()

    def _fail_queue(self, pool: _Pool) -> None:
        """End a pool that cannot go on: its jobs get its failure, its actors are stopped (so
        their CPUs are free for others)."""
        assert pool.failure is not None
        while pool.queue:
            pool.queue.popleft().handle.set_exception(pool.failure)
        for actor in pool.actors:
            if actor.job is not None:
                actor.job.handle.set_exception(pool.failure)
                actor.job, actor.ref = None, None
            actor.ready_ref = None
            self._kill(actor)
        pool.actors.clear()


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lost_error(op: str, exc: BaseException) -> errors.WorkerError:
    return errors.WorkerError(
        f"The request ({op}) failed: its Ray actor stopped unexpectedly ({_short(exc)}). It is "
        "started again for the next request; if this happens again, check the cluster's memory "
        "(Ray stops actors when a node runs short) or the model itself."
    )


def _as_error(error: Any, fallback: str) -> errors.ExplainerError:
    if not isinstance(error, dict):
        return errors.WorkerError(fallback)
    message = str(error.get("message") or "") or fallback
    return _ERRORS.get(str(error.get("type")), errors.WorkerError)(message)


def _shutdown_ref(ref: weakref.ref) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()
