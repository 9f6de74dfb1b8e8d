"""Oxen.ai `sam-3-video` and the async queue through real Ray Serve and HTTP: every curl example of the video page
(sync, queue + poll, queue + SSE with the page's awk logic), the image page's queue examples, cancellation,
isolation between API keys, a worker killed mid-job, and bad input in Oxen's error shape."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import av
import pytest
import requests

from tests.integration.conftest import API_KEY, OTHER_KEY
from tests.integration.test_oxen_image import assert_error, headers, image_url

pytestmark = pytest.mark.integration

FRAMES, HEIGHT, WIDTH, FPS = 8, 96, 128, 10.0
GENERATE, QUEUE, EVENTS = "/api/ai/videos/generate", "/api/ai/queue", "/api/events"
VIDEO_KEYS = {"model", "created", "videos", "width", "height", "num_frames", "fps"}
IMAGE_KEYS = {"model", "created", "images", "mask", "masks", "width", "height"}
TERMINAL = ("succeeded", "failed", "cancelled")
DONE_WITHIN_S = 600


@pytest.fixture(scope="module")
def video_url(image_server) -> str:
    return f"{image_server}/video/{FRAMES}.mp4"


def post(url: str, path: str, body: dict, key: str | None = API_KEY) -> requests.Response:
    return requests.post(url + path, json=body, headers=headers(key), timeout=600)


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def enqueue(url: str, body: dict, key: str = API_KEY) -> str:
    """`curl -X POST .../api/ai/queue ... | jq -r '.generations[0].generation_id'`."""
    payload = ok(post(url, QUEUE, body, key))
    assert set(payload) == {"generations"} and len(payload["generations"]) == body.get("num_generations", 1)
    for generation in payload["generations"]:
        assert generation["status"] == "queued" and generation["model"] == body["model"]
    return payload["generations"][0]["generation_id"]


def status_of(url: str, gen_id: str, key: str = API_KEY) -> dict:
    return ok(requests.get(f"{url}{QUEUE}/{gen_id}", headers=headers(key), timeout=30))


def poll(url: str, gen_id: str, key: str = API_KEY, timeout_s: float = DONE_WITHIN_S) -> dict:
    """The page's loop: GET until `.status` is succeeded, failed or cancelled (every 0.5 s instead of 5 s)."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while True:
        record = status_of(url, gen_id, key)
        if not seen or seen[-1] != record["status"]:
            seen.append(record["status"])
        if record["status"] in TERMINAL:
            assert set(seen) <= {"queued", "running", *TERMINAL}, seen
            return record
        assert time.monotonic() < deadline, f"{gen_id} still {record['status']} after {timeout_s} s"
        time.sleep(0.5)


def awk(url: str, gen_id: str, key: str = API_KEY, timeout_s: float = DONE_WITHIN_S) -> str:
    """The page's awk over `curl -sN /api/events`: after `event: media_generation_completed`, the next `data: `
    line; print it if it holds "generation_id":"<id>", else keep reading."""
    deadline = time.monotonic() + timeout_s
    with requests.get(url + EVENTS, headers=headers(key), stream=True, timeout=(10, 30)) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        expect = False
        for line in response.iter_lines(chunk_size=None, decode_unicode=True):
            assert time.monotonic() < deadline, f"no media_generation_completed for {gen_id}"
            if line == "event: media_generation_completed":
                expect = True
                continue
            if line.startswith("data: ") and expect:
                payload = line[6:]
                if f'"generation_id":"{gen_id}"' in payload:
                    return payload
                expect = False
    raise AssertionError("the event stream ended")


def read_events(url: str, key: str, seconds: float) -> list[str]:
    """Every line of /api/events for `seconds`."""
    lines, deadline = [], time.monotonic() + seconds
    with requests.get(url + EVENTS, headers=headers(key), stream=True, timeout=(10, 30)) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines(chunk_size=None, decode_unicode=True):
            lines.append(line)
            if time.monotonic() > deadline:
                return lines
    return lines


