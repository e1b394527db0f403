"""The upload store: uploaded files kept on disk by content, so links and reloads find them again.

Every uploaded model, image or labels file is written once under its sha256 into an operator-set
folder (``EXPLAINER_UPLOAD_DIR``, default ``./uploads``), bounded in size
(``EXPLAINER_UPLOAD_STORE_MB``, default 2048; ``0`` keeps nothing). When the folder grows past
its bound, the entries used least recently are removed first. A link names its files by digest,
so any session that can reach the server gets the same bytes back, after a reload or a restart.

Layout of the folder::

    objects/ab/ab12...ef        the file's bytes, named by their sha256 in hex
    objects/ab/ab12...ef.meta   JSON: the kind ("model", "image", "labels") and the name to show
    tmp/                        files being written (moved into objects/ when complete)
    .lock                       held while entries are added, removed or evicted

The store only keeps bytes; it never interprets them. A stored model is loaded like any upload,
in a compute worker with every intake check. File names are only shown, never used as paths:
every path is built from a digest checked to be 64 hexadecimal digits. Writes go to a temporary
file that is renamed into place, so a reader never sees half a file; every read checks the bytes
against their digest, and a damaged entry is removed and reported as missing. An entry's
modification time is its last use (set when it is written or read); eviction holds a file lock,
so several server processes may share one folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from explainer.errors import ExplainerError

try:  # POSIX: one lock shared by the threads and processes that use a folder
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: a lock file is not available
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_DIR",
    "DEFAULT_STORE_MB",
    "KINDS",
    "LINK_PREFIX",
    "MIN_PREFIX",
    "StoreError",
    "Stored",
    "UploadStore",
    "default_store",
    "is_digest",
    "is_prefix",
    "store_max_bytes",
    "upload_dir",
]

LOG = logging.getLogger(__name__)

DEFAULT_DIR = "uploads"
"""Default folder of the store, relative to the server's working directory."""
DEFAULT_STORE_MB = 2048
"""Default bound of the store in MiB."""
KINDS = ("model", "image", "labels")
"""What an entry can be; a link asks for an entry of one kind."""
LINK_PREFIX = 16
"""Hex digits of a digest written into links (64 bits: a collision among the entries of one
store is vanishingly unlikely, and one is reported as ambiguous, never guessed)."""
MIN_PREFIX = 12
"""The shortest digest prefix a link may use."""
NAME_CHARS = 200
"""Longest name kept with an entry (names are only shown)."""
STALE_TMP_S = 3600
"""Age after which a temporary file left by a crashed writer is removed."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},64}}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class StoreError(ExplainerError):
    """A file could not be kept in the upload store (it still works in the current session)."""


@dataclass(frozen=True)
class Stored:
    """One entry read back from the store."""

    digest: str
    data: bytes
    kind: str
    name: str


def is_digest(text: str) -> bool:
    """``text`` is a full sha256 in lower-case hex."""
    return isinstance(text, str) and _HEX64.fullmatch(text) is not None


def is_prefix(text: str) -> bool:
    """``text`` is a lower-case hex digest prefix a link may use (12 to 64 digits)."""
    return isinstance(text, str) and _PREFIX.fullmatch(text) is not None


def clean_name(name: str, fallback: str = "upload") -> str:
    """A file name fit to show: control characters dropped, at most :data:`NAME_CHARS` long."""
    text = _CONTROL.sub("", str(name or "")).strip()
    if len(text) > NAME_CHARS:
        text = text[: NAME_CHARS - 1] + "…"
    return text or fallback


def upload_dir() -> Path:
    """The store's folder: ``EXPLAINER_UPLOAD_DIR``, or ``./uploads`` in the working directory."""
    raw = os.environ.get("EXPLAINER_UPLOAD_DIR", "").strip()
    return Path(raw).expanduser() if raw else Path.cwd() / DEFAULT_DIR


def store_max_bytes() -> int:
    """The store's bound in bytes (``EXPLAINER_UPLOAD_STORE_MB``); 0 keeps nothing."""
    raw = os.environ.get("EXPLAINER_UPLOAD_STORE_MB", "").strip()
    if not raw:
        return DEFAULT_STORE_MB * 2**20
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise StoreError(
            f"The server setting EXPLAINER_UPLOAD_STORE_MB={raw!r} is not a size in MB (0 or "
            "more); the operator must fix or unset it."
        )
    return int(value * 2**20)


def default_store() -> UploadStore:
    """The store the server's settings name (read at each call, like the other limits)."""
    return UploadStore(upload_dir(), store_max_bytes())


