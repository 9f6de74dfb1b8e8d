"""Hostile input against one served app: keys before bodies, body limits while reading, video uploads refused before
an actor starts, capped video prompts, strings no encoder can take; then the app is healthy and no worker grew.

The first test records every Ray worker's RSS, the last compares (within 20%) and prints the table.
"""

from __future__ import annotations

import json
import select
import socket
import time
from urllib.parse import urlparse

import pytest
import requests

from tests.integration.conftest import API_KEY, png_b64, random_image
from tests.videos import write_video

BEARER = {"Authorization": f"Bearer {API_KEY}"}
KEYS = {"Authorization": f"Bearer {API_KEY}", "x-api-key": API_KEY}
MIB = 1024 * 1024
RSS: dict[str, dict[int, int]] = {}


def _shape(path: str):
    """Each provider's error shape: a function of the body that is true when it is that provider's error."""
    if path.startswith("/v1/sam3-image") or path.startswith("/v2/"):
        return lambda b: isinstance(b.get("error"), str) and "code" in b
    if path.startswith("/api/ai") or path.startswith("/api/events"):
        return lambda b: b.get("status") == "error" and isinstance(b.get("status_description"), str)
    if path.startswith("/sam3/"):
        return lambda b: set(b) == {"message"}
    if path.startswith("/api/predict") or path.startswith("/api/sam2_compatible"):
        return lambda b: b.get("success") is False and isinstance(b.get("error"), str)
    return lambda b: isinstance(b.get("error"), dict) and {"code", "message"} <= set(b["error"])


KEYED_POSTS = [
    "/v1/image/segment", "/v1/sam3-image", "/v2/sam3-image", "/api/ai/images/edit", "/api/ai/videos/generate",
    "/api/ai/queue", "/sam3/concept_segment", "/sam3/visual_segment", "/sam3/embed_image", "/api/predict",
    "/api/sam2_compatible", "/v1/video/sessions", "/v1/video/sessions/abc/prompts", "/v1/video/sessions/abc/propagate",
]
KEYED_GETS = ["/v1/stats", "/api/ai/queue", "/api/ai/models", "/v2/requests/abc/status", "/v1/video/sessions/abc"]
IMAGE_POSTS = [p for p in KEYED_POSTS[:11] if "videos" not in p and p != "/api/ai/queue"]


def _actors() -> list[dict]:
    """Every actor this cluster's GCS knows of, dead ones included (Ray's legacy state table: no dashboard needed)."""
    from ray._private import state

    return list(state.actors().values())


