"""The queue survives its store: a JobBook reopened on the same state backend continues where the last one stopped."""

from __future__ import annotations

import uuid

import pytest

from serve_app.core.state import MemoryKV, RedisKV, SqliteKV
from serve_app.jobs.repo import EVENTS, JOBS, JobRepo
from serve_app.jobs.store import JobBook, JobLimits, Outcome

A, B = "tenant-a", "tenant-b"
REQUEST = {"model": "sam-3-image", "input_image": "https://example.com/a.png", "prompt": "the ox"}


class Clocks:
    """A monotonic clock that restarts at 0 with each process, and a wall clock that does not."""

    def __init__(self) -> None:
        self.mono, self.wall_now = 0.0, 1_775_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_now += seconds

    def restart_process(self) -> None:
        self.mono = 0.0


@pytest.fixture(params=["memory", "sqlite", "redis"])
def kv(request, tmp_path):
    if request.param == "memory":
        return MemoryKV()
    if request.param == "sqlite":
        return SqliteKV(tmp_path / "state.db", "app")
    return RedisKV(request.getfixturevalue("redis_url"), f"jobs-{uuid.uuid4().hex[:8]}")


def open_book(kv, clocks: Clocks, epoch: str = "0badcafe", **limits) -> JobBook:
    repo = JobRepo(kv, clock=lambda: clocks.mono, wall=lambda: clocks.wall_now)
    return JobBook(JobLimits(**limits), epoch=epoch, clock=lambda: clocks.mono, wall=lambda: clocks.wall_now, repo=repo)


def test_queued_running_and_finished_jobs_survive_a_store_restart(kv):
    clocks = Clocks()
    first = open_book(kv, clocks, heartbeat_timeout_s=10)
    done, running, queued = (first.submit(A, "sam-3-image", "image", REQUEST, "http://h/api/media/", 1)[0]["generation_id"]
                             for _ in range(3))
    assert first.claim("w1")["id"] == done and first.finish(done, "w1", Outcome(result={"images": [{"url": "u"}]}))
    assert first.claim("w1")["id"] == running
    clocks.advance(3)
    clocks.restart_process()

    second = open_book(kv, clocks, epoch="ffffffff", heartbeat_timeout_s=10)  # a new replica mints a new epoch...
    assert second.epoch == "0badcafe", "...but continues the stored one, so ids and event cursors stay valid"
    assert second.get(A, done)["status"] == "succeeded" and second.get(A, done)["result"] == {"images": [{"url": "u"}]}
    assert second.get(A, running)["status"] == "running" and second.get(A, queued)["status"] == "queued"
    assert second.get(A, done)["created"] == first.get(A, done)["created"]
    with pytest.raises(Exception, match="not found"):
        second.get(B, done)  # ownership survives too
    assert second.heartbeat(running, "w1"), "the worker that still runs it keeps it"
    assert second.claim("w2")["id"] == queued and second.claim("w3") is None, "nothing runs twice"
    assert [e.seq for e in second.events_after(A, 0)] == [1]
    assert second.stats()["running"] == 2 and second.stats()["succeeded"] == 1


def test_a_running_job_whose_worker_died_with_the_store_runs_again_once(kv):
    """A whole-service restart: the worker is gone too. The job is queued again, not failed, and runs once more;
    the old worker, should it come back, has lost it (no job runs twice)."""
    clocks = Clocks()
    first = open_book(kv, clocks, heartbeat_timeout_s=10)
    job = first.submit(A, "sam-3-image", "image", REQUEST, "http://h/", 1)[0]["generation_id"]
    first.claim("w-dead")
    clocks.advance(100)
    clocks.restart_process()
    second = open_book(kv, clocks, heartbeat_timeout_s=10)
    second.sweep()
    assert second.get(A, job)["status"] == "running", "a restarted store gives running jobs one heartbeat period"
    clocks.advance(11)
    assert second.sweep() == [] and second.get(A, job)["status"] == "queued"
    assert open_book(kv, clocks, heartbeat_timeout_s=10).get(A, job)["status"] == "queued", "the requeue was stored"
    assert second.claim("w-new")["id"] == job and not second.heartbeat(job, "w-dead")
    assert not second.finish(job, "w-dead", Outcome(result={})) and second.finish(job, "w-new", Outcome(result={}))
    clocks.advance(11)
    assert second.get(A, job)["status"] == "succeeded"


def test_a_worker_dying_outside_a_restart_still_fails_its_job(kv):
    clocks = Clocks()
    book = open_book(kv, clocks, heartbeat_timeout_s=10)
    job = book.submit(A, "sam-3-image", "image", REQUEST, "http://h/", 1)[0]["generation_id"]
    book.claim("w")
    clocks.advance(11)
    assert book.sweep() == [job] and "worker" in book.get(A, job)["error_message"]


def test_events_continue_their_numbering_and_expired_records_are_deleted(kv):
    clocks = Clocks()
    first = open_book(kv, clocks, ttl_s=60, heartbeat_timeout_s=1000)
    ids = [first.submit(A, "sam-3-image", "image", REQUEST, "http://h/", 1)[0]["generation_id"] for _ in range(2)]
    for job_id in ids:
        first.claim("w")
        first.finish(job_id, "w", Outcome(result={}))
    clocks.restart_process()
    second = open_book(kv, clocks, ttl_s=60, heartbeat_timeout_s=1000)
    extra = second.submit(A, "sam-3-image", "image", REQUEST, "http://h/", 1)[0]["generation_id"]
    second.cancel(A, extra)
    assert [e.seq for e in second.events_after(A, 0)] == [1, 2, 3]
    clocks.advance(61)
    second.sweep()
    kv.purge_expired()
    assert list(kv.scan(JOBS)) == [] and list(kv.scan(EVENTS)) == [], "expired jobs and events leave the store"
    with pytest.raises(Exception, match="not found"):
        open_book(kv, clocks, ttl_s=60).get(A, ids[0])


def test_an_idempotency_key_returns_the_first_submission_even_after_a_store_restart(kv):
    """A retried queue submission (the client's, or the proxy's after a replica died) queues nothing new; the key
    belongs to its API key, and survives the store's restart with the jobs it names."""
    clocks = Clocks()
    first = open_book(kv, clocks)
    ids = [v["generation_id"] for v in first.submit(A, "sam-3-image", "image", REQUEST, "http://h/", 2, "k-1")]
    again = [v["generation_id"] for v in first.submit(A, "sam-3-image", "image", REQUEST, "http://h/", 2, "k-1")]
    assert again == ids and first.stats()["queued"] == 2
    other_key = first.submit(B, "sam-3-image", "image", REQUEST, "http://h/", 1, "k-1")[0]["generation_id"]
    assert other_key not in ids, "another API key's same Idempotency-Key is another submission"
    clocks.restart_process()
    second = open_book(kv, clocks, epoch="ffffffff")
    assert [v["generation_id"] for v in second.submit(A, "sam-3-image", "image", REQUEST, "http://h/", 2, "k-1")] == ids
    assert second.stats()["queued"] == 3
    fresh = second.submit(A, "sam-3-image", "image", REQUEST, "http://h/", 1, "k-2")[0]["generation_id"]
    assert fresh not in ids and second.stats()["queued"] == 4
