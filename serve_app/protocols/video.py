"""The native video session API: start, add_prompt, propagate (streamed NDJSON or SSE), remove_object, reset, close."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.core.auth import bearer
from serve_app.core.config import Config
from serve_app.core.errors import (
    BadRequest,
    InvalidPrompt,
    InvalidVideo,
    PayloadTooLarge,
    Sam3Error,
    ValidationFailed,
)
from serve_app.core.http import validation_error_message
from serve_app.core.openapi import NativeError, error_responses, request_body
from serve_app.core.registry import LITE_ARCH
from serve_app.core.security import UrlFetcher
from serve_app.image.prompts import check_text
from serve_app.image.service import SegmentService, get_service
from serve_app.video.backend import VideoBackend, get_video_backend
from serve_app.video.io import VideoLimits, check_resolution, probe_video, video_bytes_from_base64

MAX_FRAME_LIST = 2000
Number = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionCreateIn(_Strict):
    """Start a session from a video (base64, data URI or http(s) URL) or from a list of frames."""

    video: str | None = Field(None, description="An mp4 / webm / mov video: base64, data URI, or http(s) URL.")
    frames: list[str] | None = Field(
        None, max_length=MAX_FRAME_LIST, description="Frames as images (base64 / data URI / URL), in order."
    )
    fps: float | None = Field(None, gt=0, le=240, description="Frame rate of `frames` (default 25).")
    model: str | None = Field(None, max_length=64, description="The served model that tracks (`GET /v1/models`; a "
                              "sam3_video one); omitted: the default. A raw-body upload names it as `?model=`.")


class PromptIn(_Strict):
    """One prompt on one frame: text tracks every instance; points and/or a box track one object."""

    frame_index: int = Field(0, ge=0, description="The frame the prompt is drawn on.")
    text: str | None = Field(None, min_length=1, max_length=256, description="A noun phrase to track everywhere.")
    points: list[Annotated[list[Number], Field(min_length=2, max_length=2)]] = Field(
        default_factory=list, description="Clicks [x, y] in pixels of the frame."
    )
    point_labels: list[Literal[0, 1]] | None = Field(None, description="1 = on the object, 0 = background.")
    box: Annotated[list[Number], Field(min_length=4, max_length=4)] | None = Field(
        None, description="[x0, y0, x1, y1] in pixels."
    )
    object_id: int | None = Field(None, ge=0, le=1_000_000, description="Clicks/box: the object to start or refine.")


class PropagateIn(_Strict):
    direction: Literal["forward", "backward", "both"] = Field("forward", description="Which way to track.")
    start_frame: int | None = Field(None, ge=0, description="Default: 0 (text) or the first prompted frame.")
    max_frames: int | None = Field(
        None, ge=1,
        description="Frames to track beyond start_frame in each direction (SAM's max_frame_num_to_track): "
        "max_frames=2 from frame 6 gives frames 6, 7, 8. Default: to the end.",
    )
    stream_format: Literal["ndjson", "sse"] | None = Field(
        None, description="ndjson (default) or sse; `Accept: text/event-stream` also selects sse."
    )


router = APIRouter(tags=["video"])


def check_video_clicks(points: list, labels: list | None, config: Config) -> None:
    """The image routes' caps hold on video prompts too (SAM3_MAX_POINTS), checked before the session is called."""
    if len(points) > config.max_points:
        raise InvalidPrompt(f"{len(points)} points in one prompt; the limit is {config.max_points} (SAM3_MAX_POINTS)")
    if labels is not None and len(labels) != len(points):
        raise InvalidPrompt(f"{len(labels)} point_labels for {len(points)} points: give one label per point")


def _tenant(service: SegmentService, authorization: str | None, api_key: str | None) -> str:
    return service.auth.tenant(bearer(authorization) or api_key, "`Authorization: Bearer <key>` or `x-api-key`")


async def _source_bytes(service: SegmentService, value: str) -> bytes:
    limits = VideoLimits.from_config(service.config)
    if value.strip().lower().startswith(("http://", "https://")):
        fetcher = UrlFetcher(
            service.config.url_allowlist, service.config.fetch_timeout_s, limits.max_bytes,
            service.config.fetch_max_redirects,
        )
        return await fetcher.fetch(value.strip())
    return video_bytes_from_base64(value, limits)


def session_model(service: SegmentService, name: str | None) -> str:
    """The served model a session tracks with: 404 for an unknown name, 400 for a concept-only (lite) model."""
    model = service.model(name).name
    if service.arch(model) == LITE_ARCH:
        raise BadRequest(f"model {model!r} is a sam3_lite_text model: it has no tracker, so it cannot track video; "
                         "open the session on a sam3_video model")
    return model