def _memory(pid: int) -> dict[str, int] | None:
    """VmRSS and its parts (bytes): RssAnon is the process' own memory; RssShmem is Ray's shared object store
    mapped into it (bounded by the store's size, shared by every worker), RssFile its code and libraries."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if line.startswith(("VmRSS", "RssAnon", "RssShmem")))
    except OSError:
        return None
    return {key: int(value.split()[0]) * 1024 for key, value in fields.items()}


def _worker_rss() -> dict[int, tuple[str, dict[str, int]]]:
    """pid -> (actor class and name, memory) of every live actor (proxy, controller, replicas, sessions)."""
    found = {}
    for actor in _actors():
        if actor["State"] != "ALIVE" or not actor["Pid"]:
            continue
        memory = _memory(actor["Pid"])
        if memory:
            found[actor["Pid"]] = (f"{actor['ActorClassName']}:{actor['Name']}"[:48], memory)
    return found


def test_00_record_worker_rss(providers_url):
    # warm every deployment once, so the baseline is a served app, not a cold one
    assert requests.post(f"{providers_url}/v1/image/segment", headers=BEARER, timeout=120, json={
        "image": png_b64(random_image(1)), "prompts": [{"type": "concept", "text": "cat"}]}).status_code == 200
    RSS["start"] = {pid: memory for pid, (_, memory) in _worker_rss().items()}
    assert RSS["start"]


# ---------------------------------------------------------------- keys before anything else

@pytest.mark.parametrize("path", KEYED_POSTS)
@pytest.mark.parametrize("body", [b"{not json", b'{"prompts": 7, "image": [1]}', b"\xff\xfe\x00", b""],
                         ids=["malformed", "schema-breaking", "not-utf8", "empty"])
def test_no_key_is_401_whatever_the_body(providers_url, path, body):
    r = requests.post(f"{providers_url}{path}", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 401, (path, r.status_code, r.text[:300])
    assert _shape(path)(r.json()), (path, r.text[:300])


@pytest.mark.parametrize("path", KEYED_GETS)
def test_no_key_on_reads_is_401(providers_url, path):
    r = requests.get(f"{providers_url}{path}", timeout=30)
    assert r.status_code == 401 and _shape(path)(r.json()), (path, r.text[:300])


def test_a_wrong_key_is_401_in_each_transport(providers_url):
    for path, headers, params in [
        ("/v1/image/segment", {"x-api-key": "nope"}, None), ("/v1/image/segment", {"Authorization": "Bearer x"}, None),
        ("/v1/sam3-image", {"x-api-key": "nope"}, None), ("/sam3/concept_segment", {}, {"api_key": "nope"}),
        ("/api/ai/images/edit", {"Authorization": "Bearer nope"}, None),
    ]:
        r = requests.post(f"{providers_url}{path}", data=b"{", headers=headers, params=params, timeout=30)
        assert r.status_code == 401 and _shape(path)(r.json()), (path, r.text)
    r = requests.post(f"{providers_url}/sam3/concept_segment", json={"api_key": "nope", "image": 1}, timeout=30)
    assert r.status_code == 401 and r.json() == {"message": "invalid API key"}


# ---------------------------------------------------------------- body limits while reading

def _chunked_post(url: str, path: str, headers: dict, total: int, chunk: int = 256 * 1024) -> tuple[int, dict, int]:
    """POST `total` bytes with Transfer-Encoding: chunked, as a careful client does: stop sending once the server
    has answered. Returns (status, JSON body, bytes sent)."""
    target = urlparse(url)
    sock = socket.create_connection((target.hostname, target.port), timeout=60)
    try:
        head = [f"POST {target.path}{path} HTTP/1.1", f"Host: {target.hostname}", "Transfer-Encoding: chunked",
                "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        sock.sendall("\r\n".join(head).encode())
        sent, piece = 0, b"7" * chunk
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer is here: stop uploading
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        else:
            sock.sendall(b"0\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 60
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            if time.monotonic() > deadline:
                raise AssertionError(f"no complete answer after sending {sent} bytes: {data[:200]!r}")
            more = sock.recv(65536)
            if not more:
                break
            data += more
        header, _, body = data.partition(b"\r\n\r\n")
        return int(header.split()[1]), json.loads(body[: _length(data)] or b"{}"), sent
    finally:
        sock.close()


def _length(data: bytes) -> int:
    header = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    for line in header.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":")[1])
    return 0


@pytest.mark.parametrize("path", IMAGE_POSTS)
def test_chunked_bodies_over_the_limit_are_413_before_they_are_all_sent(providers_url, path):
    """Serve's proxy reads a body ahead of the replica without bound (docs/operations.md), so the client may send
    well past the limit before the 413 reaches it; the route never sees more than the limit, and memory returns."""
    limit = 64 * MIB  # SAM3_MAX_REQUEST_BYTES's default, the providers app's limit
    status, body, sent = _chunked_post(providers_url, path, KEYS, total=4 * limit)
    print(f"{path}: 413 after the client sent {sent / MIB:.0f} MiB (limit {limit / MIB:.0f} MiB)")
    assert status == 413, (path, status, body)
    assert _shape(path)(body) and "SAM3_MAX_REQUEST_BYTES" in json.dumps(body), body


def test_raw_video_upload_over_the_video_limit_is_413_while_reading(providers_url):
    status, body, sent = _chunked_post(providers_url, "/v1/video/sessions", {**KEYS, "Content-Type": "video/mp4"},
                                       total=600 * MIB, chunk=1024 * 1024)
    print(f"raw video: 413 after the client sent {sent / MIB:.0f} MiB (limit 200 MiB)")
    assert status == 413 and "SAM3_VIDEO_MAX_BYTES" in body["error"]["message"], body


# ---------------------------------------------------------------- video uploads: refused before any actor starts

def _session_actors() -> int:
    return sum(actor["ActorClassName"] == "SessionActor" for actor in _actors())


@pytest.mark.parametrize("make, words", [
    (lambda url: requests.post(url, data=b"", headers={**BEARER, "Content-Type": "video/mp4"}, timeout=30), "empty"),
    (lambda url: requests.post(url, json={"frames": []}, headers=BEARER, timeout=30), "frames"),
    (lambda url: requests.post(url, data=b"not a video at all" * 100, headers={**BEARER, "Content-Type": "video/mp4"},
                               timeout=30), "could not open video"),
    (lambda url: requests.post(url, json={"video": "aGVsbG8gd29ybGQ="}, headers=BEARER, timeout=30), "video"),
    (lambda url: requests.post(url, data=write_video(20, 64, 96)[:300], headers={**BEARER, "Content-Type": "video/mp4"},
                               timeout=30), "video"),
], ids=["zero-bytes", "no-frames", "text", "base64-text", "truncated"])
def test_refused_uploads_start_no_actor(providers_url, make, words):
    before = _session_actors()
    started = time.perf_counter()
    r = make(f"{providers_url}/v1/video/sessions")
    elapsed = time.perf_counter() - started
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert _session_actors() == before, "a refused upload started a session actor"
    assert elapsed < 3.0, f"refusing took {elapsed:.1f} s"


def test_oxen_video_refused_before_an_actor(providers_url):
    before = _session_actors()
    r = requests.post(f"{providers_url}/api/ai/videos/generate", headers=BEARER, timeout=30, json={
        "model": "sam-3-video", "prompt": "cat", "input_video": "data:video/mp4;base64,aGVsbG8gd29ybGQ="})
    assert r.status_code == 400 and r.json()["status"] == "error", r.text
    assert _session_actors() == before


# ---------------------------------------------------------------- video prompts are capped like image prompts

@pytest.fixture(scope="module")
def session(providers_url):
    r = requests.post(f"{providers_url}/v1/video/sessions", data=write_video(6, 48, 64),
                      headers={**BEARER, "Content-Type": "video/mp4"}, timeout=120)
    assert r.status_code == 201, r.text
    yield r.json()["session_id"]
    requests.delete(f"{providers_url}/v1/video/sessions/{r.json()['session_id']}", headers=BEARER, timeout=30)


@pytest.mark.parametrize("count", [65, 10_000, 100_000])
def test_many_clicks_are_refused_at_once(providers_url, session, count):
    started = time.perf_counter()
    r = requests.post(f"{providers_url}/v1/video/sessions/{session}/prompts", headers=BEARER, timeout=60, json={
        "frame_index": 0, "object_id": 1, "points": [[10, 10]] * count, "point_labels": [1] * count})
    assert r.status_code == 400 and "SAM3_MAX_POINTS" in r.json()["error"]["message"], r.text[:300]
    assert time.perf_counter() - started < 10


def test_clicks_at_the_cap_work(providers_url, session):
    r = requests.post(f"{providers_url}/v1/video/sessions/{session}/prompts", headers=BEARER, timeout=120, json={
        "frame_index": 0, "object_id": 1, "points": [[10 + i % 40, 10 + i % 30] for i in range(64)]})
    assert r.status_code == 200, r.text[:300]


# ---------------------------------------------------------------- strings no encoder can take

HOSTILE_STRINGS = {"lone-surrogate": "\ud800", "nul": "a\x00b", "100kb": "x" * 100_000, "rtl-bom": "\ufeff\u202e"}
PRINTABLE = {"rtl-bom"}
STRING_BODIES = [
    ("/v1/image/segment", lambda s: {"image": s, "prompts": [{"type": "concept", "text": s}]}),
    ("/v1/image/segment", lambda s: {"image": png_b64(random_image(2)), "image_id": s,
                                     "prompts": [{"type": "concept", "text": s}]}),
    ("/v1/sam3-image", lambda s: {"image": png_b64(random_image(2)), "text_prompt": s}),
    ("/api/ai/images/edit", lambda s: {"model": s, "prompt": s, "input_image": png_b64(random_image(2))}),
    ("/api/ai/queue", lambda s: {"model": s, "prompt": "cat", "input_image": s}),
    ("/api/ai/videos/generate", lambda s: {"model": "sam-3-video", "prompt": s, "input_video": s}),
    ("/sam3/concept_segment", lambda s: {"image": {"type": "base64", "value": s}, "prompts": [{"text": s}]}),
    ("/sam3/visual_segment", lambda s: {"image": {"type": "base64", "value": png_b64(random_image(2))},
                                        "image_id": s, "prompts": {"prompts": [{"points": []}]}}),
    ("/api/predict", lambda s: {"data": [s, s, 0.5]}),
    ("/api/sam2_compatible", lambda s: {"inputs": {"image": s, "text_prompts": [s]}}),
    ("/v1/video/sessions", lambda s: {"video": s}),
    ("/v1/video/sessions/abc/prompts", lambda s: {"text": s, "frame_index": 0}),
]


@pytest.mark.parametrize("name", list(HOSTILE_STRINGS))
@pytest.mark.parametrize("path, make", STRING_BODIES, ids=[f"{p}#{i}" for i, (p, _) in enumerate(STRING_BODIES)])
def test_hostile_strings_are_4xx_in_the_provider_shape(providers_url, path, make, name):
    raw = json.dumps(make(HOSTILE_STRINGS[name]))  # ensure_ascii: the lone surrogate travels as \ud800
    r = requests.post(f"{providers_url}{path}", data=raw, headers={**KEYS, "content-type": "application/json"},
                      timeout=120)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    if name in PRINTABLE:  # unusual but printable text is a valid prompt or id: any answer but a 5xx
        assert r.status_code < 500, (path, name, r.status_code, r.text[:300])
        return
    assert 400 <= r.status_code < 500, (path, name, r.status_code, r.text[:300])
    assert _shape(path)(r.json()), (path, r.text[:300])


# ---------------------------------------------------------------- afterwards: healthy, and nothing grew

def test_zz_healthy_and_no_worker_grew(providers_url):
    assert requests.get(f"{providers_url}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.post(f"{providers_url}/v1/image/segment", headers=BEARER, timeout=120, json={
        "image": png_b64(random_image(3)), "prompts": [{"type": "concept", "text": "dog"}]}).status_code == 200
    start = RSS.get("start")
    if not start:
        pytest.skip("the baseline test did not run")
    now = _worker_rss()
    rows, grown = [], []
    for pid, (name, memory) in sorted(now.items(), key=lambda item: item[1][0]):
        if pid not in start:
            continue
        before = start[pid]
        ratio = memory["RssAnon"] / before["RssAnon"]
        rows.append(f"  {name:<48} private {before['RssAnon'] / MIB:7.1f} -> {memory['RssAnon'] / MIB:7.1f} MiB "
                    f"{ratio - 1:+6.1%}   (VmRSS {before['VmRSS'] / MIB:7.1f} -> {memory['VmRSS'] / MIB:7.1f}, "
                    f"object store mapped {before['RssShmem'] / MIB:5.1f} -> {memory['RssShmem'] / MIB:5.1f})")
        if ratio > 1.20:
            grown.append(name)
    print("\nRay workers' memory before -> after the hostile-input tests:\n" + "\n".join(rows))
    assert not grown, f"private memory grew more than 20%: {grown}"
