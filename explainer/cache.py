"""A small thread-safe LRU cache keyed by content digests.

Results are keyed by what they were computed from (sha256 of the image bytes, the model digest,
the layer name, the settings), never by object identity, so two users asking the same question
share one computation. The cache is bounded both by entry count and by an estimate of the bytes
its values hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["digest", "ContentCache", "estimate_nbytes"]

T = TypeVar("T")

# Rough fixed cost of a Python container or object, added so that many tiny entries still count.
_OBJECT_OVERHEAD = 64


def digest(*parts: bytes | str | int | float | tuple | None) -> str:
    """Return a sha256 hex digest of ``parts`` under a canonical, unambiguous encoding.

    Every part is tagged with its type and length-prefixed, so ``("ab",)`` and ``("a", "b")``
    differ, as do ``1``, ``1.0``, ``True`` and ``"1"``. Tuples and lists nest.

    Parameters
    ----------
    *parts : bytes, str, int, float, tuple, list or None
        The values that determine a result.

    Returns
    -------
    str
        64 lowercase hex characters.

    Raises
    ------
    TypeError
        For a part of any other type (which would have no stable encoding).
    """
    hasher = hashlib.sha256()
    _encode((*parts,), hasher)
    return hasher.hexdigest()


def _encode(part: Any, hasher: Any) -> None:
    """Feed one tagged, length-prefixed part into ``hasher``."""
    if part is None:
        hasher.update(b"N")
    elif isinstance(part, bool):
        hasher.update(b"T" if part else b"F")
    elif isinstance(part, int):
        text = str(part).encode("ascii")
        hasher.update(b"i" + struct.pack(">Q", len(text)) + text)
    elif isinstance(part, float):
        text = part.hex().encode("ascii")
        hasher.update(b"f" + struct.pack(">Q", len(text)) + text)
    elif isinstance(part, str):
        data = part.encode("utf-8")
        hasher.update(b"s" + struct.pack(">Q", len(data)))
        hasher.update(data)
    elif isinstance(part, (bytes, bytearray, memoryview)):
        data = bytes(part)
        hasher.update(b"b" + struct.pack(">Q", len(data)))
        hasher.update(data)
    elif isinstance(part, (tuple, list)):
        hasher.update(b"t" + struct.pack(">Q", len(part)))
        for item in part:
            _encode(item, hasher)
    else:
        raise TypeError(
            f"digest() accepts bytes, str, int, float, tuple, list or None; got "
            f"{type(part).__name__}. Convert the value to one of these first."
        )


def estimate_nbytes(value: Any) -> int:
    """Estimate how many bytes ``value`` keeps alive.

    Counts the buffers of numpy arrays and torch tensors (anything with an integer
    ``nbytes``), and walks dataclasses, lists, tuples, sets and dicts; other objects count
    their ``sys.getsizeof``. Shared objects are counted once.
    """
    return _estimate(value, set())


def _estimate(value: Any, seen: set[int]) -> int:
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, (bytes, bytearray, str)):
        return sys.getsizeof(value)
    if value is None or isinstance(value, (bool, int, float, complex)):
        return sys.getsizeof(value)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int) and not isinstance(nbytes, bool):
        # numpy arrays and torch tensors: the data buffer dominates.
        return nbytes + _OBJECT_OVERHEAD
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _OBJECT_OVERHEAD + sum(
            _estimate(getattr(value, field.name), seen) for field in dataclasses.fields(value)
        )
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(
            _estimate(k, seen) + _estimate(v, seen) for k, v in value.items()
        )
    if isinstance(value, (list, tuple, set, frozenset)):
        return sys.getsizeof(value) + sum(_estimate(item, seen) for item in value)
    return sys.getsizeof(value)


class _InFlight:
    """One computation in progress: waiters block on ``done`` and then read the outcome."""

    __slots__ = ("done", "ok", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.value: Any = None


class ContentCache:
    """A thread-safe LRU cache bounded by entry count and by estimated bytes.

    Parameters
    ----------
    max_bytes : int
        Upper bound on the summed size estimates of stored values. A value larger than this on
        its own is handed back to the caller but never stored.
    max_entries : int
        Upper bound on the number of stored values.

    Notes
    -----
    :meth:`get_or_compute` runs each key's computation once even when many threads ask for it
    at the same time; the cache-wide lock is never held while computing, so other keys stay
    available. A computation that raises leaves no entry, and the next caller computes afresh.
    """

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer; got {max_bytes!r}.")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries <= 0:
            raise ValueError(f"max_entries must be a positive integer; got {max_entries!r}.")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._in_flight: dict[Hashable, _InFlight] = {}
        self._bytes = 0
        self._hits = 0
        self._misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` is stored; does not count as a hit or refresh its position."""
        with self._lock:
            return key in self._entries

    def get(self, key: Hashable, default: Any = None) -> Any:
        """Return the value stored under ``key`` (marking it recently used), else ``default``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return default
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> bool:
        """Store ``value`` under ``key`` and evict least recently used entries to fit.

        Parameters
        ----------
        key : Hashable
            Usually a :func:`digest`.
        value : Any
            The value to keep.
        nbytes : int, optional
            Its size in bytes; estimated with :func:`estimate_nbytes` when omitted.

        Returns
        -------
        bool
            True when stored; False when the value alone exceeds ``max_bytes`` (any older value
            under ``key`` is dropped then, so a stale result is never served).
        """
        size = estimate_nbytes(value) if nbytes is None else int(nbytes)
        if size < 0:
            raise ValueError(f"nbytes must not be negative; got {nbytes!r}.")
        with self._lock:
            return self._store(key, value, size)

    def get_or_compute(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Return the value under ``key``, computing it with ``fn()`` once if it is missing.

        Concurrent callers with the same key wait for the one computation instead of starting
        their own. If ``fn`` raises, the exception reaches its caller, nothing is stored, and
        callers that were waiting retry (one of them computes again).
        """
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    return entry[0]
                flight = self._in_flight.get(key)
                if flight is None:
                    flight = _InFlight()
                    self._in_flight[key] = flight
                    self._misses += 1
                    owner = True
                else:
                    owner = False
            if not owner:
                flight.done.wait()
                if flight.ok:
                    with self._lock:
                        self._hits += 1
                    return flight.value
                continue  # the computation failed: try again, possibly as the new owner
            try:
                value = fn()
                size = estimate_nbytes(value)
            except BaseException:
                with self._lock:
                    self._in_flight.pop(key, None)
                flight.done.set()
                raise
            with self._lock:
                self._store(key, value, size)
                self._in_flight.pop(key, None)
                flight.value = value
                flight.ok = True
            flight.done.set()
            return value

    def stats(self) -> dict[str, int]:
        """Return ``hits``, ``misses``, ``entries`` and ``bytes`` (estimated) as a dict."""
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "entries": len(self._entries),
                "bytes": self._bytes,
            }

    def clear(self) -> None:
        """Drop every stored entry and reset the counters (computations in flight finish)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._hits = 0
            self._misses = 0

    def _store(self, key: Hashable, value: Any, size: int) -> bool:
        """Insert under the lock held by the caller; evict LRU entries until both bounds hold."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.max_bytes:
            return False
        self._entries[key] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self._bytes -= evicted_size
        return True