async def _create_args(request: Request, service: SegmentService) -> tuple:
    """The session's video, checked here (size, container, header, one frame) before any session actor starts;
    and its model, checked first."""
    data, frames, fps, model = await _upload(request, service)
    limits = VideoLimits.from_config(service.config)
    if data is not None:
        await asyncio.to_thread(probe_video, data, limits)
    else:
        await asyncio.to_thread(_check_frames, service, frames, limits)
    return data, frames, fps, model


def _check_frames(service: SegmentService, frames: list[bytes], limits: VideoLimits) -> None:
    """Every frame's header (size, format, the image routes' pixel limits), before any actor starts; the actor
    decodes the frames. A frame whose header cannot tell its size is decoded here, and its pixels dropped. Their
    encoded total was counted as they arrived (`_upload`)."""
    first: tuple[int, int] | None = None
    for i, data in enumerate(frames):
        size = service.loader.probe(data) or service.loader.decode(data).shape[:2]
        if first is None:
            first = size
            check_resolution(size[1], size[0], limits)
        elif size != first:
            raise InvalidVideo(f"frame {i} is {size[1]}x{size[0]} but frame 0 is {first[1]}x{first[0]}: "
                               "all frames of a video must share one size")


async def _upload(request: Request, service: SegmentService) -> tuple:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query_model = request.query_params.get("model")
    if kind.startswith("video/") or kind == "application/octet-stream":
        model = session_model(service, query_model)
        return await request.body(), None, None, model
    try:
        body = SessionCreateIn.model_validate_json(await request.body())
    except ValidationError as exc:
        raise ValidationFailed(f"invalid request: {validation_error_message(exc.errors())}") from None
    if (body.video is None) == (body.frames is None):
        raise BadRequest("give exactly one of `video` or `frames` (or upload the video as the raw body)")
    model = session_model(service, body.model or query_model)
    if body.video is not None:
        return await _source_bytes(service, body.video), None, None, model
    if not body.frames:
        raise InvalidVideo("`frames` is empty: a video needs at least one frame")
    if len(body.frames) > service.config.video_max_frames:
        raise PayloadTooLarge(f"{len(body.frames)} frames; the limit is {service.config.video_max_frames} "
                              "(SAM3_VIDEO_MAX_FRAMES)")
    frames, total, cap = [], 0, service.config.video_max_bytes
    for source in body.frames:  # kept encoded: the session actor decodes them
        frames.append(await service.loader.load_bytes(source))
        total += len(frames[-1])
        if total > cap:  # checked as they arrive: URL frames must not pile up past the video's own limit
            raise PayloadTooLarge(f"frames are more than {cap} bytes encoded, the limit for a video "
                                  "(SAM3_VIDEO_MAX_BYTES)")
    return None, frames, body.fps, model


RAW_VIDEO = ("video/*", "application/octet-stream")  # any video/* type, or octet-stream, is read as the raw video
CREATE_BODY = request_body(
    SessionCreateIn.model_json_schema(), *RAW_VIDEO,
    description="JSON {video | frames, fps}, or the encoded video itself as the body (Content-Type video/* or "
    "application/octet-stream).",
)


@router.post(
    "/v1/video/sessions", status_code=201, openapi_extra=CREATE_BODY,
    responses=error_responses(NativeError, 400, 401, 404, 413, 422, 429, 503),
)
async def start_session(
    request: Request, service: SegmentService = Depends(get_service),
    backend: VideoBackend = Depends(get_video_backend),
    authorization: str | None = Header(None), x_api_key: str | None = Header(None),
) -> dict:
    """Start a session: JSON {video | frames, fps}, or the raw video as the body (Content-Type video/*)."""
    tenant = _tenant(service, authorization, x_api_key)
    return await backend.create(tenant, *await _create_args(request, service))


@router.get("/v1/video/sessions/{session_id}", responses=error_responses(NativeError, 401, 404, 410, 422, 429, 503))
async def session_info(
    session_id: str, service: SegmentService = Depends(get_service), backend: VideoBackend = Depends(get_video_backend),
    authorization: str | None = Header(None), x_api_key: str | None = Header(None),
) -> dict:
    tenant = _tenant(service, authorization, x_api_key)
    return {"session_id": session_id, **await backend.call(session_id, tenant, "info")}


