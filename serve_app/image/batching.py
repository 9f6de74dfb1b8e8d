"""Batching for the encoder and the decoder: a request alone runs at once; requests that arrive together meet in one
batch.

Ray's `@serve.batch` closes a batch `batch_wait_timeout_s` after its first request arrives even while the previous
batch still runs, so under load it queues batches of one or two behind the model. Here the next batch is formed
when the model is free: everything that arrived meanwhile goes in it (up to `max_batch_size`). Each request also
says how many requests its sender has in flight (`expected`); a batch waits for that many, at most `wait_s` after
its first request arrived. A lone request (`expected` 1) never waits.

Nothing runs for a request nobody waits for: an entry whose caller was cancelled (its client left) or whose
deadline (wall clock) passed is dropped when the next batch is formed, and counted in `stats()`.

`run` may answer an exception in place of one item's result: that request gets the error, the others their results.
`concurrency` batches may run at once (each in its own worker thread); another worker starts only when the queue holds
more than the workers not running a batch can take.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.core.errors import GatewayTimeout


@dataclass
class _Entry:
    item: Any
    expected: int
    future: asyncio.Future
    deadline: float | None = None  # time.time(); None: no deadline
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    """Runs `run(items) -> results` (same length, same order) in worker threads, `concurrency` batches at a time."""

    def __init__(
        self, run: Callable[[list], list], max_batch_size: int, wait_s: float,
        on_batch: Callable[[int], None] | None = None, concurrency: int = 1, name: str = "image encoder",
    ) -> None:
        self.name = name  # what a dropped request's 504 says it waited for
        self.run = run
        self.concurrency = max(1, int(concurrency))
        self.max_batch_size = max(1, int(max_batch_size))
        self.wait_s = max(0.0, float(wait_s))
        self.on_batch = on_batch or (lambda size: None)
        self._queue: deque[_Entry] = deque()
        self._arrival: asyncio.Event | None = None
        self._workers: set[asyncio.Task] = set()
        self._busy = 0  # workers running a batch
        self._lock = threading.Lock()
        self._totals = {"batches": 0, "items": 0, "wait_s": 0.0, "run_s": 0.0}
        self.dropped = {"cancelled": 0, "expired": 0}

    async def submit(self, item: Any, expected: int = 1, deadline: float | None = None) -> Any:
        """The result for `item`; `expected` is how many requests the caller has in flight, this one included;
        past `deadline` (time.time()) the entry is dropped unrun with a 504."""
        loop = asyncio.get_running_loop()
        entry = _Entry(item, max(1, int(expected)), loop.create_future(), deadline)
        self._queue.append(entry)
        if self._arrival is None:
            self._arrival = asyncio.Event()
        self._arrival.set()
        self._workers = {w for w in self._workers if not w.done()}
        free = len(self._workers) - self._busy  # workers forming a batch: each takes up to max_batch_size
        if len(self._workers) < self.concurrency and len(self._queue) > free * self.max_batch_size:
            self._workers.add(loop.create_task(self._work()))
        return await entry.future

    def stats(self) -> dict:
        """Batches run, items, mean queue wait and mean model time per batch, in milliseconds."""
        with self._lock:
            t = dict(self._totals)
        return {
            "queued": len(self._queue), "dropped_cancelled": self.dropped["cancelled"],
            "dropped_expired": self.dropped["expired"],
            "mean_queue_wait_ms": round(t["wait_s"] * 1000 / t["items"], 3) if t["items"] else 0.0,
            "mean_batch_run_ms": round(t["run_s"] * 1000 / t["batches"], 3) if t["batches"] else 0.0,
        }

    async def _work(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._queue:
                return  # the next submit starts a new worker
            await self._fill()
            self._drop_cancelled()
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                entry = self._queue.popleft()
                if self._live(entry):
                    batch.append(entry)
            if batch:
                await self._run(batch)

    async def _fill(self) -> None:
        """Wait, at most wait_s after the oldest queued request arrived, for as many as the senders expect."""
        while True:
            self._drop_cancelled()
            target = min(self.max_batch_size, max((e.expected for e in self._queue), default=1))
            remaining = self._queue[0].arrived + self.wait_s - time.perf_counter() if self._queue else 0.0
            if not self._queue or len(self._queue) >= target or remaining <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _run(self, batch: list[_Entry]) -> None:
        started = time.perf_counter()
        self.on_batch(len(batch))
        self._busy += 1
        try:
            results = await asyncio.to_thread(self.run, [e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        else:
            for entry, result in zip(batch, results):
                if entry.future.done():
                    continue
                if isinstance(result, BaseException):  # this item's own error
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result(result)
        finally:
            self._busy -= 1
        with self._lock:
            self._totals["batches"] += 1
            self._totals["items"] += len(batch)
            self._totals["wait_s"] += sum(started - e.arrived for e in batch)
            self._totals["run_s"] += time.perf_counter() - started

    def _live(self, entry: _Entry) -> bool:
        """False (counted; an expired entry gets its 504) for an entry that must not run."""
        if entry.future.done():
            self.dropped["cancelled"] += 1
            return False
        if entry.deadline is not None and time.time() >= entry.deadline:
            self.dropped["expired"] += 1
            entry.future.set_exception(GatewayTimeout(
                f"the request's deadline passed while it waited for the {self.name}; it was dropped"))
            return False
        return True

    def _drop_cancelled(self) -> None:
        """Drop dead entries anywhere in the queue, so that they neither count towards a batch nor wait in it."""
        if any(e.future.done() or (e.deadline is not None and time.time() >= e.deadline) for e in self._queue):
            self._queue = deque(e for e in self._queue if self._live(e))


@dataclass
class BatchedModel:
    """One model a replica holds: its engine and its own batcher (a batch never mixes models)."""

    engine: Any
    batcher: Batcher


def merged_stats(batchers: list[Batcher]) -> dict:
    """`stats()` of the batchers of every model a replica holds: counts summed, mean waits and runs the largest."""
    each = [b.stats() for b in batchers]
    merged = {key: sum(s[key] for s in each) for key in ("queued", "dropped_cancelled", "dropped_expired")}
    for key in ("mean_queue_wait_ms", "mean_batch_run_ms"):
        merged[key] = max((s[key] for s in each), default=0.0)
    return merged
