"""Live video streams over a real WebSocket through Ray Serve's proxy (docs/video-streams.md): 300 frames in and
300 results out in order, ownership, disconnect frees the actor, bad frames, back-pressure, the cap."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from load_tests.harness import serve_processes
from serve_app.core.config import Config
from serve_app.core.stats import status_bytes
from serve_app.image.codecs import rle_decode
from tests.integration.conftest import API_KEY, OTHER_KEY, deploy, undeploy
from tests.videos import moving_frames

pytestmark = pytest.mark.integration

APP = "streams"
H, W = 48, 64
MAX_FRAME_BYTES = 64 * 1024
START = {"type": "start", "objects": [{"object_id": 7, "points": [[6, 6]], "point_labels": [1]}]}  # on the square


@pytest.fixture(scope="module")
def ws_url(serve_instance) -> Iterator[str]:
    config = Config(
        api_keys=[API_KEY, OTHER_KEY], web_ui=False, video_max_streams=2, video_stream_max_in_flight=2,
        video_stream_max_frame_bytes=MAX_FRAME_BYTES, video_max_frame_pixels=20_000, video_max_objects=2,
    )
    url = deploy(APP, config, serve_instance)
    yield url.replace("http://", "ws://") + "/v1/video/streams"
    undeploy(APP)


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    return [png(f) for f in moving_frames(40, H, W)]


def png(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def open_ws(url: str, key: str | None = API_KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return connect(url, additional_headers=headers, open_timeout=60, max_size=2**24, **kwargs)


def recv(ws, timeout: float = 120) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def start(ws, body: dict = START) -> dict:
    ws.send(json.dumps(body))
    started = recv(ws)
    assert started["type"] == "started", started
    return started


def closed_with(ws) -> tuple[dict, int]:
    """The error message the server sent before closing, and the close code."""
    message = recv(ws)
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    return message, closed.value.rcvd.code


def stream_actors() -> dict[str, str]:
    """Name -> state of every stream actor of this app the GCS knows of (dead ones too)."""
    from ray._private import state

    return {a["Name"]: a["State"] for a in state.actors().values() if a["Name"].startswith(f"sam3-stream:{APP}:")}


def wait_dead(name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stream_actors().get(name) == "DEAD":
            return
        time.sleep(0.5)
    raise AssertionError(f"{name} is still {stream_actors().get(name)} {timeout} s after the client left")


def actor_info(stream_id: str) -> dict:
    import ray

    actor = ray.get_actor(f"sam3-stream:{APP}:{stream_id}", namespace="sam3")
    return ray.get(actor.info.remote(), timeout=30)


def test_300_frames_in_order_with_state_bounded(ws_url, frames):
    count, window = 300, 2
    with open_ws(ws_url) as ws:
        started = start(ws)
        assert started["mode"] == "click" and started["max_in_flight"] == window
        replies, sent, stored = [], 0, {}
        t0 = time.monotonic()
        while len(replies) < count:
            while sent < count and sent - len(replies) < window:  # as many in flight as the server takes
                ws.send(frames[sent % len(frames)])
                sent += 1
            replies.append(recv(ws))
            if len(replies) in (60, count):
                stored[len(replies)] = actor_info(started["stream_id"])
        elapsed = time.monotonic() - t0
    assert [r["type"] for r in replies] == ["frame"] * count, [r for r in replies if r["type"] != "frame"][:3]
    assert [r["seq"] for r in replies] == list(range(count))
    assert [r["frame_index"] for r in replies] == list(range(count))
    for reply in replies:
        (obj,) = reply["objects"]
        assert obj["object_id"] == 7 and set(obj) == {"object_id", "score", "box", "area", "mask"}
        assert obj["mask"]["size"] == [H, W] and rle_decode(obj["mask"]).sum() == obj["area"]
    # the model's state is the same size after 60 frames and after 300: frames, outputs, inputs do not pile up
    assert stored[60]["stored"] == stored[count]["stored"], stored
    assert stored[count]["stored"]["processed_frames"] == 1
    growth = stored[count]["rss_bytes"] - stored[60]["rss_bytes"]
    assert growth < 64 * 1024**2, f"the stream actor grew {growth / 2**20:.1f} MiB over 240 frames"
    print(f"300 frames in {elapsed:.1f} s ({count / elapsed:.1f} frames/s); actor RSS after 60: "
          f"{stored[60]['rss_bytes'] / 2**20:.1f} MiB, after 300: {stored[count]['rss_bytes'] / 2**20:.1f} MiB")


def test_text_stream_tracks_as_frames_arrive(ws_url, frames):
    with open_ws(ws_url) as ws:
        started = start(ws, {"type": "start", "text": ["square", "circle"]})
        assert started["mode"] == "text"
        for i in range(3):
            ws.send(frames[i])
            reply = recv(ws)
            assert reply["type"] == "frame" and reply["frame_index"] == i, reply
            for obj in reply["objects"]:
                assert obj["mask"]["size"] == [H, W] and obj["area"] > 0
        ws.send(json.dumps({"type": "close"}))
        assert recv(ws) == {"type": "closed", "stream_id": started["stream_id"], "frames": 3}


def test_another_key_cannot_attach_and_the_owner_can_watch(ws_url, frames):
    with open_ws(ws_url) as owner:
        stream_id = start(owner)["stream_id"]
        with open_ws(f"{ws_url}/{stream_id}", key=OTHER_KEY) as intruder:
            message, code = closed_with(intruder)
        assert code == 4404 and message["error"]["code"] == "not_found", message
        with open_ws(f"{ws_url}/nope", key=API_KEY) as lost:
            assert closed_with(lost)[1] == 4404
        with open_ws(f"{ws_url}/{stream_id}", key=API_KEY) as viewer:
            assert recv(viewer) == {"type": "attached", "stream_id": stream_id}
            owner.send(frames[0])
            mine = recv(owner)
            seen = recv(viewer)
            assert seen == {"type": "frame", **{k: v for k, v in mine.items() if k != "type"}}
            owner.send(json.dumps({"type": "close"}))
            assert recv(owner)["type"] == "closed"
            assert recv(viewer) == {"type": "closed", "stream_id": stream_id}


@pytest.mark.parametrize("where", ["header", "query", "subprotocol", "none", "wrong"])
def test_keys(ws_url, where):
    kwargs = {"key": None}
    url = ws_url
    if where == "header":
        kwargs["key"] = API_KEY
    elif where == "query":
        url = f"{ws_url}?api_key={API_KEY}"
    elif where == "subprotocol":
        kwargs["subprotocols"] = ["sam3.v1", f"bearer.{API_KEY}"]
    elif where == "wrong":
        kwargs["key"] = "not-a-key"
    with open_ws(url, **kwargs) as ws:
        if where in ("none", "wrong"):
            message, code = closed_with(ws)
            assert code == 4401 and message["error"]["code"] == "unauthorized", message
            return
        if where == "subprotocol":
            assert ws.subprotocol == "sam3.v1"
        start(ws)


def test_disconnect_frees_the_actor_and_its_place(ws_url, frames):
    with open_ws(ws_url) as first, open_ws(ws_url) as second:
        names = [f"sam3-stream:{APP}:{start(ws)['stream_id']}" for ws in (first, second)]
        assert all(stream_actors()[n] == "ALIVE" for n in names)
        with open_ws(ws_url) as third:  # the cap is 2
            third.send(json.dumps(START))
            message, code = closed_with(third)
        assert code == 4429 and "SAM3_VIDEO_MAX_STREAMS" in message["error"]["message"], message
        first.send(frames[0])
        assert recv(first)["type"] == "frame"
        first.send(frames[1])  # leave with a frame in flight
    for name in names:  # both sockets dropped without a close message
        wait_dead(name)
    with open_ws(ws_url) as again:  # their places are free again
        start(again)


def test_bad_frames_are_answered_and_the_stream_goes_on(ws_url, frames):
    big = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)  # > 64 KiB as PNG
    with open_ws(ws_url) as ws:
        start(ws)
        cases = [
            (b"not an image", "invalid_image", "could not decode"),
            (png(big), "payload_too_large", "SAM3_VIDEO_STREAM_MAX_FRAME_BYTES"),
            (png(np.zeros((150, 150, 3), np.uint8)), "payload_too_large", "SAM3_VIDEO_MAX_FRAME_PIXELS"),
            (frames[0][: len(frames[0]) // 2], "invalid_image", "truncated"),
        ]
        for seq, (data, code, words) in enumerate(cases):
            ws.send(data)
            reply = recv(ws)
            assert reply["type"] == "error" and reply["seq"] == seq, reply
            assert reply["error"]["code"] == code and words in reply["error"]["message"], reply
        ws.send(png(moving_frames(1, H, W)[0], "JPEG"))
        reply = recv(ws)
        assert reply["type"] == "frame" and reply["frame_index"] == 0 and reply["seq"] == len(cases), reply
        ws.send(png(moving_frames(1, H + 2, W)[0]))  # another size than the first frame
        reply = recv(ws)
        assert reply["error"]["code"] == "invalid_image" and "share one size" in reply["error"]["message"], reply
        ws.send(json.dumps({"type": "hello"}))
        assert recv(ws)["error"]["code"] == "bad_request"
        ws.send(frames[1])
        reply = recv(ws)
        assert reply["type"] == "frame" and reply["frame_index"] == 1, reply


@pytest.mark.parametrize("body,code,error", [
    ({"type": "start"}, 4400, "invalid_prompt"),
    ({"type": "start", "text": "square", "objects": START["objects"]}, 4400, "invalid_prompt"),
    ({"type": "start", "objects": [{"object_id": 1, "points": [[1, 2]] * 65}]}, 4400, "invalid_prompt"),
    ({"type": "start", "text": "x", "extra": 1}, 4422, "validation_error"),
    ("{not json", 4400, "bad_request"),
    (b"\x89PNG", 4400, "bad_request"),
])
def test_bad_start_messages_close_the_socket(ws_url, body, code, error):
    with open_ws(ws_url) as ws:
        ws.send(body if isinstance(body, (str, bytes)) else json.dumps(body))
        message, closed = closed_with(ws)
    assert closed == code and message["error"]["code"] == error, message


def test_frames_pushed_faster_than_tracked_are_dropped(ws_url, frames):
    burst = 20
    with open_ws(ws_url) as ws:
        start(ws)
        for i in range(burst):  # no waiting for replies
            ws.send(frames[i])
        replies = [recv(ws) for _ in range(burst)]
    by_seq = {r["seq"]: r for r in replies}
    assert sorted(by_seq) == list(range(burst)), "every frame gets exactly one reply"
    dropped = [r for r in replies if r["type"] == "dropped"]
    tracked = [r for r in replies if r["type"] == "frame"]
    assert dropped and all("SAM3_VIDEO_STREAM_MAX_IN_FLIGHT" in r["reason"] for r in dropped)
    assert [r["frame_index"] for r in tracked] == list(range(len(tracked)))  # dropped frames take no index
    assert [r["seq"] for r in tracked] == sorted(r["seq"] for r in tracked)  # results in push order
    assert by_seq[0]["type"] == by_seq[1]["type"] == "frame"  # the first max_in_flight were taken


def proxy_rss_bytes() -> int:
    """RSS of this node's Serve HTTP proxy (the process that buffers WebSocket messages for the app)."""
    return status_bytes("VmRSS", serve_processes(APP)["proxy"])


