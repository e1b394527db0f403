"""The upload store: round trip, LRU eviction, concurrency, damage and path safety."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from pathlib import Path

import pytest

from webapp.persist import (
    LINK_PREFIX,
    StoreError,
    UploadStore,
    default_store,
    is_prefix,
    store_max_bytes,
    upload_dir,
)

KB = 1024


def counter_clock():
    """Uses one second apart, whatever the file system's time resolution."""
    ticks = itertools.count(1_700_000_000)
    return lambda: next(ticks) * 1_000_000_000


def blob(seed: int, size: int = 10 * KB) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32)


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "store", 64 * KB, clock=counter_clock())


def test_round_trip_keeps_bytes_kind_and_name(store):
    data = blob(1)
    digest = store.put(data, kind="model", name="net.pt")
    assert digest == hashlib.sha256(data).hexdigest()
    got = store.get(digest)
    assert got is not None
    assert (got.data, got.kind, got.name) == (data, "model", "net.pt")
    assert store.get(digest, kind="image") is None  # a link asks for a kind; another is refused
    assert store.find(digest[:LINK_PREFIX]) == [digest]
    assert digest in store


def test_files_are_named_by_digest_never_by_name(store):
    digest = store.put(b"hello", kind="image", name="../../etc/passwd\x00\x1b[31m")
    files = sorted(p.name for p in store.root.rglob("*") if p.is_file())
    assert digest in files and f"{digest}.meta" in files
    assert not any("passwd" in name for name in files)
    assert store.get(digest).name == "../../etc/passwd[31m"  # shown only, control chars dropped
    assert not (store.root.parent / "etc").exists()


def test_a_second_upload_of_the_same_bytes_is_one_entry(store):
    a = store.put(b"same bytes", kind="image", name="a.png")
    b = store.put(b"same bytes", kind="image", name="b.png")
    assert a == b
    assert len(store.entries()) == 1
    assert store.get(a).name == "b.png"


def test_eviction_removes_the_least_recently_used_first(store):
    first, second, third = (store.put(blob(i, 20 * KB), kind="image", name=f"{i}") for i in "abc")
    assert store.get(first) is not None  # first is now used more recently than second
    fourth = store.put(blob("d", 20 * KB), kind="image", name="d")
    assert second not in store
    assert {first, third, fourth} <= {d for d, _, _ in store.entries()}
    assert store.total_bytes() <= store.max_bytes
    fifth = store.put(blob("e", 20 * KB), kind="image", name="e")
    assert third not in store  # next in order of last use
    assert first in store and fourth in store and fifth in store


def test_eviction_follows_the_order_of_last_use_over_many_rounds(store):
    held = [store.put(blob(f"r{i}", 20 * KB), kind="image", name=str(i)) for i in range(3)]
    for round_ in range(8):
        oldest, second = held[0], held[1]
        store.get(oldest)  # used again: the second oldest is now the least recently used
        newcomer = store.put(blob(f"n{round_}", 20 * KB), kind="image", name="n")
        assert second not in store, round_
        assert oldest in store and newcomer in store
        held = [held[2], oldest, newcomer]


