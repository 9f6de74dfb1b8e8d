"""Where shared state lives: one small key-value interface with three backends (memory, SQLite file, Redis).

Every replica that opens the same `SAM3_STATE_URL` (or `SAM3_STATE_DIR` for SQLite) under the same namespace sees
the same tables. Values are bytes; each entry may carry a time to live; tables are scanned oldest first. Media
files, job records and events, and the video-session registry are built on it (docs/architecture.md).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from serve_app.core.config import Config

SQLITE_FILE = "state.db"
BACKSTOP_MS = 60_000  # Redis drops an expired entry itself this long after our clock says it expired


class KV(Protocol):
    """Tables of (key -> bytes). Expired entries read as absent and are deleted by `purge_expired`."""

    def put(self, table: str, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    def get(self, table: str, key: str) -> bytes | None: ...

    def delete(self, table: str, *keys: str) -> None: ...

    def scan(self, table: str) -> Iterator[tuple[str, bytes]]: ...

    def usage(self, table: str) -> tuple[int, int]: ...

    def oldest(self, table: str, n: int) -> list[str]: ...

    def expires_in(self, table: str, key: str) -> float | None: ...

    def purge_expired(self) -> int: ...


class MemoryKV:
    """One process only (unit tests, in-process use): nothing is shared or survives the process."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._tables: dict[str, OrderedDict[str, tuple[bytes, float | None]]] = {}
        self._lock = threading.Lock()

    def put(self, table: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        with self._lock:
            rows = self._tables.setdefault(table, OrderedDict())
            rows.pop(key, None)
            rows[key] = (bytes(value), None if ttl_s is None else self.clock() + ttl_s)

    def get(self, table: str, key: str) -> bytes | None:
        with self._lock:
            row = self._tables.get(table, {}).get(key)
            return None if row is None or self._dead(row) else row[0]

    def delete(self, table: str, *keys: str) -> None:
        with self._lock:
            rows = self._tables.get(table, {})
            for key in keys:
                rows.pop(key, None)

    def scan(self, table: str) -> Iterator[tuple[str, bytes]]:
        with self._lock:
            rows = [(k, v) for k, (v, exp) in self._tables.get(table, {}).items() if not self._dead((v, exp))]
        yield from rows

    def usage(self, table: str) -> tuple[int, int]:
        rows = list(self.scan(table))
        return len(rows), sum(len(v) for _, v in rows)

    def oldest(self, table: str, n: int) -> list[str]:
        return [k for k, _ in list(self.scan(table))[:n]]

    def expires_in(self, table: str, key: str) -> float | None:
        with self._lock:
            row = self._tables.get(table, {}).get(key)
            return None if row is None or row[1] is None else max(0.0, row[1] - self.clock())

    def purge_expired(self) -> int:
        with self._lock:
            dead = [(t, k) for t, rows in self._tables.items() for k, row in rows.items() if self._dead(row)]
            for table, key in dead:
                del self._tables[table][key]
        return len(dead)

    def _dead(self, row: tuple[bytes, float | None]) -> bool:
        return row[1] is not None and row[1] <= self.clock()


USAGE_SQL = ("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM kv INDEXED BY kv_usage WHERE ns = ? AND tbl = ? "
             "AND (expires IS NULL OR expires > ?)")  # SqliteKV.usage: answered from the index alone


class SqliteKV:
    """A SQLite file (WAL): shared by every process on one machine, survives restarts. The embedded default."""

    def __init__(self, path: str | Path, namespace: str, clock: Callable[[], float] = time.time) -> None:
        self.path, self.ns, self.clock = str(path), namespace, clock
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL, "
                "value BLOB NOT NULL, expires REAL, seq INTEGER NOT NULL, PRIMARY KEY (ns, tbl, key))"
            )
            db.execute("CREATE INDEX IF NOT EXISTS kv_order ON kv (ns, tbl, seq)")
            db.execute("CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires) WHERE expires IS NOT NULL")
            # `usage` reads only this index: a row's own columns after its value (expires) lie behind the value's
            # overflow pages, so counting over the table read every stored byte (0.15 ms per 300 KB entry, each put)
            if "size" not in {row[1] for row in db.execute("PRAGMA table_info(kv)")}:  # written before the column:
                db.execute("ALTER TABLE kv ADD COLUMN size INTEGER")  # add and fill it once, not at every open
                db.execute("UPDATE kv SET size = LENGTH(value)")
            db.execute("CREATE INDEX IF NOT EXISTS kv_usage ON kv (ns, tbl, expires, size)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:  # one connection per thread; sqlite3 serialises writers across processes itself
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def put(self, table: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        expires = None if ttl_s is None else self.clock() + ttl_s
        self._db().execute(
            "INSERT OR REPLACE INTO kv (ns, tbl, key, value, expires, seq, size) VALUES (?, ?, ?, ?, ?, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 FROM kv WHERE ns = ? AND tbl = ?), ?)",
            (self.ns, table, key, sqlite3.Binary(value), expires, self.ns, table, len(value)),
        )

    def get(self, table: str, key: str) -> bytes | None:
        row = self._db().execute(
            "SELECT value FROM kv WHERE ns = ? AND tbl = ? AND key = ? AND (expires IS NULL OR expires > ?)",
            (self.ns, table, key, self.clock()),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, table: str, *keys: str) -> None:
        self._db().executemany(
            "DELETE FROM kv WHERE ns = ? AND tbl = ? AND key = ?", [(self.ns, table, key) for key in keys]
        )

    def scan(self, table: str) -> Iterator[tuple[str, bytes]]:
        rows = self._db().execute(
            "SELECT key, value FROM kv WHERE ns = ? AND tbl = ? AND (expires IS NULL OR expires > ?) ORDER BY seq",
            (self.ns, table, self.clock()),
        ).fetchall()
        for key, value in rows:
            yield key, bytes(value)

    def usage(self, table: str) -> tuple[int, int]:
        count, size = self._db().execute(USAGE_SQL, (self.ns, table, self.clock())).fetchone()
        return int(count), int(size)

    def oldest(self, table: str, n: int) -> list[str]:
        rows = self._db().execute(
            "SELECT key FROM kv WHERE ns = ? AND tbl = ? ORDER BY seq LIMIT ?", (self.ns, table, n)
        ).fetchall()
        return [row[0] for row in rows]

    def expires_in(self, table: str, key: str) -> float | None:
        row = self._db().execute(
            "SELECT expires FROM kv WHERE ns = ? AND tbl = ? AND key = ?", (self.ns, table, key)
        ).fetchone()
        return None if row is None or row[0] is None else max(0.0, row[0] - self.clock())

    def purge_expired(self) -> int:
        cursor = self._db().execute(
            "DELETE FROM kv WHERE ns = ? AND expires IS NOT NULL AND expires <= ?", (self.ns, self.clock())
        )
        return cursor.rowcount


_REDIS_PUT = """
local old = redis.call('HGET', KEYS[4], ARGV[1])
local seq = redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], string.len(ARGV[2]))
redis.call('INCRBY', KEYS[6], string.len(ARGV[2]) - (tonumber(old) or 0))
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return seq
"""
_REDIS_DELETE = """
local freed = 0
for i, key in ipairs(ARGV) do
  local size = redis.call('HGET', KEYS[3], key)
  if size then
    freed = freed + tonumber(size)
    redis.call('HDEL', KEYS[3], key)
    redis.call('ZREM', KEYS[1], key)
    redis.call('ZREM', KEYS[2], key)
    redis.call('DEL', KEYS[5] .. key)
  end
end
redis.call('DECRBY', KEYS[4], freed)
return freed
"""


class RedisKV:
    """Redis (the one KubeRay clusters run for GCS fault tolerance): shared by every node of a cluster.

    Per table: one string per value, a sorted set ordering the keys (score: an insertion counter), one of expiry
    times (our clock), a hash of sizes and a byte counter, all updated atomically by Lua scripts. Values with a TTL
    also expire in Redis itself (a backstop), so a missed purge does not keep them forever.
    """

    def __init__(self, url: str, namespace: str, clock: Callable[[], float] = time.time) -> None:
        import redis  # only clusters that configure Redis need the client

        self.r = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
        self.prefix, self.clock = f"sam3:{namespace}:", clock
        self._put, self._delete = self.r.register_script(_REDIS_PUT), self.r.register_script(_REDIS_DELETE)

    def _k(self, table: str, part: str, key: str = "") -> str:
        return f"{self.prefix}{table}:{part}:{key}" if key else f"{self.prefix}{table}:{part}"

    def put(self, table: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        keys = [self._k(table, "v", key), *(self._k(table, part) for part in ("order", "expiry", "size", "seq", "bytes"))]
        expires = "" if ttl_s is None else repr(self.clock() + ttl_s)
        ttl_ms = 0 if ttl_s is None else int(ttl_s * 1000) + BACKSTOP_MS
        self._put(keys=keys, args=[key, value, expires, ttl_ms])
        if ttl_s is not None:
            self.r.sadd(f"{self.prefix}__expiring", table)

    def get(self, table: str, key: str) -> bytes | None:
        pipe = self.r.pipeline()
        pipe.get(self._k(table, "v", key))
        pipe.zscore(self._k(table, "expiry"), key)
        value, expires = pipe.execute()
        return None if value is None or (expires is not None and expires <= self.clock()) else value

    def delete(self, table: str, *keys: str) -> None:
        if keys:
            parts = [self._k(table, part) for part in ("order", "expiry", "size", "bytes")]
            self._delete(keys=[*parts, self._k(table, "v") + ":"], args=list(keys))

    def _live_keys(self, table: str) -> list[str]:
        pipe = self.r.pipeline()
        pipe.zrange(self._k(table, "order"), 0, -1)
        pipe.zrangebyscore(self._k(table, "expiry"), "-inf", self.clock())
        keys, dead = pipe.execute()
        dead = set(dead)
        return [k.decode() for k in keys if k not in dead]

    def scan(self, table: str) -> Iterator[tuple[str, bytes]]:
        keys = self._live_keys(table)
        for start in range(0, len(keys), 256):
            chunk = keys[start : start + 256]
            for key, value in zip(chunk, self.r.mget([self._k(table, "v", k) for k in chunk])):
                if value is not None:
                    yield key, value

    def usage(self, table: str) -> tuple[int, int]:
        """Entries and bytes, counting expired entries not yet purged (MediaStore purges before it looks)."""
        pipe = self.r.pipeline()
        pipe.zcard(self._k(table, "order"))
        pipe.get(self._k(table, "bytes"))
        count, size = pipe.execute()
        return int(count), int(size or 0)

    def oldest(self, table: str, n: int) -> list[str]:
        return [k.decode() for k in self.r.zrange(self._k(table, "order"), 0, max(0, n - 1))]

    def expires_in(self, table: str, key: str) -> float | None:
        expires = self.r.zscore(self._k(table, "expiry"), key)
        return None if expires is None else max(0.0, expires - self.clock())

    def purge_expired(self) -> int:
        purged = 0
        for table in [t.decode() for t in self.r.smembers(f"{self.prefix}__expiring")]:
            dead = [k.decode() for k in self.r.zrangebyscore(self._k(table, "expiry"), "-inf", self.clock())]
            if dead:
                self.delete(table, *dead)
                purged += len(dead)
        return purged


def state_location(config: Config) -> str:
    """What `SAM3_STATE_URL` resolves to: `redis://...`, `memory://`, or `sqlite:///<state_dir>/state.db`."""
    if config.state_url:
        return config.state_url
    return "sqlite:///" + str(Path(os.path.expanduser(config.state_dir)).absolute() / SQLITE_FILE)


def open_kv(config: Config, namespace: str) -> KV:
    """The shared store named by the config, under `namespace` (the Serve application's name)."""
    location = state_location(config)
    scheme = urlparse(location).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisKV(location, namespace)
    if scheme == "sqlite":
        return SqliteKV(location[len("sqlite:///"):] or SQLITE_FILE, namespace)
    if scheme == "memory":
        return MemoryKV()
    raise ValueError(f"SAM3_STATE_URL: unsupported scheme {scheme!r}; use redis://, sqlite:/// or memory://")
