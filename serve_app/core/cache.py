"""Bounded LRU caches: image embeddings (by client image_id or image digest) and visual-prompt logits."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

V = TypeVar("V")


class BoundedLRU(Generic[V]):
    """An LRU bounded by entry count and by total bytes; thread-safe; counts hits, misses and evictions."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[tuple, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: tuple) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple, value: V, nbytes: int) -> None:
        if self.max_entries <= 0 or nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size
                self.evictions += 1

    def pop(self, key: tuple) -> None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self._bytes -= item[1]

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._items), "bytes": self._bytes, "max_entries": self.max_entries,
                "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
            }


@dataclass(frozen=True)
class CachedEmbedding:
    embedding: object  # ObjectRef (Serve) or tensor (in-process)
    height: int
    width: int


class EmbeddingCache(BoundedLRU[CachedEmbedding]):
    """Embeddings per (tenant, key): one API key never sees another's cached images."""


@dataclass(frozen=True)
class CachedLogits:
    points: tuple  # ((x, y, label), ...) in click order
    box: tuple | None
    logits: np.ndarray  # (h, w) float32, best mask


class LogitsCache(BoundedLRU[list[CachedLogits]]):
    """Low-res logits of earlier visual answers per (tenant, image_id), for click-by-click refinement."""

    def remember(self, key: tuple, entry: CachedLogits, keep: int = 8) -> None:
        history = [e for e in (self.get(key) or []) if (e.points, e.box) != (entry.points, entry.box)]
        history = (history + [entry])[-keep:]
        self.put(key, history, sum(e.logits.nbytes for e in history))

    def best_prefix(self, key: tuple, points: tuple, box: tuple | None) -> np.ndarray | None:
        """Logits of the longest earlier prompt whose clicks begin this prompt's clicks (same box)."""
        candidates = [
            e for e in (self.get(key) or [])
            if e.box == box and len(e.points) <= len(points) and points[: len(e.points)] == e.points
        ]
        return max(candidates, key=lambda e: len(e.points)).logits if candidates else None