def test_writers_wait_for_the_folder_lock(store):
    import fcntl

    store.put(b"first", kind="image", name="a")
    fd = os.open(store.root / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another server process would hold it
    done = threading.Event()
    thread = threading.Thread(
        target=lambda: (store.put(b"second", kind="image", name="b"), done.set())
    )
    try:
        thread.start()
        assert not done.wait(0.5)  # blocked while the lock is held
        assert hashlib.sha256(b"second").hexdigest() not in store
    finally:
        os.close(fd)
    thread.join(timeout=30)
    assert done.is_set()
    assert hashlib.sha256(b"second").hexdigest() in store


def test_a_file_larger_than_the_store_is_refused_with_a_reason(store):
    with pytest.raises(StoreError, match="larger than the server's upload store"):
        store.put(b"x" * (65 * KB), kind="model", name="big.pt")
    assert store.entries() == []


def test_bound_zero_keeps_nothing(tmp_path):
    store = UploadStore(tmp_path, 0)
    with pytest.raises(StoreError, match="EXPLAINER_UPLOAD_STORE_MB=0"):
        store.put(b"abc", kind="image", name="a.png")


def test_a_damaged_file_is_detected_and_dropped(store):
    digest = store.put(blob(2), kind="image", name="x.png")
    path = store.root / "objects" / digest[:2] / digest
    damaged = bytearray(path.read_bytes())
    damaged[100] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert store.get(digest) is None
    assert not path.exists()
    assert store.find(digest[:LINK_PREFIX]) == []
    # Uploading it again heals the entry.
    assert store.put(blob(2), kind="image", name="x.png") == digest
    assert store.get(digest).data == blob(2)


def test_a_damaged_file_of_the_same_size_is_replaced_on_upload(store):
    digest = store.put(b"abcdef", kind="image", name="x.png")
    path = store.root / "objects" / digest[:2] / digest
    path.write_bytes(b"abcdeX")
    store.put(b"abcdef", kind="image", name="x.png")
    assert store.get(digest).data == b"abcdef"


@pytest.mark.parametrize(
    "name",
    ["../../secret", "/etc/passwd", "ab/../../x", "", "ABCDEF" * 11, "g" * 64, "0" * 63, "..", "a"],
)
def test_path_tricks_are_refused(store, name):
    store.put(b"data", kind="image", name="a")
    assert store.get(name) is None
    assert store.find(name) == []
    assert name not in store


def test_a_traversal_name_never_reaches_a_file_outside(tmp_path):
    store = UploadStore(tmp_path / "a" / "b" / "store", 64 * KB)
    name = "../../../x"
    outside = (store.root / "objects" / name[:2] / name).resolve()
    assert tmp_path in outside.parents
    outside.write_bytes(b"not the store's")
    assert store.get(name) is None
    assert outside.read_bytes() == b"not the store's"  # not read as an entry, nor removed


def test_symlinked_entry_is_not_followed(store, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret")
    digest = hashlib.sha256(b"top secret").hexdigest()
    folder = store.root / "objects" / digest[:2]
    folder.mkdir(parents=True)
    os.symlink(secret, folder / digest)
    assert store.get(digest) is None


def test_short_prefixes_are_not_links():
    assert not is_prefix("abc")
    assert not is_prefix("ABCDEF012345")
    assert is_prefix("abcdef012345")


def test_concurrent_writers_keep_the_store_consistent_and_bounded(tmp_path):
    store = UploadStore(tmp_path / "store", 200 * KB)
    payloads = [blob(i, 8 * KB) for i in range(60)]
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for i in range(offset, len(payloads), 3):
                digest = store.put(payloads[i], kind="image", name=str(i))
                got = store.get(digest)
                # Another thread may evict it at once, but never returns other bytes.
                assert got is None or got.data == payloads[i]
                store.put(payloads[0], kind="image", name="shared")
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    rows = store.entries()
    assert rows and store.total_bytes() <= store.max_bytes
    for digest, _, _ in rows:
        assert hashlib.sha256(store.get(digest).data).hexdigest() == digest
    assert not list((store.root / "tmp").iterdir())  # no temporary file left behind


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPLAINER_UPLOAD_DIR", str(tmp_path / "u"))
    monkeypatch.setenv("EXPLAINER_UPLOAD_STORE_MB", "1.5")
    assert upload_dir() == tmp_path / "u"
    assert store_max_bytes() == int(1.5 * 2**20)
    assert default_store().root == (tmp_path / "u").absolute()
    monkeypatch.delenv("EXPLAINER_UPLOAD_DIR")
    monkeypatch.chdir(tmp_path)
    assert upload_dir() == tmp_path / "uploads"
    for bad in ("lots", "-1", "inf"):
        monkeypatch.setenv("EXPLAINER_UPLOAD_STORE_MB", bad)
        with pytest.raises(StoreError, match="EXPLAINER_UPLOAD_STORE_MB"):
            store_max_bytes()
