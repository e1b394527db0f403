"""A compute worker process: ``python -m explainer.compute.worker REQUEST_FD REPLY_FD``.

Started by :class:`explainer.compute.local.LocalExecutor`, one per model. Before it reads a byte
of its model it limits itself: its data memory (``RLIMIT_DATA``, the operator's
``EXPLAINER_WORKER_MEMORY_MB``; skipped on CUDA, whose driver maps large private areas, where the
server's resident-memory watchdog still applies), no core dumps, no network (a network namespace
of its own, see :func:`isolate`) and no privileges gained from programs it might start. Then it
loads the model its first message names and answers one job at a time over two pipes, in
:mod:`explainer.compute.wire` frames.

A reader thread takes cancel requests while a job runs (the job stops at the next module it
enters) and ends the process when the server closes the request pipe, so no worker outlives its
server.
"""

from __future__ import annotations

import os
import queue
import resource
import sys
import threading
import time
from typing import Any

_PROGRESS_INTERVAL_S = 0.1
_MESSAGE_CHARS = 2000


_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36


def isolate() -> bool:
    """Cut this process off the network and from gaining privileges; True if the network is cut.

    The process moves into a network namespace of its own, where no interface is up, so code
    run by a hostile model cannot reach any address, loopback included (as root, or through a
    user namespace where the kernel allows unprivileged ones); ``no_new_privs`` keeps any
    program it could start from gaining privileges; and it becomes the subreaper of what it
    starts, so no descendant can detach from it. Called before the process starts threads
    (a user namespace needs a single thread). Where neither namespace can be made, the worker
    still runs, with its other limits.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    # Orphans of anything this process starts become its children, not init's, so the server
    # finds every one of them (a process that detached twice included) when it stops the worker.
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    attempts = (_CLONE_NEWNET, _CLONE_NEWUSER | _CLONE_NEWNET)
    return any(libc.unshare(flags) == 0 for flags in attempts)


def _limit_self(memory_bytes: int | None, cuda: bool) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes and not cuda:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _error(exc: BaseException) -> dict[str, Any]:
    from explainer.errors import ExplainerError, JobCancelled

    message = " ".join(str(exc).split())[:_MESSAGE_CHARS]
    if isinstance(exc, JobCancelled):
        return {"type": "JobCancelled", "message": message, "limit": None}
    cause = exc
    while cause is not None:  # the engine wraps allocation failures in its own message
        if _is_out_of_memory(cause):
            return {"type": "WorkerLimitError", "message": message, "limit": "memory"}
        cause = cause.__cause__
    if isinstance(exc, ExplainerError):
        return {"type": type(exc).__name__, "message": message, "limit": None}
    return {"type": "WorkerError", "message": f"{type(exc).__name__}: {message}", "limit": None}


class _Worker:
    def __init__(self, request_fd: int, reply_fd: int, isolated: bool) -> None:
        self.isolated = isolated
        self.request_fd = request_fd
        self.reply_fd = reply_fd
        self.jobs: queue.Queue[dict[str, Any]] = queue.Queue()
        self.write_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.current: int | None = None
        self.cancel_event = threading.Event()
        self.cancelled: set[int] = set()

    def send(self, message: dict[str, Any]) -> None:
        from explainer.compute.wire import write_frame

        with self.write_lock:
            write_frame(self.reply_fd, message)

    def read_requests(self) -> None:
        """Reader thread: queue jobs, flag cancellations, exit when the server goes away."""
        from explainer.compute.wire import read_frame

        while True:
            try:
                message = read_frame(self.request_fd, limit=None)  # the server is trusted
            except (EOFError, OSError):
                os._exit(0)
            except Exception:  # noqa: BLE001 - a malformed request from the server ends the worker
                os._exit(3)
            kind = message.get("kind") if isinstance(message, dict) else None
            if kind == "cancel":
                with self.state_lock:
                    if message.get("id") == self.current:
                        self.cancel_event.set()
                    else:
                        self.cancelled.add(message.get("id"))
            elif kind in ("load", "job"):
                self.jobs.put(message)

    def serve(self) -> None:
        from explainer.compute.tasks import ModelSession, cancellable

        threading.Thread(target=self.read_requests, name="requests", daemon=True).start()
        first = self.jobs.get()
        if first.get("kind") != "load":
            os._exit(3)
        from explainer.compute.jobs import ModelSource

        try:
            session = ModelSession(ModelSource.from_message(first["model"]))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back as a message
            self.send({"kind": "failed", "error": _error(exc)})
            return
        self.send({"kind": "ready", "info": session.info, "isolated": self.isolated})

        while True:
            job = self.jobs.get()
            job_id = job.get("id")
            with self.state_lock:
                if job_id in self.cancelled:
                    self.cancelled.discard(job_id)
                    self.send({"kind": "error", "id": job_id, "error": _error(_cancelled())})
                    continue
                self.current = job_id
                self.cancel_event.clear()
            last = [0.0]

            def progress(done: int, total: int, job_id: Any = job_id, last: list = last) -> None:
                if self.cancel_event.is_set():
                    raise _cancelled()
                now = time.monotonic()
                if done >= total or now - last[0] >= _PROGRESS_INTERVAL_S:
                    last[0] = now
                    self.send({"kind": "progress", "id": job_id, "done": done, "total": total})

            try:
                _apply_settings(job.get("settings"))
                with cancellable(self.cancel_event):
                    value = session.run(str(job.get("op")), job.get("args") or {}, progress)
                reply = {"kind": "result", "id": job_id, "value": value}
            except BaseException as exc:  # noqa: BLE001 - every failure goes back as a message
                reply = {"kind": "error", "id": job_id, "error": _error(exc)}
            finally:
                with self.state_lock:
                    self.current = None
            try:
                self.send(reply)
            except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be encoded
                self.send({"kind": "error", "id": job_id, "error": _error(exc)})


def _apply_settings(settings: Any) -> None:
    """Take the server's current ``EXPLAINER_*`` settings (operator limits read at call time)."""
    from explainer.compute.jobs import MEMORY_ENV

    if not isinstance(settings, dict):
        return
    for key in [k for k in os.environ if k.startswith("EXPLAINER_") and k != MEMORY_ENV]:
        if key not in settings:
            del os.environ[key]
    for key, value in settings.items():
        if isinstance(key, str) and key.startswith("EXPLAINER_") and isinstance(value, str):
            os.environ[key] = value


def _cancelled() -> BaseException:
    from explainer.errors import JobCancelled

    return JobCancelled("The request was cancelled.")


def main(argv: list[str]) -> None:
    request_fd, reply_fd = int(argv[1]), int(argv[2])
    sys.dont_write_bytecode = True
    isolated = isolate()
    import torch

    from explainer.compute.jobs import MEMORY_ENV
    from explainer.compute.tasks import DEVICE_ENV

    wanted = os.environ.get(DEVICE_ENV, "auto").strip().lower()
    cuda = wanted.startswith("cuda") or (wanted in ("", "auto") and torch.cuda.is_available())
    raw = os.environ.get(MEMORY_ENV, "")
    _limit_self(int(raw) if raw.isdigit() else None, cuda)
    _Worker(request_fd, reply_fd, isolated).serve()


if __name__ == "__main__":
    main(sys.argv)
