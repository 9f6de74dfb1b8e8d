"""The async queue without Ray: job state machine, bounds, owner checks, event log, watchdog, store core, worker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from serve_app.core.errors import InvalidImage, NotFound, TooManyRequests
from serve_app.core.media import MediaStore
from serve_app.jobs.store import (
    JOB_LOST,
    WORKER_DIED,
    Conflict,
    JobBook,
    JobLimits,
    Outcome,
    echo_params,
    epoch_of,
)
from serve_app.jobs.storecore import JobStoreCore
from serve_app.jobs.worker import Worker
from serve_app.protocols.oxen_queue import FileCollector, sse_frame

A, B = "tenant-a", "tenant-b"
REQUEST = {"model": "sam-3-video", "input_video": "https://example.com/v.mp4", "prompt": "the ox", "apply_mask": True}
BASE = "http://host/api/media/"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def book(clock: Clock | None = None, **limits) -> JobBook:
    return JobBook(JobLimits(**limits), epoch="0badcafe", clock=clock or Clock(), wall=lambda: 1_775_000_000.0)


def submit(jobs: JobBook, tenant: str = A, count: int = 1, request: dict | None = None) -> list[str]:
    views = jobs.submit(tenant, "sam-3-video", "video", request or REQUEST, BASE, count)
    return [v["generation_id"] for v in views]


def success(url: str = BASE + "x") -> Outcome:
    return Outcome(result={"videos": [{"url": url}]}, result_url=url)


# ------------------------------------------------------------------------------------------------ records


def test_submit_returns_queued_records_with_uuid_ids_of_the_store_epoch():
    jobs = book()
    views = jobs.submit(A, "sam-3-video", "video", REQUEST, BASE, 2)
    assert [v["status"] for v in views] == ["queued", "queued"]
    first = views[0]
    assert first["model"] == "sam-3-video" and first["type"] == "video" and first["created"] == 1_775_000_000
    assert first["prompt"] == "the ox" and first["input_video"] == REQUEST["input_video"] and first["apply_mask"]
    assert "result" not in first and "error_message" not in first
    ids = [v["generation_id"] for v in views]
    assert len(set(ids)) == 2
    for job_id in ids:
        assert str(uuid.UUID(job_id)) == job_id and uuid.UUID(job_id).version == 4
        assert epoch_of(job_id) == "0badcafe"
    assert epoch_of("not-a-uuid") is None


def test_data_uris_are_echoed_shortened():
    uri = "data:video/mp4;base64," + "A" * 10_000
    echoed = echo_params({"model": "m", "input_video": uri, "prompt": "p"})
    assert set(echoed) == {"input_video", "prompt"}
    assert echoed["input_video"].startswith("data:video/mp4;base64,") and len(echoed["input_video"]) < 100
    assert "10022 characters" in echoed["input_video"]


def test_another_key_sees_nothing():
    jobs = book()
    (job_id,) = submit(jobs, A)
    assert jobs.get(A, job_id)["generation_id"] == job_id
    for call in (lambda: jobs.get(B, job_id), lambda: jobs.cancel(B, job_id), lambda: jobs.get(A, str(uuid.uuid4()))):
        with pytest.raises(NotFound, match="generation not found"):
            call()
    assert jobs.active(B) == [] and [v["generation_id"] for v in jobs.active(A)] == [job_id]
    assert jobs.active(A, "sam-3-image") == []


def test_ids_of_an_earlier_store_are_reported_lost_not_unknown():
    old = book()
    (job_id,) = submit(old)
    restarted = JobBook(JobLimits(), epoch="12345678", previous_epochs=["0badcafe"])
    view = restarted.get(B, job_id)
    assert view == {"generation_id": job_id, "status": "failed", "error_code": "job_lost", "error_message": JOB_LOST}
    with pytest.raises(NotFound):
        restarted.get(A, str(uuid.uuid4()))


# ------------------------------------------------------------------------------------------------ bounds


def test_queued_and_running_jobs_per_key_are_capped():
    jobs = book(max_active_per_key=3)
    submit(jobs, A, 2)
    with pytest.raises(TooManyRequests, match="SAM3_JOBS_MAX_QUEUED_PER_KEY"):
        submit(jobs, A, 2)
    submit(jobs, B, 3)  # other keys are not affected
    job = jobs.claim("w")
    jobs.finish(job["id"], "w", success())
    submit(jobs, job["tenant"])  # a finished job frees its place


def test_the_store_drops_oldest_finished_jobs_first_then_refuses():
    jobs = book(max_jobs=3)
    first, second = submit(jobs, A, 2)
    for _ in range(2):
        work = jobs.claim("w")
        jobs.finish(work["id"], "w", success())
    submit(jobs, B, 2)  # evicts `first`, the oldest finished
    with pytest.raises(NotFound):
        jobs.get(A, first)
    assert jobs.get(A, second)["status"] == "succeeded"
    submit(jobs, B)  # evicts `second`
    with pytest.raises(TooManyRequests, match="SAM3_JOBS_MAX"):
        submit(jobs, B)  # everything left is live


# ------------------------------------------------------------------------------------------------ state machine


def test_claim_heartbeat_finish_succeeds_and_emits_one_completed_event():
    clock = Clock()
    jobs = book(clock)
    (job_id,) = submit(jobs)
    work = jobs.claim("worker-1")
    assert work == {"id": job_id, "tenant": A, "model": "sam-3-video", "kind": "video", "request": REQUEST,
                    "media_base": BASE}
    assert jobs.get(A, job_id)["status"] == "running" and jobs.claim("worker-2") is None
    assert jobs.heartbeat(job_id, "worker-1") and not jobs.heartbeat(job_id, "worker-2")
    assert not jobs.finish(job_id, "worker-2", success())  # not its job
    assert jobs.finish(job_id, "worker-1", success(BASE + "abc"))
    view = jobs.get(A, job_id)
    assert view["status"] == "succeeded" and view["result_url"] == BASE + "abc"
    assert view["result"] == {"videos": [{"url": BASE + "abc"}]} and "error_message" not in view
    (event,) = jobs.events_after(A, 0)
    assert event.name == "media_generation_completed" and event.data["generation_id"] == job_id
    assert event.data["result_url"] == BASE + "abc" and "result" not in event.data
    assert not jobs.heartbeat(job_id, "worker-1"), "a finished job tells its worker to stop"
    assert not jobs.finish(job_id, "worker-1", Outcome.failure("x", "late")), "terminal statuses are final"


def test_failure_is_recorded_with_its_reason_and_a_failed_event():
    jobs = book()
    (job_id,) = submit(jobs)
    jobs.claim("w")
    jobs.finish(job_id, "w", Outcome.failure("invalid_video", "the bytes are not a video"))
    view = jobs.get(A, job_id)
    assert (view["status"], view["error_code"], view["error_message"]) == (
        "failed", "invalid_video", "the bytes are not a video")
    assert [e.name for e in jobs.events_after(A, 0)] == ["media_generation_failed"]


def test_cancel_queued_and_running_jobs():
    jobs = book()
    queued, running = submit(jobs, A, 2)
    work = jobs.claim("w")
    assert work["id"] == queued
    queued, running = running, queued  # the first submitted is the one running
    assert jobs.cancel(A, queued)["status"] == "cancelled"
    assert jobs.claim("w2") is None, "a cancelled job is never started"
    assert jobs.cancel(A, running)["status"] == "cancelled"
    assert not jobs.heartbeat(running, "w"), "the worker learns on its next heartbeat"
    assert not jobs.finish(running, "w", success())
    assert jobs.get(A, running)["status"] == "cancelled"
    assert jobs.cancel(A, running)["status"] == "cancelled", "cancelling twice is harmless"
    assert [e.name for e in jobs.events_after(A, 0)] == ["media_generation_cancelled"] * 2


def test_cancelling_a_finished_job_is_a_conflict():
    jobs = book()
    (job_id,) = submit(jobs)
    jobs.claim("w")
    jobs.finish(job_id, "w", success())
    with pytest.raises(Conflict, match="already succeeded"):
        jobs.cancel(A, job_id)


def test_claim_is_fair_between_keys():
    jobs = book()
    a1, a2 = submit(jobs, A, 2)
    (b1,) = submit(jobs, B)
    assert jobs.claim("w")["id"] == a1
    assert jobs.claim("w")["id"] == b1, "B has nothing running: it goes before A's second job"
    assert jobs.claim("w")["id"] == a2


def test_release_puts_a_workers_jobs_back_first_in_line():
    jobs = book()
    first, second = submit(jobs, A, 2)
    jobs.claim("dying")
    assert jobs.release("dying") == 1 and jobs.release("other") == 0
    assert jobs.get(A, first)["status"] == "queued"
    assert jobs.claim("next")["id"] == first


# ------------------------------------------------------------------------------------------------ watchdog


def test_a_silent_worker_fails_its_job_after_the_heartbeat_timeout():
    clock = Clock()
    jobs = book(clock, heartbeat_timeout_s=10)
    (job_id,) = submit(jobs)
    jobs.claim("w")
    clock.now += 9
    assert jobs.heartbeat(job_id, "w") and jobs.sweep() == []
    clock.now += 10.5
    assert jobs.sweep() == [job_id]
    view = jobs.get(A, job_id)
    assert view["status"] == "failed" and view["error_code"] == "worker_died"
    assert view["error_message"].startswith(WORKER_DIED)
    assert not jobs.finish(job_id, "w", success()), "a report after the watchdog's verdict is ignored"
    assert jobs.get(A, job_id)["status"] == "failed"
    assert [e.name for e in jobs.events_after(A, 0)] == ["media_generation_failed"]


def test_a_job_running_past_the_timeout_fails():
    clock = Clock()
    jobs = book(clock, heartbeat_timeout_s=10, timeout_s=30)
    (job_id,) = submit(jobs)
    jobs.claim("w")
    for _ in range(4):
        clock.now += 8
        jobs.heartbeat(job_id, "w")
        jobs.sweep()
    view = jobs.get(A, job_id)
    assert view["status"] == "failed" and view["error_code"] == "timeout"
    assert "SAM3_JOBS_TIMEOUT_S" in view["error_message"]


def test_finished_jobs_and_their_events_expire():
    clock = Clock()
    jobs = book(clock, ttl_s=100)
    (job_id,) = submit(jobs)
    jobs.claim("w")
    jobs.finish(job_id, "w", success())
    clock.now += 99
    jobs.sweep()
    assert jobs.get(A, job_id)["status"] == "succeeded" and len(jobs.events_after(A, 0)) == 1
    clock.now += 2
    jobs.sweep()
    with pytest.raises(NotFound):
        jobs.get(A, job_id)
    assert jobs.events_after(A, 0) == [] and len(jobs) == 0


# ------------------------------------------------------------------------------------------------ events


def test_events_are_per_key_with_increasing_sequence_numbers_and_a_replay_window():
    clock = Clock()
    jobs = book(clock, replay_s=60)
    (a_old,) = submit(jobs, A)
    (b_job,) = submit(jobs, B)
    (a_new,) = submit(jobs, A)
    for expected in (a_old, b_job, a_new):
        work = jobs.claim("w")
        assert work["id"] == expected
        jobs.finish(work["id"], "w", success())
        clock.now += 40
    seqs = [e.seq for e in jobs.events_after(A, 0)]
    assert seqs == sorted(seqs) and len(seqs) == 2
    assert [e.data["generation_id"] for e in jobs.events_after(B, 0)] == [b_job]
    assert [e.data["generation_id"] for e in jobs.events_after(A, seqs[0])] == [a_new]
    replay = jobs.events_after(A, None)  # a new connection: only the last 60 s
    assert [e.data["generation_id"] for e in replay] == [a_new]


def test_sse_frame_matches_the_awk_of_the_oxen_page():
    jobs = book()
    (job_id,) = submit(jobs)
    jobs.claim("w")
    jobs.finish(job_id, "w", success())
    (event,) = jobs.events_after(A, 0)
    frame = sse_frame({"id": f"e-{event.seq}", "event": event.name, "data": event.data})
    lines = frame.split("\n")
    assert lines[1] == "event: media_generation_completed" and lines[2].startswith("data: ")
    assert frame.endswith("\n\n") and len(lines) == 5
    payload = lines[2][6:]
    assert f'"generation_id":"{job_id}"' in payload
    assert json.loads(payload)["status"] == "succeeded"


# ------------------------------------------------------------------------------------------------ store core


def live_core(**limits) -> JobStoreCore:
    return JobStoreCore(JobBook(JobLimits(**limits), epoch="0badcafe", clock=time.monotonic), MediaStore(10_000, 60))



def test_core_claim_waits_for_work_and_events_wait_for_an_event():
    async def scenario():
        core = live_core()
        waiting = asyncio.create_task(core.claim("w", 5.0))
        listening = asyncio.create_task(core.events(A, None, 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        (job_id,) = submit(core.book)
        work = await asyncio.wait_for(waiting, 1.0)
        assert work["id"] == job_id and not listening.done()
        collector = FileCollector(BASE)
        url = collector(b"mp4-bytes", "video/mp4")
        assert core.finish(job_id, "w", Outcome(result={"videos": [{"url": url}]}, result_url=url,
                                                files=collector.files))
        batch = await asyncio.wait_for(listening, 1.0)
        (event,) = batch["events"]
        assert event["event"] == "media_generation_completed" and event["data"]["generation_id"] == job_id
        assert batch["cursor"] == event["id"] == f"0badcafe-{core.book.last_seq}"
        media_id = url.removeprefix(BASE)
        data, content_type, owner, remaining = core.get_media(media_id)
        assert (data, content_type, owner) == (b"mp4-bytes", "video/mp4", A) and 0 < remaining <= 60
        empty = await core.events(A, batch["cursor"], 0.05)  # nothing new: times out, same cursor
        assert empty == {"cursor": batch["cursor"], "events": []}
        replay = await core.events(A, "ffffffff-1", 0.05)  # another epoch's cursor: the replay window
        assert [e["id"] for e in replay["events"]] == [event["id"]]
        assert await core.claim("w", 0.05) is None

    asyncio.run(scenario())


def test_core_fails_a_job_whose_files_do_not_fit():
    jobs = book()
    core = JobStoreCore(jobs, MediaStore(1024, 60))
    (job_id,) = submit(jobs)
    jobs.claim("w")
    outcome = Outcome(result={}, result_url=BASE + "big", files=[("big", b"x" * 2048, "video/mp4")])
    assert core.finish(job_id, "w", outcome)
    view = jobs.get(A, job_id)
    assert view["status"] == "failed" and view["error_code"] == "payload_too_large"
    assert not core.finish(job_id, "w", success())


# ------------------------------------------------------------------------------------------------ worker


class CoreQueue:
    """A JobStoreCore seen through the worker's JobQueue protocol (what the Ray handle does remotely)."""

    def __init__(self, core: JobStoreCore) -> None:
        self.core = core

    async def claim(self, worker, wait_s):
        return await self.core.claim(worker, wait_s)

    async def heartbeat(self, job_id, worker):
        return self.core.book.heartbeat(job_id, worker)

    async def finish(self, job_id, worker, outcome):
        return self.core.finish(job_id, worker, outcome)

    async def release(self, worker):
        return self.core.book.release(worker)


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_worker_runs_jobs_and_reports_results_and_errors():
    async def execute(job):
        if job["request"]["prompt"] == "bad":
            raise InvalidImage("cannot decode the image")
        if job["request"]["prompt"] == "bug":
            raise RuntimeError("boom")
        return Outcome(result={"prompt": job["request"]["prompt"]})

    async def scenario():
        core = live_core()
        worker = Worker(CoreQueue(core), execute, "w", concurrency=2, heartbeat_s=0.05, claim_wait_s=0.1)
        worker.start()
        ids = [submit(core.book, request={**REQUEST, "prompt": p})[0] for p in ("ok", "bad", "bug")]
        await until(lambda: all(core.book.get(A, i)["status"] in ("succeeded", "failed") for i in ids))
        ok, bad, bug = (core.book.get(A, i) for i in ids)
        assert ok["status"] == "succeeded" and ok["result"] == {"prompt": "ok"}
        assert (bad["status"], bad["error_code"]) == ("failed", "invalid_image")
        assert (bug["status"], bug["error_code"]) == ("failed", "internal_error")
        assert "RuntimeError" in bug["error_message"]
        assert worker.stats()["succeeded"] == 1 and worker.stats()["failed"] == 2
        await worker.stop()

    asyncio.run(scenario())


