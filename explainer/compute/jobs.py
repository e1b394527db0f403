"""The job interface: what the web server asks of a compute tier, whatever runs it.

A job names a model (:class:`ModelSource`: plain data, the bytes of an upload or the built-in
model), an operation from :data:`explainer.compute.tasks.OPERATIONS` and its arguments (plain data
and numpy arrays). :meth:`Executor.submit` returns a :class:`JobHandle`, shaped like
``concurrent.futures.Future``: ``result(timeout)``, ``done()``, ``cancel()``, plus the progress
the computation last reported. Executors differ only in where the work runs: local worker
processes (:class:`explainer.compute.local.LocalExecutor`), or a cluster.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from explainer.errors import JobCancelled

__all__ = ["MEMORY_ENV", "Executor", "JobHandle", "ModelSource"]

MEMORY_ENV = "EXPLAINER_WORKER_MEMORY_BYTES"
"""Set by an executor for the worker processes it starts: their memory limit in bytes."""

_ids = itertools.count(1)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: enough for any worker to load it, as plain data.

    Attributes
    ----------
    kind : str
        ``"builtin"`` (the demo model shipped in ``assets/``) or ``"file"`` (bytes of a model
        file, loaded with :func:`explainer.intake.load_model` and all its checks).
    data : bytes
        The file's bytes (empty for the built-in model).
    filename : str
        The file's name, for messages.
    arch : str or None
        Architecture for weights-only files.
    num_classes : int or None
        Number of classes asked for, or None to read it from the file.
    data_digest : str
        The sha256 of ``data`` in hex; computed when not given (pass it when it is known, to
        avoid hashing a large file again).
    """

    kind: str = "builtin"
    data: bytes = field(default=b"", repr=False)
    filename: str = ""
    arch: str | None = None
    num_classes: int | None = None
    data_digest: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("builtin", "file"):
            raise ValueError(f"A model source is 'builtin' or 'file', not {self.kind!r}.")
        if not self.data_digest:  # the sha256 of the bytes, when the caller has not got it yet
            object.__setattr__(self, "data_digest", hashlib.sha256(self.data).hexdigest())

    @functools.cached_property
    def key(self) -> str:
        """A digest naming the model this source loads (bytes and loading options)."""
        hasher = hashlib.sha256()
        parts = (self.kind, self.filename, str(self.arch), str(self.num_classes), self.data_digest)
        for part in parts:
            hasher.update(part.encode("utf-8", "surrogatepass") + b"\x00")
        return hasher.hexdigest()

    def as_message(self) -> dict[str, Any]:
        """The source as a plain dict for the wire."""
        return {
            "kind": self.kind,
            "data": self.data,
            "filename": self.filename,
            "arch": self.arch,
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> ModelSource:
        """Rebuild a source from :meth:`as_message`."""
        return cls(
            kind=str(message["kind"]),
            data=bytes(message["data"]),
            filename=str(message["filename"]),
            arch=None if message["arch"] is None else str(message["arch"]),
            num_classes=None if message["num_classes"] is None else int(message["num_classes"]),
        )


class JobHandle:
    """One submitted job: its outcome when it is done, its progress while it runs.

    The executor completes it with :meth:`set_result` or :meth:`set_exception`; users call
    :meth:`result`, :meth:`done`, :meth:`cancel` and read :attr:`progress`.
    """

    def __init__(self, op: str) -> None:
        self.id = next(_ids)
        self.op = op
        self._cond = threading.Condition()
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._progress: tuple[int, int] | None = None
        self._cancel_requested = False
        self._on_cancel: list[Callable[[], None]] = []

    # --- for users
    def result(self, timeout: float | None = None) -> Any:
        """The job's value; raises its error. ``TimeoutError`` if not done within ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"job {self.id} ({self.op}) is still running")
            if self._error is not None:
                raise self._error
            return self._value

    def done(self) -> bool:
        """Whether the job has finished (with a value, an error, or cancelled)."""
        with self._cond:
            return self._done

    @property
    def progress(self) -> tuple[int, int] | None:
        """``(done, total)`` as last reported by the computation, or None."""
        with self._cond:
            return self._progress

    @property
    def cancel_requested(self) -> bool:
        with self._cond:
            return self._cancel_requested

    def cancel(self) -> bool:
        """Ask the job to stop; True if it had not finished. The executor stops it promptly
        (a running computation within about a second) and completes it with
        :class:`~explainer.errors.JobCancelled`."""
        with self._cond:
            if self._done:
                return False
            self._cancel_requested = True
            callbacks = list(self._on_cancel)
        for callback in callbacks:
            callback()
        return True

    # --- for executors
    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the cancelling thread) when :meth:`cancel` is called."""
        with self._cond:
            self._on_cancel.append(callback)
            already = self._cancel_requested and not self._done
        if already:
            callback()

    def set_progress(self, done: int, total: int) -> None:
        with self._cond:
            self._progress = (int(done), int(total))

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def set_cancelled(self, reason: str = "The request was cancelled.") -> None:
        self._finish(None, JobCancelled(reason))

    def _finish(self, value: Any, error: BaseException | None) -> None:
        with self._cond:
            if self._done:
                return
            self._value, self._error, self._done = value, error, True
            self._cond.notify_all()


class Executor(Protocol):
    """Runs jobs on models; see :class:`explainer.compute.local.LocalExecutor`."""

    def submit(
        self,
        model: ModelSource,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        background: bool = False,
    ) -> JobHandle:
        """Queue ``op(args)`` on ``model`` and return its handle at once.

        A ``background`` job (a long refinement nobody waits for) must not hold up the
        interactive ones on the same model: executors run it apart from them where they can.
        """
        ...

    def shutdown(self) -> None:
        """Stop every worker; jobs still queued or running end cancelled."""
        ...
