"""Live video streams over WebSocket: open a stream with a prompt, push frames, get each frame's objects back.

Protocol (docs/video-streams.md): `WS /v1/video/streams` opens a stream; `WS /v1/video/streams/{stream_id}` watches
one (same key only). Every error is a JSON message in the native error shape; fatal ones then close the socket with
4000 + the HTTP status the same error has on the REST routes (4401, 4404, 4422, 4429...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from serve_app.core.auth import bearer
from serve_app.core.errors import (
    BadRequest,
    GatewayTimeout,
    Gone,
    PayloadTooLarge,
    Sam3Error,
    ServiceUnavailable,
    ValidationFailed,
)
from serve_app.core.http import native_error_body, validation_error_message
from serve_app.image.prompts import check_text
from serve_app.image.service import SegmentService, get_service
from serve_app.video.stream_prompt import StreamObject, StreamPrompt, check_prompt
from serve_app.video.stream_backend import StreamBackend, get_stream_backend

logger = logging.getLogger(__name__)
Number = Annotated[float, Field(allow_inf_nan=False)]
START_TIMEOUT_S = 30.0  # the start message must come this soon after the socket opens
MAX_START_BYTES = 256 * 1024
SUBPROTOCOL = "sam3.v1"  # browsers: offer ["sam3.v1", "bearer.<key>"]; the server answers sam3.v1
KEY_SUBPROTOCOL = "bearer."
WATCH_WAIT_S = 5.0
CLOSE_NORMAL, CLOSE_INTERNAL = 1000, 1011


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamObjectIn(_Strict):
    object_id: int = Field(..., ge=0, le=1_000_000, description="Your id for the object, echoed in every result.")
    points: list[Annotated[list[Number], Field(min_length=2, max_length=2)]] = Field(
        default_factory=list, description="Clicks [x, y] in pixels of the first frame."
    )
    point_labels: list[Literal[0, 1]] | None = Field(None, description="1 = on the object, 0 = background.")
    box: Annotated[list[Number], Field(min_length=4, max_length=4)] | None = Field(
        None, description="[x0, y0, x1, y1] in pixels of the first frame."
    )


class StreamStartIn(_Strict):
    """The first message: what to track. `text` tracks every instance; `objects` track clicked/boxed objects."""

    type: Literal["start"]
    text: str | list[str] | None = Field(None, description="A noun phrase, or several, tracked on every frame.")
    objects: list[StreamObjectIn] | None = Field(None, description="Objects clicked/boxed on the first frame.")


router = APIRouter(tags=["video"])


def _key(websocket: WebSocket) -> str | None:
    """The API key: `Authorization: Bearer`, `x-api-key`, the `api_key` query parameter, or a `bearer.<key>`
    subprotocol (browsers cannot set headers on a WebSocket)."""
    offered = websocket.scope.get("subprotocols") or []
    return (
        bearer(websocket.headers.get("authorization")) or websocket.headers.get("x-api-key")
        or websocket.query_params.get("api_key")
        or next((p[len(KEY_SUBPROTOCOL):] for p in offered if p.startswith(KEY_SUBPROTOCOL)), None)
    )


def close_code(exc: Sam3Error) -> int:
    """4000 + the HTTP status of the error (4401, 4404, 4429...); 1011 for a server fault."""
    return 4000 + exc.status_code if 400 <= exc.status_code < 600 and exc.status_code != 500 else CLOSE_INTERNAL


def error_message(exc: Sam3Error, seq: int | None = None) -> dict:
    return {"type": "error", **({} if seq is None else {"seq": seq}), **native_error_body(exc)}


class _Socket:
    """One accepted WebSocket: sends serialised (results and drop notices come from two tasks), errors rendered."""

    def __init__(self, websocket: WebSocket) -> None:
        self.ws = websocket
        self._lock = asyncio.Lock()

    async def accept(self) -> None:
        offered = self.ws.scope.get("subprotocols") or []
        await self.ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)

    async def send(self, message: dict) -> None:
        async with self._lock:
            await self.ws.send_text(json.dumps(message, separators=(",", ":")))

    async def fail(self, exc: Sam3Error, seq: int | None = None) -> None:
        """Say what went wrong, then close with its code (when the client is still there)."""
        with contextlib.suppress(Exception):
            await self.send(error_message(exc, seq))
            await self.ws.close(close_code(exc), reason=exc.message[:120])

    async def close(self, code: int = CLOSE_NORMAL) -> None:
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)


async def _authenticate(sock: _Socket, service: SegmentService) -> str | None:
    """The caller's tenant, checked before anything else; on a bad key the socket is told and closed (4401)."""
    await sock.accept()
    try:
        return service.auth.tenant(_key(sock.ws), "`Authorization: Bearer <key>`, `x-api-key`, `?api_key=` or a "
                                                 "`bearer.<key>` subprotocol")
    except Sam3Error as exc:
        await sock.fail(exc)
        return None