def test_cancelling_a_running_job_stops_its_execution_and_runs_its_cleanup():
    state = {"started": False, "cleaned": False}

    async def execute(job):
        state["started"] = True
        try:
            await asyncio.sleep(60)
        finally:
            state["cleaned"] = True
        return Outcome(result={})

    async def scenario():
        core = live_core()
        worker = Worker(CoreQueue(core), execute, "w", heartbeat_s=0.05, claim_wait_s=0.1)
        worker.start()
        (job_id,) = submit(core.book)
        await until(lambda: state["started"])
        core.book.cancel(A, job_id)
        await until(lambda: state["cleaned"], 2.0)
        await until(lambda: not worker.running)
        assert core.book.get(A, job_id)["status"] == "cancelled" and worker.stats()["stopped"] == 1
        await worker.stop()

    asyncio.run(scenario())


def test_a_dead_worker_fails_its_job_and_a_graceful_one_hands_it_back():
    async def execute(job):
        await asyncio.sleep(60)

    async def scenario():
        core = live_core(heartbeat_timeout_s=0.3)
        dead = Worker(CoreQueue(core), execute, "dead", heartbeat_s=0.05, claim_wait_s=0.1)
        dead.start()
        (job_id,) = submit(core.book)
        await until(lambda: core.book.get(A, job_id)["status"] == "running")
        for task in dead._loops:  # the process dies: no heartbeat, no release, nothing reported
            task.cancel()
        dead.queue = None
        await asyncio.sleep(0.2)
        assert core.book.sweep() == [] and core.book.get(A, job_id)["status"] == "running"
        await until(lambda: core.book.sweep() or core.book.get(A, job_id)["status"] == "failed", 2.0)
        view = core.book.get(A, job_id)
        assert view["status"] == "failed" and view["error_message"].startswith(WORKER_DIED)

        graceful = Worker(CoreQueue(core), execute, "graceful", heartbeat_s=0.05, claim_wait_s=0.1)
        graceful.start()
        (second,) = submit(core.book)
        await until(lambda: core.book.get(A, second)["status"] == "running")
        await graceful.stop()
        assert core.book.get(A, second)["status"] == "queued", "handed back, not lost"

    asyncio.run(scenario())