@router.post(
    "/v1/video/sessions/{session_id}/prompts", responses=error_responses(NativeError, 400, 401, 404, 410, 413, 422, 429, 503)
)
async def add_prompt(
    session_id: str, body: PromptIn, service: SegmentService = Depends(get_service),
    backend: VideoBackend = Depends(get_video_backend),
    authorization: str | None = Header(None), x_api_key: str | None = Header(None),
) -> dict:
    """Text (tracked on every frame from propagate on), or clicks/box for one object on one frame."""
    tenant = _tenant(service, authorization, x_api_key)
    if body.text is not None and (body.points or body.box is not None):
        raise InvalidPrompt("send either text or points/box in one prompt, not both")
    if body.text is not None:
        check_text(body.text, "text")
        return _render(await backend.call(session_id, tenant, "add_text", body.frame_index, body.text))
    if body.object_id is None:
        raise InvalidPrompt("clicks and boxes need an `object_id` (any integer you choose, reused to refine)")
    check_video_clicks(body.points, body.point_labels, service.config)
    labels = body.point_labels if body.point_labels is not None else [1] * len(body.points)
    result = await backend.call(
        session_id, tenant, "add_clicks", body.frame_index, body.object_id, body.points, labels, body.box
    )
    return _render(result)


@router.post(
    "/v1/video/sessions/{session_id}/propagate", response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}, "text/event-stream": {}},
                     "description": "One line (NDJSON) or event (SSE) per tracked frame, then `done`."},
               **error_responses(NativeError, 400, 401, 404, 410, 413, 422, 429, 503)},
)
async def propagate(
    session_id: str, body: PropagateIn, request: Request, service: SegmentService = Depends(get_service),
    backend: VideoBackend = Depends(get_video_backend),
    authorization: str | None = Header(None), x_api_key: str | None = Header(None),
) -> StreamingResponse:
    """Track the prompts through the video; each frame is sent as soon as it is computed."""
    tenant = _tenant(service, authorization, x_api_key)
    sse = body.stream_format == "sse" or (
        body.stream_format is None and "text/event-stream" in request.headers.get("accept", "")
    )
    await backend.call(session_id, tenant, "start_propagation", body.direction, body.start_frame, body.max_frames)
    media = "text/event-stream" if sse else "application/x-ndjson"
    return StreamingResponse(_stream(backend, session_id, tenant, sse), media_type=media)


async def _stream(backend: VideoBackend, session_id: str, tenant: str, sse: bool) -> AsyncIterator[str]:
    sent = 0
    try:
        while (batch := await backend.call(session_id, tenant, "next_frames", 1)) is not None:
            for frame in batch:
                sent += 1
                yield _line("frame", _render(frame), sse)
        yield _line("done", {"done": True, "frames": sent}, sse)
    except Sam3Error as exc:  # the status line is gone: report in-band and stop
        yield _line("error", {"error": {"code": exc.code, "message": exc.message}}, sse)


def _line(event: str, payload: dict, sse: bool) -> str:
    data = json.dumps(payload, separators=(",", ":"))
    return f"event: {event}\ndata: {data}\n\n" if sse else data + "\n"


def _render(frame: dict) -> dict:
    objects = [
        {"object_id": o["object_id"], "score": o["score"], "box": o["box"], "area": o["area"], "mask": o["rle"],
         **({"text": o["text"]} if "text" in o else {})}  # text prompts: the prompt that found the object
        for o in frame.get("objects", [])
    ]
    return {**{k: v for k, v in frame.items() if k != "objects"}, "objects": objects}


@router.delete(
    "/v1/video/sessions/{session_id}/objects/{object_id}",
    responses=error_responses(NativeError, 401, 404, 410, 422, 429, 503),
)
async def remove_object(
    session_id: str, object_id: int, service: SegmentService = Depends(get_service),
    backend: VideoBackend = Depends(get_video_backend),
    authorization: str | None = Header(None), x_api_key: str | None = Header(None),
) -> dict:
    tenant = _tenant(service, authorization, x_api_key)
    await backend.call(session_id, tenant, "remove_object", object_id)
    return {"session_id": session_id, "removed": object_id}


@router.post(
    "/v1/video/sessions/{session_id}/reset", responses=error_responses(NativeError, 401, 404, 410, 413, 422, 429, 503)
)
async def reset(
    session_id: str, service: SegmentService = Depends(get_service), backend: VideoBackend = Depends(get_video_backend),
    authorization: str | None = Header(None), x_api_key: str | None = Header(None),
) -> dict:
    tenant = _tenant(service, authorization, x_api_key)
    await backend.call(session_id, tenant, "reset")
    return {"session_id": session_id, "reset": True}


@router.delete("/v1/video/sessions/{session_id}", responses=error_responses(NativeError, 401, 404, 422, 503))
async def close(
    session_id: str, service: SegmentService = Depends(get_service), backend: VideoBackend = Depends(get_video_backend),
    authorization: str | None = Header(None), x_api_key: str | None = Header(None),
) -> dict:
    """Close the session and free its actor; closing twice answers 200 again."""
    return await backend.close(session_id, _tenant(service, authorization, x_api_key))
