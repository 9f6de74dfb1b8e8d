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


def test_an_oversized_body_without_a_valid_key_is_401_not_413(keyed):
    """Keys first: an anonymous caller learns nothing of the limits; a key that travels in the body cannot be read
    from a body too large to read, so there the limit answers."""
    app, seen = keyed
    big = b"x" * (LIMIT + 10)
    for headers in ({}, {"x-api-key": "nope"}):
        r = _call(app, "POST", "/gt-header/raw", content=big, headers=headers)
        assert r.status_code == 401, (headers, r.text)
    r = _call(app, "POST", "/gt-flat/model?api_key=nope", content=big)
    assert r.status_code == 401 and r.json() == {"message": "invalid API key"}
    r = _call(app, "POST", "/gt-flat/model", content=big)
    assert r.status_code == 413 and r.json()["message"].startswith("request body is")
    assert seen["calls"] == 0


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


# ---------------------------------------------------------------- the in-flight budget (SAM3_INGRESS_MAX_INFLIGHT_BYTES)

BUDGET = 100_000


def _held_app(config: Config):
    """The gate's app plus a route that holds its request (and the body's reservation) until released."""
    from serve_app.core.http import Gate

    app, seen = _app(config)
    entered, release = asyncio.Event(), asyncio.Event()

    @app.post("/gt-header/hold")
    async def hold(request: Request) -> dict:
        data = await request.body()
        entered.set()
        await release.wait()
        return {"bytes": len(data)}

    @app.post("/gt-header/boom")
    async def boom(request: Request) -> dict:
        await request.body()
        raise RuntimeError("the route failed after reading its body")

    def budget():
        stack = app.middleware_stack
        while not isinstance(stack, Gate):
            stack = stack.app
        return stack.inflight

    return app, entered, release, budget


def _concurrently(app, first: dict, then: list[dict], entered: asyncio.Event, release: asyncio.Event):
    """Send `first` (to /gt-header/hold), wait until it holds its body, send `then` one by one, then release it."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as client:
            held = asyncio.create_task(client.request("POST", "/gt-header/hold", **first))
            await asyncio.wait_for(entered.wait(), 10)
            answers = [await client.request(r.pop("method", "POST"), r.pop("path"), **r) for r in then]
            release.set()
            return await held, answers

    return asyncio.run(go())


def test_a_request_past_the_in_flight_budget_is_429_in_its_providers_shape_with_retry_after():
    app, entered, release, budget = _held_app(Config(api_keys=[KEY], max_request_bytes=LIMIT * 4,
                                                     ingress_max_inflight_bytes=BUDGET))
    key = {"x-api-key": KEY}
    first, answers = _concurrently(app, {"content": b"a" * 60_000, "headers": key}, [
        {"path": "/gt-header/raw", "content": b"b" * 50_000, "headers": key},        # 60 + 50 kB > 100 kB: 429
        {"path": "/gt-header/raw", "content": b"c" * 30_000, "headers": key},        # 60 + 30 kB fits: 200
        {"path": "/gt-header/raw", "content": b"d" * 50_000},                         # no key: 401 before the budget
        {"path": "/gt-flat/model", "content": b"e" * 50_000, "params": {"api_key": KEY}},  # provider's shape
        {"path": "/gt-header/raw", "content": _chunks(50_000), "headers": key},      # chunked: 429 while reading
    ], entered, release)
    assert first.status_code == 200 and first.json() == {"bytes": 60_000}
    over, fits, unkeyed, flat, chunked = answers
    assert over.status_code == 429, over.text
    assert over.headers["retry-after"] == "1"
    error = over.json()["error"]
    assert error["code"] == "rate_limited" and "SAM3_INGRESS_MAX_INFLIGHT_BYTES" in error["message"]
    assert "60000 bytes" in error["message"] and "50000 more" in error["message"]
    assert fits.status_code == 200 and fits.json() == {"bytes": 30_000}
    assert unkeyed.status_code == 401
    assert flat.status_code == 429 and "SAM3_INGRESS_MAX_INFLIGHT_BYTES" in flat.json()["message"]
    assert chunked.status_code == 429 and chunked.headers["retry-after"] == "1", chunked.text
    assert budget().held == 0 and budget().refused == 3


def test_a_lone_request_larger_than_the_budget_gets_in_and_every_end_releases_its_reservation():
    app, entered, release, budget = _held_app(Config(api_keys=[KEY], max_request_bytes=LIMIT * 4,
                                                     ingress_max_inflight_bytes=BUDGET // 10))
    key = {"x-api-key": KEY}
    big = LIMIT * 3  # over the budget, under the request limit: alone on the replica, it is served
    r = _call(app, "POST", "/gt-header/raw", content=b"x" * big, headers=key)
    assert r.status_code == 200 and r.json() == {"bytes": big}
    r = _call(app, "POST", "/gt-header/raw", content=_chunks(big), headers=key)
    assert r.status_code == 200 and r.json() == {"bytes": big}
    for request in ({"content": b"x" * (LIMIT * 4 + 1)}, {"content": _chunks(LIMIT * 4 + 1)},  # 413s
                    {"content": b"{", "path": "/gt-header/model"}):                             # 422
        path = request.pop("path", "/gt-header/raw")
        assert _call(app, "POST", path, headers=key, **request).status_code in (413, 422)
    with pytest.raises(RuntimeError):
        _call(app, "POST", "/gt-header/boom", content=b"y" * 5_000, headers=key)
    assert budget().held == 0
    first, (second,) = _concurrently(app, {"content": b"z" * 5_000, "headers": key},
                                     [{"path": "/gt-header/raw", "content": b"w" * 6_000, "headers": key}],
                                     entered, release)
    assert first.status_code == 200 and second.status_code == 429
    assert budget().held == 0