def decode(data: bytes) -> tuple[int, int, int]:
    """(frames, width, height) of an mp4, decoded with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert frames, "no frame decoded"
    return len(frames), frames[0].shape[1], frames[0].shape[0]


def check_video_response(payload: dict, base_url: str) -> None:
    """The sync response shape, and the rendered video: fetchable without a key, the input's frames and size."""
    assert set(payload) == VIDEO_KEYS, payload
    assert payload["model"] == "sam-3-video" and abs(payload["created"] - time.time()) < 900
    assert (payload["width"], payload["height"], payload["num_frames"], payload["fps"]) == (WIDTH, HEIGHT, FRAMES, FPS)
    (video,) = payload["videos"]
    assert set(video) == {"url"} and video["url"].startswith(f"{base_url}/api/media/")
    response = requests.get(video["url"], timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    assert decode(response.content) == (FRAMES, WIDTH, HEIGHT)


def check_succeeded(record: dict, gen_id: str, base_url: str) -> None:
    assert record["generation_id"] == gen_id and record["status"] == "succeeded", record
    assert record["created"] <= record["started_at"] <= record["completed_at"]
    assert "error_message" not in record
    if record["model"] == "sam-3-video":
        assert record["type"] == "video"
        check_video_response(record["result"], base_url)
        assert record["result_url"] == record["result"]["videos"][0]["url"]
    else:
        assert record["type"] == "image" and set(record["result"]) == IMAGE_KEYS
        assert record["result_url"] == record["result"]["images"][0]["url"]
        response = requests.get(record["result_url"], timeout=30)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def seed_video_bodies(video: str) -> list[dict]:
    """The two request bodies of the video page (without, then with apply_mask)."""
    first = {"model": "sam-3-video", "input_video": video, "prompt": "the ox horns"}
    return [first, {**first, "apply_mask": True}]


def seed_image_bodies(image: str) -> list[dict]:
    first = {"model": "sam-3-image", "input_image": image, "prompt": "the ox horns"}
    return [first, {**first, "apply_mask": True, "output_format": "png"}]


# ------------------------------------------------------------------------------------------------ video page


@pytest.mark.parametrize("index", [0, 1], ids=["sync", "sync-apply-mask"])
def test_video_sync_examples(providers_url, video_url, index):
    payload = ok(post(providers_url, GENERATE, seed_video_bodies(video_url)[index]))
    check_video_response(payload, providers_url)


def test_video_sync_apply_mask_false_and_inline(providers_url, video_url):
    body = {"model": "sam-3-video", "input_video": video_url, "prompt": "the ox horns", "apply_mask": False,
            "response_format": "b64_json"}
    payload = ok(post(providers_url, GENERATE, body))
    assert set(payload["videos"][0]) == {"b64_json"}
    assert decode(base64.b64decode(payload["videos"][0]["b64_json"])) == (FRAMES, WIDTH, HEIGHT)


def test_video_queue_and_poll_examples(providers_url, video_url):
    ids = [enqueue(providers_url, body) for body in seed_video_bodies(video_url)]
    for gen_id, body in zip(ids, seed_video_bodies(video_url)):
        record = poll(providers_url, gen_id)
        check_succeeded(record, gen_id, providers_url)
        assert record["prompt"] == body["prompt"] and record["input_video"] == video_url
        assert record["apply_mask"] is True


def test_video_queue_and_sse_examples(providers_url, video_url):
    ids = [enqueue(providers_url, body) for body in seed_video_bodies(video_url)]
    for gen_id in ids:
        payload = awk(providers_url, gen_id)
        event = json.loads(payload)  # what `| jq .` pretty-prints
        assert event["generation_id"] == gen_id and event["status"] == "succeeded"
        assert event["result_url"].startswith(f"{providers_url}/api/media/")
        check_succeeded(status_of(providers_url, gen_id), gen_id, providers_url)


def test_video_model_object(providers_url):
    model = ok(requests.get(providers_url + "/api/ai/models/sam-3-video", headers=headers(), timeout=30))
    assert model["id"] == "sam-3-video" and model["name"] == "Segment Anything 3 - Video"
    assert model["endpoint"] == "/videos/generate" and model["capabilities"]["output"] == ["video"]
    schema = model["json_request_schema"]
    assert schema == model["request_schema"]
    props = schema["properties"]
    assert set(props) == {"input_video", "prompt", "apply_mask"}
    assert sorted(schema["required"]) == ["input_video", "prompt"]
    assert props["input_video"]["type"] == "string" and props["input_video"]["format"] == "uri"
    assert props["apply_mask"]["type"] == "boolean" and props["apply_mask"]["default"] is True
    assert all(p["description"] for p in props.values())
    listing = ok(requests.get(providers_url + "/api/ai/models", headers=headers(), timeout=30))
    assert [m["id"] for m in listing["data"]] == ["sam-3-image", "sam-3-video"]


# ------------------------------------------------------------------------------------------------ image page


def test_image_queue_and_poll_examples(providers_url, image_server):
    bodies = seed_image_bodies(image_url(image_server, 3, (96, 128)))
    ids = [enqueue(providers_url, body) for body in bodies]
    for gen_id in ids:
        check_succeeded(poll(providers_url, gen_id), gen_id, providers_url)


def test_image_queue_and_sse_examples(providers_url, image_server):
    for body in seed_image_bodies(image_url(image_server, 4, (96, 128))):
        gen_id = enqueue(providers_url, body)
        payload = awk(providers_url, gen_id)  # connects after enqueueing, as the page does: replayed if done
        assert f'"generation_id":"{gen_id}"' in payload and '"status":"succeeded"' in payload
        check_succeeded(status_of(providers_url, gen_id), gen_id, providers_url)


PAGE_AWK = r"""
/^event: media_generation_completed$/ { expect=1; next }
/^data: / && expect {
payload = substr($0, 7)
if (index(payload, "\"generation_id\":\"" id "\"")) { print payload; exit }
expect = 0
}
"""


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("awk")), reason="needs curl and awk")
def test_the_page_sse_pipeline_runs_as_written_with_curl_and_the_system_awk(providers_url, video_url):
    """`curl -sN .../api/events | awk -v id="$GEN_ID" '...'` verbatim, connected while the video job runs
    (Debian's awk, mawk, reads a pipe 4 KiB at a time: the event must not wait in its buffer)."""
    gen_id = enqueue(providers_url, seed_video_bodies(video_url)[0])
    script = f'curl -sN -H "Authorization: Bearer $KEY" {providers_url}{EVENTS} | awk -v id="$GEN_ID" \'{PAGE_AWK}\''
    env = {"PATH": os.environ["PATH"], "KEY": API_KEY, "GEN_ID": gen_id}
    with subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True,
                          start_new_session=True) as pipeline:
        try:
            out, _ = pipeline.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pipeline.pid, signal.SIGKILL)  # curl and awk too, whatever happened
    event = json.loads(out)
    assert event["generation_id"] == gen_id and event["status"] == "succeeded"


