"""The gate in front of every route: keys before the body is parsed, body limits while it is read (chunked too)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel

from serve_app.core.config import Config
from serve_app.core.http import (
    body_limit,
    install_error_handlers,
    install_gate,
    key_rule,
    register_error_shape,
    register_key_rule,
)

KEY = "gate-test-key"
LIMIT = 64 * 1024


class Body(BaseModel):
    image: str
    count: int


def _app(config: Config) -> tuple[FastAPI, dict]:
    seen = {"bytes": 0, "calls": 0}
    app = FastAPI()
    install_error_handlers(app)
    install_gate(app, lambda: config)
    register_error_shape("/gt-flat/", lambda exc: {"message": exc.message})
    register_key_rule("/gt-header/", ("bearer", "header:x-api-key"), "a header")
    register_key_rule("/gt-flat/", ("bearer", "query:api_key", "body:api_key"), "header, query or body")

    @app.post("/gt-header/model")
    async def model(body: Body) -> dict:
        seen["calls"] += 1
        return {"count": body.count}

    @app.post("/gt-header/raw")
    async def raw(request: Request) -> dict:
        seen["calls"] += 1
        data = await request.body()
        seen["bytes"] = len(data)
        return {"bytes": len(data)}

    @app.post("/gt-flat/model")
    async def flat(body: dict) -> dict:
        seen["calls"] += 1
        return {"keys": sorted(body)}

    @app.post("/gt-open/raw")
    async def open_raw(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return app, seen


def _call(app: FastAPI, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def _chunks(total: int, size: int = 8192):
    async def gen():
        sent = 0
        while sent < total:
            n = min(size, total - sent)
            sent += n
            yield b"x" * n

    return gen()


@pytest.fixture()
def keyed():
    return _app(Config(api_keys=[KEY], max_request_bytes=LIMIT))


def test_no_key_and_a_malformed_body_is_401_not_400(keyed):
    app, seen = keyed
    for body in (b"{not json", b'{"image": 1}', b"\xff\xfe", b""):
        r = _call(app, "POST", "/gt-header/model", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 401, (body, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
    assert seen["calls"] == 0


def test_a_wrong_key_is_401_and_a_good_one_reaches_validation(keyed):
    app, _ = keyed
    r = _call(app, "POST", "/gt-header/model", content=b"{", headers={"x-api-key": "nope"})
    assert r.status_code == 401 and "invalid API key" in r.json()["error"]["message"]
    r = _call(app, "POST", "/gt-header/model", content=b"{", headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400
    r = _call(app, "POST", "/gt-header/model", json={"image": "a"}, headers={"x-api-key": KEY})
    assert r.status_code == 422


def test_a_body_key_is_read_within_the_limit_and_the_body_replayed(keyed):
    app, seen = keyed
    r = _call(app, "POST", "/gt-flat/model", json={"api_key": KEY, "image": "x"})
    assert r.status_code == 200 and r.json() == {"keys": ["api_key", "image"]}
    r = _call(app, "POST", "/gt-flat/model", json={"api_key": "wrong"})
    assert r.status_code == 401 and r.json() == {"message": "invalid API key"}  # the provider's own shape
    r = _call(app, "POST", "/gt-flat/model", content=b"[1, 2")
    assert r.status_code == 401 and "missing API key" in r.json()["message"]
    r = _call(app, "POST", "/gt-flat/model?api_key=" + KEY, json={"a": 1})
    assert r.status_code == 200
    r = _call(app, "POST", "/gt-flat/model", content=_chunks(LIMIT + 1))
    assert r.status_code == 413, r.text
    assert seen["calls"] == 2


def test_chunked_bodies_over_the_limit_are_413_while_reading(keyed):
    app, seen = keyed
    headers = {"x-api-key": KEY}
    r = _call(app, "POST", "/gt-header/raw", content=_chunks(LIMIT), headers=headers)
    assert r.status_code == 200 and r.json() == {"bytes": LIMIT}
    for path in ("/gt-header/raw", "/gt-header/model"):
        r = _call(app, "POST", path, content=_chunks(LIMIT + 1), headers=headers)
        assert r.status_code == 413, (path, r.text)
        body = r.json()["error"]
        assert body["code"] == "payload_too_large" and "SAM3_MAX_REQUEST_BYTES" in body["message"]


def test_declared_lengths_over_the_limit_are_refused_before_reading(keyed):
    app, seen = keyed
    r = _call(app, "POST", "/gt-header/raw", content=b"x" * (LIMIT + 10), headers={"x-api-key": KEY})
    assert r.status_code == 413 and seen["calls"] == 0


def test_reading_stops_at_the_first_chunk_over_the_limit():
    """The gate never pulls more than one chunk past the limit from the client."""
    config = Config(api_keys=[], max_request_bytes=LIMIT)
    app, _ = _app(config)
    pulled = {"n": 0}

    async def gen():
        for _ in range(10_000):  # 80 MB if it were read to the end
            pulled["n"] += 1
            yield b"y" * 8192

    r = _call(app, "POST", "/gt-open/raw", content=gen())
    assert r.status_code == 413
    assert pulled["n"] <= LIMIT // 8192 + 2, pulled


def test_auth_off_lets_everything_through_to_the_route():
    app, _ = _app(Config(api_keys=[], max_request_bytes=LIMIT))
    assert _call(app, "POST", "/gt-header/model", json={"image": "a", "count": 2}).json() == {"count": 2}


def test_video_uploads_get_the_video_limit_raw_or_base64():
    config = Config(max_request_bytes=1_000_000, video_max_bytes=3_000_000)
    assert body_limit("/v1/video/sessions", config, "video/mp4") == (3_000_000, "SAM3_VIDEO_MAX_BYTES")
    assert body_limit("/v1/video/sessions", config, "application/json")[0] >= 3_000_000 * 4 // 3
    assert body_limit("/v1/video/sessions/abc/prompts", config, "application/json")[1] == "SAM3_MAX_REQUEST_BYTES"


def test_every_provider_route_is_keyed():
    import deployments.ingress  # noqa: F401 - registers every provider's rules

    for path in ("/v1/image/segment", "/v1/video/sessions", "/v1/stats", "/v1/sam3-image", "/v2/sam3-image",
                 "/v2/requests/x/status", "/api/ai/images/edit", "/api/ai/queue", "/api/events", "/api/predict",
                 "/api/sam2_compatible", "/sam3/concept_segment"):
        assert key_rule(path) is not None, path
    for path in ("/healthz", "/readyz", "/api/media/abc", "/openapi.json", "/docs", "/ui/"):
        assert key_rule(path) is None, path
    assert key_rule("/v1/sam3-image").transports == ("header:x-api-key",)
    assert json.dumps(key_rule("/sam3/visual_segment").transports) == '["bearer", "query:api_key", "body:api_key"]'