@pytest.mark.slow
def test_a_sender_ten_times_faster_than_tracking_for_30_s_keeps_proxy_and_actor_flat(ws_url, frames):
    """The app reads every message at once and answers `dropped` past its window, so neither Serve's proxy (which
    buffers WebSocket messages without a bound) nor the stream actor holds the frames the tracker has no time for."""
    import threading

    with open_ws(ws_url) as ws:
        stream_id = start(ws)["stream_id"]
        began = time.monotonic()
        for i in range(10):  # lock-step: how long one frame takes to track
            ws.send(frames[i])
            assert recv(ws)["type"] == "frame"
        per_frame = (time.monotonic() - began) / 10
        interval = per_frame / 10
        replies: list[dict] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set() or len(replies) < sent:
                try:
                    replies.append(recv(ws, timeout=60))
                except TimeoutError:
                    return

        sent = 0
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        samples: list[tuple[float, int, int]] = []
        t0 = next_sample = time.monotonic()
        while (now := time.monotonic()) - t0 < 30:
            ws.send(frames[sent % len(frames)])
            sent += 1
            if now >= next_sample:
                samples.append((now - t0, proxy_rss_bytes(), actor_info(stream_id)["rss_bytes"]))
                next_sample = now + 3
            time.sleep(max(0.0, t0 + sent * interval - time.monotonic()))
        done.set()
        samples.append((time.monotonic() - t0, proxy_rss_bytes(), actor_info(stream_id)["rss_bytes"]))
        reader.join(timeout=120)
    rate = sent / 30
    dropped = sum(r["type"] == "dropped" for r in replies)
    tracked = sum(r["type"] == "frame" for r in replies)
    mib = [(round(t), round(p / 2**20), round(a / 2**20)) for t, p, a in samples]
    print(f"tracking {1 / per_frame:.1f} frames/s, sent {sent} at {rate:.0f}/s: {tracked} tracked, {dropped} dropped; "
          f"(s, proxy MiB, actor MiB): {mib}")
    assert rate >= 5 / per_frame, "the sender kept well ahead of the tracker"
    assert sorted(r["seq"] for r in replies) == list(range(10, 10 + sent)), "every frame gets exactly one reply"
    assert dropped > tracked > 0
    settled = samples[1:]  # after the first few seconds' allocations
    for column, name in ((1, "proxy"), (2, "actor")):
        first, last = settled[0][column], max(s[column] for s in settled[-3:])
        assert last <= first * 1.10, f"the {name}'s RSS grew from {first / 2**20:.0f} to {last / 2**20:.0f} MiB"