def test_queued_image_matches_the_sync_answer(providers_url, image_server):
    body = seed_image_bodies(image_url(image_server, 5, (96, 128)))[0]
    sync = ok(post(providers_url, "/api/ai/images/edit", body))
    queued = poll(providers_url, enqueue(providers_url, body))["result"]
    assert queued["masks"] == sync["masks"] and (queued["width"], queued["height"]) == (sync["width"], sync["height"])
    for a, b in ((sync["images"][0]["url"], queued["images"][0]["url"]), (sync["mask"]["url"], queued["mask"]["url"])):
        assert requests.get(a, timeout=30).content == requests.get(b, timeout=30).content


# ------------------------------------------------------------------------------------------------ queue semantics


def test_cancel_queued_and_running_generations(providers_url, image_server):
    body = {"model": "sam-3-video", "input_video": f"{image_server}/video/24.mp4", "prompt": "the ox horns",
            "num_generations": 4}
    payload = ok(post(providers_url, QUEUE, body))
    ids = [g["generation_id"] for g in payload["generations"]]
    assert len(set(ids)) == 4
    last = ids[-1]  # two runner slots: the fourth of four long jobs is still queued
    assert status_of(providers_url, last)["status"] == "queued"
    response = requests.delete(f"{providers_url}{QUEUE}/{last}", headers=headers(), timeout=30)
    assert ok(response)["status"] == "cancelled"
    for gen_id in ids[:-1]:
        ok(requests.delete(f"{providers_url}{QUEUE}/{gen_id}", headers=headers(), timeout=30))
    again = requests.delete(f"{providers_url}{QUEUE}/{last}", headers=headers(), timeout=30)
    assert ok(again)["status"] == "cancelled"
    time.sleep(3)
    for gen_id in ids:
        record = status_of(providers_url, gen_id)
        assert record["status"] == "cancelled" and record["error_code"] == "cancelled" and "result" not in record
    assert "started_at" not in status_of(providers_url, last), "cancelled while queued: never started"
    active = ok(requests.get(providers_url + QUEUE, headers=headers(), timeout=30))["generations"]
    assert not {g["generation_id"] for g in active} & set(ids)
    cancelled = [line for line in read_events(providers_url, API_KEY, 2) if last in line]
    assert len(cancelled) == 1 and '"status":"cancelled"' in cancelled[0]


