"""The async queue, free of Ray: job records and their state machine, per-key event logs, heartbeats, expiry.

`JobBook` is the synchronous bookkeeping (one clock; with a JobRepo it writes through to the shared state store,
serve_app/jobs/repo.py); `JobStoreCore` (serve_app/jobs/storecore.py) adds waiting for work or events and the
files of finished jobs. The JobStore deployment wraps one core; JobRunner replicas claim jobs, heartbeat them and
report outcomes (serve_app/jobs/worker.py).
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from serve_app.core.config import Config
from serve_app.core.errors import NotFound, Sam3Error, TooManyRequests
from serve_app.jobs.repo import JobRepo, Loaded

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
EVENT_NAMES = {
    SUCCEEDED: "media_generation_completed",
    FAILED: "media_generation_failed",
    CANCELLED: "media_generation_cancelled",
}
EVENTS_PER_KEY = 1000  # newest events kept per API key (and none older than SAM3_JOBS_TTL_S)
WORKER_DIED = "the worker running this job died"
JOB_LOST = (
    "this generation was lost: the job store restarted while it was queued or running; submit it again"
)
DATA_URI_ECHO = 48  # characters of a data: URI echoed back in a job record


class Conflict(Sam3Error):
    status_code = 409
    code = "conflict"


@dataclass(frozen=True)
class JobLimits:
    max_jobs: int = 10_000
    max_active_per_key: int = 32
    ttl_s: float = 3600.0
    timeout_s: float = 1800.0
    heartbeat_timeout_s: float = 15.0
    replay_s: float = 300.0

    @classmethod
    def from_config(cls, config: Config) -> JobLimits:
        return cls(
            config.jobs_max, config.jobs_max_queued_per_key, config.jobs_ttl_s, config.jobs_timeout_s,
            config.jobs_heartbeat_timeout_s, config.jobs_events_replay_s,
        )


@dataclass
class Outcome:
    """What a worker reports: a result (with the files it links to) or an error."""

    result: dict | None = None
    result_url: str | None = None
    files: list[tuple[str, bytes, str]] = field(default_factory=list)  # (media id, bytes, content type)
    error_code: str | None = None
    error_message: str | None = None

    @classmethod
    def failure(cls, code: str, message: str) -> Outcome:
        return cls(error_code=code, error_message=message)


@dataclass
class Job:
    id: str
    tenant: str
    model: str
    kind: str  # "image" | "video"
    request: dict  # the validated request, inputs included; emptied once the job is finished
    echo: dict  # the request parameters shown back (data URIs shortened)
    media_base: str  # URL prefix of /api/media/ on the host the job was submitted to
    created: float  # unix time
    status: str = QUEUED
    worker: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    beat: float = 0.0  # monotonic: last heartbeat
    started: float = 0.0  # monotonic: claimed
    finished: float = 0.0  # monotonic: reached a terminal status
    result: dict | None = None
    result_url: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    restored: bool = False  # running when a store restarted: if its worker stays silent, it runs again
    idempotency_key: str | None = None  # the submission's Idempotency-Key: a repeat returns this submission's jobs

    def view(self, with_result: bool = True) -> dict:
        """The generation as GET /api/ai/queue/{id} shows it (events carry it without `result`)."""
        out: dict[str, Any] = {"generation_id": self.id, "model": self.model, "type": self.kind,
                               "status": self.status, "created": int(self.created)}
        out.update((key, value) for key, value in self.echo.items() if key not in out)
        for key in ("started_at", "completed_at"):
            if getattr(self, key) is not None:
                out[key] = int(getattr(self, key))
        if self.result_url is not None:
            out["result_url"] = self.result_url
        if with_result and self.result is not None:
            out["result"] = self.result
        if self.error_message is not None:
            out["error_code"], out["error_message"] = self.error_code, self.error_message
        return out

    def work(self) -> dict:
        """What a worker needs to run the job."""
        return {"id": self.id, "tenant": self.tenant, "model": self.model, "kind": self.kind,
                "request": self.request, "media_base": self.media_base}


@dataclass(frozen=True)
class Event:
    seq: int
    name: str
    data: dict
    at: float  # monotonic


def echo_params(request: dict) -> dict:
    """Request parameters to show back: everything but the model, with data: URIs cut to their header."""
    out = {}
    for key, value in request.items():
        if key == "model":
            continue
        if isinstance(value, str) and value[:5].lower() == "data:" and len(value) > DATA_URI_ECHO:
            value = f"{value[:DATA_URI_ECHO]}... ({len(value)} characters)"
        out[key] = value
    return out


def epoch_of(job_id: str) -> str | None:
    """The store epoch a generation id was minted in (its first 8 hex digits), or None if it is not one of ours."""
    try:
        return uuid.UUID(job_id).hex[:8]
    except (ValueError, AttributeError, TypeError):
        return None


class JobBook:
    """Every job of one store, owner-checked (another key's id is 404), bounded, with one event log per key.

    Statuses: queued -> running -> succeeded | failed; queued | running -> cancelled; running -> queued
    only when its worker shuts down gracefully (`release`). Terminal statuses are final: a late report from a
    worker that lost the job (cancelled, or failed by the watchdog) is ignored.
    """

    def __init__(
        self, limits: JobLimits, *, epoch: str | None = None, previous_epochs: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None, repo: JobRepo | None = None,
    ) -> None:
        self.limits = limits
        self.epoch = epoch or secrets.token_hex(4)
        self.previous_epochs = frozenset(previous_epochs) - {self.epoch}
        self.clock, self.wall = clock, wall
        self.on_change = on_change or (lambda: None)
        self._jobs: dict[str, Job] = {}
        self._queue: OrderedDict[str, None] = OrderedDict()  # queued ids, oldest first
        self._finished: OrderedDict[str, None] = OrderedDict()  # terminal ids, oldest first
        self._active: Counter[str] = Counter()  # queued + running per key
        self._keyed: dict[tuple[str, str], list[str]] = {}  # (tenant, Idempotency-Key) -> its submission's job ids
        self._running: Counter[str] = Counter()  # running per key
        self._events: dict[str, deque[Event]] = {}
        self.last_seq = 0
        self.repo = repo
        if repo is not None:
            self._restore(repo.load())

    # ---------------------------------------------------------------- clients

    def submit(self, tenant: str, model: str, kind: str, request: dict, media_base: str, count: int = 1,
               idempotency_key: str | None = None) -> list[dict]:
        """Queue `count` jobs. With `idempotency_key`, a repeat of the key's submission (a client's or the proxy's
        retry after a lost answer) returns the jobs of the first one, as they are now, and queues nothing; the key
        is the key's own (another API key's same key is another submission) and lives as long as its jobs."""
        if idempotency_key is not None:
            earlier = [self._jobs[i] for i in self._keyed.get((tenant, idempotency_key), ()) if i in self._jobs]
            if earlier:
                return [job.view() for job in earlier]
        if self._active[tenant] + count > self.limits.max_active_per_key:
            raise TooManyRequests(
                f"this API key has {self._active[tenant]} generations queued or running; at most "
                f"{self.limits.max_active_per_key} are allowed (SAM3_JOBS_MAX_QUEUED_PER_KEY): wait for some to finish"
            )
        while len(self._jobs) + count > self.limits.max_jobs and self._finished:
            self._drop(next(iter(self._finished)))
        if len(self._jobs) + count > self.limits.max_jobs:
            raise TooManyRequests(
                f"the queue holds {len(self._jobs)} generations, the most this server allows (SAM3_JOBS_MAX); "
                "retry later"
            )
        echo = echo_params(request)
        jobs = [Job(self._new_id(), tenant, model, kind, dict(request), echo, media_base, self.wall(),
                    idempotency_key=idempotency_key) for _ in range(count)]
        if idempotency_key is not None:
            self._keyed[(tenant, idempotency_key)] = [job.id for job in jobs]
        for job in jobs:
            self._jobs[job.id] = job
            self._queue[job.id] = None
            self._active[tenant] += 1
            self._save(job)
        self.on_change()
        return [job.view() for job in jobs]

    def get(self, tenant: str, job_id: str) -> dict:
        job = self._jobs.get(job_id)
        if job is not None and job.tenant == tenant:
            return job.view()
        if epoch_of(job_id) in self.previous_epochs:
            return {"generation_id": job_id, "status": FAILED, "error_code": "job_lost", "error_message": JOB_LOST}
        raise self._not_found(job_id)

    def active(self, tenant: str, model: str | None = None) -> list[dict]:
        """The key's queued and running generations, oldest first."""
        return [job.view() for job in self._jobs.values()
                if job.tenant == tenant and job.status not in TERMINAL and model in (None, job.model)]

    def cancel(self, tenant: str, job_id: str) -> dict:
        job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise self._not_found(job_id)
        if job.status in (SUCCEEDED, FAILED):
            raise Conflict(f"generation {job_id} already {job.status}; there is nothing to cancel")
        if job.status != CANCELLED:
            self._end(job, CANCELLED, error=("cancelled", "cancelled by the client"))
        return job.view()

    def events_after(self, tenant: str, after: int | None) -> list[Event]:
        """The key's events after sequence number `after`; with None, those of the last `replay_s` seconds."""
        log = self._events.get(tenant, ())
        if after is None:
            since = self.clock() - self.limits.replay_s
            return [event for event in log if event.at >= since]
        return [event for event in log if event.seq > after]

    # ---------------------------------------------------------------- workers

    def claim(self, worker: str) -> dict | None:
        """The next queued job, now running for `worker`: keys with the fewest running jobs go first."""
        best: Job | None = None
        for job_id in self._queue:
            job = self._jobs[job_id]
            if best is None or self._running[job.tenant] < self._running[best.tenant]:
                best = job
                if self._running[job.tenant] == 0:
                    break
        if best is None:
            return None
        del self._queue[best.id]
        now = self.clock()
        best.status, best.worker, best.started_at, best.started, best.beat = RUNNING, worker, self.wall(), now, now
        self._running[best.tenant] += 1
        self._save(best)
        return best.work()

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """True while the job is still this worker's to run; False tells it to stop (cancelled, failed, gone)."""
        job = self._owned_by(job_id, worker)
        if job is None:
            return False
        job.beat, job.restored = self.clock(), False  # its worker is alive: a later silence is its death
        return True

    def running_tenant(self, job_id: str, worker: str) -> str | None:
        """The key of a job `worker` is running, or None when it is not (or no longer) running it."""
        job = self._owned_by(job_id, worker)
        return None if job is None else job.tenant

    def finish(self, job_id: str, worker: str, outcome: Outcome) -> bool:
        """Record a worker's outcome; False (and nothing changes) when the job is no longer this worker's."""
        job = self._owned_by(job_id, worker)
        if job is None:
            return False
        if outcome.error_message is not None:
            self._end(job, FAILED, error=(outcome.error_code or "internal_error", outcome.error_message))
        else:
            job.result, job.result_url = outcome.result, outcome.result_url
            self._end(job, SUCCEEDED)
        return True

    def release(self, worker: str) -> int:
        """A worker shutting down gracefully: its running jobs go back to the front of the queue."""
        mine = [job for job in self._jobs.values() if job.status == RUNNING and job.worker == worker]
        for job in reversed(mine):
            job.status, job.worker, job.started_at = QUEUED, None, None
            self._running[job.tenant] -= 1
            self._queue[job.id] = None
            self._queue.move_to_end(job.id, last=False)
            self._save(job)
        if mine:
            self.on_change()
        return len(mine)

    # ---------------------------------------------------------------- watchdog

    def sweep(self) -> list[str]:
        """Fail running jobs whose worker went silent or that ran too long; drop expired jobs and events."""
        now, failed = self.clock(), []
        for job in [j for j in self._jobs.values() if j.status == RUNNING]:
            if now - job.beat > self.limits.heartbeat_timeout_s and job.restored:
                self._requeue(job)  # its worker went down with the store (a service restart): nothing is lost
                continue
            if now - job.beat > self.limits.heartbeat_timeout_s:
                silent = f"no heartbeat for {self.limits.heartbeat_timeout_s:g} s"
                self._end(job, FAILED, error=("worker_died", f"{WORKER_DIED} ({silent}); submit it again"))
            elif now - job.started > self.limits.timeout_s:
                limit = f"{self.limits.timeout_s:g} s (SAM3_JOBS_TIMEOUT_S)"
                self._end(job, FAILED, error=("timeout", f"the generation ran longer than {limit}"))
            else:
                continue
            failed.append(job.id)
        while self._finished:
            oldest = self._jobs[next(iter(self._finished))]
            if now - oldest.finished <= self.limits.ttl_s:
                break
            self._drop(oldest.id)
        for tenant in list(self._events):
            log = self._events[tenant]
            while log and now - log[0].at > self.limits.ttl_s:
                expired = log.popleft()
                if self.repo is not None:
                    self.repo.drop_event(expired.seq)
            if not log:
                del self._events[tenant]
        return failed

    def stats(self) -> dict:
        by_status = Counter(job.status for job in self._jobs.values())
        return {"epoch": self.epoch, "jobs": len(self._jobs), **{s: by_status[s] for s in
                (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)}}

    # ---------------------------------------------------------------- internals

    def _new_id(self) -> str:
        """A UUID whose first 8 hex digits are this store's epoch: ids minted by an earlier store are recognised."""
        return str(uuid.UUID(hex=self.epoch + secrets.token_hex(12), version=4))

    def _not_found(self, job_id: str) -> NotFound:
        shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."
        return NotFound(
            f"generation not found: {shown!r} (unknown to this API key, or finished more than "
            f"{self.limits.ttl_s:g} s ago: SAM3_JOBS_TTL_S)"
        )

    def _owned_by(self, job_id: str, worker: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.status == RUNNING and job.worker == worker else None

    def _end(self, job: Job, status: str, error: tuple[str, str] | None = None) -> None:
        if job.status == QUEUED:
            self._queue.pop(job.id, None)
        elif job.status == RUNNING:
            self._running[job.tenant] -= 1
        self._active[job.tenant] -= 1
        job.status, job.completed_at, job.finished, job.request = status, self.wall(), self.clock(), {}
        if error is not None:
            job.error_code, job.error_message = error
        self._finished[job.id] = None
        self.last_seq += 1
        event = Event(self.last_seq, EVENT_NAMES[status], job.view(with_result=False), self.clock())
        log = self._events.setdefault(job.tenant, deque(maxlen=EVENTS_PER_KEY))
        if self.repo is not None:
            if len(log) == log.maxlen:
                self.repo.drop_event(log[0].seq)
            self.repo.save_job(job)
            self.repo.save_event(job.tenant, event, self.limits.ttl_s)
            self.repo.save_meta(self.epoch, self.last_seq)
        log.append(event)
        self.on_change()

    def _drop(self, job_id: str) -> None:
        self._finished.pop(job_id, None)
        job = self._jobs.pop(job_id)  # only finished jobs are dropped
        if job.idempotency_key is not None:
            self._keyed.pop((job.tenant, job.idempotency_key), None)
        if self.repo is not None:
            self.repo.drop_job(job_id)

    def _requeue(self, job: Job) -> None:
        """A restored job whose worker did not come back: queued again, at the front (it was claimed first)."""
        self._running[job.tenant] -= 1
        job.status, job.worker, job.started_at, job.restored = QUEUED, None, None, False
        self._queue[job.id] = None
        self._queue.move_to_end(job.id, last=False)
        self._save(job)
        self.on_change()

    def _save(self, job: Job) -> None:
        if self.repo is not None:
            self.repo.save_job(job)

    def _restore(self, loaded: Loaded) -> None:
        """Continue from what the repo holds: the same epoch (ids and cursors stay valid), every job, every event."""
        if loaded.epoch:
            self.epoch = loaded.epoch
            self.previous_epochs = self.previous_epochs - {self.epoch}
        self.last_seq = loaded.last_seq
        for record in loaded.jobs:
            job = Job(**record)
            self._jobs[job.id] = job
            if job.idempotency_key is not None:
                self._keyed.setdefault((job.tenant, job.idempotency_key), []).append(job.id)
            if job.status in TERMINAL:
                continue
            self._active[job.tenant] += 1
            if job.status == QUEUED:
                self._queue[job.id] = None
            else:  # running: its worker gets one heartbeat period to show it is alive, else the job runs again
                job.beat, job.restored = self.clock(), True
                self._running[job.tenant] += 1
        for job in sorted((j for j in self._jobs.values() if j.status in TERMINAL), key=lambda j: j.finished):
            self._finished[job.id] = None
        for record in loaded.events:
            log = self._events.setdefault(record["tenant"], deque(maxlen=EVENTS_PER_KEY))
            log.append(Event(record["seq"], record["name"], record["data"], record["at"]))
        self.repo.save_meta(self.epoch, self.last_seq)

    def __len__(self) -> int:
        return len(self._jobs)
