"""The results store of a dataset run: one SQLite file of tables and arrays, never pickles.

Why SQLite (through Python's own ``sqlite3``) rather than Parquet files: a dataset run appends
one image at a time as results stream in, and must survive being killed at any moment and
resume where it stopped. In SQLite each image is one transaction (its row, one row per layer,
its maps), committed as soon as it arrives, so a run killed mid-write leaves the store exactly
as it was after the last whole image, and a resumed run finds what is done with one indexed
query. Parquet files are immutable once written: streaming appends would mean a new part file
per few images, a half-written part file after a kill (no footer: unreadable) to detect and drop,
and compaction afterwards. SQLite also lets a reader (a notebook, the ranking below) open the
store while a run writes to it (write-ahead log), and it needs nothing beyond the standard
library. For columnar analysis, :meth:`ResultsStore.channel_matrix` gives numpy arrays, and
``pandas.read_sql`` or DuckDB read the tables directly.

Layout (arrays are little-endian float32 bytes; their shapes are stored beside them as JSON):

``run``     ``key``, ``value`` (JSON): ``settings`` (everything the numbers depend on, compared
            when a run resumes), ``model`` (its name, architecture, classes and digests),
            ``classes`` (the class folders and their labels), ``about`` (versions, times).
``images``  one row per image file: ``path`` (relative to the dataset folder), ``sha256`` of its
            bytes, ``status`` (``ok``; ``bad``: unreadable, or the model cannot explain it;
            ``failed``: the computation failed, e.g. a worker limit, and is tried again when the
            run resumes), ``reason``, ``true_label``, ``true_name``, ``predicted``,
            ``predicted_name``, ``score`` (softmax probability of the prediction, or the share
            of output positions it covers), ``top`` (JSON ``[[class, value], ...]``), ``target``
            (JSON: the explained class, or ``[class, *position]``), ``finished`` (Unix time).
``layers``  one row per image and layer: ``shape`` (JSON), ``channels``, ``conductance`` (each
            channel's conductance total), ``act_max`` and ``act_mean`` (each channel's strongest
            and mean activation: what ranks the images that drive a neuron hardest), ``delta``
            (completeness: sum of conductance minus ``output_diff``), ``output_diff``
            (``F(x) - F(baseline)``), ``relative_delta``, ``n_steps`` (with automatic steps: the
            intervals between the path points the engine chose), ``steps_status`` (``fixed``,
            or why automatic steps stopped: ``converged``, ``cap``, ``stalled``...),
            ``layer_moves``, and
            ``map`` (the full conductance map, only when the run keeps maps).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explainer.errors import ExplainerError

__all__ = [
    "RANK_COLUMNS",
    "SCHEMA_VERSION",
    "ImageRow",
    "ResultsStore",
    "StoreError",
]

SCHEMA_VERSION = 1
"""Version of the layout above; a store of another version is refused."""

RANK_COLUMNS: tuple[str, ...] = ("act_max", "act_mean", "conductance")
"""Per-channel columns images can be ranked by."""

_STATUSES = ("ok", "bad", "failed")
_FLOAT = np.dtype("<f4")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'bad', 'failed')),
    reason TEXT,
    true_label INTEGER,
    true_name TEXT,
    predicted INTEGER,
    predicted_name TEXT,
    score REAL,
    top TEXT,
    target TEXT,
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS layers (
    path TEXT NOT NULL REFERENCES images (path) ON DELETE CASCADE,
    layer TEXT NOT NULL,
    shape TEXT NOT NULL,
    channels INTEGER NOT NULL,
    conductance BLOB NOT NULL,
    act_max BLOB NOT NULL,
    act_mean BLOB NOT NULL,
    delta REAL,
    output_diff REAL,
    relative_delta REAL,
    n_steps INTEGER NOT NULL,
    steps_status TEXT NOT NULL,
    layer_moves INTEGER NOT NULL,
    map BLOB,
    PRIMARY KEY (path, layer)
);
CREATE INDEX IF NOT EXISTS layers_by_layer ON layers (layer);
"""


class StoreError(ExplainerError, ValueError):
    """The results store cannot be used as asked (another run's settings, in use, damaged)."""