def test_cancelling_a_finished_generation_is_a_conflict(providers_url, image_server):
    gen_id = enqueue(providers_url, seed_image_bodies(image_url(image_server, 6, (96, 128)))[0])
    assert poll(providers_url, gen_id)["status"] == "succeeded"
    response = requests.delete(f"{providers_url}{QUEUE}/{gen_id}", headers=headers(), timeout=30)
    assert_error(response, 409, "conflict", "already succeeded")


def test_another_key_sees_neither_the_generation_nor_its_events(providers_url, image_server):
    gen_id = enqueue(providers_url, seed_image_bodies(image_url(image_server, 7, (96, 128)))[0])
    for response in (
        requests.get(f"{providers_url}{QUEUE}/{gen_id}", headers=headers(OTHER_KEY), timeout=30),
        requests.delete(f"{providers_url}{QUEUE}/{gen_id}", headers=headers(OTHER_KEY), timeout=30),
    ):
        assert_error(response, 404, "resource_not_found", "generation not found")
    assert poll(providers_url, gen_id)["status"] == "succeeded"
    other = read_events(providers_url, OTHER_KEY, 3)
    assert ": ping" in other, "keep-alives flow"
    assert not [line for line in other if gen_id in line]
    mine = read_events(providers_url, API_KEY, 2)
    assert [line for line in mine if gen_id in line], "the owner's new connection replays it"
    listing = ok(requests.get(providers_url + QUEUE, headers=headers(OTHER_KEY), timeout=30))
    assert gen_id not in str(listing)


def test_a_job_that_fails_reports_why(providers_url):
    body = {"model": "sam-3-video", "prompt": "the ox horns",
            "input_video": "data:video/mp4;base64," + base64.b64encode(b"not a video at all").decode()}
    gen_id = enqueue(providers_url, body)
    record = poll(providers_url, gen_id, timeout_s=120)
    assert record["status"] == "failed" and record["error_code"] == "invalid_video" and record["error_message"]
    assert record["input_video"].startswith("data:video/mp4;base64,") and "result" not in record
    lines = read_events(providers_url, API_KEY, 2)
    index = next(i for i, line in enumerate(lines) if gen_id in line)
    assert lines[index - 1] == "event: media_generation_failed"


# ------------------------------------------------------------------------------------------------ bad input

VIDEO = {"model": "sam-3-video", "input_video": "https://example.com/v.mp4", "prompt": "the ox horns"}


def _without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


@pytest.mark.parametrize("path", [GENERATE, QUEUE], ids=["sync", "queue"])
@pytest.mark.parametrize(
    "body,status,code,words",
    [
        pytest.param(_without(VIDEO, "input_video"), 422, "validation_error", ("input_video", "required"),
                     id="no-video"),
        pytest.param(_without(VIDEO, "prompt"), 422, "validation_error", ("prompt", "required"), id="no-prompt"),
        pytest.param(_without(VIDEO, "model"), 422, "validation_error", ("model", "required"), id="no-model"),
        pytest.param({**VIDEO, "apply_mask": "yes"}, 422, "validation_error", ("apply_mask",), id="mask-yes"),
        pytest.param({**VIDEO, "input_video": "AAAA"}, 422, "validation_error", ("input_video", "uri"), id="not-uri"),
        pytest.param({**VIDEO, "model": "kling-video-v2"}, 404, "resource_not_found",
                     ("model not found", "kling-video-v2"), id="unknown-model"),
        pytest.param({**VIDEO, "input_video": "http://10.0.0.1/v.mp4"}, 400, "url_not_allowed", ("10.0.0.1",),
                     id="private-url"),
        pytest.param({**VIDEO, "input_video": "http://169.254.169.254/latest"}, 400, "url_not_allowed",
                     ("169.254.169.254",), id="metadata-url"),
    ],
)
def test_bad_video_requests_are_4xx_in_oxen_shape(providers_url, path, body, status, code, words):
    assert_error(post(providers_url, path, body), status, code, *words)


def test_not_a_video_and_blank_prompt(providers_url, video_url):
    garbage = "data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode()
    assert_error(post(providers_url, GENERATE, {**VIDEO, "input_video": garbage}), 400, "invalid_video")
    blank = {**VIDEO, "input_video": video_url, "prompt": "   "}
    assert_error(post(providers_url, GENERATE, blank), 400, "invalid_prompt", "blank")


