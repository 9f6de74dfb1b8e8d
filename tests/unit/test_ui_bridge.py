"""The /ui bridge without Ray: the ingress-side proxy relays requests to an ASGI app run elsewhere and its
responses back (streamed ones too), and says so in the native shape when it cannot."""

from __future__ import annotations

import asyncio
import pickle

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Mount, Route

from serve_app.ui.bridge import UIProxy, portable_scope, run_asgi


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"body": (await request.body()).decode(), "root_path": request.scope["root_path"],
                         "url": str(request.url), "query": request.query_params.get("q")})


async def events(request: Request) -> StreamingResponse:
    async def stream():
        for i in range(3):
            yield f"data: {i}\n\n"
            await asyncio.sleep(0)
    return StreamingResponse(stream(), media_type="text/event-stream")


async def broken(request: Request) -> JSONResponse:
    raise RuntimeError("boom")


UI = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/events", events), Route("/broken", broken)])
SEEN: list[set] = []  # the keys of each forwarded scope


def relayed(scope: dict, body: bytes):
    SEEN.append(set(scope))
    crossed = pickle.loads(pickle.dumps(scope))  # what crosses the process boundary must pickle
    return run_asgi(UI, crossed, body)  # routed below root_path, as the WebUI runs its app


def front(proxy: UIProxy) -> httpx.AsyncClient:
    """The ingress: the proxy mounted at /app/ui, as Serve's route prefix /app and the mount make it."""
    outer = Starlette(routes=[Mount("/app/ui", app=proxy)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://sam3.example")


def call(proxy: UIProxy, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with front(proxy) as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


@pytest.fixture
def proxy() -> UIProxy:
    p = UIProxy()
    p.connect(relayed, max_bytes=1000)
    return p


def test_a_request_arrives_whole_with_its_public_url(proxy):
    response = call(proxy, "POST", "/app/ui/echo?q=1", content=b"hello")
    assert response.status_code == 200
    assert response.json() == {"body": "hello", "root_path": "/app/ui", "url": "http://sam3.example/app/ui/echo?q=1",
                               "query": "1"}
    assert SEEN[-1] <= {"type", "http_version", "method", "scheme", "path", "raw_path", "root_path",
                             "query_string", "headers", "server", "client"}


def test_a_stream_is_relayed(proxy):
    response = call(proxy, "GET", "/app/ui/events")
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_an_app_error_is_a_500(proxy):
    response = call(proxy, "GET", "/app/ui/broken")
    assert response.status_code == 500


def test_limits_and_absence_answer_in_the_native_shape(proxy):
    too_big = call(proxy, "POST", "/app/ui/echo", content=b"x" * 1001)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    absent = call(UIProxy(), "GET", "/app/ui/events")
    assert absent.status_code == 404 and "SAM3_WEB_UI=false" in absent.json()["error"]["message"]


def test_a_dead_ui_process_is_a_503():
    async def dying(scope, body):
        raise ConnectionError("actor died")
        yield  # an async generator, as the handle's stream is

    proxy = UIProxy()
    proxy.connect(dying, max_bytes=1000)
    response = call(proxy, "GET", "/app/ui/events")
    assert response.status_code == 503 and "restarting" in response.json()["error"]["message"]


def test_the_proxy_pickles_empty():
    proxy = UIProxy()
    proxy.connect(relayed, max_bytes=5)
    assert pickle.loads(pickle.dumps(proxy))._stream is None


def test_portable_scope_keeps_only_plain_values():
    scope = {"type": "http", "path": "/x", "headers": [(b"a", b"b")], "app": object(), "client": ["1.2.3.4", 5]}
    assert portable_scope(scope) == {"type": "http", "path": "/x", "headers": [(b"a", b"b")],
                                     "client": ("1.2.3.4", 5), "server": None}