def _parse_start(message: dict, service: SegmentService) -> StreamPrompt:
    text = message.get("text")
    if text is None:
        raise BadRequest("the first message must be the JSON start message (text), not a frame")
    if len(text) > MAX_START_BYTES:
        raise PayloadTooLarge(f"the start message is {len(text)} characters; the limit is {MAX_START_BYTES}")
    try:
        body = StreamStartIn.model_validate_json(text)
    except ValidationError as exc:
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            raise BadRequest("the start message is not valid JSON") from None
        raise ValidationFailed(f"invalid start message: {validation_error_message(exc.errors())}") from None
    texts = [body.text] if isinstance(body.text, str) else list(body.text or [])
    for phrase in texts:
        check_text(phrase, "text")
    prompt = StreamPrompt(
        texts=tuple(texts),
        objects=tuple(
            StreamObject(o.object_id, tuple(tuple(p) for p in o.points),
                         tuple(o.point_labels if o.point_labels is not None else [1] * len(o.points)),
                         tuple(o.box) if o.box is not None else None)
            for o in body.objects or []
        ),
    )
    check_prompt(prompt, service.config)
    return prompt


@router.websocket("/v1/video/streams")
async def open_stream(
    websocket: WebSocket, service: SegmentService = Depends(get_service),
    backend: StreamBackend = Depends(get_stream_backend),
) -> None:
    """Open a live stream: send the start message, then frames as binary messages; read one reply per frame."""
    sock = _Socket(websocket)
    tenant = await _authenticate(sock, service)
    if tenant is None:
        return
    try:
        first = await asyncio.wait_for(websocket.receive(), START_TIMEOUT_S)
    except asyncio.TimeoutError:
        await sock.fail(GatewayTimeout(f"no start message within {START_TIMEOUT_S:g} s"))
        return
    if first["type"] == "websocket.disconnect":
        return
    try:
        prompt = _parse_start(first, service)
        info = await backend.open(tenant, prompt)
    except Sam3Error as exc:
        await sock.fail(exc)
        return
    stream_id = info["stream_id"]
    try:
        await _run(sock, backend, service, stream_id, info)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(backend.close(stream_id, tenant))  # disconnect, error or done: free the stream


