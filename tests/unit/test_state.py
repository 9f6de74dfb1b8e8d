"""The shared key-value store on each backend: order, TTL, bounds accounting, namespaces, and what survives a reopen."""

from __future__ import annotations

import uuid

import pytest

from serve_app.core.config import Config
from serve_app.core.state import USAGE_SQL, MemoryKV, RedisKV, SqliteKV, open_kv, state_location


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_kv(request, tmp_path):
    def make(namespace: str | None = None, clock=None):
        namespace, clock = namespace or request.node.name, clock or Clock()
        if request.param == "memory":
            return MemoryKV(clock)
        if request.param == "sqlite":
            return SqliteKV(tmp_path / "state.db", namespace, clock)
        return RedisKV(request.getfixturevalue("redis_url"), f"{namespace}-{uuid.uuid4().hex[:6]}", clock)

    make.backend = request.param
    return make


def test_put_get_delete_and_scan_oldest_first(make_kv):
    kv = make_kv()
    for key in ("b", "a", "c"):
        kv.put("t", key, key.encode() * 3)
    kv.put("t", "b", b"again")  # a rewrite moves the key to the end
    assert kv.get("t", "a") == b"aaa" and kv.get("t", "zzz") is None and kv.get("other", "a") is None
    assert [k for k, _ in kv.scan("t")] == ["a", "c", "b"] and kv.oldest("t", 2) == ["a", "c"]
    assert kv.usage("t") == (3, 3 + 3 + 5)
    kv.delete("t", "a", "missing")
    assert kv.get("t", "a") is None and kv.usage("t") == (2, 8)


def test_ttl_hides_then_purges(make_kv):
    clock = Clock()
    kv = make_kv(clock=clock)
    kv.put("t", "short", b"1", ttl_s=10)
    kv.put("t", "forever", b"2")
    assert kv.expires_in("t", "short") == pytest.approx(10) and kv.expires_in("t", "forever") is None
    clock.now += 10.5
    assert kv.get("t", "short") is None and [k for k, _ in kv.scan("t")] == ["forever"]
    assert kv.purge_expired() == 1 and kv.usage("t") == (1, 1)


def test_namespaces_do_not_see_each_other(make_kv):
    if make_kv.backend == "memory":
        pytest.skip("a memory store is one process' own")
    first, second = make_kv("app-a"), make_kv("app-b")
    first.put("t", "k", b"a")
    assert second.get("t", "k") is None and list(second.scan("t")) == []


def test_sqlite_state_survives_reopening(tmp_path):
    SqliteKV(tmp_path / "s.db", "app").put("jobs", "j1", b"record")
    assert SqliteKV(tmp_path / "s.db", "app").get("jobs", "j1") == b"record"


def test_redis_state_is_shared_between_clients(redis_url):
    RedisKV(redis_url, "shared-app").put("jobs", "j1", b"record", ttl_s=60)
    other = RedisKV(redis_url, "shared-app")
    assert other.get("jobs", "j1") == b"record" and 59 < other.expires_in("jobs", "j1") <= 60


def test_the_config_picks_the_backend(tmp_path, redis_url):
    assert state_location(Config(state_dir=str(tmp_path))) == f"sqlite:///{tmp_path}/state.db"
    assert isinstance(open_kv(Config(state_dir=str(tmp_path)), "a"), SqliteKV)
    assert isinstance(open_kv(Config(state_url=redis_url), "a"), RedisKV)
    assert isinstance(open_kv(Config(state_url="memory://"), "a"), MemoryKV)
    with pytest.raises(ValueError, match="SAM3_STATE_URL"):
        Config.from_env({"SAM3_STATE_URL": "postgres://x"})


def test_sqlite_usage_reads_the_index_not_the_stored_bytes(tmp_path):
    """MediaStore.put counts the store's bytes on every put. Counted over the table, that read every value stored (a
    row's expiry lies behind its value's overflow pages): 209 ms a put with 894 files of 300 KB, measured."""
    kv = SqliteKV(tmp_path / "s.db", "app")
    kv.put("media", "a", b"x" * 300_000, ttl_s=60)
    kv.put("media", "b", b"y" * 1000)
    db = kv._db()
    plan = " ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {USAGE_SQL}", ("app", "media", 0.0)))
    assert "COVERING INDEX kv_usage" in plan, plan
    assert kv.usage("media") == (2, 301_000)
    kv.put("media", "a", b"z" * 10)  # a rewrite counts its new size
    assert kv.usage("media") == (2, 1010)


def test_a_sqlite_store_written_before_the_size_column_opens_and_counts_its_bytes(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("CREATE TABLE kv (ns TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, "
               "expires REAL, seq INTEGER NOT NULL, PRIMARY KEY (ns, tbl, key))")
    db.execute("INSERT INTO kv VALUES ('app', 'media', 'old', ?, NULL, 1)", (b"o" * 700,))
    db.commit()
    db.close()
    kv = SqliteKV(tmp_path / "s.db", "app")
    assert kv.usage("media") == (1, 700) and kv.get("media", "old") == b"o" * 700
    kv.put("media", "new", b"n" * 50)
    assert kv.usage("media") == (2, 750) and kv.oldest("media", 1) == ["old"]
