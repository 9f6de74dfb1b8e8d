"""A job worker, free of Ray: claims jobs from the store, runs them, heartbeats them, reports their outcome."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from serve_app.core.errors import Sam3Error
from serve_app.jobs.store import Outcome

logger = logging.getLogger(__name__)

Execute = Callable[[dict], Awaitable[Outcome]]  # Job.work() -> outcome; raising is a failed job
FINISH_TRIES = 30  # a second apart: longer than a store replica takes to restart


class JobQueue(Protocol):
    """The store as a worker sees it."""

    async def claim(self, worker: str, wait_s: float) -> dict | None: ...

    async def heartbeat(self, job_id: str, worker: str) -> bool: ...

    async def finish(self, job_id: str, worker: str, outcome: Outcome) -> bool: ...

    async def release(self, worker: str) -> int: ...


class Worker:
    """`concurrency` loops, each claiming and running one job at a time.

    While a job runs its loop heartbeats it every `heartbeat_s`; a heartbeat answered False (the job was cancelled,
    timed out, or failed by the watchdog) cancels the run. If this process dies the heartbeats stop, and the store's
    watchdog fails the job: a job is never left `running`.
    """

    def __init__(
        self, queue: JobQueue, execute: Execute, worker_id: str, *, concurrency: int = 1,
        heartbeat_s: float = 3.0, claim_wait_s: float = 5.0, retry_s: float = 1.0,
    ) -> None:
        self.queue, self.execute, self.worker_id = queue, execute, worker_id
        self.concurrency, self.heartbeat_s = concurrency, heartbeat_s
        self.claim_wait_s, self.retry_s = claim_wait_s, retry_s
        self.running: dict[str, asyncio.Task] = {}
        self.counts = {"succeeded": 0, "failed": 0, "stopped": 0}
        self._loops: list[asyncio.Task] = []

    def start(self) -> None:
        self._loops = [asyncio.get_running_loop().create_task(self._loop()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        """Stop claiming, abandon running jobs and hand them back to the queue (graceful shutdown)."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.queue.release(self.worker_id), 5.0)

    async def _loop(self) -> None:
        while True:
            try:
                job = await self.queue.claim(self.worker_id, self.claim_wait_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store restarting: try again
                logger.warning("job store unreachable (%s); retrying", exc)
                await asyncio.sleep(self.retry_s)
                continue
            if job is not None:
                await self.run(job)

    async def run(self, job: dict) -> None:
        """Run one claimed job to its end, heartbeating it; report the outcome unless the job was taken away."""
        task = asyncio.get_running_loop().create_task(self._execute(job))
        self.running[job["id"]] = task
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=self.heartbeat_s)
                if not task.done() and not await self._beat(job["id"]):
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)  # let it clean up (close its session)
                    self.counts["stopped"] += 1
                    return
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            self.running.pop(job["id"], None)
        outcome = task.result()
        self.counts["failed" if outcome.error_message is not None else "succeeded"] += 1
        await self._finish(job["id"], outcome)

    async def _execute(self, job: dict) -> Outcome:
        try:
            return await self.execute(job)
        except Sam3Error as exc:
            return Outcome.failure(exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a job's bug must not kill the worker
            logger.exception("generation %s failed", job["id"])
            return Outcome.failure("internal_error", f"the generation failed unexpectedly ({type(exc).__name__})")

    async def _beat(self, job_id: str) -> bool:
        try:
            return bool(await self.queue.heartbeat(job_id, self.worker_id))
        except Exception as exc:  # noqa: BLE001 - store unreachable: keep working; its watchdog decides
            logger.warning("heartbeat for %s failed: %s", job_id, exc)
            return True

    async def _finish(self, job_id: str, outcome: Outcome) -> None:
        for attempt in range(FINISH_TRIES):
            try:
                await self.queue.finish(job_id, self.worker_id, outcome)
                return
            except Exception as exc:  # noqa: BLE001 - retried; after that the watchdog fails the job
                logger.warning("reporting %s failed (attempt %d): %s", job_id, attempt + 1, exc)
                await asyncio.sleep(self.retry_s)

    def stats(self) -> dict:
        return {"worker": self.worker_id, "running": len(self.running), **self.counts}
