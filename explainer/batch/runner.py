"""Dataset mode: explain every image of a folder through an executor, into a results store.

:func:`run_batch` does the driver's work, whatever runs the model: it loads the model once in
the executor (:class:`~explainer.compute.local.LocalExecutor`'s workers or
:class:`~explainer.compute.ray_executor.RayExecutor`'s actors), checks the layers and the
settings, reads and preprocesses each image here (with every check of
:func:`explainer.images.load_image`), sends a few images at a time to the executor as
``dataset_record`` jobs, and writes each record to the :class:`~explainer.batch.store.ResultsStore`
as soon as it comes back, checked. Images already in the store with the same bytes are skipped,
so a run that stopped (Ctrl-C, a kill, a crash) resumes where it was.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from explainer.baselines import BASELINE_KINDS
from explainer.batch.dataset import (
    ClassMap,
    ImageFile,
    class_map,
    decode,
    find_images,
    read_image,
)
from explainer.batch.record import record_problem
from explainer.batch.store import ResultsStore
from explainer.compute.jobs import Executor, JobHandle, ModelSource
from explainer.errors import AttributionError, ExplainerError, ImageLoadError, JobCancelled
from explainer.images import Preprocessing
from explainer.integration import check_method

__all__ = ["BatchError", "BatchSettings", "BatchSummary", "run_batch"]

_POLL_S = 0.02
_STOP_WAIT_S = 10.0
_MAX_FAILURES_IN_A_ROW = 8


class BatchError(ExplainerError, ValueError):
    """A dataset run cannot start or go on as asked; the message says what to change."""


@dataclass(frozen=True)
class BatchSettings:
    """What a dataset run computes for each image (everything its numbers depend on).

    Attributes
    ----------
    layers : tuple of str
        Dotted layer names; empty for the model's suggested layers.
    target : str or int
        ``"predicted"`` (the class the model predicts), ``"true"`` (the class folder's label,
        with ``labels_from_folders``) or a class index.
    method : str
        Integration rule.
    n_steps : int or "auto"
        Integration steps, or ``"auto"`` with ``tolerance`` where the engine supports it.
    tolerance : float or None
        Relative completeness delta ``auto`` steps aim for.
    baseline : str
        One of :data:`explainer.baselines.BASELINE_KINDS`; ``baseline_value``, ``blur_sigma`` and
        ``noise_seed`` as in :func:`explainer.baselines.make_baseline`.
    labels_from_folders : bool
        Read true labels from class folders (see :mod:`explainer.batch.dataset`).
    maps : bool
        Keep each layer's full conductance map, not only the channel totals.
    chunk : int
        Images per job; more amortises the round trip, fewer keeps one bad image from taking
        others with it when its worker fails.
    """

    layers: tuple[str, ...] = ()
    target: str | int = "predicted"
    method: str = "gausslegendre"
    n_steps: int | str = 50
    tolerance: float | None = None
    baseline: str = "black"
    baseline_value: float = 0.5
    blur_sigma: float = 5.0
    noise_seed: int = 0
    labels_from_folders: bool = False
    maps: bool = False
    chunk: int = 1

    def check(self) -> None:
        """Raise :class:`BatchError` for settings that cannot run, before anything loads."""
        if isinstance(self.target, str):
            if self.target not in ("predicted", "true"):
                raise BatchError(
                    f"--target is predicted, true or a class index, not {self.target!r}."
                )
            if self.target == "true" and not self.labels_from_folders:
                raise BatchError(
                    "--target true explains each image's true class, which comes from class "
                    "folders: add --labels-from-folders."
                )
        elif isinstance(self.target, bool) or not isinstance(self.target, int) or self.target < 0:
            raise BatchError(f"--target is predicted, true or a class index, not {self.target!r}.")
        try:
            check_method(self.method)
        except AttributionError as exc:
            raise BatchError(str(exc)) from None
        if self.n_steps == "auto":
            if self.tolerance is None or not (0 < self.tolerance < math.inf):
                raise BatchError(
                    "--n-steps auto needs --tolerance, the relative completeness delta to reach "
                    "(e.g. --tolerance 0.01)."
                )
        elif (
            isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 1
        ):
            raise BatchError(
                f"--n-steps is a whole number of 1 or more, or auto; got {self.n_steps!r}."
            )
        if self.baseline not in BASELINE_KINDS:
            raise BatchError(
                f"--baseline is one of {', '.join(BASELINE_KINDS)}, not {self.baseline!r}."
            )
        if not (isinstance(self.chunk, int) and self.chunk >= 1):
            raise BatchError(f"--chunk is a whole number of 1 or more, not {self.chunk!r}.")
        if any(not name.strip() for name in self.layers):
            raise BatchError("--layers holds an empty name; separate layer names with commas.")

    def baseline_spec(self) -> dict[str, Any]:
        """The baseline as the ``dataset_record`` operation takes it (only what matters)."""
        spec: dict[str, Any] = {"kind": self.baseline}
        if self.baseline == "constant":
            spec["value"] = float(self.baseline_value)
        elif self.baseline == "blur":
            spec["blur_sigma"] = float(self.blur_sigma)
        elif self.baseline == "noise":
            spec["seed"] = int(self.noise_seed)
        return spec


@dataclass
class BatchSummary:
    """How a run went.

    Attributes
    ----------
    total : int
        Images found.
    skipped : int
        Images already done by an earlier run (same bytes), not computed again.
    ok, bad, failed : int
        Images this run explained, found bad (with a reason), or could not compute.
    interrupted : bool
        Whether the run stopped early (Ctrl-C); what it finished is stored.
    seconds : float
        Wall-clock time of this run's computations.
    layers : list of str
        The layers computed.
    """

    total: int = 0
    skipped: int = 0
    ok: int = 0
    bad: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    layers: list[str] = field(default_factory=list)

    @property
    def computed(self) -> int:
        """Images this run sent to the model and got a record back for."""
        return self.ok + self.bad + self.failed


@dataclass
class _Item:
    image: ImageFile
    sha256: str
    array: np.ndarray
    target: int | None
    true_label: int | None


def _version() -> str:
    try:
        return importlib.metadata.version("layer-explainer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _wait(handle: JobHandle, what: str) -> Any:
    try:
        return handle.result()
    except ExplainerError:
        raise
    except Exception as exc:  # noqa: BLE001 - an executor's own failure, said plainly
        raise BatchError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def _check_layers(tree: Any, layers: Sequence[str]) -> list[str]:
    if not layers:
        names = list(tree.suggested)
        if not names:
            raise BatchError("The model has no suggested layers; name them with --layers a,b,c.")
        return names
    for name in layers:
        node = tree[name]  # raises with the closest names
        if not node.usable:
            raise BatchError(f"Layer {name!r} cannot be explained: {node.reason}")
    return list(dict.fromkeys(layers))


class _Progress:
    """A tqdm bar with a rate and an ETA (or nothing, when not wanted)."""

    def __init__(self, total: int, enabled: bool, initial_note: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="img", desc="explaining", dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr,
            )  # fmt: skip
            if initial_note:
                self.bar.write(initial_note, file=sys.stderr)

    def advance(self, summary: BatchSummary) -> None:
        if self.bar is not None:
            self.bar.set_postfix(ok=summary.ok, bad=summary.bad, failed=summary.failed,
                                 refresh=False)  # fmt: skip
            self.bar.update(1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(
    source: ModelSource,
    images: str | Path,
    out: str | Path,
    settings: BatchSettings,
    executors: Executor | Sequence[Executor],
    *,
    progress: bool = False,
    in_flight: int | None = None,
    stop: threading.Event | None = None,
    on_record: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Explain every image below ``images`` with ``source``'s model; results go to ``out``.

    Parameters
    ----------
    source : ModelSource
        The model (loaded with every intake check wherever the executor runs it).
    images : path
        The dataset's folder, searched recursively.
    out : path
        The results store (created, or resumed when it holds a run with the same settings).
    settings : BatchSettings
        What to compute.
    executors : Executor or sequence of Executor
        Where to compute: jobs go to the executor with the fewest jobs in flight.
    progress : bool
        Show a progress bar (rate and ETA) on stderr.
    in_flight : int, optional
        Jobs in flight at once; default two per worker (an executor's ``parallelism``).
    stop : threading.Event, optional
        Set it (e.g. from a Ctrl-C handler) to stop cleanly: no new jobs, running ones are
        cancelled, everything finished is stored.
    on_record : callable, optional
        Called with each image's path once its row is stored (for tests and monitoring).

    Returns
    -------
    BatchSummary

    Raises
    ------
    BatchError, DatasetError, StoreError, ModelLoadError, AttributionError
        With a sentence saying what to change, before any image is computed; and
        :class:`BatchError` when every job keeps failing (the workers or the cluster are gone).
    """
    settings.check()
    pool = list(executors) if isinstance(executors, Sequence) else [executors]
    if not pool:
        raise BatchError("No executor to run the jobs on.")
    stop = stop or threading.Event()
    files = find_images(images, class_folders=settings.labels_from_folders)

    first = pool[0]
    info = _wait(first.submit(source, "info"), "Loading the model")
    scores_shape = tuple(_wait(first.submit(source, "score_shape"), "Reading the scores"))
    layers = _check_layers(_wait(first.submit(source, "tree"), "Finding the layers"),
                           settings.layers)  # fmt: skip
    labels = list(info.labels)
    num_classes = len(labels)
    if isinstance(settings.target, int) and settings.target >= num_classes:
        raise BatchError(
            f"--target {settings.target} is out of range: the model has {num_classes} classes "
            f"(0 to {num_classes - 1})."
        )
    classes: ClassMap | None = None
    if settings.labels_from_folders:
        classes = class_map(files, labels)
    prep = Preprocessing.for_model(info.input_size, info.mean, info.std)
    if prep.resize is not None and len(scores_shape) > 1:
        prep = dataclasses.replace(prep, resize=None)  # a map of the whole image, as the app

    run_settings = {
        "model": source.key,
        "layers": layers,
        "target": settings.target,
        "method": settings.method,
        "n_steps": settings.n_steps,
        "tolerance": settings.tolerance if settings.n_steps == "auto" else None,
        "baseline": settings.baseline_spec(),
        "labels_from_folders": settings.labels_from_folders,
        "classes": None if classes is None else dataclasses.asdict(classes),
        "maps": settings.maps,
        "preprocessing": {
            "mean": list(prep.mean), "std": list(prep.std), "size": list(prep.size),
            "resize": prep.resize, "channels": prep.channels,
        },
    }  # fmt: skip
    model_meta = {
        "name": info.name,
        "arch": info.arch,
        "labels": labels,
        "input_size": list(info.input_size),
        "score_shape": list(scores_shape),
        "num_params": info.num_params,
        "source_format": info.source_format,
        "file_sha256": source.data_digest if source.kind == "file" else None,
        "sha256": info.sha256,
        "source_key": source.key,
        "notes": list(info.notes),
    }
    summary = BatchSummary(total=len(files), layers=layers)
    with ResultsStore(out) as store:
        store.begin(run_settings, model_meta)
        store.set_meta("about", {
            **(store.meta("about") or {}),
            "explainer": _version(), "images": str(Path(images).resolve()),
            "python": sys.version.split()[0], "torch": _torch_version(),
        })  # fmt: skip
        todo = _left_to_do(files, store)
        summary.skipped = len(files) - len(todo)
        note = (
            f"{summary.skipped} of {len(files)} images already done in {out}; {len(todo)} to go."
            if summary.skipped
            else ""
        )
        if note and progress and not todo:
            print(note, file=sys.stderr)
        bar = _Progress(len(todo), progress and bool(todo), note)
        started = time.monotonic()
        try:
            _drive(
                todo, pool, source, store, settings, layers, labels, classes, prep, summary,
                bar, stop, in_flight, on_record,
            )  # fmt: skip
        finally:
            summary.seconds = time.monotonic() - started
            bar.close()
    return summary


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _left_to_do(files: Sequence[ImageFile], store: ResultsStore) -> list[ImageFile]:
    """The images the store has no final row for (ok or bad, with the same bytes)."""
    finished = store.finished()
    todo = []
    for image in files:
        known = finished.get(image.key)
        if known is not None and known[1] in ("ok", "bad"):
            try:
                _, digest = read_image(image.path)
            except ImageLoadError:
                digest = None
            if digest is None and known[1] == "bad":
                continue  # still unreadable
            if digest == known[0]:
                continue
        todo.append(image)
    return todo


