"""The warm pool: session actors started ahead of time with the model loaded, so a new session costs only its decode.

Plain asyncio over three injected operations (launch an actor, wait until its model is loaded, kill it), so it is
unit-tested without Ray; deployments/video.py supplies the Ray ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)
H = TypeVar("H")
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0  # back-off after a warm actor failed to start (a model that never loads)


@dataclass
class Warm(Generic[H]):
    """One pooled actor: its name (for adoption and clean-up), its handle, and the task that waits for its model."""

    name: str
    handle: H
    loaded: asyncio.Task
    started: float = field(default_factory=time.monotonic)


class WarmPool(Generic[H]):
    """Up to `size` actors, each started in the background and handed out once its model is loaded.

    `fill(free)` keeps min(size, free) actors: `free` is the places left under the sessions cap, so open sessions plus
    pooled actors never exceed it (at the cap the pool is empty and holds no GPU slice). `take()` hands out a loaded
    actor that answered a ping just now (one that died is dropped, never handed out), else the actor that has been
    loading longest, else None (the caller starts one itself).
    """

    def __init__(
        self, size: int, launch: Callable[[], tuple[str, H]], wait_loaded: Callable[[H], Awaitable[object]],
        kill: Callable[[H], None], ping_timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size, self.ping_timeout_s, self.clock = size, ping_timeout_s, clock
        self._launch, self._wait_loaded, self._kill = launch, wait_loaded, kill
        self.entries: list[Warm[H]] = []
        self.closed = False
        self.started = self.failed = self.taken = self.replaced = 0  # counters for /v1/stats
        self._failures_in_a_row = 0
        self._retry_at = 0.0

    # ---- filling ------------------------------------------------------------------------------------

    def fill(self, free: int) -> None:
        """Launch actors (without waiting for them) up to min(size, free); kill the newest beyond it."""
        if self.closed:
            return
        target = max(0, min(self.size, free))
        while len(self.entries) > target:
            self._drop(self.entries[-1])
        while len(self.entries) < target and self.clock() >= self._retry_at:
            try:
                name, handle = self._launch()
            except Exception:  # noqa: BLE001 - e.g. a name still held by a dying actor: retry later
                logger.exception("could not start a warm video session actor")
                self._failed()
                return
            self.started += 1
            self.entries.append(Warm(name, handle, asyncio.get_event_loop().create_task(self._loaded(handle))))

    async def _loaded(self, handle: H) -> None:
        try:
            await self._wait_loaded(handle)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._failed()
            raise
        self._failures_in_a_row = 0

    def _failed(self) -> None:
        self.failed += 1
        self._failures_in_a_row += 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self._failures_in_a_row - 1))
        self._retry_at = self.clock() + delay

    def ready(self) -> int:
        """Pooled actors whose model is loaded."""
        return sum(1 for e in self.entries if _succeeded(e.loaded))

    # ---- handing out --------------------------------------------------------------------------------

    async def take(self) -> Warm[H] | None:
        """A loaded, live actor out of the pool (it is the caller's from now on), or None when there is none."""
        while self.entries and not self.closed:
            entry = next((e for e in self.entries if _succeeded(e.loaded)), None)
            loading = entry is None  # none loaded yet: the one loading longest is never slower than a new one
            entry = entry or self.entries[0]
            self.entries.remove(entry)
            try:
                await asyncio.shield(entry.loaded)
                if not loading:  # loaded a while ago: it must still answer
                    await asyncio.wait_for(self._wait_loaded(entry.handle), self.ping_timeout_s)
            except asyncio.CancelledError:
                self._kill_quietly(entry)  # the caller went away holding it: it must not leak
                raise
            except Exception as exc:  # noqa: BLE001 - dead or stuck: replace it, try the next
                logger.warning("warm video session actor %s is unusable (%s): replaced", entry.name, exc)
                self.replaced += 1
                self._kill_quietly(entry)
                continue
            self.taken += 1
            return entry
        return None

    def give_back(self, entry: Warm[H], free: int) -> bool:
        """Return a loaded actor that was taken but never became a session (its state reset by the caller).

        A loaded actor is worth more than one still loading: when the pool is full, the newest loading one makes
        room. False: no room (the caller kills it).
        """
        target = min(self.size, free)
        if self.closed or target <= 0:
            return False
        if len(self.entries) >= target:
            loading = [e for e in self.entries if not e.loaded.done()]
            if not loading:
                return False
            self._drop(loading[-1])
        self.entries.insert(0, entry)
        return True

    # ---- upkeep -------------------------------------------------------------------------------------

    async def check(self) -> int:
        """Ping every loaded actor; drop the dead or stuck ones and those whose start failed. Returns how many went."""
        gone = [e for e in self.entries if e.loaded.done() and not _succeeded(e.loaded)]
        live = [e for e in self.entries if _succeeded(e.loaded)]
        results = await asyncio.gather(
            *(asyncio.wait_for(self._wait_loaded(e.handle), self.ping_timeout_s) for e in live), return_exceptions=True
        )
        for entry, result in zip(live, results):
            if isinstance(result, BaseException):
                logger.warning("warm video session actor %s died or hangs (%s): replaced", entry.name, result)
                self.replaced += 1
                gone.append(entry)
        for entry in gone:
            if entry in self.entries:
                self._drop(entry)
        return len(gone)

    def names(self) -> set[str]:
        return {e.name for e in self.entries}

    def close(self) -> None:
        """Kill every pooled actor, loaded or not; nothing is launched afterwards."""
        self.closed = True
        while self.entries:
            self._drop(self.entries[-1])

    def stats(self) -> dict:
        return {"size": self.size, "pooled": len(self.entries), "ready": self.ready(), "started": self.started,
                "taken": self.taken, "failed_starts": self.failed, "replaced": self.replaced}

    def _drop(self, entry: Warm[H]) -> None:
        self.entries.remove(entry)
        self._kill_quietly(entry)

    def _kill_quietly(self, entry: Warm[H]) -> None:
        if not entry.loaded.done():
            entry.loaded.cancel()
        try:
            self._kill(entry.handle)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _succeeded(task: asyncio.Task) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None
