"""The dispatcher half of :class:`~explainer.compute.ray_executor.RayExecutor`: each model's pool
of Ray actors, the jobs waiting for one, and the thread that hands jobs to idle actors, takes
their replies, checks them, and enforces the time limit, cancellation and actor replacement.

:class:`Dispatcher` holds no state of its own: :class:`~explainer.compute.ray_executor.RayExecutor`
sets the attributes it declares, and its methods run in the executor's dispatcher thread.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from explainer import errors
from explainer.compute import wire
from explainer.compute.jobs import JobHandle, ModelSource
from explainer.compute.local import CANCEL_GRACE_S
from explainer.compute.tasks import info_problem, result_fits

LOG = logging.getLogger("explainer.compute.ray_executor")

POLL_S = 0.05
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


@dataclass
class Job:
    """A job queued for, or running in, one of a model's actors."""

    handle: JobHandle
    args: Mapping[str, Any]
    tries: int = 0


@dataclass
class Actor:
    """One actor of a model's pool and what it is doing."""

    handle: Any
    ready_ref: Any = None
    ready: bool = False
    job: Job | None = None
    ref: Any = None
    deadline: float = 0.0
    cancel_sent: float | None = None
    jobs_done: int = 0
    restarts: int = 0
    failures: int = 0
    pid: int | None = None


@dataclass
class Pool:
    """A model's actors and the jobs waiting for one."""

    source: ModelSource
    source_ref: Any
    actors: list[Actor] = field(default_factory=list)
    queue: collections.deque[Job] = field(default_factory=collections.deque)
    info: Any = None
    failure: errors.ExplainerError | None = None
    started: float = field(default_factory=time.monotonic)
    make_actor: Any = None  # () -> a new actor handle holding the model


class Dispatcher:
    """Moves jobs to actors and replies back; the base class of the executor (see the module)."""

    _ray: Any
    _lock: threading.Lock
    _wake: threading.Event
    _closed: bool
    _pools: collections.OrderedDict[str, Pool]
    _retired: list[Pool]
    _versions: dict[str, str]

    def memory_bytes(self) -> int:
        raise NotImplementedError

    def timeout_s(self) -> float:
        raise NotImplementedError

    def start_timeout_s(self) -> float:
        raise NotImplementedError

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
                    self._ray.wait(refs, num_returns=1, timeout=POLL_S)
                else:
                    self._wake.wait(POLL_S)
                self._wake.clear()
            except Exception:  # noqa: BLE001 - the dispatcher must survive anything
                LOG.exception("The Ray dispatcher failed a step")
                time.sleep(POLL_S)

    def _refs(self, pools: list[Pool]) -> list[Any]:
        return [
            ref
            for pool in pools
            for actor in list(pool.actors)
            for ref in (actor.ready_ref, actor.ref)
            if ref is not None
        ]

    def _step(self, pools: list[Pool]) -> list[Any]:
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

    def _check_ready(self, pool: Pool, actor: Actor) -> None:
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

    def _start_job(self, pool: Pool, actor: Actor, job: Job) -> None:
        if job.handle.op == "info":  # known since an actor loaded the model
            job.handle.set_result(pool.info)
            return
        job.tries += 1
        settings = {k: v for k, v in os.environ.items() if k.startswith("EXPLAINER_")}
        actor.job = job
        actor.cancel_sent = None
        actor.deadline = time.monotonic() + self.timeout_s()
        actor.ref = actor.handle.run.remote(job.handle.id, job.handle.op, job.args, settings)

    def _check_job(self, pool: Pool, actor: Actor, finished: bool) -> None:
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

    def _abandon(self, pool: Pool, actor: Actor) -> None:
        """Give up on the actor's job: replace the actor (its result, if any, is dropped)."""
        actor.ref, actor.job = None, None
        self._restart(pool, actor)

    def _restart(self, pool: Pool, actor: Actor) -> None:
        """Stop an actor that cannot be trusted to go on, and start another in its place."""
        actor.failures += 1
        self._replace(pool, actor)

    def _actor_lost(self, pool: Pool, actor: Actor, exc: Exception) -> None:
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

    def _replace(self, pool: Pool, actor: Actor) -> None:
        self._kill(actor)
        actor.ready, actor.pid = False, None
        actor.restarts += 1
        actor.handle = pool.make_actor()
        actor.ready_ref = actor.handle.ready.remote()

    def _kill(self, actor: Actor) -> None:
        try:
            self._ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _drop_cancelled(self, pool: Pool) -> None:
        for job in [j for j in pool.queue if j.handle.cancel_requested]:
            pool.queue.remove(job)
            job.handle.set_cancelled()

    def _fail_queue(self, pool: Pool) -> None:
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
