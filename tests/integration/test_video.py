"""Video sessions through the Serve app over real HTTP: tracking, refinement, streaming, isolation, failures."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.core.config import Config
from serve_app.image.codecs import rle_decode
from tests.integration.conftest import API_KEY, OTHER_KEY, deploy, undeploy
from tests.videos import moving_frames, write_video

H, W, FRAMES = 96, 128, 12
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}


@pytest.fixture(scope="module")
def video_url(serve_instance) -> Iterator[str]:
    # the clip's frames fit video_max_decoded_bytes; a longer list of image frames does not (test_image_frames...)
    config = Config(api_keys=[API_KEY, OTHER_KEY], video_max_sessions=3, video_max_frames=60, web_ui=False,
                    video_max_decoded_bytes=FRAMES * H * W * 3)
    yield deploy("video", config, serve_instance)
    undeploy("video")


@pytest.fixture(scope="module")
def clip() -> bytes:
    return write_video(FRAMES, H, W, fps=10)


def start(url: str, video: bytes, headers: dict = AUTH) -> requests.Response:
    return requests.post(
        f"{url}/v1/video/sessions", data=video, headers={**headers, "Content-Type": "video/mp4"}, timeout=120
    )


@pytest.fixture
def session(video_url, clip):
    response = start(video_url, clip)
    assert response.status_code == 201, response.text
    sid = response.json()["session_id"]
    yield sid
    requests.delete(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60)


@pytest.fixture(scope="class")
def refused_session(video_url, clip):
    """One session for a class of refused prompts: a refusal changes nothing, and each open starts a tracker actor.
    Closed when the class is done, so it never counts against the session cap in the tests after it."""
    response = start(video_url, clip)
    assert response.status_code == 201, response.text
    sid = response.json()["session_id"]
    yield sid
    requests.delete(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60)


def prompt(url: str, sid: str, body: dict, headers: dict = AUTH) -> requests.Response:
    return requests.post(f"{url}/v1/video/sessions/{sid}/prompts", json=body, headers=headers, timeout=120)


def propagate(url: str, sid: str, **body) -> list[tuple[float, dict]]:
    """(arrival time, line) for every streamed line."""
    started, out = time.perf_counter(), []
    with requests.post(f"{url}/v1/video/sessions/{sid}/propagate", json=body, headers=AUTH, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            out.append((time.perf_counter() - started, json.loads(line)))
    assert out[-1][1] == {"done": True, "frames": len(out) - 1}
    return out


def frames_of(lines: list[tuple[float, dict]]) -> list[dict]:
    return [line for _, line in lines if "frame_index" in line]


def masks(frame: dict) -> dict[int, np.ndarray]:
    found = {}
    for obj in frame["objects"]:
        mask = rle_decode(obj["mask"])
        assert mask.shape == (H, W)
        found[obj["object_id"]] = mask
    return found


def test_text_prompt_tracks_every_frame_and_streams(video_url, session):
    info = requests.get(f"{video_url}/v1/video/sessions/{session}", headers=AUTH, timeout=30).json()
    assert (info["num_frames"], info["width"], info["height"]) == (FRAMES, W, H)
    assert prompt(video_url, session, {"frame_index": 0, "text": "bright square"}).status_code == 200
    lines = propagate(video_url, session, direction="forward")
    frames = frames_of(lines)
    assert [f["frame_index"] for f in frames] == list(range(FRAMES))
    assert any(f["objects"] for f in frames), "text tracking found nothing on any frame"
    for frame in frames:
        masks(frame)
    first_at, done_at = lines[0][0], lines[-1][0]
    assert first_at < done_at / 2, f"first frame at {first_at:.2f}s of {done_at:.2f}s: not streamed"


def test_sse_stream(video_url, session):
    prompt(video_url, session, {"text": "circle"})
    headers = {**AUTH, "Accept": "text/event-stream"}
    with requests.post(f"{video_url}/v1/video/sessions/{session}/propagate", json={"max_frames": 3},
                       headers=headers, stream=True, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.text
    events = [block for block in text.split("\n\n") if block]
    assert [e.split("\n")[0] for e in events] == ["event: frame"] * 4 + ["event: done"]
    assert json.loads(events[0].split("data: ", 1)[1])["frame_index"] == 0


def test_point_prompt_refined_on_a_later_frame(video_url, session):
    first = prompt(video_url, session, {"frame_index": 0, "object_id": 1, "points": [[30, 45]], "point_labels": [1]})
    assert first.status_code == 200, first.text
    assert first.json()["frame_index"] == 0 and 1 in masks(first.json())
    before = {f["frame_index"]: masks(f).get(1) for f in frames_of(propagate(video_url, session))}
    assert sorted(before) == list(range(FRAMES))
    refined = prompt(video_url, session, {"frame_index": 8, "object_id": 1, "points": [[90, 45], [10, 10]],
                                          "point_labels": [1, 0]})
    assert refined.status_code == 200, refined.text
    refined_mask = masks(refined.json())[1]
    after = {f["frame_index"]: masks(f).get(1) for f in frames_of(propagate(video_url, session))}
    assert np.array_equal(after[8], refined_mask), "frame 8 now follows the refinement"
    assert not np.array_equal(before[8], after[8]), "the refinement changed the track"


def test_box_prompt_and_remove_object(video_url, session):
    assert prompt(video_url, session, {"object_id": 1, "points": [[30, 45]]}).status_code == 200
    assert prompt(video_url, session, {"object_id": 2, "box": [60, 10, 120, 60]}).status_code == 200
    ids = {o for f in frames_of(propagate(video_url, session)) for o in masks(f)}
    assert ids == {1, 2}
    removed = requests.delete(f"{video_url}/v1/video/sessions/{session}/objects/2", headers=AUTH, timeout=60)
    assert removed.status_code == 200
    ids = {o for f in frames_of(propagate(video_url, session)) for o in masks(f)}
    assert ids == {1}
    missing = requests.delete(f"{video_url}/v1/video/sessions/{session}/objects/2", headers=AUTH, timeout=60)
    assert missing.status_code == 404


def test_backward_and_both_directions(video_url, session):
    prompt(video_url, session, {"frame_index": 6, "object_id": 3, "points": [[60, 45]]})
    backward = [f["frame_index"] for f in frames_of(propagate(video_url, session, direction="backward", start_frame=6))]
    assert backward == list(range(6, -1, -1))
    both = [f["frame_index"] for f in frames_of(propagate(video_url, session, direction="both", start_frame=6))]
    assert both == list(range(6, FRAMES)) + list(range(5, -1, -1))
    limited = frames_of(propagate(video_url, session, direction="forward", start_frame=6, max_frames=2))
    assert [f["frame_index"] for f in limited] == [6, 7, 8]


def test_reset_forgets_prompts(video_url, session):
    prompt(video_url, session, {"object_id": 1, "points": [[30, 45]]})
    assert requests.post(f"{video_url}/v1/video/sessions/{session}/reset", headers=AUTH, timeout=60).status_code == 200
    response = requests.post(f"{video_url}/v1/video/sessions/{session}/propagate", json={}, headers=AUTH, timeout=60)
    assert response.status_code == 400 and "add a prompt" in response.json()["error"]["message"]
    assert prompt(video_url, session, {"text": "square"}).status_code == 200  # text is allowed after a reset


def test_disconnect_stops_propagation(video_url):
    long = start(video_url, write_video(40, H, W, fps=10))
    sid = long.json()["session_id"]
    try:
        prompt(video_url, sid, {"text": "square"})
        with requests.post(f"{video_url}/v1/video/sessions/{sid}/propagate", json={}, headers=AUTH,
                           stream=True, timeout=120) as r:
            lines = r.iter_lines()
            next(lines), next(lines)  # two frames, then hang up
        time.sleep(2.0)
        info = requests.get(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=30).json()
        assert info["frames_propagated"] < 10, f"{info['frames_propagated']} frames computed after a hang-up"
        assert len(frames_of(propagate(video_url, sid, max_frames=2))) == 3, "the session still works"
    finally:
        requests.delete(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60)


def test_close_is_idempotent_and_frees_the_session(video_url, clip):
    sid = start(video_url, clip).json()["session_id"]
    for _ in range(2):
        closed = requests.delete(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60)
        assert closed.status_code == 200 and closed.json()["closed"] is True
    assert requests.get(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=30).status_code == 404


def test_another_keys_session_is_not_found(video_url, session):
    for response in (
        requests.get(f"{video_url}/v1/video/sessions/{session}", headers=OTHER, timeout=30),
        prompt(video_url, session, {"text": "square"}, headers=OTHER),
        requests.delete(f"{video_url}/v1/video/sessions/{session}", headers=OTHER, timeout=30),
    ):
        assert response.status_code == 404, response.text
    assert requests.get(f"{video_url}/v1/video/sessions/{session}", headers=AUTH, timeout=30).status_code == 200


def test_killed_actor_gives_410_while_another_session_works(video_url, clip):
    a, b = (start(video_url, clip).json()["session_id"] for _ in range(2))
    try:
        pid = requests.get(f"{video_url}/v1/video/sessions/{a}", headers=AUTH, timeout=30).json()["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        gone = prompt(video_url, a, {"text": "square"})
        assert gone.status_code == 410 and "died" in gone.json()["error"]["message"], gone.text
        assert prompt(video_url, b, {"text": "square"}).status_code == 200
        assert len(frames_of(propagate(video_url, b, max_frames=1))) == 2
        assert requests.get(f"{video_url}/v1/video/sessions/{a}", headers=AUTH, timeout=30).status_code == 404
    finally:
        for sid in (a, b):
            requests.delete(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60)


def test_session_cap_gives_429(video_url, clip):
    opened = []
    try:
        for _ in range(3):
            response = start(video_url, clip)
            assert response.status_code == 201
            opened.append(response.json()["session_id"])
        over = start(video_url, clip)
        assert over.status_code == 429 and "SAM3_VIDEO_MAX_SESSIONS" in over.json()["error"]["message"]
    finally:
        for sid in opened:
            requests.delete(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60)
    assert start_and_close(video_url, clip), "closing frees places under the cap"


def start_and_close(url: str, clip: bytes) -> bool:
    response = start(url, clip)
    if response.status_code != 201:
        return False
    return requests.delete(f"{url}/v1/video/sessions/{response.json()['session_id']}", headers=AUTH, timeout=60).ok


@pytest.mark.parametrize(
    ("make", "status", "code", "words"),
    [
        pytest.param(lambda clip: os.urandom(4000), 400, "invalid_video", ["video"], id="not-a-video"),
        pytest.param(lambda clip: clip[: len(clip) // 2], 400, "invalid_video", ["truncated"], id="truncated"),
        pytest.param(lambda clip: write_video(70, H, W), 413, "payload_too_large", ["SAM3_VIDEO_MAX_FRAMES"],
                     id="too-many-frames"),
        pytest.param(lambda clip: b"", 400, "invalid_video", [], id="empty"),
    ],
)
def test_bad_videos(video_url, clip, make, status, code, words):
    response = start(video_url, make(clip))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and all(w in error["message"] for w in words), error
    assert requests.get(f"{video_url}/v1/stats", headers=AUTH, timeout=30).json()["video"]["open_sessions"] == 0


def _png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_image_frames_over_the_decoded_budget_are_served_from_their_encoded_bytes(video_url):
    """A `frames` list whose pixels exceed SAM3_VIDEO_MAX_DECODED_BYTES opens (kept as the PNGs sent) and tracks
    every frame; frames of two sizes, or one that is not an image, are refused before any session starts."""
    images = moving_frames(2 * FRAMES, H, W)
    body = {"frames": [_png_b64(i) for i in images], "fps": 10}
    response = requests.post(f"{video_url}/v1/video/sessions", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 201, response.text
    sid = response.json()["session_id"]
    try:
        assert (response.json()["num_frames"], response.json()["width"]) == (2 * FRAMES, W)
        assert prompt(video_url, sid, {"frame_index": 0, "points": [[20, 20]], "object_id": 1}).status_code == 200
        tracked = frames_of(propagate(video_url, sid))
        assert [f["frame_index"] for f in tracked] == list(range(2 * FRAMES))
    finally:
        requests.delete(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60)
    odd = {"frames": [body["frames"][0], _png_b64(moving_frames(1, H, W + 2)[0])]}
    bad = {"frames": [body["frames"][0], base64.b64encode(b"not an image").decode()]}
    png = base64.b64decode(body["frames"][1])  # its header is whole, its pixels cut: found by the actor's decode
    cut = {"frames": [body["frames"][0], base64.b64encode(png[: len(png) // 2]).decode()]}
    for payload, words in ((odd, "frame 1 is 130x96"), (bad, "image"), (cut, "truncated")):
        response = requests.post(f"{video_url}/v1/video/sessions", json=payload, headers=AUTH, timeout=120)
        assert response.status_code == 400 and words in response.json()["error"]["message"], response.text
    assert requests.get(f"{video_url}/v1/stats", headers=AUTH, timeout=30).json()["video"]["open_sessions"] == 0


class TestRefusedPrompts:
    @pytest.mark.parametrize(
        ("body", "status", "words"),
        [
            pytest.param({"frame_index": 99, "text": "square"}, 400, ["frame index 99", "12 frames"], id="frame-range"),
            pytest.param({"frame_index": 0, "points": [[500, 5]], "object_id": 1}, 400, ["outside"],
                         id="point-outside"),
            pytest.param({"points": [[5, 5]]}, 400, ["object_id"], id="clicks-without-object-id"),
            pytest.param({"text": "a", "points": [[5, 5]], "object_id": 1}, 400, ["either text"], id="text-and-points"),
            pytest.param({"frame_index": -1, "text": "x"}, 422, ["frame_index"], id="negative-frame"),
            pytest.param({"text": 5}, 422, ["text"], id="text-wrong-type"),
        ],
    )
    def test_bad_prompts(self, video_url, refused_session, body, status, words):
        response = prompt(video_url, refused_session, body)
        assert response.status_code == status, response.text
        assert all(w in response.json()["error"]["message"] for w in words), response.text


def test_unknown_session_and_missing_key(video_url, clip):
    assert prompt(video_url, "no-such-session", {"text": "x"}).status_code == 404
    assert start(video_url, clip, headers={}).status_code == 401


def _node_used_bytes() -> int:
    info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


def _serve_rss(url: str) -> tuple[int, int]:
    stats = requests.get(f"{url}/v1/stats", headers=AUTH, timeout=30).json()
    return stats["ingress_rss_bytes"], stats["video"]["rss_bytes"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"  # a zombie has exited


SESSIONS_OPENED = 8  # each starts an actor (~4 s on 2 cores, ~12 s under load); enough to show growth


def test_many_sessions_return_memory(video_url, clip):
    for _ in range(3):  # warm-up: first sessions allocate caches and code paths
        assert start_and_close(video_url, clip)
    time.sleep(2.0)
    ingress0, sessions0 = _serve_rss(video_url)
    node0 = _node_used_bytes()
    pids = []
    for i in range(SESSIONS_OPENED):
        response = start(video_url, clip)
        assert response.status_code == 201, f"session {i}: {response.text}"
        sid = response.json()["session_id"]
        assert prompt(video_url, sid, {"text": "square"}).status_code == 200
        pids.append(requests.get(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=30).json()["pid"])
        assert requests.delete(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60).ok
    time.sleep(3.0)
    ingress1, sessions1 = _serve_rss(video_url)
    node1 = _node_used_bytes()
    mib = 1024 * 1024
    print(
        f"\n{SESSIONS_OPENED} sessions opened and closed: ingress RSS {ingress0 / mib:.0f} -> {ingress1 / mib:.0f} MiB, "
        f"VideoSessions RSS {sessions0 / mib:.0f} -> {sessions1 / mib:.0f} MiB, "
        f"node used {node0 / mib:.0f} -> {node1 / mib:.0f} MiB ({(node1 - node0) / node0:+.1%})"
    )
    assert len(set(pids)) == SESSIONS_OPENED, "one actor process per session"
    assert not [pid for pid in pids if _alive(pid)], "every closed session's actor process has exited"
    assert requests.get(f"{video_url}/v1/stats", headers=AUTH, timeout=30).json()["video"]["open_sessions"] == 0
    assert ingress1 <= ingress0 * 1.10 and sessions1 <= sessions0 * 1.10


def test_sessions_survive_a_video_sessions_replica_restart(video_url, clip):
    """The registry is in the shared state store and tracker actors are detached: after the VideoSessions replica
    dies, a session opened before answers as before (same tracked object), and another key still sees nothing."""
    import ray

    sid = start(video_url, clip).json()["session_id"]
    try:
        clicked = prompt(video_url, sid, {"frame_index": 0, "object_id": 1, "points": [[30, 45]], "point_labels": [1]})
        assert clicked.status_code == 200, clicked.text
        before = frames_of(propagate(video_url, sid, max_frames=1))
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("SERVE_REPLICA::video#VideoSessions#")]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
        deadline = time.monotonic() + 120
        while True:
            try:  # a request that reaches the replica while it restarts waits for it (model build, pool refill)
                response = requests.get(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=30)
            except requests.exceptions.ReadTimeout:
                assert time.monotonic() < deadline, "the restarted VideoSessions replica never answered"
                continue
            if response.status_code == 200:
                break
            assert response.status_code in (500, 503, 504) and time.monotonic() < deadline, response.text
            time.sleep(0.5)
        after = frames_of(propagate(video_url, sid, max_frames=1))
        assert [f["frame_index"] for f in after] == [f["frame_index"] for f in before]
        assert [o["object_id"] for o in after[0]["objects"]] == [o["object_id"] for o in before[0]["objects"]]
        assert requests.get(f"{video_url}/v1/video/sessions/{sid}", headers=OTHER, timeout=30).status_code == 404
    finally:
        requests.delete(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60)
    assert requests.get(f"{video_url}/v1/video/sessions/{sid}", headers=AUTH, timeout=30).status_code == 404
