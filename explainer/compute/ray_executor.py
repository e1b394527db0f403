"""Run jobs on a Ray cluster, behind the same job interface as the local workers.

:class:`RayExecutor` puts each model's :class:`~explainer.compute.jobs.ModelSource` into Ray's
object store once (``ray.put``) and starts actors that each load it into a
:class:`~explainer.compute.tasks.ModelSession`, the code a local worker process runs. Jobs queue
here and go to whichever actor is idle, so images run in parallel across the cluster; each
handle completes as its result comes back. Time limits, cancellation, the memory limit of each
actor and the check of every result work as in :mod:`explainer.compute.local`, and results
travel as :mod:`explainer.compute.wire` documents, checked before use.

The actors' code is in :mod:`.ray_actor`, the dispatcher thread in :mod:`.ray_dispatch`, and
connecting to Ray (a Ray of this machine listens on loopback only) in :mod:`.ray_connect`.

Ray is optional (``pip install "layer-explainer[ray]"``): this module imports ``ray`` only when
a :class:`RayExecutor` is created, and importing :mod:`explainer` never imports it.

Ray is no sandbox: its actors run as the cluster's user with the network they need to reach
the cluster, and Ray moves data between processes with pickles. Run only models you trust on
a cluster; uploads from strangers belong in the local workers, which are isolated.
"""

from __future__ import annotations

import atexit
import collections
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from explainer import errors, limits
from explainer.compute import wire
from explainer.compute.jobs import JobHandle, ModelSource
from explainer.compute.local import WorkerStatus
from explainer.compute.ray_actor import SessionActor, versions
from explainer.compute.ray_connect import LOCAL, connect, import_ray
from explainer.compute.ray_dispatch import Actor, Dispatcher, Job, Pool

__all__ = ["LOCAL", "RayExecutor", "SessionActor"]

_STATUS_TIMEOUT_S = 10.0


class RayExecutor(Dispatcher):
    """Run jobs on Ray actors that each hold the model, within the operator's limits.

    Parameters
    ----------
    address : str
        ``"local"`` to start a Ray instance on this machine (its servers listen on
        loopback only), or a cluster's address
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
        ray = import_ray()
        self._ray = ray
        self._owns_ray = connect(ray, address, init_options)
        self.cpus_per_actor = float(cpus_per_actor)
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self.parallelism = int(actors) if actors else max(1, int(cpus // self.cpus_per_actor))
        self._memory_bytes = memory_bytes
        self._timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        self._pools: collections.OrderedDict[str, Pool] = collections.OrderedDict()
        self._retired: list[Pool] = []  # closed by the dispatcher thread
        self._max_models = max(1, int(max_models))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._versions = versions()
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
        job = Job(handle, dict(args or {}))
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

    def _start_pool(self, source: ModelSource) -> Pool:
        """The model into the object store once, and its actors (called with the lock)."""
        ray = self._ray
        pool = Pool(source, ray.put(source.as_message()))
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
            pool.actors.append(Actor(handle, ready_ref=handle.ready.remote()))
        self._pools[source.key] = pool
        return pool

    def _statuses(self) -> list[tuple[Pool, Actor, dict[str, Any]]]:
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


def _shutdown_ref(ref: weakref.ref) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()