async def _run(sock: _Socket, backend: StreamBackend, service: SegmentService, stream_id: str, info: dict) -> None:
    config = service.config
    max_in_flight, max_bytes = config.video_stream_max_in_flight, config.video_stream_max_frame_bytes
    await sock.send({"type": "started", "stream_id": stream_id, "mode": info["mode"], "max_in_flight": max_in_flight,
                     "max_frame_bytes": max_bytes})
    pending: deque[tuple[int, asyncio.Task]] = deque()  # frames sent on, in order; each answered in that order
    wake = asyncio.Event()
    fatal: list[Sam3Error] = []
    tracked = [0]
    finished = asyncio.Event()  # the client asked to close and every frame it sent has been answered

    async def answer() -> None:
        while True:
            while not pending:
                if finished.is_set():
                    return
                wake.clear()
                await wake.wait()
            seq, task = pending[0]
            try:
                result = await task
                await sock.send({"type": "frame", "seq": seq, **result})
                tracked[0] += 1
            except Sam3Error as exc:
                if exc.status_code >= 500 or isinstance(exc, Gone):
                    fatal.append(exc)
                    await sock.fail(exc, seq)
                    return
                await sock.send(error_message(exc, seq))  # a bad frame: the stream goes on
            pending.popleft()

    answering = asyncio.create_task(answer())
    seq = number = 0
    try:
        while not answering.done():
            receive = asyncio.create_task(sock.ws.receive())
            done, _ = await asyncio.wait({receive, answering}, timeout=config.video_stream_idle_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                if not done:  # nothing from the client for the whole idle time
                    await sock.fail(GatewayTimeout(
                        f"no frame for {config.video_stream_idle_s:g} s (SAM3_VIDEO_STREAM_IDLE_S); the stream is closed"))
                break
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            if data is None:
                if _is_close(message.get("text")):
                    finished.set()
                    wake.set()
                    await answering
                    await sock.send({"type": "closed", "stream_id": stream_id, "frames": tracked[0]})
                    await sock.close()
                    break
                await sock.send(error_message(BadRequest(
                    'send frames as binary messages (JPEG/PNG bytes), or {"type": "close"} to end the stream')))
                continue
            if len(pending) >= max_in_flight:
                await sock.send({"type": "dropped", "seq": seq, "reason": f"{max_in_flight} frames are already in "
                                 "flight (SAM3_VIDEO_STREAM_MAX_IN_FLIGHT): wait for a reply before sending more"})
            elif len(data) > max_bytes:
                await sock.send(error_message(PayloadTooLarge(
                    f"the frame is {len(data)} bytes; the limit is {max_bytes} (SAM3_VIDEO_STREAM_MAX_FRAME_BYTES)"),
                    seq))
            else:
                pending.append((seq, asyncio.create_task(backend.push(stream_id, number, seq, data))))
                number += 1
                wake.set()
            seq += 1
    except WebSocketDisconnect:
        pass  # the client left mid-send: the caller frees the stream
    except Exception as exc:  # noqa: BLE001 - a bug: say so and close the stream
        if not isinstance(exc, Sam3Error):
            logger.exception("video stream %s failed", stream_id)
            exc = ServiceUnavailable("the stream failed on the server")
        await sock.fail(exc)
    finally:
        answering.cancel()
        if answering.done() and not answering.cancelled():
            answering.exception()  # retrieved: a send that failed because the client left is no news
        for _, task in pending:
            task.cancel()
        await sock.close(close_code(fatal[0]) if fatal else CLOSE_NORMAL)


def _is_close(text: str | None) -> bool:
    try:
        return isinstance(text, str) and json.loads(text).get("type") == "close"
    except (ValueError, AttributeError):
        return False


@router.websocket("/v1/video/streams/{stream_id}")
async def watch_stream(
    websocket: WebSocket, stream_id: str, service: SegmentService = Depends(get_service),
    backend: StreamBackend = Depends(get_stream_backend),
) -> None:
    """Watch an open stream of your key's: every frame result it produces from now on (read-only)."""
    sock = _Socket(websocket)
    tenant = await _authenticate(sock, service)
    if tenant is None:
        return
    try:
        watch_id = await backend.attach(stream_id, tenant)
    except Sam3Error as exc:
        await sock.fail(exc)  # another key's stream or an unknown id: 4404, as a session is 404
        return
    left = asyncio.create_task(websocket.receive())  # a viewer sends nothing; this returns when it leaves
    try:
        await sock.send({"type": "attached", "stream_id": stream_id})
        after = -1
        while not left.done():
            polled = asyncio.create_task(backend.watch(watch_id, after, WATCH_WAIT_S))
            await asyncio.wait({polled, left}, return_when=asyncio.FIRST_COMPLETED)
            if not polled.done():
                polled.cancel()
                break
            batch = polled.result()
            for message in batch["messages"]:
                await sock.send(message)
                after = message["seq"]
            if batch["closed"]:
                await sock.send({"type": "closed", "stream_id": stream_id})
                break
    except Gone:
        with contextlib.suppress(Exception):
            await sock.send({"type": "closed", "stream_id": stream_id})
    except Sam3Error as exc:
        await sock.fail(exc)
    except Exception:  # noqa: BLE001, S110 - the viewer went away mid-send
        pass
    finally:
        left.cancel()
        await backend.detach(watch_id)
        await sock.close()
