"""MediaStore on every state backend: byte, entry and TTL bounds, oldest-first eviction, unguessable ids, threads."""

from __future__ import annotations

import threading

import pytest

from serve_app.core.errors import PayloadTooLarge
from serve_app.core.media import MediaStore as _MediaStore
from serve_app.core.state import MemoryKV, RedisKV, SqliteKV


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite", "redis"])
def MediaStore(request, tmp_path):  # noqa: N802 - stands in for the class, on each backend
    """MediaStore(...) over the backend under test; each test gets an empty namespace."""
    import uuid

    def make(*args, clock=None, **kwargs):
        clock = clock or __import__("time").time
        if request.param == "memory":
            kv = MemoryKV(clock)
        elif request.param == "sqlite":
            kv = SqliteKV(tmp_path / "state.db", uuid.uuid4().hex, clock)
        else:
            kv = RedisKV(request.getfixturevalue("redis_url"), uuid.uuid4().hex, clock)
        return _MediaStore(*args, clock=clock, kv=kv, **kwargs)

    return make


def test_put_get_round_trip_keeps_type_and_owner(MediaStore):
    store = MediaStore(max_bytes=1024, ttl_s=60)
    media_id = store.put(b"png-bytes", "image/png", "tenant-a")
    item = store.get(media_id)
    assert (item.data, item.content_type, item.owner) == (b"png-bytes", "image/png", "tenant-a")
    assert store.get("unknown") is None


def test_ids_are_long_random_and_distinct(MediaStore):
    store = MediaStore(max_bytes=10**6, ttl_s=60)
    ids = {store.put(b"x", "image/png", "t") for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) >= 32 and i.replace("-", "").replace("_", "").isalnum() for i in ids)


def test_entries_expire_after_ttl(MediaStore):
    clock = Clock()
    store = MediaStore(max_bytes=1024, ttl_s=10, clock=clock)
    media_id = store.put(b"abc", "image/png", "t")
    clock.now += 9.5
    assert store.get(media_id) is not None and store.remaining_s(store.get(media_id)) == pytest.approx(0.5)
    clock.now += 0.5
    assert store.get(media_id) is None
    assert store.stats()["entries"] == 0 and store.stats()["bytes"] == 0


def test_byte_bound_evicts_the_oldest(MediaStore):
    store = MediaStore(max_bytes=30, ttl_s=60)
    a, b, c = (store.put(bytes(10), "image/png", "t") for _ in range(3))
    assert store.get(a) is not None  # a read does not reorder: the store is shared, reads are not writes
    d = store.put(bytes(10), "image/png", "t")
    assert store.get(a) is None, "a was the oldest"
    assert all(store.get(i) is not None for i in (b, c, d))
    assert store.stats()["bytes"] == 30 and store.stats()["evicted"] == 1


def test_two_stores_on_one_backend_serve_each_others_files(tmp_path):
    """Two replicas (two processes' stores on one SQLite file) see the same files; another namespace does not."""
    first = _MediaStore(1024, 60, kv=SqliteKV(tmp_path / "s.db", "app"))
    second = _MediaStore(1024, 60, kv=SqliteKV(tmp_path / "s.db", "app"))
    other_app = _MediaStore(1024, 60, kv=SqliteKV(tmp_path / "s.db", "other"))
    media_id = first.put(b"abc", "image/png", "t")
    assert second.get(media_id).data == b"abc" and other_app.get(media_id) is None


def test_entry_bound_evicts_oldest(MediaStore):
    store = MediaStore(max_bytes=10**6, ttl_s=60, max_entries=2)
    a, b, c = (store.put(b"x", "image/png", "t") for _ in range(3))
    assert store.get(a) is None and store.get(b) is not None and store.get(c) is not None


def test_expired_entries_go_before_live_ones(MediaStore):
    clock = Clock()
    store = MediaStore(max_bytes=20, ttl_s=10, clock=clock)
    old = store.put(bytes(10), "image/png", "t")
    clock.now += 5
    live = store.put(bytes(10), "image/png", "t")
    clock.now += 6  # old expired, live has 4 s left
    store.put(bytes(10), "image/png", "t")
    assert store.get(old) is None and store.get(live) is not None


def test_a_file_larger_than_the_store_is_refused_with_the_knob_named(MediaStore):
    store = MediaStore(max_bytes=10, ttl_s=60)
    kept = store.put(bytes(5), "image/png", "t")
    with pytest.raises(PayloadTooLarge, match="SAM3_MEDIA_MAX_BYTES"):
        store.put(bytes(11), "image/png", "t")
    assert store.get(kept) is not None, "a refused file evicts nothing"


def test_concurrent_puts_and_gets_keep_the_byte_count_exact(MediaStore):
    store = MediaStore(max_bytes=5000, ttl_s=60)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(120):
                store.get(store.put(bytes(7), "image/png", "t"))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = store.stats()
    assert stats["bytes"] == 7 * stats["entries"] <= 5000
