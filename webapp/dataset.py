"""The Dataset page's service: pick a results store safely, read it once, slice and rank it.

Where stores come from. A shared server must not open any file a visitor names, so the page
only lists the ``*.sqlite`` files of one operator-chosen folder (:data:`DATASET_DIR_ENV`,
default ``./runs``) and accepts uploaded stores. An upload is untrusted: its size is bounded
(:data:`MAX_STORE_MB_ENV`), it is copied to a private temporary file, opened read-only and
immutable (SQLite writes nothing next to it), with ``trusted_schema`` off, a time limit on every
query and a structure check, and it is read completely into memory at once; the copy is then
deleted. Every SQLite or store problem becomes :class:`DatasetViewError` with a sentence saying
what is wrong.

What is read. :func:`load_store` returns a :class:`StoreData`: per image its path, true and
predicted class, and per layer the ``(images, channels)`` matrices of conductance totals and
strongest activations. Everything the page shows is computed from it by plain functions
(:func:`slice_mask`, :func:`class_matrix`, :func:`top_channels`, :func:`top_images`), so a click
never reads the file again. Loaded stores are kept in the shared, bounded result cache of
:mod:`webapp.backend`, keyed by the upload's sha256, or by a folder store's path, size and
modification time (a store that a run is still writing is read again when it changes).

Runs from the app. :func:`start_run` explains the images of the session with
:func:`explainer.batch.run_batch` in a background thread on the app's compute workers, writing
a new store (and a copy of the images, so the page can show them) into the dataset folder;
:class:`RunJob` reports its progress and stops on request.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from explainer.batch.runner import BatchSettings, BatchSummary, run_batch
from explainer.batch.store import SCHEMA_VERSION, ResultsStore
from explainer.cache import digest
from explainer.errors import ExplainerError
from explainer.images import load_image

__all__ = [
    "DATASET_DIR_ENV",
    "MAX_STORE_MB_ENV",
    "SLICES",
    "DatasetViewError",
    "RunJob",
    "StoreData",
    "class_matrix",
    "dataset_dir",
    "list_stores",
    "load_store",
    "load_upload",
    "max_store_bytes",
    "slice_mask",
    "start_run",
    "thumbnail",
    "top_channels",
    "top_images",
]

# Session-state keys of the Dataset page (the page's own; the shared ones live in webapp.state).
STORE = "dataset_store"
"""``("folder", name)`` or ``("upload", name)``: the store the page shows, or absent."""
NEURON = "dataset_neuron"
"""``(layer, channel)`` selected on the Dataset page, or absent."""
JOB = "dataset_job"
"""The :class:`RunJob` of this session's run in progress, or absent."""
FOCUS = "dataset_focus"
"""``(layer, channel)`` another page (the Neuron card) asked the Dataset page to open on, or
absent; the page takes it once a store is shown."""

DATASET_DIR_ENV = "EXPLAINER_DATASET_DIR"
"""The folder of results stores the page lists (and where runs started in the app write)."""
DEFAULT_DATASET_DIR = "runs"
MAX_STORE_MB_ENV = "EXPLAINER_MAX_STORE_MB"
"""Largest uploaded store, in MiB (default 64)."""
DEFAULT_MAX_STORE_MB = 64.0
QUERY_SECONDS = 20.0
"""Longest time reading an uploaded store may take (a hostile file cannot hang the page); ten
times more for a store of the operator's folder."""
SLICES: dict[str, str] = {
    "all": "All images",
    "correct": "Correctly classified",
    "incorrect": "Misclassified",
}
ROW_LABEL_CHARS = 24
"""Longest class name the heatmap writes beside its rows (a longer one is shortened with "…";
its hover text has it in full): long names would squeeze the cells and, on a 1024 px screen,
push the labels out of the figure."""
_STORE_SUFFIX = ".sqlite"
_REQUIRED_TABLES = ("images", "layers", "run")
THUMB_PX = 160


class DatasetViewError(ExplainerError, ValueError):
    """A results store cannot be listed, opened or read; the message says what to do."""


# --- where stores come from ---------------------------------------------------------------------
def dataset_dir() -> Path:
    """The operator's folder of stores: ``$EXPLAINER_DATASET_DIR``, else ``./runs``."""
    return Path(os.environ.get(DATASET_DIR_ENV) or DEFAULT_DATASET_DIR).expanduser().resolve()


