"""What each Ray actor of :class:`~explainer.compute.ray_executor.RayExecutor` runs.

:class:`SessionActor` is a plain class (the executor makes it a Ray actor with ``ray.remote``), so
importing this module needs no ``ray``. An actor holds one
:class:`~explainer.compute.tasks.ModelSession`, the code a local worker process runs, and answers
every call with a :mod:`~explainer.compute.wire` document.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Mapping
from typing import Any

from explainer import errors
from explainer.compute import wire
from explainer.compute.jobs import ModelSource

__all__ = ["SessionActor", "versions"]


def versions() -> dict[str, str]:
    """The versions an actor and its driver must share: layer-explainer's and torch's."""
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

    A plain class: :class:`~.ray_executor.RayExecutor` makes it a Ray actor, so this module
    needs no ``ray`` to import. Every reply is a :mod:`~explainer.compute.wire` document (bytes).
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
                            "versions": versions(), "pid": os.getpid()})  # fmt: skip

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