def _drive(
    todo: Sequence[ImageFile],
    pool: list[Executor],
    source: ModelSource,
    store: ResultsStore,
    settings: BatchSettings,
    layers: list[str],
    labels: list[str],
    classes: ClassMap | None,
    prep: Preprocessing,
    summary: BatchSummary,
    bar: _Progress,
    stop: threading.Event,
    in_flight: int | None,
    on_record: Callable[[str], None] | None,
) -> None:
    """The run's loop: keep jobs in flight, store results as they finish, stop when asked."""
    parallelism = sum(max(1, int(getattr(e, "parallelism", 1))) for e in pool)
    window = max(1, in_flight or 2 * parallelism)
    pending: dict[JobHandle, tuple[int, list[_Item]]] = {}
    load = [0] * len(pool)
    items = _prepared(todo, classes, settings, prep, store, summary, bar, on_record)
    exhausted = False
    failures_in_a_row = 0
    last_failure = ""

    def true_of(item: _Item) -> dict[str, Any]:
        if item.true_label is None:
            return {}
        return {"true_label": item.true_label, "true_name": item.image.class_name}

    def finish(done: JobHandle) -> None:
        nonlocal failures_in_a_row, last_failure
        slot, chunk = pending.pop(done)
        load[slot] -= 1
        try:
            records = done.result(timeout=0)
        except JobCancelled:
            return  # stopped on purpose: not stored, done again on resume
        except ExplainerError as exc:
            failures_in_a_row += 1
            last_failure = " ".join(str(exc).split())
            for item in chunk:
                store.add_problem(item.image.key, item.sha256, last_failure, status="failed",
                                  **true_of(item))  # fmt: skip
                summary.failed += 1
                _stored(item.image.key, summary, bar, on_record)
            if failures_in_a_row >= _MAX_FAILURES_IN_A_ROW:
                raise BatchError(
                    f"The last {failures_in_a_row} jobs all failed, so the run stopped (what is "
                    f"done is kept; run again to resume). The last error: {last_failure}"
                ) from exc
            return
        failures_in_a_row = 0
        if not isinstance(records, list) or len(records) != len(chunk):
            records = [None] * len(chunk)
        for item, record in zip(chunk, records, strict=True):
            key = item.image.key
            problem = record_problem(record, layers, len(labels), settings.maps)
            if problem is not None:
                store.add_problem(key, item.sha256, f"The worker sent {problem}.",
                                  status="failed", **true_of(item))  # fmt: skip
                summary.failed += 1
            elif "error" in record:
                store.add_problem(key, item.sha256, record["error"], **true_of(item))
                summary.bad += 1
            else:
                store.add_record(key, item.sha256, record, labels=labels, **true_of(item))
                summary.ok += 1
            _stored(key, summary, bar, on_record)

    try:
        while True:
            while not stop.is_set() and not exhausted and len(pending) < window:
                chunk = []
                for item in items:
                    chunk.append(item)
                    if len(chunk) >= settings.chunk or stop.is_set():
                        break
                if not chunk:
                    exhausted = True
                    break
                slot = min(range(len(pool)), key=load.__getitem__)
                handle = pool[slot].submit(source, "dataset_record", {
                    "images": [item.array for item in chunk],
                    "targets": [item.target for item in chunk],
                    "layers": layers,
                    "baseline": settings.baseline_spec(),
                    "method": settings.method,
                    "n_steps": settings.n_steps,
                    "tolerance": settings.tolerance,
                    "maps": settings.maps,
                })  # fmt: skip
                pending[handle] = (slot, chunk)
                load[slot] += 1
            if stop.is_set():
                break
            if not pending:
                if exhausted:
                    return
                continue
            done = [h for h in pending if h.done()]
            if not done:
                time.sleep(_POLL_S)
                continue
            for handle in done:
                finish(handle)
    except KeyboardInterrupt:
        stop.set()  # Ctrl-C without a handler: stop as cleanly as with one
    finally:
        if pending:
            _stop_pending(pending, finish, bar)
        if stop.is_set():
            summary.interrupted = True


