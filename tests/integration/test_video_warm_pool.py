"""The warm pool of session actors through the Serve app: opens take a pooled actor whose model is loaded, the pool
refills, a dead pooled actor is never handed out, a refused video gives its actor back, a replica crash or a delete
leaves no actor behind. Actors are looked up in Ray's actor table (ray._private.state.actors())."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import requests

from serve_app.core.config import Config
from tests.integration.conftest import deploy
from tests.videos import write_video

APP = "warmpool"
PREFIX = f"sam3-video:{APP}:"
H, W = 96, 128


@pytest.fixture(scope="module")
def pool_url(serve_instance) -> Iterator[str]:
    config = Config(video_warm_sessions=1, video_max_sessions=3, video_session_ttl_s=30.0, web_ui=False)
    yield deploy(APP, config, serve_instance)
    from ray import serve

    if APP in serve.status().applications:  # the last test deletes it itself
        serve.delete(APP)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return write_video(12, H, W, fps=10)


def actors(starting: bool = False) -> dict[str, dict]:
    """This app's live session actors (pooled or not) by name; with `starting`, also those not yet started."""
    import ray

    states = ("ALIVE", "PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING") if starting else ("ALIVE",)
    return {a["Name"]: a for a in ray._private.state.actors().values()
            if a["Name"].startswith(PREFIX) and a["State"] in states}


def warm_stats(url: str) -> dict:
    return requests.get(f"{url}/v1/stats", timeout=30).json()["video"]["warm"]


