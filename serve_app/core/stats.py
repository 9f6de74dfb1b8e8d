"""Counters the deployments keep and report on /v1/stats; the same numbers go to Ray's metrics when Ray is there."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections import Counter
from collections.abc import Mapping

# glibc malloc settings for every Ray process (set before Ray starts: its workers inherit the environment). By
# default glibc raises its mmap threshold after the first large free, so a 64 MiB request body ends up in heap
# arenas that fragment and are never given back: measured on the hostile-input test, Serve's proxy stayed +123%
# and each ingress +50% after a few refused 256 MiB uploads. A fixed threshold puts every block of 64 KiB or more
# (bodies, images, pickles) in its own mapping, returned on free; two arenas bound the per-thread arenas.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}


def allocator_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` with ALLOCATOR_ENV where the operator set nothing: for a process started from it."""
    return {**ALLOCATOR_ENV, **environ}


def apply_allocator_env() -> None:
    """Set ALLOCATOR_ENV in this process' environment (unless the operator set them) before Ray starts."""
    os.environ.update(allocator_environ(os.environ))


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if os.name == "posix" else None


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim); a no-op where there is no malloc_trim."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


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


def status_bytes(field: str, pid: int | str = "self") -> int:
    """One memory field (VmRSS, VmHWM, RssAnon...) of /proc/<pid>/status, this process' by default, in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class ModelStats:
    """Per model of one encoder or decoder replica: requests and their time, loads, evictions, and what it holds.

    `evictions` counts the models that left the replica's held set (Serve's multiplexer unloads the least recently
    used one to load another). `on_event(kind, model, seconds)` feeds Ray metrics: kind is request, load or evict.
    """

    def __init__(self, names: list[str], on_event=None) -> None:
        self._lock = threading.Lock()
        self._per = {name: {"requests": 0, "seconds": 0.0, "loads": 0, "evictions": 0, "load_s": 0.0}
                     for name in names}
        self._held: list[str] = []
        self.on_event = on_event or (lambda kind, model, seconds: None)

    def request(self, name: str, seconds: float) -> None:
        with self._lock:
            row = self._per[name]
            row["requests"] += 1
            row["seconds"] += seconds
        self.on_event("request", name, seconds)

    def loaded(self, name: str, seconds: float) -> None:
        with self._lock:
            row = self._per[name]
            row["loads"] += 1
            row["load_s"] = seconds
        self.on_event("load", name, seconds)

    def holding(self, names: list[str]) -> None:
        """What the replica holds now: a model that was held and is not any more was evicted."""
        with self._lock:
            gone = [n for n in self._held if n not in names]
            for name in gone:
                self._per[name]["evictions"] += 1
            self._held = list(names)
        for name in gone:
            self.on_event("evict", name, 0.0)

    def snapshot(self) -> dict:
        with self._lock:
            return {name: {"loaded": name in self._held, "requests": row["requests"],
                           "mean_ms": round(row["seconds"] * 1000 / row["requests"], 2) if row["requests"] else 0.0,
                           "loads": row["loads"], "evictions": row["evictions"],
                           "last_load_s": round(row["load_s"], 3)}
                    for name, row in self._per.items()}
