"""Overload on a real Serve graph: refusals at once in each front door's shape, per-key limits, deadlines, and
cancelled requests that cost the encoder and decoder (almost) nothing."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.core.config import Config
from tests.integration.conftest import deploy, undeploy

KEYS = ["flood-key", "other-key"]


def _jpeg_b64(seed: int, height: int = 240, width: int = 320) -> str:
    """A distinct image per seed: no request is a cache hit of another."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _body(seed: int, prompts: int = 1) -> dict:
    return {"image": _jpeg_b64(seed), "prompts": [{"type": "concept", "text": f"thing {i}"} for i in range(prompts)],
            "output": "rle"}


@pytest.fixture(scope="module")
def tight_url(serve_instance):
    """Two requests run at once, a line of at most 1 s, four in flight per key."""
    config = Config(api_keys=KEYS, admission_running_per_replica=2, admission_max_wait_s=1.0, max_inflight_per_key=4,
                    web_ui=False, video_warm_sessions=0)
    yield deploy("overload", config, serve_instance)
    undeploy("overload")


def _stats(url: str) -> dict:
    response = requests.get(f"{url}/v1/stats", headers={"x-api-key": KEYS[1]}, timeout=30)
    response.raise_for_status()
    return response.json()


def _post(url: str, path: str, payload: dict, headers: dict) -> tuple[int, object, dict, float]:
    started = time.perf_counter()
    response = requests.post(f"{url}{path}", json=payload, headers=headers, timeout=60)
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text}
    return response.status_code, response.headers, body, time.perf_counter() - started  # headers: case-insensitive


def test_a_burst_is_refused_at_once_in_the_native_shape_and_refusals_never_reach_the_model(tight_url):
    before = _stats(tight_url)["decoder"]["requests"]
    payloads = [_body(seed) for seed in range(24)]
    headers = {"x-api-key": KEYS[0]}
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda p: _post(tight_url, "/v1/image/segment", p, headers), payloads))
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 429, 503}, statuses
    ok = statuses.count(200)
    refused = [a for a in answers if a[0] != 200]
    assert ok >= 2 and refused, statuses
    for status, head, body, seconds in refused:
        assert "Retry-After" in head and int(head["Retry-After"]) >= 1, (status, head, body)
        assert body["error"]["code"] in ("overloaded", "rate_limited"), body
        assert seconds < 5.0  # answered at once, not after the admitted ones
    admission = _stats(tight_url)["admission"]
    assert admission["refused_overload"] + admission["refused_key_limit"] >= len(refused)
    # nothing refused reached the model: the decoder saw exactly the admitted requests
    assert _stats(tight_url)["decoder"]["requests"] - before == ok


def test_one_key_over_its_own_limit_gets_429_while_another_key_is_served(tight_url):
    payloads = [_body(100 + seed) for seed in range(12)]
    with ThreadPoolExecutor(13) as pool:
        flood = [pool.submit(_post, tight_url, "/v1/image/segment", p, {"x-api-key": KEYS[0]}) for p in payloads]
        time.sleep(0.05)
        other = pool.submit(_post, tight_url, "/v1/image/segment", _body(999), {"x-api-key": KEYS[1]})
        flood_statuses = [f.result()[0] for f in flood]
        assert 429 in flood_statuses or 503 in flood_statuses, flood_statuses
        assert other.result()[0] == 200, other.result()[2]
    assert _stats(tight_url)["admission"]["refused_key_limit"] >= 1