class UploadStore:
    """A folder of files named by their sha256, bounded in bytes, evicting the least recently used.

    Parameters
    ----------
    root : path
        The folder (created when first written to).
    max_bytes : int
        Bound on the bytes of all entries (their files and names); 0 keeps nothing.
    clock : callable, optional
        Returns the time in nanoseconds that marks a use (``time.time_ns``); tests pass a
        counter so the order of uses does not depend on the file system's time resolution.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int,
        *,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.root = Path(root).absolute()
        self.max_bytes = int(max_bytes)
        self._clock = clock

    # --- paths: only ever built from a checked digest ------------------------------------------
    @property
    def _objects(self) -> Path:
        return self.root / "objects"

    def _blob(self, digest: str) -> Path:
        if not is_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self._objects / digest[:2] / digest

    def _meta(self, digest: str) -> Path:
        return self._blob(digest).with_name(digest + ".meta")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_tmp(self, data: bytes) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=tmp, prefix="part-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise
        return Path(name)

    def _touch(self, path: Path) -> None:
        now = self._clock()
        os.utime(path, ns=(now, now), follow_symlinks=False)

    # --- public API -----------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """False when the operator set the bound to 0 (nothing is kept)."""
        return self.max_bytes > 0

    def put(self, data: bytes, *, kind: str, name: str) -> str:
        """Keep ``data`` (if not kept already) and mark it used; return its sha256 digest.

        Raises
        ------
        StoreError
            When the store is switched off, the file is larger than the whole store, or the
            folder cannot be written (the message says which).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        data = bytes(data)
        if not self.enabled:
            raise StoreError(
                "This server keeps no uploads (EXPLAINER_UPLOAD_STORE_MB=0), so a link or a "
                "reload cannot bring this file back."
            )
        meta = json.dumps({"kind": kind, "name": clean_name(name)}).encode("utf-8")
        if len(data) + len(meta) > self.max_bytes:
            raise StoreError(
                f"This file ({len(data) / 2**20:.3g} MB) is larger than the server's upload "
                f"store ({self.max_bytes / 2**20:.3g} MB, EXPLAINER_UPLOAD_STORE_MB), so a link "
                "or a reload cannot bring it back; it works in this session."
            )
        digest = hashlib.sha256(data).hexdigest()
        blob = self._blob(digest)
        try:
            # Written again even when present: a damaged copy of the same size is replaced.
            parts = [(self._write_tmp(data), blob), (self._write_tmp(meta), self._meta(digest))]
            try:
                with self._locked():
                    blob.parent.mkdir(parents=True, exist_ok=True)
                    for source, target in parts:
                        os.replace(source, target)
                    self._touch(blob)
                    self._evict(keep=digest)
            finally:
                for source, _ in parts:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(source)
        except OSError as exc:
            LOG.warning("Could not keep an upload in %s: %s", self.root, exc)
            reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise StoreError(
                f"This file could not be kept on the server ({reason}), so a link or a reload "
                "cannot bring it back; it works in this session."
            ) from None
        return digest

    def get(self, digest: str, kind: str | None = None) -> Stored | None:
        """The entry with this full digest, marked used; ``None`` when absent or damaged.

        A file whose bytes no longer match its digest is removed (and logged). ``kind``, when
        given, must match the kind the entry was stored as.
        """
        if not is_digest(digest):
            return None
        blob = self._blob(digest)
        try:
            fd = os.open(blob, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                data = handle.read()
        except OSError as exc:
            LOG.warning("Could not read %s from the upload store: %s", digest, exc)
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            LOG.warning("Upload %s is damaged (its bytes do not match its digest); removed", digest)
            self._drop_damaged(digest, inode)
            return None
        stored_kind, name = self._read_meta(digest)
        if kind is not None and stored_kind != kind:
            return None
        with contextlib.suppress(OSError):  # a concurrent eviction may have removed it
            self._touch(blob)
        return Stored(digest=digest, data=data, kind=stored_kind, name=name)

    def _read_meta(self, digest: str) -> tuple[str, str]:
        try:
            fd = os.open(self._meta(digest), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as handle:
                meta = json.loads(handle.read(4096).decode("utf-8"))
            kind, name = meta.get("kind"), meta.get("name")
        except (OSError, ValueError, AttributeError):
            return "", clean_name("")
        return (kind if kind in KINDS else ""), clean_name(name if isinstance(name, str) else "")

    def _drop_damaged(self, digest: str, inode: int) -> None:
        with contextlib.suppress(OSError), self._locked():
            blob = self._blob(digest)
            if blob.lstat().st_ino == inode:  # not replaced by a good copy meanwhile
                self._remove(digest)

    def find(self, prefix: str) -> list[str]:
        """Full digests of the entries whose digest starts with ``prefix`` (sorted)."""
        if not is_prefix(prefix):
            return []
        folder = self._objects / prefix[:2]
        try:
            names = os.listdir(folder)
        except OSError:
            return []
        return sorted(n for n in names if is_digest(n) and n.startswith(prefix))

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and is_digest(digest) and self._blob(digest).is_file()

    def entries(self) -> list[tuple[str, int, int]]:
        """``(digest, bytes, last use in ns)`` of every entry, least recently used first."""
        rows = []
        try:
            shards = [s for s in os.listdir(self._objects) if re.fullmatch(r"[0-9a-f]{2}", s)]
        except OSError:
            return []
        for shard in shards:
            try:
                names = os.listdir(self._objects / shard)
            except OSError:
                continue
            for name in names:
                if not is_digest(name) or name[:2] != shard:
                    continue
                try:
                    info = self._blob(name).lstat()
                except OSError:
                    continue
                size = info.st_size
                with contextlib.suppress(OSError):
                    size += self._meta(name).lstat().st_size
                rows.append((name, size, info.st_mtime_ns))
        rows.sort(key=lambda row: (row[2], row[0]))
        return rows

    def total_bytes(self) -> int:
        """Bytes held by all entries."""
        return sum(size for _, size, _ in self.entries())

    def _remove(self, digest: str) -> None:
        for path in (self._blob(digest), self._meta(digest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _evict(self, keep: str | None = None) -> list[str]:
        """Remove least recently used entries until the store fits (call with the lock held)."""
        rows = self.entries()
        total = sum(size for _, size, _ in rows)
        removed = []
        for digest, size, _ in rows:
            if total <= self.max_bytes:
                break
            if digest == keep:
                continue
            self._remove(digest)
            total -= size
            removed.append(digest)
        self._clear_stale_tmp()
        if removed:
            LOG.info("Upload store: evicted %d least recently used entries", len(removed))
        return removed

    def _clear_stale_tmp(self) -> None:
        folder = self.root / "tmp"
        cutoff = time.time() - STALE_TMP_S
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            path = folder / name
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime < cutoff:
                    path.unlink()