def _stop_pending(
    pending: dict[JobHandle, tuple[int, list[_Item]]],
    finish: Callable[[JobHandle], None],
    bar: _Progress,
) -> None:
    """Cancel the jobs in flight; store those that finish anyway, within a few seconds."""
    bar.note(f"Stopping: cancelling {len(pending)} job(s) in flight...")
    for handle in list(pending):
        handle.cancel()
    deadline = time.monotonic() + _STOP_WAIT_S
    while pending and time.monotonic() < deadline:
        for handle in [h for h in pending if h.done()]:
            try:
                finish(handle)
            except BatchError:
                pass
        time.sleep(_POLL_S)


def _stored(
    key: str, summary: BatchSummary, bar: _Progress, on_record: Callable[[str], None] | None
) -> None:
    bar.advance(summary)
    if on_record is not None:
        on_record(key)


def _prepared(
    todo: Sequence[ImageFile],
    classes: ClassMap | None,
    settings: BatchSettings,
    prep: Preprocessing,
    store: ResultsStore,
    summary: BatchSummary,
    bar: _Progress,
    on_record: Callable[[str], None] | None,
) -> Iterator[_Item]:
    """Each image read, digested, decoded and preprocessed; bad ones are stored on the way."""
    for image in todo:
        true_label = None if classes is None else classes.label(str(image.class_name))
        extra = {} if true_label is None else {"true_label": true_label,
                                                "true_name": image.class_name}  # fmt: skip
        try:
            data, digest = read_image(image.path)
        except ImageLoadError as exc:
            store.add_problem(image.key, "", str(exc), **extra)
            summary.bad += 1
            _stored(image.key, summary, bar, on_record)
            continue
        try:
            array = decode(data, prep, image.path.name)
        except ImageLoadError as exc:
            store.add_problem(image.key, digest, str(exc), **extra)
            summary.bad += 1
            _stored(image.key, summary, bar, on_record)
            continue
        if settings.target == "true":
            target = true_label
        elif isinstance(settings.target, int):
            target = settings.target
        else:
            target = None
        yield _Item(image, digest, array, target, true_label)
