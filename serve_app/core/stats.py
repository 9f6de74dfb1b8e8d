"""Counters the deployments keep and report on /v1/stats; the same numbers go to Ray's metrics when Ray is there."""

from __future__ import annotations

import os
import threading
from collections import Counter


class BatchStats:
    """How many batches of each size an encoder ran, and the images it encoded."""

    def __init__(self) -> None:
        self._sizes: Counter[int] = Counter()
        self._lock = threading.Lock()

    def record(self, size: int) -> None:
        with self._lock:
            self._sizes[size] += 1

    def snapshot(self) -> dict:
        with self._lock:
            sizes = dict(sorted(self._sizes.items()))
        batches = sum(sizes.values())
        images = sum(size * count for size, count in sizes.items())
        return {
            "batches": batches,
            "images": images,
            "max_batch_size": max(sizes, default=0),
            "mean_batch_size": images / batches if batches else 0.0,
            "batch_size_histogram": {str(k): v for k, v in sizes.items()},
        }


def rss_bytes() -> int:
    """This process' resident set size, in bytes (Linux /proc)."""
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