def max_store_bytes() -> int:
    """Largest accepted upload of a store, in bytes (``$EXPLAINER_MAX_STORE_MB``)."""
    text = os.environ.get(MAX_STORE_MB_ENV, "")
    try:
        mb = float(text) if text else DEFAULT_MAX_STORE_MB
    except ValueError:
        mb = DEFAULT_MAX_STORE_MB
    if not (math.isfinite(mb) and mb > 0):
        mb = DEFAULT_MAX_STORE_MB
    return int(mb * 2**20)


def list_stores(folder: Path) -> list[str]:
    """Names of the ``*.sqlite`` files directly in ``folder`` (sorted); links that lead out of
    the folder are left out.

    Raises
    ------
    DatasetViewError
        When the folder exists but cannot be read.
    """
    if not folder.is_dir():
        return []
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DatasetViewError(
            f"The dataset folder cannot be read ({exc.strerror or exc}); ask the operator to "
            f"check the permissions of {DATASET_DIR_ENV}."
        ) from None
    names = []
    for entry in entries:
        if entry.suffix != _STORE_SUFFIX:
            continue
        try:
            real = entry.resolve()
        except OSError:
            continue
        if real.is_file() and real.parent == folder:
            names.append(entry.name)
    return names


def _in_folder(folder: Path, name: str) -> Path:
    """``folder / name`` for a listed store name, refusing anything else."""
    if name not in list_stores(folder):
        raise DatasetViewError(
            f"There is no store named {name!r} in the dataset folder any more; pick another."
        )
    return folder / name


# --- what is read -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerData:
    """One layer of a store: one row per explained image (in :attr:`StoreData.paths` order)."""

    channels: int
    conductance: np.ndarray
    act_max: np.ndarray


@dataclass(frozen=True)
class StoreData:
    """What the Dataset page shows of a store, read once.

    ``true`` and ``predicted`` hold ``-1`` where a label is unknown; ``class_names`` maps the
    class indices that occur (and the model's labels) to names; ``root`` is the folder the image
    paths are relative to when the page may read image files from it, else ``None``.
    """

    name: str
    paths: tuple[str, ...]
    true: np.ndarray
    predicted: np.ndarray
    class_names: dict[int, str]
    layers: dict[str, LayerData]
    counts: dict[str, int]
    problems: tuple[tuple[str, str, str], ...]
    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None

    @property
    def has_true_labels(self) -> bool:
        return bool(len(self.true)) and bool(np.any(self.true >= 0))

    def class_name(self, index: int) -> str:
        return self.class_names.get(int(index), f"class {int(index)}")


class _ReadStore(ResultsStore):
    """A :class:`ResultsStore` opened read-only with a time limit on every query.

    ``immutable`` (for an uploaded copy nobody vouches for) also tells SQLite the file cannot
    change, so it takes no locks and writes no journal beside it. The structure and layout
    version are checked here, with messages that do not quote server paths.
    """

    def __init__(self, path: Path, *, immutable: bool) -> None:  # noqa: D107 - see the class
        self.path = path
        self.readonly = True
        self._lock = None
        self._db = None  # type: ignore[assignment]
        uri = path.resolve().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro")
        try:
            db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:
            raise DatasetViewError(f"The file cannot be opened as SQLite ({exc}).") from None
        self._db = db
        try:
            self._prepare(db, QUERY_SECONDS if immutable else 10 * QUERY_SECONDS)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _prepare(db: sqlite3.Connection, seconds: float) -> None:
        db.execute("PRAGMA trusted_schema=OFF")
        db.execute("PRAGMA cell_size_check=ON")
        deadline = time.monotonic() + seconds
        db.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
        _check_structure(db)
        row = db.execute("SELECT value FROM run WHERE key='schema'").fetchone()
        try:
            version = None if row is None else json.loads(row[0])
        except (TypeError, ValueError):
            version = None
        if version != SCHEMA_VERSION:
            raise DatasetViewError(
                f"This store has layout version {version if version is not None else 'none'}; "
                f"this app reads version {SCHEMA_VERSION}. Write it again with this version of "
                "`explainer batch`."
            )


def _check_structure(db: sqlite3.Connection) -> None:
    """The three tables are real tables (not views) and the file is not damaged."""
    found = dict(db.execute("SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view')"))
    missing = [t for t in _REQUIRED_TABLES if found.get(t) != "table"]
    if missing:
        raise DatasetViewError(
            "This SQLite file is not a results store of `explainer batch`: it has no "
            f"{', '.join(missing)} table. Pick the .sqlite file a run wrote (its --out)."
        )
    verdict = db.execute("PRAGMA quick_check").fetchone()
    if verdict is None or verdict[0] != "ok":
        raise DatasetViewError(
            "The store is damaged (SQLite's integrity check failed); run `explainer batch` "
            "again to write a new one."
        )