def test_refusals_in_each_front_doors_shape(tight_url):
    """Oxen, Roboflow and the HF Space answer an overload refusal in their own error shapes, with Retry-After."""
    image = _jpeg_b64(7)
    cases = [
        ("/api/ai/images/edit", {"model": "sam-3-image", "input_image": f"data:image/jpeg;base64,{image}",
                                 "prompt": "a thing"}, {"Authorization": f"Bearer {KEYS[0]}"}),
        ("/sam3/concept_segment", {"image": {"type": "base64", "value": image},
                                   "prompts": [{"type": "text", "text": "a thing"}]},
         {"Authorization": f"Bearer {KEYS[0]}"}),
        ("/api/sam2_compatible", {"inputs": {"image": image, "text_prompts": ["a thing"]}},
         {"Authorization": f"Bearer {KEYS[0]}"}),
    ]
    for path, payload, headers in cases:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: _post(tight_url, path, payload, headers), range(16)))
        refused = [a for a in answers if a[0] in (429, 503)]
        assert refused, (path, [a[0] for a in answers])
        assert all(a[0] in (200, 429, 503) for a in answers), (path, [(a[0], a[2]) for a in answers])
        for status, head, body, _ in refused:
            assert "Retry-After" in head
            assert "error" in body or "message" in body, (path, body)
            assert "overloaded" in json.dumps(body) or "capacity" in json.dumps(body) or "limit" in json.dumps(body)


def test_the_timeout_header_is_checked_and_shortens_the_deadline(tight_url):
    headers = {"x-api-key": KEYS[1]}
    status, _, body, _ = _post(tight_url, "/v1/image/segment", _body(5), {**headers, "X-Request-Timeout": "soon"})
    assert status == 400 and "X-Request-Timeout" in body["error"]["message"]
    # a deadline too short for the encoder: 504 (dropped), never a 5xx other than the deadline's own
    status, _, body, seconds = _post(tight_url, "/v1/image/segment", _body(6, prompts=16),
                                     {**headers, "X-Request-Timeout": "0.001"})
    assert status in (503, 504), body
    assert seconds < 5.0
    status, _, _, _ = _post(tight_url, "/v1/image/segment", _body(6), {**headers, "X-Request-Timeout": "60"})
    assert status == 200


@pytest.fixture(scope="module")
def wide_url(serve_instance):
    """Admission wide open (everything reaches the graph): what the encoder and decoder drop is theirs to drop."""
    config = Config(api_keys=KEYS, admission_running_per_replica=64, admission_max_wait_s=5.0,
                    max_inflight_per_key=64, encoder_max_batch_size=4, web_ui=False, video_warm_sessions=0)
    yield deploy("overload-wide", config, serve_instance)
    undeploy("overload-wide")


def _raw_request(url: str, payload: dict) -> bytes:
    parsed = urlparse(url)
    body = json.dumps(payload).encode()
    return (f"POST {parsed.path}/v1/image/segment HTTP/1.1\r\nHost: {parsed.netloc}\r\n"
            f"x-api-key: {KEYS[0]}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def test_twenty_requests_sent_and_dropped_at_once_cost_the_encoder_and_decoder_almost_nothing(wide_url):
    before = _stats(wide_url)
    parsed = urlparse(wide_url)
    sockets = []
    for seed in range(20):  # distinct images, eight prompts each: 20 encodes and 160 prompt decodes if all ran
        sock = socket.create_connection((parsed.hostname, parsed.port))
        sock.sendall(_raw_request(wide_url, _body(500 + seed, prompts=8)))
        sockets.append(sock)
    time.sleep(0.2)
    for sock in sockets:  # the clients leave
        sock.close()
    time.sleep(8.0)  # whatever still runs finishes or stops
    after = _stats(wide_url)
    encoded = after["encoder"]["images"] - before["encoder"]["images"]
    decoded = after["decoder"]["decoded"] - before["decoder"]["decoded"]
    dropped = {k: after["encoder"][k] - before["encoder"][k] for k in ("dropped_cancelled", "dropped_expired")}
    stopped = {k: after["decoder"][k] - before["decoder"][k]
               for k in ("dropped_cancelled", "stopped_cancelled", "dropped_expired", "stopped_expired")}
    print(f"encoded {encoded}/20, decoded {decoded}/20, encoder dropped {dropped}, decoder {stopped}")
    assert encoded <= 8, (encoded, dropped)  # the batch or two already running when the clients left
    assert decoded <= 2, (decoded, stopped)  # at most the decodes that finished a chunk before the stop
    # a live request afterwards is served as usual
    status, _, body, _ = _post(wide_url, "/v1/image/segment", _body(1), {"x-api-key": KEYS[1]})
    assert status == 200, body