@dataclass(frozen=True)
class ImageRow:
    """One image's row of the ``images`` table."""

    path: str
    sha256: str
    status: str
    reason: str | None
    true_label: int | None
    true_name: str | None
    predicted: int | None
    predicted_name: str | None
    score: float | None
    top: list[tuple[int, float]] | None
    target: int | tuple[int, ...] | None
    finished: float


def _blob(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype=_FLOAT).tobytes()


def _array(data: bytes, shape: Sequence[int]) -> np.ndarray:
    return np.frombuffer(data, dtype=_FLOAT).astype(np.float32).reshape(tuple(shape))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))


def _target_json(target: Any) -> str:
    return _json(list(target) if isinstance(target, tuple) else target)


def _target_value(text: str | None) -> int | tuple[int, ...] | None:
    if text is None:
        return None
    value = json.loads(text)
    return tuple(value) if isinstance(value, list) else value


def _finite(value: float) -> float | None:
    """A float for a REAL column: SQLite has no NaN (it would store NULL anyway)."""
    value = float(value)
    return None if math.isnan(value) else value


class ResultsStore:
    """A dataset run's results on disk (see the module docstring for the layout).

    Parameters
    ----------
    path : path
        The SQLite file; created when missing (unless ``readonly``).
    readonly : bool
        Open an existing store for reading only (a store being written may be read).

    A writing store holds an exclusive lock (``<path>.lock``) while open, so two runs never
    write to one store at once. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock: int | None = None
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"No results store at {str(self.path)!r}.")
            uri = self.path.resolve().as_uri() + "?mode=ro"
            self._db = self._connect(uri, uri=True)
            self._check_version()
            return
        if self.path.exists() and not self.path.is_file():
            raise StoreError(f"{str(self.path)!r} is a folder; --out names the store's file.")
        if not self.path.parent.is_dir():
            raise StoreError(
                f"The folder of {str(self.path)!r} does not exist; create it or pick another --out."
            )
        self._lock = self._take_lock()
        try:
            self._db = self._connect(str(self.path))
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._db:
                self._db.executescript(_SCHEMA)
                row = self._db.execute("SELECT value FROM run WHERE key='schema'").fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO run (key, value) VALUES ('schema', ?)",
                        (_json(SCHEMA_VERSION),),
                    )
            self._check_version()
        except BaseException:
            self._release_lock()
            raise

    # --- opening and closing
    @staticmethod
    def _connect(target: str, uri: bool = False) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(target, uri=uri, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{target!r} is not a results store this version can read ({exc}); pick another "
                "--out."
            ) from exc
        return db

    def _check_version(self) -> None:
        try:
            row = self._db.execute("SELECT value FROM run WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{str(self.path)!r} is not a results store ({exc}).") from exc
        if row is None or json.loads(row[0]) != SCHEMA_VERSION:
            found = "none" if row is None else row[0]
            raise StoreError(
                f"{str(self.path)!r} is a store of layout version {found}; this version of "
                f"explainer writes version {SCHEMA_VERSION}. Pick another --out."
            )

    def _take_lock(self) -> int:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"Another run is writing to {str(self.path)!r}; wait for it to finish or stop "
                "it (Ctrl-C keeps what it has done), or pick another --out."
            ) from None
        return fd

    def _release_lock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None

    def close(self) -> None:
        """Close the store (committed work is on disk already) and release its lock."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None  # type: ignore[assignment]
        self._release_lock()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the run's description
    def meta(self, key: str) -> Any:
        """The JSON value stored under ``key`` in the ``run`` table, or None."""
        row = self._db.execute("SELECT value FROM run WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        """Store ``value`` (plain JSON data) under ``key`` in the ``run`` table."""
        with self._db:
            self._db.execute(
                "INSERT INTO run (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (key, _json(value)),
            )

    def begin(self, settings: Mapping[str, Any], model: Mapping[str, Any]) -> bool:
        """Record a run's settings and model, or check them against the run being resumed.

        Returns True when the store already holds a run with these settings.

        Raises
        ------
        StoreError
            When the store holds a run with other settings (a resumed run must compute the
            same numbers), naming what differs.
        """
        settings = json.loads(_json(dict(settings)))
        before = self.meta("settings")
        if before is not None and before != settings:
            keys = sorted(
                k for k in set(before) | set(settings) if before.get(k) != settings.get(k)
            )
            shown = "; ".join(
                f"{k}: {before.get(k)!r} before, {settings.get(k)!r} now" for k in keys
            )
            raise StoreError(
                f"{str(self.path)!r} holds a run with other settings ({shown}). Run with the "
                "same settings to resume it, or pick another --out for a new run."
            )
        now = time.time()
        about = self.meta("about") or {"created": now}
        about["updated"] = now
        with self._db:
            for key, value in (("settings", settings), ("model", dict(model)), ("about", about)):
                self._db.execute(
                    "INSERT INTO run (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                    (key, _json(value)),
                )
        return before is not None

    # --- writing
    def finished(self) -> dict[str, tuple[str, str]]:
        """``path -> (sha256, status)`` of every image in the store."""
        rows = self._db.execute("SELECT path, sha256, status FROM images")
        return {path: (digest, status) for path, digest, status in rows}

    def add_record(
        self,
        path: str,
        sha256: str,
        record: Mapping[str, Any],
        *,
        labels: Sequence[str] = (),
        true_label: int | None = None,
        true_name: str | None = None,
    ) -> None:
        """Store one explained image (a record from :func:`~explainer.batch.record.image_record`)
        and its layers in one transaction, replacing what the store held for ``path``."""
        top = [(int(i), float(v)) for i, v in record["top"]]
        predicted = int(record["predicted"])
        score = next((v for i, v in top if i == predicted), math.nan)
        with self._db:
            self._db.execute("DELETE FROM images WHERE path=?", (path,))
            self._db.execute(
                "INSERT INTO images (path, sha256, status, reason, true_label, true_name, "
                "predicted, predicted_name, score, top, target, finished) "
                "VALUES (?, ?, 'ok', NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    path, sha256, true_label, true_name, predicted,
                    labels[predicted] if predicted < len(labels) else f"class {predicted}",
                    _finite(score), _json([list(t) for t in top]),
                    _target_json(record["target"]), time.time(),
                ),
            )  # fmt: skip
            self._db.executemany(
                "INSERT INTO layers (path, layer, shape, channels, conductance, act_max, "
                "act_mean, delta, output_diff, relative_delta, n_steps, steps_status, "
                "layer_moves, map) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        path, entry["name"], _json(list(entry["shape"])), int(entry["shape"][0]),
                        _blob(entry["conductance"]), _blob(entry["act_max"]),
                        _blob(entry["act_mean"]), _finite(entry["delta"]),
                        _finite(entry["output_diff"]), _finite(entry["relative_delta"]),
                        int(entry["n_steps"]), str(entry["steps_status"]),
                        int(bool(entry["layer_moves"])),
                        None if entry.get("map") is None else _blob(entry["map"]),
                    )
                    for entry in record["layers"]
                ],
            )  # fmt: skip

    def add_problem(
        self,
        path: str,
        sha256: str,
        reason: str,
        *,
        status: str = "bad",
        true_label: int | None = None,
        true_name: str | None = None,
    ) -> None:
        """Store an image that has no results, with the reason (``bad`` or ``failed``)."""
        if status not in ("bad", "failed"):
            raise ValueError(f"status is 'bad' or 'failed', not {status!r}")
        with self._db:
            self._db.execute("DELETE FROM images WHERE path=?", (path,))
            self._db.execute(
                "INSERT INTO images (path, sha256, status, reason, true_label, true_name, "
                "finished) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (path, sha256, status, reason, true_label, true_name, time.time()),
            )

    # --- reading
    def images(self, status: str | None = None) -> list[ImageRow]:
        """Rows of the ``images`` table (all, or those with ``status``), sorted by path."""
        query = (
            "SELECT path, sha256, status, reason, true_label, true_name, predicted, "
            "predicted_name, score, top, target, finished FROM images"
        )
        params: tuple[Any, ...] = ()
        if status is not None:
            query += " WHERE status=?"
            params = (status,)
        rows = []
        for row in self._db.execute(query + " ORDER BY path", params):
            top = None if row[9] is None else [(int(i), float(v)) for i, v in json.loads(row[9])]
            rows.append(ImageRow(*row[:9], top, _target_value(row[10]), row[11]))  # type: ignore[arg-type]
        return rows

    def counts(self) -> dict[str, int]:
        """How many images have each status."""
        found = dict(self._db.execute("SELECT status, count(*) FROM images GROUP BY status"))
        return {status: int(found.get(status, 0)) for status in _STATUSES}

    def layer_names(self) -> list[str]:
        """The layers the store holds results for, in the order the run named them."""
        settings = self.meta("settings") or {}
        return list(settings.get("layers", []))

    def layer_row(self, path: str, layer: str) -> dict[str, Any] | None:
        """One image's results for one layer, arrays included, or None."""
        row = self._db.execute(
            "SELECT shape, conductance, act_max, act_mean, delta, output_diff, relative_delta, "
            "n_steps, steps_status, layer_moves, map FROM layers WHERE path=? AND layer=?",
            (path, layer),
        ).fetchone()
        if row is None:
            return None
        shape = tuple(json.loads(row[0]))
        channels = (shape[0],)
        return {
            "shape": shape,
            "conductance": _array(row[1], channels),
            "act_max": _array(row[2], channels),
            "act_mean": _array(row[3], channels),
            "delta": row[4],
            "output_diff": row[5],
            "relative_delta": row[6],
            "n_steps": row[7],
            "steps_status": row[8],
            "layer_moves": bool(row[9]),
            "map": None if row[10] is None else _array(row[10], shape),
        }

    def channel_matrix(self, layer: str, column: str = "act_max") -> tuple[list[str], np.ndarray]:
        """``(paths, values)``: one row per explained image, one column per channel.

        ``column`` is one of :data:`RANK_COLUMNS`.
        """
        if column not in RANK_COLUMNS:
            raise StoreError(f"Rank by one of {', '.join(RANK_COLUMNS)}, not {column!r}.")
        rows = self._db.execute(
            f"SELECT l.path, l.channels, l.{column} FROM layers l JOIN images i USING (path) "
            "WHERE l.layer=? AND i.status='ok' ORDER BY l.path",
            (layer,),
        ).fetchall()
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        channels = rows[0][1]
        values = np.stack([_array(blob, (channels,)) for _, _, blob in rows])
        return [path for path, _, _ in rows], values

    def top_images(
        self, layer: str, channel: int, k: int = 10, by: str = "act_max"
    ) -> list[tuple[str, float]]:
        """The ``k`` images that drive ``channel`` of ``layer`` hardest, strongest first.

        ``by`` is ``act_max`` (the channel's strongest activation anywhere in the image, the
        default), ``act_mean`` or ``conductance`` (its conductance total). Ties keep path
        order. Only the channel's four bytes of each row are read.
        """
        if by not in RANK_COLUMNS:
            raise StoreError(f"Rank by one of {', '.join(RANK_COLUMNS)}, not {by!r}.")
        if isinstance(channel, bool) or not isinstance(channel, int) or channel < 0:
            raise StoreError(f"A channel is a whole number of 0 or more, not {channel!r}.")
        rows = self._db.execute(
            f"SELECT l.path, substr(l.{by}, ?, 4) FROM layers l JOIN images i USING (path) "
            "WHERE l.layer=? AND i.status='ok' AND l.channels>? ORDER BY l.path",
            (channel * _FLOAT.itemsize + 1, layer, channel),
        ).fetchall()
        if not rows:
            known = self._db.execute(
                "SELECT max(channels) FROM layers WHERE layer=?", (layer,)
            ).fetchone()[0]
            if known is None:
                names = ", ".join(repr(n) for n in self.layer_names()) or "none"
                raise StoreError(
                    f"The store holds no results for layer {layer!r} (it has {names})."
                )
            if channel >= known:
                raise StoreError(
                    f"Layer {layer!r} has {known} channels; pick one between 0 and {known - 1}."
                )
            return []
        values = np.frombuffer(b"".join(blob for _, blob in rows), dtype=_FLOAT)
        order = np.argsort(-values.astype(np.float64), kind="stable")[: max(0, int(k))]
        return [(rows[i][0], float(values[i])) for i in order]
