"""Tests for explainer.cache: digests, LRU order, byte bound, single computation per key."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from explainer.cache import ContentCache, digest, estimate_nbytes

# Long enough never to fire on a healthy run; it only turns a deadlock into a failure.
WAIT_S = 10.0


# ----------------------------------------------------------------------------- digest


def test_digest_is_stable_hex_sha256():
    first = digest(b"image bytes", "features.3", 50, 0.5, None, ("black", 0))
    assert first == digest(b"image bytes", "features.3", 50, 0.5, None, ("black", 0))
    assert len(first) == 64
    assert int(first, 16) >= 0


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("ab",), ("a", "b")),
        (("a", "b"), ("b", "a")),
        ((1,), (1.0,)),
        ((1,), ("1",)),
        ((1,), (True,)),
        ((0,), (False,)),
        ((None,), ("",)),
        ((b"x",), ("x",)),
        (((1, 2), 3), (1, (2, 3))),
        (((),), ()),
        ((1.0,), (1.0000000000000002,)),
    ],
)
def test_digest_separates_different_parts(a, b):
    # Python calls 1 == 1.0 == True equal; the digest must not.
    assert digest(*a) != digest(*b)


def test_digest_treats_lists_like_tuples():
    assert digest([1, "a"]) == digest((1, "a"))


def test_digest_refuses_unencodable_parts():
    with pytest.raises(TypeError, match="digest"):
        digest({"a": 1})
    with pytest.raises(TypeError):
        digest(np.zeros(3))


# ----------------------------------------------------------------------------- sizes


@dataclasses.dataclass
class Result:
    name: str
    values: np.ndarray
    more: list


def test_size_estimate_counts_array_and_tensor_buffers():
    array = np.zeros(1000, dtype=np.float32)
    tensor = torch.zeros(500, dtype=torch.float64)
    assert 4000 <= estimate_nbytes(array) < 4000 + 200
    assert 4000 <= estimate_nbytes(tensor) < 4000 + 200
    nested = Result("x", array, [tensor, {"k": np.zeros(250, dtype=np.int64)}])
    assert 10000 <= estimate_nbytes(nested) < 10000 + 1000
    # A buffer shared twice is counted once.
    assert estimate_nbytes([array, array]) < 4000 + 300


# ----------------------------------------------------------------------------- LRU


def test_get_put_and_stats():
    cache = ContentCache(max_bytes=10_000, max_entries=10)
    assert cache.get("a") is None
    assert cache.get("a", "missing") == "missing"
    assert cache.put("a", 1, nbytes=10)
    assert cache.get("a") == 1
    assert "a" in cache and len(cache) == 1
    assert cache.stats() == {"hits": 1, "misses": 2, "entries": 1, "bytes": 10}
    cache.clear()
    assert cache.stats() == {"hits": 0, "misses": 0, "entries": 0, "bytes": 0}
    assert "a" not in cache


def test_least_recently_used_entry_is_evicted_first():
    cache = ContentCache(max_bytes=10_000, max_entries=3)
    for key in "abc":
        cache.put(key, key.upper(), nbytes=1)
    assert cache.get("a") == "A"  # "b" is now the oldest
    cache.put("d", "D", nbytes=1)
    assert "b" not in cache
    assert [k for k in "acd" if k in cache] == ["a", "c", "d"]
    cache.put("c", "C2", nbytes=1)  # replacing refreshes too: "a" is the oldest now
    cache.put("e", "E", nbytes=1)
    assert "a" not in cache
    assert cache.get("c") == "C2"
    assert cache.stats()["entries"] == 3


def test_byte_bound_evicts_until_it_holds():
    cache = ContentCache(max_bytes=100, max_entries=100)
    cache.put("a", "A", nbytes=40)
    cache.put("b", "B", nbytes=40)
    cache.put("c", "C", nbytes=50)  # 130 > 100: "a" goes, 90 left
    assert "a" not in cache and "b" in cache and "c" in cache
    assert cache.stats()["bytes"] == 90
    cache.put("d", "D", nbytes=95)  # both older entries must go
    assert [k for k in "abcd" if k in cache] == ["d"]
    assert cache.stats()["bytes"] == 95


def test_estimated_sizes_drive_the_byte_bound():
    cache = ContentCache(max_bytes=10_000, max_entries=100)
    cache.put("a", Result("a", np.zeros(1000, dtype=np.float32), []))  # ~4 kB
    cache.put("b", Result("b", np.zeros(1000, dtype=np.float32), []))
    assert cache.stats()["bytes"] >= 8000
    cache.put("c", Result("c", np.zeros(1000, dtype=np.float32), []))
    assert "a" not in cache and "b" in cache and "c" in cache


def test_oversized_value_is_returned_but_not_stored():
    cache = ContentCache(max_bytes=1000, max_entries=10)
    cache.put("small", 1, nbytes=10)
    big = np.zeros(10_000, dtype=np.uint8)
    assert cache.put("big", big) is False
    assert "big" not in cache and "small" in cache
    assert cache.get_or_compute("big2", lambda: big) is big
    assert "big2" not in cache
    # An oversized replacement drops the stale value under the same key.
    assert cache.put("small", big) is False
    assert "small" not in cache
    assert cache.stats()["bytes"] == 0


def test_bounds_must_be_positive():
    with pytest.raises(ValueError):
        ContentCache(max_bytes=0, max_entries=1)
    with pytest.raises(ValueError):
        ContentCache(max_bytes=1, max_entries=0)


# ----------------------------------------------------------------------------- get_or_compute


def test_get_or_compute_computes_once_and_then_hits():
    cache = ContentCache(max_bytes=10_000, max_entries=10)
    calls = []

    def compute():
        calls.append(1)
        return "value"

    assert cache.get_or_compute("k", compute) == "value"
    assert cache.get_or_compute("k", compute) == "value"
    assert len(calls) == 1
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1


def test_concurrent_callers_of_one_key_share_one_computation():
    cache = ContentCache(max_bytes=10_000, max_entries=10)
    threads = 8
    started = threading.Event()
    release = threading.Event()
    calls = []
    lock = threading.Lock()

    def compute():
        with lock:
            calls.append(1)
        started.set()
        assert release.wait(WAIT_S)
        return object()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(cache.get_or_compute, "key", compute) for _ in range(threads)]
        assert started.wait(WAIT_S)
        release.set()
        results = [f.result(timeout=WAIT_S) for f in futures]
    assert len(calls) == 1
    assert all(r is results[0] for r in results)
    assert cache.stats()["misses"] == 1


def test_other_keys_stay_available_while_one_computes():
    cache = ContentCache(max_bytes=10_000, max_entries=10)
    cache.put("ready", "R", nbytes=1)
    started = threading.Event()
    release = threading.Event()

    def slow():
        started.set()
        assert release.wait(WAIT_S)
        return "slow"

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(cache.get_or_compute, "slow", slow)
        assert started.wait(WAIT_S)
        # The slow computation is still blocked: these must not wait for it.
        assert cache.get("ready") == "R"
        assert cache.get_or_compute("fast", lambda: "fast") == "fast"
        cache.put("other", "O", nbytes=1)
        assert cache.stats()["entries"] == 3
        release.set()
        assert future.result(timeout=WAIT_S) == "slow"
    assert cache.get("slow") == "slow"


def test_an_exception_leaves_no_entry_and_the_next_caller_recomputes():
    cache = ContentCache(max_bytes=10_000, max_entries=10)

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_compute("k", broken)
    assert "k" not in cache
    assert cache.stats()["entries"] == 0
    assert cache.get_or_compute("k", lambda: 42) == 42
    assert cache.get("k") == 42


def test_waiters_retry_after_the_computation_they_waited_for_fails():
    cache = ContentCache(max_bytes=10_000, max_entries=10)
    started = threading.Event()
    release = threading.Event()
    attempts = []
    lock = threading.Lock()

    def flaky():
        with lock:
            attempts.append(1)
            first = len(attempts) == 1
        if first:
            started.set()
            assert release.wait(WAIT_S)
            raise RuntimeError("first attempt fails")
        return "ok"

    with ThreadPoolExecutor(max_workers=4) as pool:
        owner = pool.submit(cache.get_or_compute, "k", flaky)
        assert started.wait(WAIT_S)
        waiters = [pool.submit(cache.get_or_compute, "k", flaky) for _ in range(3)]
        release.set()
        with pytest.raises(RuntimeError, match="first attempt"):
            owner.result(timeout=WAIT_S)
        assert [w.result(timeout=WAIT_S) for w in waiters] == ["ok"] * 3
    # Whenever the waiters arrived, exactly one of them recomputed after the failure.
    assert len(attempts) == 2
    assert cache.get("k") == "ok"


def test_interrupted_computation_leaves_no_entry_and_is_recomputed():
    cache = ContentCache(max_bytes=10_000, max_entries=10)

    class Interrupted(BaseException):
        """Stands in for Streamlit stopping a script midway (a rerun, a closed tab)."""

    def interrupted():
        raise Interrupted()

    with pytest.raises(Interrupted):
        cache.get_or_compute("k", interrupted)
    assert "k" not in cache
    assert cache.get_or_compute("k", lambda: 42) == 42


def test_soak_of_hundreds_of_requests_stays_within_bounds():
    cache = ContentCache(max_bytes=64 * 1024, max_entries=50)
    for i in range(400):
        value = cache.get_or_compute(
            f"request-{i}", lambda i=i: np.full(256 + i % 7, i, np.float32)
        )
        assert value[0] == i
        stats = cache.stats()
        assert stats["bytes"] <= 64 * 1024 and stats["entries"] <= 50
    assert cache.get("request-399") is not None and cache.get("request-0") is None
