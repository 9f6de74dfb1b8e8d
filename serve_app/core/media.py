"""A bounded in-memory store for generated files (edited images, masks), served back under unguessable ids."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.core.config import Config
from serve_app.core.errors import PayloadTooLarge

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
    expires_at: float  # on the store's clock


class MediaStore:
    """LRU over (max_bytes, max_entries), each entry expiring ttl_s after it was stored; thread-safe.

    Ids are capability tokens: whoever holds the URL may read the file until it expires, like a signed URL.
    """

    def __init__(
        self, max_bytes: int, ttl_s: float, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes, self.ttl_s, self.max_entries = int(max_bytes), float(ttl_s), int(max_entries)
        self._clock = clock
        self._items: OrderedDict[str, MediaItem] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._evicted = 0

    def put(self, data: bytes, content_type: str, owner: str, media_id: str | None = None) -> str:
        """Store a file; returns its id (new, or `media_id`: one minted elsewhere with new_media_id()).

        Evicts expired entries, then the least recently used."""
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(
                f"the generated file is {len(data)} bytes, more than the media store holds ({self.max_bytes} bytes, "
                "SAM3_MEDIA_MAX_BYTES); use response_format=b64_json or a smaller image"
            )
        media_id = media_id or new_media_id()
        with self._lock:
            now = self._clock()
            self._drop_expired(now)
            if media_id in self._items:  # the same id stored again replaces the file
                self._bytes -= len(self._items.pop(media_id).data)
            while self._items and (self._bytes + len(data) > self.max_bytes or len(self._items) >= self.max_entries):
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.data)
                self._evicted += 1
            self._items[media_id] = MediaItem(bytes(data), content_type, owner, now + self.ttl_s)
            self._bytes += len(data)
        return media_id

    def get(self, media_id: str) -> MediaItem | None:
        """The file, or None when the id is unknown, evicted or expired."""
        with self._lock:
            item = self._items.get(media_id)
            if item is None:
                return None
            if item.expires_at <= self._clock():
                del self._items[media_id]
                self._bytes -= len(item.data)
                return None
            self._items.move_to_end(media_id)
            return item

    def remaining_s(self, item: MediaItem) -> float:
        """Seconds until the item expires (for Cache-Control)."""
        return max(0.0, item.expires_at - self._clock())

    def _drop_expired(self, now: float) -> None:
        expired = [key for key, item in self._items.items() if item.expires_at <= now]
        for key in expired:
            self._bytes -= len(self._items.pop(key).data)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "ttl_s": self.ttl_s, "evicted": self._evicted}


_store: MediaStore | None = None
_store_lock = threading.Lock()


def media_store(config: Config) -> MediaStore:
    """The ingress process's store, created on first use with the limits of the first config that asks."""
    global _store
    if _store is None:
        with _store_lock:
            if _store is None:
                _store = MediaStore(config.media_max_bytes, config.media_ttl_s)
    return _store
