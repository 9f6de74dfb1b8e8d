"""Generated files (edited images, masks, videos) in the shared state store, served back under unguessable ids."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.core.config import Config
from serve_app.core.errors import PayloadTooLarge
from serve_app.core.slots import Slot
from serve_app.core.state import KV, MemoryKV

MAX_ENTRIES = 10_000  # guards against many tiny files; the byte bound (SAM3_MEDIA_MAX_BYTES) is the real limit
ID_BYTES = 24  # secrets.token_urlsafe(24): 32 characters, 192 random bits


def new_media_id() -> str:
    """An unguessable id: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(ID_BYTES)


@dataclass(frozen=True)
class MediaItem:
    """One stored file. `owner` is the tenant that generated it (kept for accounting, not checked on read)."""

    data: bytes
    content_type: str
    owner: str
    expires_at: float  # unix time


TABLE, META = "media", "media_meta"  # the bytes alone in one table, so its size is the files' size

class MediaStore:
    """Files in the shared state store, bounded by bytes and entries (oldest first out), each expiring ttl_s after
    it was stored. Every replica that opens the same store serves every file.

    Ids are capability tokens: whoever holds the URL may read the file until it expires, like a signed URL.
    Reads do not reorder: a read must not be a write to a store other replicas share.
    """

    def __init__(
        self, max_bytes: int, ttl_s: float, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.time,
        kv: KV | None = None,
    ) -> None:
        self.max_bytes, self.ttl_s, self.max_entries = int(max_bytes), float(ttl_s), int(max_entries)
        self._clock = clock
        self.kv = kv if kv is not None else MemoryKV(clock)
        self._lock = threading.Lock()  # one writer per process evicts at a time; replicas may overshoot briefly
        self._evicted = 0

    def put(self, data: bytes, content_type: str, owner: str, media_id: str | None = None) -> str:
        """Store a file; returns its id (new, or `media_id`: one minted elsewhere with new_media_id()).

        Evicts expired entries, then the oldest."""
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(
                f"the generated file is {len(data)} bytes, more than the media store holds ({self.max_bytes} bytes, "
                "SAM3_MEDIA_MAX_BYTES); use response_format=b64_json or a smaller image"
            )
        media_id = media_id or new_media_id()
        with self._lock:
            self.kv.purge_expired()
            self.kv.delete(TABLE, media_id)  # the same id stored again replaces the file
            self.kv.delete(META, media_id)
            entries, used = self.kv.usage(TABLE)
            while entries and (used + len(data) > self.max_bytes or entries >= self.max_entries):
                victims = self.kv.oldest(TABLE, 1)
                self.kv.delete(TABLE, *victims)
                self.kv.delete(META, *victims)
                self._evicted += len(victims)
                entries, used = self.kv.usage(TABLE)
            meta = json.dumps({"type": content_type, "owner": owner}).encode()
            self.kv.put(META, media_id, meta, ttl_s=self.ttl_s)
            self.kv.put(TABLE, media_id, bytes(data), ttl_s=self.ttl_s)
        return media_id

    def get(self, media_id: str) -> MediaItem | None:
        """The file, or None when the id is unknown, evicted or expired."""
        if not media_id or len(media_id) > 4 * ID_BYTES:
            return None
        data = self.kv.get(TABLE, media_id)
        meta = self.kv.get(META, media_id) if data is not None else None
        remaining = self.kv.expires_in(TABLE, media_id) if meta is not None else None
        if data is None or meta is None or remaining is None or remaining <= 0:
            return None
        header = json.loads(meta)
        return MediaItem(data, header["type"], header["owner"], self._clock() + remaining)

    def remaining_s(self, item: MediaItem) -> float:
        """Seconds until the item expires (for Cache-Control)."""
        return max(0.0, item.expires_at - self._clock())

    def stats(self) -> dict:
        self.kv.purge_expired()
        entries, used = self.kv.usage(TABLE)
        return {"entries": entries, "bytes": used, "max_bytes": self.max_bytes, "ttl_s": self.ttl_s,
                "evicted": self._evicted}


_slot: Slot[MediaStore] = Slot("the media store is not open yet")
_fallback_lock = threading.Lock()


def set_media_store(store: MediaStore | None) -> None:
    """Each process that serves or writes files sets the shared store once it starts (deployments do)."""
    _slot.set(store)


def media_store(config: Config) -> MediaStore:
    """This process' store: the shared one its deployment opened; else (in-process use) one in memory."""
    if _slot.value is None:
        with _fallback_lock:
            if _slot.value is None:
                _slot.set(MediaStore(config.media_max_bytes, config.media_ttl_s))
    return _slot.value