def _read(store: ResultsStore, name: str, root: Path | None) -> StoreData:
    """Everything the page needs from an open store (see :class:`StoreData`)."""
    model = store.meta("model") or {}
    settings = store.meta("settings") or {}
    if not isinstance(model, dict) or not isinstance(settings, dict):
        raise DatasetViewError("The store's run description is damaged (not a JSON object).")
    labels = [str(x) for x in model.get("labels") or []]
    class_names = dict(enumerate(labels))
    rows = store.images()
    problems = tuple((r.path, r.status, r.reason or "") for r in rows if r.status != "ok")
    by_path = {r.path: r for r in rows if r.status == "ok"}
    layers: dict[str, LayerData] = {}
    paths: list[str] | None = None
    for layer in store.layer_names():
        layer = str(layer)
        cond_paths, cond = store.channel_matrix(layer, "conductance")
        act_paths, act = store.channel_matrix(layer, "act_max")
        if cond_paths != act_paths or (paths is not None and cond_paths != paths):
            raise DatasetViewError(
                f"The store is incomplete: layer {layer!r} does not have a row for every "
                "explained image. Run `explainer batch` again to complete it."
            )
        paths = cond_paths
        layers[layer] = LayerData(int(cond.shape[1]) if cond.ndim == 2 else 0, cond, act)
    paths = paths or []
    true = np.full(len(paths), -1, dtype=np.int64)
    predicted = np.full(len(paths), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        row = by_path.get(path)
        if row is None:
            continue
        if row.true_label is not None:
            true[i] = int(row.true_label)
            if row.true_name and int(row.true_label) not in class_names:
                class_names[int(row.true_label)] = str(row.true_name)
        if row.predicted is not None:
            predicted[i] = int(row.predicted)
            if row.predicted_name and int(row.predicted) not in class_names:
                class_names[int(row.predicted)] = str(row.predicted_name)
    return StoreData(
        name=name,
        paths=tuple(paths),
        true=true,
        predicted=predicted,
        class_names=class_names,
        layers=layers,
        counts=store.counts(),
        problems=problems,
        model=str(model.get("name") or model.get("arch") or "unknown model"),
        settings=settings,
        root=root,
    )


def _plainly(exc: BaseException) -> DatasetViewError:
    """A store problem in a sentence (SQLite's own words in brackets)."""
    if isinstance(exc, DatasetViewError):
        return exc
    text = " ".join(str(exc).split())[:200]
    if isinstance(exc, sqlite3.OperationalError) and "interrupted" in text:
        return DatasetViewError(
            f"Reading the store took longer than {QUERY_SECONDS:.0f} s, so it was stopped; the "
            "file may be damaged or built to be slow."
        )
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
        return DatasetViewError(
            "This file is not an SQLite database, so it is not a results store. Pick the "
            ".sqlite file `explainer batch` wrote (its --out)."
        )
    if isinstance(exc, ExplainerError):
        return DatasetViewError(f"This file cannot be read as a results store: {text}")
    return DatasetViewError(
        f"The store is damaged or not a results store ({type(exc).__name__}: {text}). Pick "
        "the .sqlite file `explainer batch` wrote, or run it again."
    )


def _image_root(store: ResultsStore, folder: Path) -> Path | None:
    about = store.meta("about") or {}
    images = about.get("images") if isinstance(about, dict) else None
    if not isinstance(images, str) or not images:
        return None
    root = Path(images)
    return root if root.is_absolute() else (folder / root)


def load_store(folder: Path, name: str) -> StoreData:
    """Read the store ``name`` of the dataset folder ``folder`` (cached while it is unchanged).

    Raises
    ------
    DatasetViewError
        When it is not a results store, is damaged, or cannot be read.
    """
    from webapp import backend

    path = _in_folder(folder, name)
    try:
        stat = path.stat()
    except OSError as exc:
        raise DatasetViewError(f"The store cannot be read ({exc.strerror or exc}).") from None
    key = digest("dataset-store", str(path.resolve()), stat.st_size, stat.st_mtime_ns)

    def read() -> StoreData:
        try:
            with _ReadStore(path, immutable=False) as store:
                return _read(store, name, _image_root(store, folder))
        except Exception as exc:  # noqa: BLE001 - every store problem is said plainly
            raise _plainly(exc) from None

    return backend.result_cache().get_or_compute(key, read)


def load_upload(name: str, data: bytes) -> StoreData:
    """Read an uploaded store (untrusted bytes) through a private, immutable temporary copy.

    Raises
    ------
    DatasetViewError
        When it is too large, not SQLite, not a results store, or damaged.
    """
    from webapp import backend

    limit = max_store_bytes()
    if len(data) > limit:
        raise DatasetViewError(
            f"The file is {len(data) / 2**20:.1f} MB, more than the {limit / 2**20:.0f} MB this "
            f"server accepts for an upload; ask the operator to put it in the dataset folder, "
            f"or to raise {MAX_STORE_MB_ENV}."
        )
    if not data.startswith(b"SQLite format 3\x00"):
        raise DatasetViewError(
            "This file is not an SQLite database, so it is not a results store. Pick the "
            ".sqlite file `explainer batch` wrote (its --out)."
        )
    key = digest("dataset-upload", hashlib.sha256(data).hexdigest())

    def read() -> StoreData:
        with tempfile.TemporaryDirectory(prefix="explainer-store-") as tmp:
            copy = Path(tmp) / "upload.sqlite"
            copy.write_bytes(data)
            copy.chmod(0o400)
            try:
                with _ReadStore(copy, immutable=True) as store:
                    return _read(store, name, None)
            except Exception as exc:  # noqa: BLE001 - every store problem is said plainly
                raise _plainly(exc) from None

    return backend.result_cache().get_or_compute(key, read)


# --- slicing and ranking ------------------------------------------------------------------------
def slice_mask(data: StoreData, which: str) -> np.ndarray:
    """Which images (rows) are in the slice ``which``: ``all``, ``correct`` or ``incorrect``.

    Correct and incorrect need a true label; images without one are in neither.
    """
    if which == "all":
        return np.ones(len(data.paths), dtype=bool)
    known = (data.true >= 0) & (data.predicted >= 0)
    same = data.true == data.predicted
    return known & same if which == "correct" else known & ~same


def class_matrix(
    data: StoreData, layer: str, mask: np.ndarray, by: str = "true"
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``(classes, means, counts)``: the mean conductance total of each channel per class.

    ``by`` groups the images of ``mask`` by their ``true`` or ``predicted`` class; classes with
    no image in the slice are left out. ``means`` is ``(classes, channels)``.
    """
    labels = data.true if by == "true" else data.predicted
    values = data.layers[layer].conductance
    chosen = mask & (labels >= 0)
    classes = sorted({int(c) for c in labels[chosen]})
    means = np.zeros((len(classes), values.shape[1] if values.ndim == 2 else 0))
    counts = np.zeros(len(classes), dtype=np.int64)
    for row, cls in enumerate(classes):
        rows = chosen & (labels == cls)
        counts[row] = int(rows.sum())
        means[row] = values[rows].astype(np.float64).mean(axis=0)
    return classes, means, counts


def top_channels(
    classes: Sequence[int], means: np.ndarray, k: int = 5
) -> list[tuple[int, int, int, float]]:
    """``(class, rank, channel, mean)`` for the ``k`` channels of largest ``|mean|`` per class."""
    rows = []
    for r, cls in enumerate(classes):
        order = np.argsort(-np.abs(means[r]), kind="stable")[:k]
        rows.extend((int(cls), rank, int(c), float(means[r, c])) for rank, c in enumerate(order, 1))
    return rows


def top_images(
    data: StoreData, layer: str, channel: int, mask: np.ndarray, k: int = 8
) -> list[tuple[str, float]]:
    """The ``k`` images of the slice that drive ``channel`` hardest (strongest activation).

    The same ranking as :meth:`ResultsStore.top_images` (``by="act_max"``, ties in path order),
    within the slice.
    """
    values = data.layers[layer].act_max
    if not (0 <= channel < values.shape[1]):
        return []
    rows = np.flatnonzero(mask)
    column = values[rows, channel].astype(np.float64)
    order = np.argsort(-column, kind="stable")[:k]
    return [(data.paths[rows[i]], float(column[i])) for i in order]


def thumbnail(data: StoreData, path: str) -> np.ndarray | None:
    """A small RGB copy of an image of the store, or None when its file is not reachable.

    Only folder stores have a root; the path must stay inside it once links are resolved, and
    the file is decoded with every intake check.
    """
    if data.root is None:
        return None
    try:
        root = data.root.resolve()
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return None
        image = load_image(target)
    except (OSError, ExplainerError, ValueError):
        return None
    image.thumbnail((THUMB_PX, THUMB_PX))
    return np.asarray(image)


# --- runs started from the app ------------------------------------------------------------------
@dataclass
class RunJob:
    """A dataset run in a background thread: its progress, its result, and a way to stop it."""

    store_name: str
    total: int
    stop: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    summary: BatchSummary | None = None
    error: str | None = None
    thread: threading.Thread | None = None

    @property
    def finished(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def _record(self, _path: str) -> None:
        self.done += 1


def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(name).stem).strip("-")
    return stem or "image"


def start_run(
    folder: Path,
    source: Any,
    images: Sequence[tuple[str, bytes]],
    settings: BatchSettings,
    executor: Any,
) -> RunJob:
    """Write ``images`` (name, bytes) under a new name in ``folder`` and explain them into a new
    store there, in a background thread on ``executor``.

    Raises
    ------
    DatasetViewError
        When the folder cannot be created or written.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"app-{stamp}-{uuid.uuid4().hex[:6]}"
    image_dir = folder / f"{base}.images"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        image_dir.mkdir()
        used: set[str] = set()
        for i, (name, data) in enumerate(images):
            suffix = Path(name).suffix.lower() or ".png"
            if not re.fullmatch(r"\.[a-z0-9]{1,5}", suffix):
                suffix = ".png"
            file_name = f"{i:03d}-{_safe_stem(name)}{suffix}"
            while file_name in used:
                file_name = f"{i:03d}-{uuid.uuid4().hex[:4]}{suffix}"
            used.add(file_name)
            (image_dir / file_name).write_bytes(data)
    except OSError as exc:
        raise DatasetViewError(
            f"The dataset folder cannot be written ({exc.strerror or exc}); ask the operator "
            f"to make {DATASET_DIR_ENV} a folder the server may write to."
        ) from None
    job = RunJob(store_name=f"{base}{_STORE_SUFFIX}", total=len(images))

    def work() -> None:
        try:
            job.summary = run_batch(
                source, image_dir, folder / job.store_name, settings, executor,
                stop=job.stop, on_record=job._record,
            )  # fmt: skip
        except ExplainerError as exc:
            job.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - shown on the page, never a traceback
            job.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"

    job.thread = threading.Thread(target=work, name=f"dataset-run-{base}", daemon=True)
    job.thread.start()
    return job


def image_bytes_of(entries: Sequence[Any]) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the session's images (:class:`webapp.state.ImageEntry`)."""
    return [(str(e.name), bytes(e.data)) for e in entries]


def describe_settings(settings: dict[str, Any]) -> str:
    """The run's settings in one line of plain text."""
    parts = []
    for key in ("target", "method", "n_steps", "baseline"):
        if key in settings:
            value = settings[key]
            if isinstance(value, dict):
                value = value.get("kind", json.dumps(value))
            parts.append(f"{key.replace('_', ' ')}: {value}")
    return ", ".join(parts)


def png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB array (for tests and downloads)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the class x channel heatmap ----------------------------------------------------------------
MAX_HEAT_CHANNELS = 128
"""Channels drawn at most (those with the largest class means); the table lists every channel."""
MAX_HEAT_CLASSES = 40
"""Classes drawn at most (those with the most images in the slice)."""


def heatmap_view(
    classes: Sequence[int], means: np.ndarray, counts: np.ndarray
) -> tuple[list[int], list[int], np.ndarray]:
    """``(rows, channels, z)``: the classes and channels the heatmap draws, and their means.

    At most :data:`MAX_HEAT_CLASSES` classes (most images first, then in class order) and
    :data:`MAX_HEAT_CHANNELS` channels (largest ``|mean|`` over the drawn classes, in channel
    order).
    """
    order = sorted(range(len(classes)), key=lambda r: (-int(counts[r]), classes[r]))
    keep_rows = sorted(order[:MAX_HEAT_CLASSES], key=lambda r: classes[r])
    sub = means[keep_rows] if keep_rows else np.zeros((0, means.shape[1]))
    channels = list(range(sub.shape[1]))
    if len(channels) > MAX_HEAT_CHANNELS:
        strength = np.abs(sub).max(axis=0) if len(sub) else np.zeros(len(channels))
        channels = sorted(np.argsort(-strength, kind="stable")[:MAX_HEAT_CHANNELS].tolist())
    return [int(classes[r]) for r in keep_rows], channels, sub[:, channels]


def row_label(name: str, limit: int = ROW_LABEL_CHARS) -> str:
    """``name`` shortened to ``limit`` characters with "…", keeping a trailing count such as
    ``" (12)"`` whole."""
    if len(name) <= limit:
        return name
    head, suffix = name, ""
    if name.endswith(")") and " (" in name:
        head, _, count = name.rpartition(" (")
        suffix = f" ({count}"
    keep = max(1, limit - len(suffix) - 1)
    return head[:keep].rstrip() + "…" + suffix


def class_heatmap(
    row_names: Sequence[str],
    rows: Sequence[int],
    channels: Sequence[int],
    z: np.ndarray,
    selected: tuple[int | None, int] | None = None,
    width_px: float = 760.0,
) -> Any:
    """Classes (rows) by channels (columns), coloured by mean conductance (red up, blue down).

    A transparent square marker lies on every cell (a click on a plain heatmap reports no
    point); its ``customdata`` is ``[class, channel]``. ``selected`` (class, channel) is outlined,
    or the whole column of the channel when the class is None.
    """
    import plotly.graph_objects as go

    from webapp.figures import SIGNED_SCALE, symmetric_limit
    from webapp.text import html

    n_rows, n_cols = len(rows), len(channels)
    height = int(min(560, max(220, 90 + 24 * n_rows)))
    limit = symmetric_limit(z) if z.size else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=np.asarray(z, dtype=np.float64),
            x=list(range(n_cols)),
            y=list(range(n_rows)),
            colorscale=SIGNED_SCALE,
            zmid=0.0,
            zmin=-limit,
            zmax=limit,
            hoverinfo="skip",
            colorbar=dict(title=dict(text="mean<br>conductance", side="right"), thickness=12),
        )
    )
    yy, xx = np.mgrid[0:n_rows, 0:n_cols]
    custom = [[int(rows[y]), int(channels[x])] for y, x in zip(yy.ravel(), xx.ravel(), strict=True)]
    text = [
        f"{html(row_names[y])}, channel {int(channels[x])}<br>mean {z[y, x]:.4g}"
        for y, x in zip(yy.ravel(), xx.ravel(), strict=True)
    ]
    marker = max(4.0, min((height - 70) / max(n_rows, 1), width_px / max(n_cols, 1)))
    fig.add_trace(
        go.Scatter(
            x=xx.ravel().astype(float),
            y=yy.ravel().astype(float),
            mode="markers",
            marker=dict(symbol="square", size=marker, color="rgba(0,0,0,0)", line=dict(width=0)),
            customdata=custom,
            text=text,
            hovertemplate="%{text}<br>click to see the images that drive it<extra></extra>",
            selected=dict(marker=dict(opacity=1.0)),
            unselected=dict(marker=dict(opacity=1.0)),
            showlegend=False,
        )
    )
    step = max(1, math.ceil(n_cols / 24))
    fig.update_xaxes(
        range=[-0.5, n_cols - 0.5],
        tickvals=list(range(0, n_cols, step)),
        ticktext=[str(channels[i]) for i in range(0, n_cols, step)],
        title=dict(text="channel", standoff=4),
        showgrid=False,
        zeroline=False,
    )
    fig.update_yaxes(
        range=[n_rows - 0.5, -0.5],
        tickvals=list(range(n_rows)),
        ticktext=[html(row_label(name)) for name in row_names],
        showgrid=False,
        zeroline=False,
        automargin=True,
    )
    fig.update_layout(
        height=height,
        margin=dict(l=8, r=8, t=8, b=8),
        dragmode=False,
        hovermode="closest",
        hoverdistance=-1,
        clickmode="event+select",
        plot_bgcolor="rgba(0,0,0,0)",
        paper_bgcolor="rgba(0,0,0,0)",
        showlegend=False,
    )
    if selected is not None and selected[1] in channels and n_rows:
        x = list(channels).index(selected[1])
        if selected[0] in rows:
            y0 = y1 = list(rows).index(selected[0])
        else:
            y0, y1 = 0, n_rows - 1
        fig.add_shape(
            type="rect", x0=x - 0.5, x1=x + 0.5, y0=y0 - 0.5, y1=y1 + 0.5,
            line=dict(color="#f5b700", width=3), fillcolor="rgba(0,0,0,0)", layer="above",
        )  # fmt: skip
    return fig
