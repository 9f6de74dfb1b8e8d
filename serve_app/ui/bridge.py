"""HTTP requests to the web UI carried as messages: the ingress' /ui mount sends each request to the one process
that holds the Gradio app, and relays the response it streams back (Server-Sent Events included).

Gradio keeps its queue, sessions and uploads in its process: with several ingress replicas, a `queue/join` and
the `queue/data` stream that follows must reach the same Gradio app. So the app lives in one place (the WebUI
deployment) and every ingress replica forwards to it. Both halves are plain ASGI, free of Ray: `UIProxy` takes
a `Stream` (in Serve, a streaming call on the WebUI handle), `run_asgi` runs one request against the app.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from starlette.responses import JSONResponse

from serve_app.core.errors import NotFound, PayloadTooLarge, Sam3Error, ServiceUnavailable
from serve_app.core.http import native_error_body
from serve_app.core.logs import scope_request_id

logger = logging.getLogger(__name__)

Stream = Callable[[dict, bytes], AsyncIterator[dict]]  # (scope, body) -> the app's ASGI send messages
SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
              "headers", "server", "client")
LINGER_S = 5.0  # how long an app may take to notice its client went away before it is cancelled


def portable_scope(scope: dict) -> dict:
    """What the app needs of an HTTP scope, picklable: the routing framework's own objects stay behind."""
    out = {key: scope[key] for key in SCOPE_KEYS if key in scope}
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    out["client"] = tuple(scope["client"]) if scope.get("client") else None
    out["server"] = tuple(scope["server"]) if scope.get("server") else None
    return out


async def run_asgi(app, scope: dict, body: bytes) -> AsyncIterator[dict]:
    """One request through an ASGI app, yielding what it sends; a closed iterator is the client going away."""
    messages: asyncio.Queue = asyncio.Queue()
    finished, gone = object(), asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - reported as a 500 below if nothing was sent yet
            logger.exception("web UI request %s %s failed", scope.get("method"), scope.get("path"))
        finally:
            await messages.put(finished)

    task = asyncio.get_running_loop().create_task(run())
    started = False
    try:
        while (message := await messages.get()) is not finished:
            started = started or message["type"] == "http.response.start"
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                break
        if not started:
            yield {"type": "http.response.start", "status": 500,
                   "headers": [(b"content-type", b"text/plain; charset=utf-8")]}
            yield {"type": "http.response.body", "body": b"internal server error"}
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait({task}, timeout=LINGER_S)
            task.cancel()


class UIProxy:
    """ASGI, mounted in the ingress: each request (body read whole, within the limit) forwarded to `stream`."""

    def __init__(self) -> None:
        self._stream: Stream | None = None
        self._max_bytes = 64 * 1024 * 1024

    def connect(self, stream: Stream | None, max_bytes: int) -> None:
        self._stream, self._max_bytes = stream, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # Starlette does not forward it to mounts; the UI has its own
            return
        if scope["type"] != "http":  # Gradio's clients use HTTP and SSE only
            await send({"type": "websocket.close", "code": 1008})
            return
        try:
            if self._stream is None:
                raise NotFound("the web UI is off on this server (SAM3_WEB_UI=false)")
            body = await read_body(receive, self._max_bytes)
            responses = self._stream(portable_scope(scope), body)
        except Sam3Error as exc:
            await JSONResponse(status_code=exc.status_code, content=native_error_body(exc, scope_request_id(scope)))(
                scope, receive, send)
            return
        started = False
        try:
            async for message in responses:
                started = started or message["type"] == "http.response.start"
                await send(message)
        except Exception as exc:  # noqa: BLE001 - the UI's process died or restarts: say so, if we still can
            logger.warning("web UI request failed: %s", exc)
            if not started:
                unavailable = ServiceUnavailable("the web UI is restarting; retry in a moment")
                await JSONResponse(status_code=503, content=native_error_body(unavailable, scope_request_id(scope)))(
                    scope, receive, send)

    def __getstate__(self) -> dict:  # pickled with the ingress app before any replica runs: nothing to carry
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


async def read_body(receive, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ServiceUnavailable("the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"request body is over {max_bytes} bytes (SAM3_MAX_REQUEST_BYTES)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


ui_app = UIProxy()
