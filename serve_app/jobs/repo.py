"""The queue's durable half: every job record, each key's events and the book's epoch in the shared state store.

The JobBook writes through on every transition and reads everything back when a JobStore (re)starts, so queued
jobs, finished results and event cursors survive a store replica's death and a whole-service restart. Monotonic
times do not survive a process; records carry wall-clock times and are rebased onto the new process' clock.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.core.state import KV

JOBS, EVENTS, META = "jobs", "job_events", "job_meta"
MONOTONIC_FIELDS = ("beat", "started", "finished")


@dataclass(frozen=True)
class Loaded:
    """What a store finds when it starts: the epoch and last event number it continues from, jobs, events."""

    epoch: str | None
    last_seq: int
    jobs: list[dict]  # Job fields, monotonic ones rebased
    events: list[dict]  # {"tenant", "seq", "name", "data", "at"}, `at` rebased


class JobRepo:
    """Job records and events as JSON in a KV; events expire by themselves after the jobs' TTL."""

    def __init__(self, kv: KV, clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self.kv, self.clock, self.wall = kv, clock, wall

    def save_job(self, job) -> None:
        record = dataclasses.asdict(job)
        for name in MONOTONIC_FIELDS:  # as wall times: "how long ago" is what survives a restart
            record[name] = self._to_wall(record[name]) if record[name] else 0.0
        self.kv.put(JOBS, job.id, json.dumps(record, separators=(",", ":")).encode())

    def drop_job(self, job_id: str) -> None:
        self.kv.delete(JOBS, job_id)

    def save_event(self, tenant: str, event, ttl_s: float) -> None:
        record = {"tenant": tenant, "seq": event.seq, "name": event.name, "data": event.data,
                  "at": self._to_wall(event.at)}
        self.kv.put(EVENTS, f"{event.seq:016d}", json.dumps(record, separators=(",", ":")).encode(), ttl_s=ttl_s)

    def drop_event(self, seq: int) -> None:
        self.kv.delete(EVENTS, f"{seq:016d}")

    def save_meta(self, epoch: str, last_seq: int) -> None:
        self.kv.put(META, "book", json.dumps({"epoch": epoch, "last_seq": last_seq}).encode())

    def load(self) -> Loaded:
        meta = json.loads(self.kv.get(META, "book") or b"{}")
        jobs = []
        for _, blob in self.kv.scan(JOBS):
            record = json.loads(blob)
            for name in MONOTONIC_FIELDS:
                record[name] = self._to_clock(record[name]) if record[name] else 0.0
            jobs.append(record)
        events = []
        for _, blob in self.kv.scan(EVENTS):
            record = json.loads(blob)
            record["at"] = self._to_clock(record["at"])
            events.append(record)
        jobs.sort(key=lambda r: r["created"])
        events.sort(key=lambda r: r["seq"])
        last_seq = max([int(meta.get("last_seq", 0)), *(e["seq"] for e in events)])
        return Loaded(meta.get("epoch"), last_seq, jobs, events)

    def _to_wall(self, monotonic: float) -> float:
        return self.wall() - (self.clock() - monotonic)

    def _to_clock(self, wall: float) -> float:
        return self.clock() - (self.wall() - wall)