def wait_pool(url: str, ready: int = 1, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (stats := warm_stats(url))["ready"] < ready:
        assert time.monotonic() < deadline, f"the warm pool never held {ready} loaded actors: {stats}"
        time.sleep(0.25)
    return stats


def pooled_pids(url: str) -> dict[int, str]:
    """pid -> name of the actors in the pool now (no session is open when this is called)."""
    assert requests.get(f"{url}/v1/stats", timeout=30).json()["video"]["open_sessions"] == 0
    return {a["Pid"]: name for name, a in actors().items()}


def open_session(url: str, video: bytes) -> tuple[requests.Response, float]:
    t0 = time.perf_counter()
    response = requests.post(f"{url}/v1/video/sessions", data=video, headers={"Content-Type": "video/mp4"}, timeout=300)
    return response, time.perf_counter() - t0


def close(url: str, sid: str) -> None:
    assert requests.delete(f"{url}/v1/video/sessions/{sid}", timeout=60).status_code == 200


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def cold_start_s() -> float:
    """What an open costs without the pool, before the decode: a session actor started and its model loaded, here,
    the way VideoSessions starts one (model shipped through the object store, 0 CPUs)."""
    import ray

    from deployments.video import SessionActor
    from serve_app.image.models import load_video_model

    model = ray.put(load_video_model(Config()))
    t0 = time.perf_counter()
    actor = SessionActor.options(num_cpus=0).remote(Config(), model)
    ray.get(actor.ready.remote(), timeout=300)
    elapsed = time.perf_counter() - t0
    ray.kill(actor)
    return elapsed


def test_open_takes_a_pooled_actor_with_its_model_loaded(pool_url, clip):
    cold_s = cold_start_s()
    wait_pool(pool_url)
    pooled = pooled_pids(pool_url)
    assert len(pooled) == 1, pooled
    response, open_s = open_session(pool_url, clip)
    assert response.status_code == 201, response.text
    body = response.json()
    try:
        assert body["pid"] in pooled, f"the session runs in pid {body['pid']}, not in the pooled actor {pooled}"
        assert body["warm_start"] is True and body["num_frames"] == 12
        print(f"\nopen with the pool {open_s:.2f} s (server: {body['timings_ms']}); an actor start alone {cold_s:.2f} s")
        assert open_s < cold_s, f"open took {open_s:.2f} s, an actor start and model load alone {cold_s:.2f} s"
        assert body["timings_ms"]["actor"] < cold_s * 1000 / 2
        prompt = requests.post(f"{pool_url}/v1/video/sessions/{body['session_id']}/prompts",
                               json={"frame_index": 0, "text": "square"}, timeout=120)
        assert prompt.status_code == 200, prompt.text
    finally:
        close(pool_url, body["session_id"])


def test_pool_refills_after_a_take_and_closed_sessions_exit(pool_url, clip):
    wait_pool(pool_url)
    (first,) = pooled_pids(pool_url)
    response, _ = open_session(pool_url, clip)
    sid, pid = response.json()["session_id"], response.json()["pid"]
    assert pid == first
    try:
        stats = wait_pool(pool_url)
        session_actor = [n for n, a in actors().items() if a["Pid"] == pid]
        refilled = [a["Pid"] for n, a in actors().items() if a["Pid"] != pid]
        assert len(session_actor) == 1 and len(refilled) == 1, actors()
        assert stats["pooled"] == 1 and stats["taken"] >= 1
    finally:
        close(pool_url, sid)
    wait_until(lambda: not alive(pid), 30, "a closed session's actor process exits")
    assert refilled[0] in pooled_pids(pool_url), "the refilled actor stays pooled after the close"


def test_a_killed_pooled_actor_is_replaced_and_never_handed_out(pool_url, clip):
    wait_pool(pool_url)
    (victim,) = pooled_pids(pool_url)
    os.kill(victim, signal.SIGKILL)
    response, _ = open_session(pool_url, clip)  # at once: the pool has not necessarily noticed yet
    assert response.status_code == 201, response.text
    sid, pid = response.json()["session_id"], response.json()["pid"]
    try:
        assert pid != victim and alive(pid)
        assert prompt_ok(pool_url, sid)
        wait_pool(pool_url)
        assert victim not in {a["Pid"] for a in actors().values()}
    finally:
        close(pool_url, sid)
    # Killed while idle in the pool, with no open at all: the sweeper replaces it.
    wait_pool(pool_url)
    (idle,) = pooled_pids(pool_url)
    replaced = warm_stats(pool_url)["replaced"]
    os.kill(idle, signal.SIGKILL)
    wait_until(lambda: warm_stats(pool_url)["replaced"] > replaced, 60, "the sweeper never noticed the dead actor")
    wait_pool(pool_url)
    assert idle not in pooled_pids(pool_url)


def prompt_ok(url: str, sid: str) -> bool:
    return requests.post(f"{url}/v1/video/sessions/{sid}/prompts", json={"text": "square"}, timeout=120).ok


def test_a_refused_video_gives_its_actor_back_to_the_pool(pool_url, clip):
    wait_pool(pool_url)
    (pid,) = pooled_pids(pool_url)
    truncated = clip[: len(clip) // 2]  # passes the ingress' probe (header, first frame), fails the full decode
    refused, _ = open_session(pool_url, truncated)
    assert refused.status_code == 400 and "truncated" in refused.json()["error"]["message"], refused.text
    wait_until(lambda: pid in pooled_pids(pool_url) and warm_stats(pool_url)["ready"] == 1, 60,
               "the actor that refused the video is pooled again")
    response, _ = open_session(pool_url, clip)
    assert response.status_code == 201 and response.json()["pid"] == pid, "the same, reset, actor serves the next"
    sid = response.json()["session_id"]
    info = requests.get(f"{pool_url}/v1/video/sessions/{sid}", timeout=30).json()
    assert (info["num_frames"], info["frames_propagated"]) == (12, 0)
    close(pool_url, sid)


def test_cap_counts_sessions_not_pooled_actors_and_expiry_still_works(pool_url, clip):
    wait_pool(pool_url)
    opened = []
    try:
        for _ in range(3):  # video_max_sessions=3: all three open although one actor sat in the pool
            response, _ = open_session(pool_url, clip)
            assert response.status_code == 201, response.text
            opened.append(response.json())
        over, _ = open_session(pool_url, clip)
        assert over.status_code == 429, over.text
        time.sleep(6.0)  # a sweep: at the cap the pool holds nothing (no GPU slice for a session that cannot open)
        assert warm_stats(pool_url)["pooled"] == 0 and len(actors()) == 3
    finally:
        for body in opened[1:]:
            close(pool_url, body["session_id"])
    idle = opened[0]  # left idle (stats do not touch it, a GET would): the 30 s TTL closes it and its actor exits
    wait_until(lambda: requests.get(f"{pool_url}/v1/stats", timeout=30).json()["video"]["open_sessions"] == 0, 90,
               "the idle session never expired")
    assert requests.get(f"{pool_url}/v1/video/sessions/{idle['session_id']}", timeout=30).status_code == 404
    wait_until(lambda: not alive(idle["pid"]), 30, "an expired session's actor process exits")
    wait_pool(pool_url)


def test_a_replica_crash_leaves_no_orphan_and_keeps_sessions(pool_url, clip):
    """The dead replica's pooled actor is killed by its successor; its session (a pooled actor) is adopted."""
    import ray

    wait_pool(pool_url)
    response, _ = open_session(pool_url, clip)
    sid, pid = response.json()["session_id"], response.json()["pid"]
    try:
        wait_pool(pool_url)
        old_pool = {n for n, a in actors().items() if a["Pid"] != pid}
        assert len(old_pool) == 1
        (replica,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith(f"SERVE_REPLICA::{APP}#VideoSessions#")]
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=False)
        deadline = time.monotonic() + 180
        while requests.get(f"{pool_url}/v1/video/sessions/{sid}", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the session was not adopted after the restart"
            time.sleep(0.5)
        assert requests.get(f"{pool_url}/v1/video/sessions/{sid}", timeout=30).json()["pid"] == pid
        assert prompt_ok(pool_url, sid)
        wait_pool(pool_url)
        now = actors()
        assert not old_pool & set(now), f"the dead replica's pooled actor is still alive: {old_pool & set(now)}"
        assert len(now) == 2 and pid in {a["Pid"] for a in now.values()}, now
    finally:
        close(pool_url, sid)


def test_deleting_the_app_leaves_no_actor(pool_url, clip):
    from ray import serve

    wait_pool(pool_url)
    response, _ = open_session(pool_url, clip)
    assert response.status_code == 201
    assert len(actors(starting=True)) == 2  # the session, and its replacement in the pool, still loading
    serve.delete(APP)
    wait_until(lambda: not actors(starting=True), 60, "actors left after the app was deleted")
