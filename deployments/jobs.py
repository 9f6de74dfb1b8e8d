"""The async queue on Ray Serve: JobStore (one replica: records, events, files), JobRunner (workers), and the
JobStore handle for workers (the ingress' RayJobBackend is in deployments/handles.py). The logic is serve_app/jobs/store.py and serve_app/jobs/worker.py; these are thin shells."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve import metrics  # Serve tags: deployment, replica, application

from deployments.handles import (
    Failover,
    RayCaches,
    RayGraph,
    RayVideoBackend,
    replica_logging,
    shared_kv,
    shared_media,
)
from serve_app.core.config import Config
from serve_app.core.state import state_location
from serve_app.image.service import SegmentService
from serve_app.jobs.repo import JobRepo
from serve_app.jobs.store import JobBook, JobLimits, Outcome
from serve_app.jobs.storecore import JobStoreCore
from serve_app.jobs.worker import Worker
from serve_app.protocols.oxen_queue import OxenJobs

logger = logging.getLogger(__name__)
SWEEP_EVERY_S = 1.0
PURGE_EVERY_SWEEPS = 30
EPOCHS_KEPT = 64


def _remember_epoch(epoch: str) -> list[str]:
    """Record this store's epoch in the GCS key-value store (it outlives the replica); returns the earlier ones."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

        key = f"sam3:jobs:epochs:{serve.get_replica_context().app_name}".encode()
        earlier = [e for e in (_internal_kv_get(key) or b"").decode().split(",") if e]
        _internal_kv_put(key, ",".join([*earlier, epoch][-EPOCHS_KEPT:]).encode(), overwrite=True)
        return earlier
    except Exception as exc:  # noqa: BLE001 - without it, ids of a dead store are plain 404s
        logger.warning("could not record the job store epoch: %s", exc)
        return []


# long polls (claims, events) make every call an access-log line every few seconds: off
@serve.deployment(
    name="JobStore", num_replicas=1, max_ongoing_requests=4096, logging_config={"enable_access_log": False}
)
class JobStore:
    """The one source of truth for jobs. Its watchdog fails jobs whose worker stopped heartbeating."""

    def __init__(self, config: Config) -> None:
        replica_logging(config)
        epoch = secrets.token_hex(4)
        self.kv = shared_kv(config)
        repo = JobRepo(self.kv, clock=time.monotonic, wall=time.time)
        book = JobBook(JobLimits.from_config(config), epoch=epoch, previous_epochs=_remember_epoch(epoch), repo=repo)
        self.core = JobStoreCore(book, shared_media(config))
        logger.info("job store %s: %d jobs restored from %s", book.epoch, len(book), state_location(config))
        self._depth = metrics.Gauge("sam3_jobs", description="Jobs in the async queue (Oxen /api/ai/queue, Segmind "
                                    "/v2) by status: queued (waiting for a worker), running.", tag_keys=("status",))
        self._report()
        self._sweeper = asyncio.get_event_loop().create_task(self._sweep())

    def _report(self) -> None:
        stats = self.core.book.stats()
        for status in ("queued", "running"):
            self._depth.set(stats[status], tags={"status": status})

    async def _sweep(self) -> None:
        sweeps = 0
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                for job_id in self.core.book.sweep():
                    logger.warning("generation %s failed by the watchdog", job_id)
                self._report()
                sweeps += 1
                if sweeps % PURGE_EVERY_SWEEPS == 0:  # expired media files and events, whoever wrote them
                    self.kv.purge_expired()
            except Exception:  # noqa: BLE001 - the state store briefly unreachable: try again next sweep
                logger.exception("job store sweep failed")

    async def submit(self, tenant: str, model: str, kind: str, request: dict, media_base: str, count: int,
                     idempotency_key: str | None = None) -> list:
        return self.core.book.submit(tenant, model, kind, request, media_base, count, idempotency_key)

    async def get(self, tenant: str, job_id: str) -> dict:
        return self.core.book.get(tenant, job_id)

    async def active(self, tenant: str, model: str | None) -> list[dict]:
        return self.core.book.active(tenant, model)

    async def cancel(self, tenant: str, job_id: str) -> dict:
        return self.core.book.cancel(tenant, job_id)

    async def events(self, tenant: str, cursor: str | None, wait_s: float) -> dict:
        return await self.core.events(tenant, cursor, wait_s)

    async def media(self, media_id: str) -> tuple | None:
        return self.core.get_media(media_id)

    async def claim(self, worker: str, wait_s: float) -> dict | None:
        return await self.core.claim(worker, wait_s)

    async def heartbeat(self, job_id: str, worker: str) -> bool:
        return self.core.book.heartbeat(job_id, worker)

    async def finish(self, job_id: str, worker: str, outcome: Outcome) -> bool:
        return self.core.finish(job_id, worker, outcome)

    async def release(self, worker: str) -> int:
        return self.core.book.release(worker)

    async def stats(self) -> dict:
        return self.core.book.stats()


class StoreQueue:
    """The JobStore handle as serve_app.jobs.worker.JobQueue."""

    def __init__(self, store: DeploymentHandle) -> None:
        self.store = store

    async def claim(self, worker: str, wait_s: float) -> dict | None:
        return await self.store.claim.remote(worker, wait_s)

    async def heartbeat(self, job_id: str, worker: str) -> bool:
        return await self.store.heartbeat.remote(job_id, worker)

    async def finish(self, job_id: str, worker: str, outcome: Outcome) -> bool:
        return await self.store.finish.remote(job_id, worker, outcome)

    async def release(self, worker: str) -> int:
        return await self.store.release.remote(worker)


@serve.deployment(name="JobRunner")
class JobRunner:
    """Runs queued Oxen jobs through the same encoder/decoder graph and video sessions as the ingress."""

    def __init__(
        self, encoder: DeploymentHandle, decoder: DeploymentHandle, sessions: DeploymentHandle,
        store: DeploymentHandle, config: Config, cache: DeploymentHandle | None = None,
    ) -> None:
        replica_logging(config)
        failover = Failover(config.failover_retries)
        caches = None if cache is None else RayCaches(cache, config.request_timeout_s, failover)
        service = SegmentService(config, RayGraph(encoder, decoder, config.request_timeout_s, failover), caches=caches)
        worker_id = ray.get_runtime_context().get_actor_name() or ray.get_runtime_context().get_actor_id()
        self.worker = Worker(
            StoreQueue(store), OxenJobs(service, RayVideoBackend(sessions, failover)), worker_id,
            concurrency=config.jobs_concurrency, heartbeat_s=max(0.2, config.jobs_heartbeat_timeout_s / 5),
        )
        self.worker.start()

    async def stats(self) -> dict:
        return self.worker.stats()

    async def __del__(self) -> None:
        """Graceful shutdown (redeploy, downscale): running jobs go back to the queue for another replica."""
        await self.worker.stop()

    def ready(self) -> bool:
        return True