def test_bad_queue_requests(providers_url, image_server):
    image = {"model": "sam-3-image", "input_image": image_url(image_server, 1, (96, 128)), "prompt": "x"}
    assert_error(post(providers_url, QUEUE, {**image, "num_generations": 5}), 422, "validation_error",
                 "num_generations")
    assert_error(post(providers_url, QUEUE, {**image, "output_format": "gif"}), 422, "validation_error",
                 "output_format")
    assert_error(post(providers_url, QUEUE, {**image, "model": "flux-2-dev"}), 404, "resource_not_found", "flux-2-dev")
    response = requests.post(providers_url + QUEUE, data="{not json", headers=headers(), timeout=30)
    assert_error(response, 400, "bad_request", "json")
    assert_error(post(providers_url, QUEUE, [image]), 422, "validation_error", "object")


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["missing", "wrong"])
def test_every_route_needs_a_key(providers_url, key):
    assert_error(post(providers_url, GENERATE, VIDEO, key), 401, "unauthorized")
    assert_error(post(providers_url, QUEUE, VIDEO, key), 401, "unauthorized")
    assert_error(post(providers_url, QUEUE, {"model": 1}, key), 401, "unauthorized")
    for method, path in (("GET", QUEUE), ("GET", f"{QUEUE}/x"), ("DELETE", f"{QUEUE}/x"), ("GET", EVENTS),
                         ("GET", "/api/ai/models/sam-3-video")):
        response = requests.request(method, providers_url + path, headers=headers(key), timeout=30)
        assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize("gen_id", ["8f1d7f0e-6a4c-4f2e-9b1a-2c3d4e5f6a7b", "not-an-id", "x" * 300])
def test_unknown_generation_id_is_404(providers_url, gen_id):
    for method in ("GET", "DELETE"):
        response = requests.request(method, f"{providers_url}{QUEUE}/{gen_id}", headers=headers(), timeout=30)
        assert_error(response, 404, "resource_not_found", "generation not found")


# ------------------------------------------------------------------------------------------------ worker death (last)


def _runner_actor_names(app: str = "providers") -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#JobRunner#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def test_killing_the_worker_fails_its_job_and_the_queue_recovers(providers_url, image_server):
    import ray

    body = {"model": "sam-3-video", "input_video": f"{image_server}/video/16.mp4", "prompt": "the ox horns"}
    gen_id = enqueue(providers_url, body)
    deadline = time.monotonic() + 120
    while status_of(providers_url, gen_id)["status"] != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    (name,) = _runner_actor_names()
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    killed = time.monotonic()
    record = poll(providers_url, gen_id, timeout_s=60)
    assert record["status"] == "failed", record
    assert record["error_code"] == "worker_died"
    assert record["error_message"].startswith("the worker running this job died")
    assert time.monotonic() - killed < 40, "failed within the heartbeat timeout (15 s) and a sweep"
    assert status_of(providers_url, gen_id)["status"] == "failed", "and it stays failed"
    lines = read_events(providers_url, API_KEY, 2)
    index = next(i for i, line in enumerate(lines) if gen_id in line)
    assert lines[index - 1] == "event: media_generation_failed"
    # Serve replaces the runner; new work runs again
    image = seed_image_bodies(image_url(image_server, 8, (96, 128)))[0]
    after = enqueue(providers_url, image)
    assert poll(providers_url, after, timeout_s=180)["status"] == "succeeded"
    assert _runner_actor_names() and _runner_actor_names() != [name]


def test_a_restarted_job_store_loses_no_generation(providers_url, image_server):
    """The store's records are in the shared state store: a video generation queued or running when the store
    replica dies still ends `succeeded`, and unknown ids stay a plain 404."""
    import ray

    body = {"model": "sam-3-video", "input_video": f"{image_server}/video/{FRAMES}.mp4", "prompt": "the ox horns"}
    gen_id = enqueue(providers_url, body)
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith("SERVE_REPLICA::providers#JobStore#")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 180
    while True:
        response = requests.get(f"{providers_url}{QUEUE}/{gen_id}", headers=headers(), timeout=30)
        if response.status_code == 200 and response.json()["status"] in ("succeeded", "failed", "cancelled"):
            break
        assert response.status_code in (200, 503, 504) and time.monotonic() < deadline, response.text
        time.sleep(0.5)
    check_succeeded(response.json(), gen_id, providers_url)
    assert_error(requests.get(f"{providers_url}{QUEUE}/{uuid.uuid4()}", headers=headers(), timeout=30), 404,
                 "resource_not_found")
    image = seed_image_bodies(image_url(image_server, 10, (96, 128)))[0]
    assert poll(providers_url, enqueue(providers_url, image), timeout_s=180)["status"] == "succeeded"
