"""Oxen.ai's async queue and completion events: /api/ai/queue for sam-3-image and sam-3-video, /api/events (SSE).

The routes only validate, submit and read; JobRunner replicas run the jobs with `OxenJobs`, which calls the same
plain functions as the sync routes (oxen.render_edit, oxen_video.generate_video).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.core.config import Config
from serve_app.core.errors import BadRequest, NotFound, Sam3Error, ValidationFailed
from serve_app.core.failover import IDEMPOTENCY_DOC, idempotency_key
from serve_app.core.http import validation_error
from serve_app.core.media import new_media_id
from serve_app.core.openapi import error_responses, request_body
from serve_app.core.security import UrlFetcher
from serve_app.image.service import SegmentService, get_service
from serve_app.jobs.backend import JobBackend, get_job_backend
from serve_app.jobs.store import Outcome
from serve_app.protocols import oxen, oxen_video, segmind_queue
from serve_app.video.backend import VideoBackend

MAX_GENERATIONS = 4  # per request, as Oxen


class QueueImageRequest(oxen.ImageEditRequest):
    """`POST /api/ai/queue` with `model: sam-3-image`: the image-edit body, plus how many generations."""

    model_config = ConfigDict(extra="forbid", title="QueueImageRequest")

    num_generations: int = Field(1, ge=1, le=MAX_GENERATIONS, description="Generations to enqueue (1-4).")


class QueueVideoRequest(oxen_video.VideoGenerateRequest):
    """`POST /api/ai/queue` with `model: sam-3-video`: the video-generate body, plus how many generations."""

    model_config = ConfigDict(extra="forbid", title="QueueVideoRequest")

    num_generations: int = Field(1, ge=1, le=MAX_GENERATIONS, description="Generations to enqueue (1-4).")


# model id -> (queue request type, sync request type, generation type)
QUEUE_MODELS: dict[str, tuple[type[BaseModel], type[BaseModel], str]] = {
    oxen.MODEL_ID: (QueueImageRequest, oxen.ImageEditRequest, "image"),
    oxen_video.MODEL_ID: (QueueVideoRequest, oxen_video.VideoGenerateRequest, "video"),
}


def queue_model(model: str, registry_names: tuple[str, ...] = ()) -> tuple:
    """(queue request type, sync request type, kind) of an Oxen model id; a SAM3_MODELS name is an image model."""
    if model in QUEUE_MODELS:
        return QUEUE_MODELS[model]
    if model in registry_names:
        return QUEUE_MODELS[oxen.MODEL_ID]
    raise NotFound(f"Model not found: {model[:80]} (the queue serves {', '.join([*QUEUE_MODELS, *registry_names])})")


def parse_queue_body(raw: bytes, registry_names: tuple[str, ...] = ()) -> tuple[BaseModel, str]:
    """The request for the model it names (unknown model: 404 before anything else is checked)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValidationFailed("invalid request: body: Input should be a JSON object")
    model = data.get("model")
    if not isinstance(model, str):
        problem = "Field required" if model is None else "Input should be a valid string"
        raise ValidationFailed(f"invalid request: model: {problem}", details=[{"field": "model", "message": problem}])
    queue_type, _, kind = queue_model(model, registry_names)
    try:
        return queue_type.model_validate(data), kind
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors())) from None


async def check_input(source: str, config: Config) -> None:
    """Refuse a URL to a private or unresolvable address now (400), not later as a failed job."""
    if source.lower().startswith(("http://", "https://")):
        fetcher = UrlFetcher.from_config(config)
        await asyncio.to_thread(fetcher.check_url, source)


def media_base(request: Request) -> str:
    """The URL prefix of /api/media/ on the host and route prefix this request came in on."""
    return str(request.url_for("oxen_media", media_id="_"))[:-1]


class FileCollector:
    """A publisher for workers: mints the media id now, keeps the bytes for the store to hold under it."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.files: list[tuple[str, bytes, str]] = []

    def __call__(self, data: bytes, content_type: str) -> str:
        media_id = new_media_id()
        self.files.append((media_id, bytes(data), content_type))
        return self.base + media_id


class OxenJobs:
    """Runs one queued job in a worker, through the same functions as the sync routes (other providers' kinds too)."""

    def __init__(self, service: SegmentService, videos: VideoBackend) -> None:
        self.service, self.videos = service, videos
        self.other_kinds = {segmind_queue.KIND: segmind_queue.SegmindJobs(service)}

    async def __call__(self, job: dict) -> Outcome:
        if job["kind"] in self.other_kinds:
            return await self.other_kinds[job["kind"]](job)
        _, request_type, kind = queue_model(job["model"], tuple(oxen.registry_ids(self.service)))
        body = request_type.model_validate(job["request"])
        files = FileCollector(job["media_base"])
        if kind == "image":
            request = oxen.to_internal(body, self.service.config)
            request.model = oxen.served_model(self.service, job["model"])
            result, resolved = await self.service.segment(request, job["tenant"], need_pixels=True)
            response = await asyncio.to_thread(oxen.render_edit, body, result, resolved, publish=files)
            first = response["images"][0]
        else:
            response = await oxen_video.generate_video(body, job["tenant"], self.service.config, self.videos, files)
            first = response["videos"][0]
        return Outcome(result=response, result_url=first.get("url"), files=files.files)


# ------------------------------------------------------------------------------------------------ routes

router = APIRouter(tags=["oxen"])


_BODY = request_body({"oneOf": [QueueImageRequest.model_json_schema(), QueueVideoRequest.model_json_schema()]})


@router.post(
    "/api/ai/queue", openapi_extra=_BODY,
    responses=error_responses(oxen.OxenError, 400, 401, 404, 413, 422, 429, 503, 504),
)
async def enqueue(
    request: Request,
    tenant: str = Depends(oxen.oxen_tenant),
    service: SegmentService = Depends(get_service),
    jobs: JobBackend = Depends(get_job_backend),
    idempotency: str | None = Header(None, alias="Idempotency-Key", description=IDEMPOTENCY_DOC),
) -> dict:
    """Enqueue 1-4 generations of `sam-3-image` or `sam-3-video` (the sync routes' bodies); returns their ids.

    With an `Idempotency-Key`, a repeated submission returns the first one's generations."""
    body, kind = parse_queue_body(await request.body(), tuple(oxen.registry_ids(service)))
    await check_input(getattr(body, "input_image", None) or getattr(body, "input_video"), service.config)
    params = body.model_dump(exclude={"num_generations"}, exclude_none=True)
    records = await jobs.submit(tenant, body.model, kind, params, media_base(request), body.num_generations,
                                idempotency_key(idempotency))
    return {"generations": [{key: record[key] for key in ("generation_id", "status", "model", "type", "created")}
                            for record in records]}


@router.get("/api/ai/queue", responses=error_responses(oxen.OxenError, 401, 422, 429, 503, 504))
async def list_active(
    model: str | None = Query(None, description="Only this model's generations."),
    tenant: str = Depends(oxen.oxen_tenant),
    jobs: JobBackend = Depends(get_job_backend),
) -> dict:
    """This key's generations that are still queued or running, oldest first."""
    return {"generations": await jobs.active(tenant, model)}


@router.get(
    "/api/ai/queue/{generation_id}", responses=error_responses(oxen.OxenError, 401, 404, 422, 429, 503, 504)
)
async def get_generation(
    generation_id: str, tenant: str = Depends(oxen.oxen_tenant), jobs: JobBackend = Depends(get_job_backend)
) -> dict:
    """One generation: status, timestamps, request parameters, and `result` / `result_url` or `error_message`."""
    return await jobs.get(tenant, generation_id)


@router.delete(
    "/api/ai/queue/{generation_id}", responses=error_responses(oxen.OxenError, 401, 404, 409, 422, 429, 503, 504)
)
async def cancel_generation(
    generation_id: str, tenant: str = Depends(oxen.oxen_tenant), jobs: JobBackend = Depends(get_job_backend)
) -> dict:
    """Cancel a queued or running generation; the record stays, with status `cancelled`."""
    return await jobs.cancel(tenant, generation_id)


@router.get(
    "/api/events", response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **error_responses(oxen.OxenError, 401, 422, 503)},
)
async def events(
    tenant: str = Depends(oxen.oxen_tenant),
    service: SegmentService = Depends(get_service),
    jobs: JobBackend = Depends(get_job_backend),
    last_event_id: str | None = Header(None),
) -> StreamingResponse:
    """Server-Sent Events: `media_generation_completed` / `_failed` / `_cancelled` for this key's generations."""
    stream = event_stream(jobs, tenant, last_event_id, service.config.jobs_sse_ping_s)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


# Sent after each batch of events. Block-buffered line readers flush only on a full buffer: mawk (Debian's and
# Ubuntu's awk, the page's `| awk` example) reads a pipe 4 KiB at a time, so without this an event could wait
# there until keep-alives filled the buffer. A comment line: SSE clients and the awk ignore it.
FLUSH_PAD = ":" + " " * 4096 + "\n\n"


def sse_frame(event: dict) -> str:
    """One event; `data` is compact JSON on one line (`"generation_id":"<id>"`, no space after the colon)."""
    data = json.dumps(event["data"], separators=(",", ":"))
    return f"id: {event['id']}\nevent: {event['event']}\ndata: {data}\n\n"


async def event_stream(jobs: JobBackend, tenant: str, cursor: str | None, ping_s: float) -> AsyncIterator[str]:
    """Replayed then live events; a `: ping` comment whenever ping_s seconds pass without one."""
    yield ": connected\n\n"
    while True:
        try:
            batch = await jobs.events(tenant, cursor, ping_s)
        except Sam3Error as exc:  # the store restarting: say so in a comment, keep the stream open
            yield f": {exc.message}\n\n"
            await asyncio.sleep(min(ping_s, 1.0))
            continue
        cursor = batch["cursor"]
        if batch["events"]:
            yield "".join(sse_frame(event) for event in batch["events"]) + FLUSH_PAD
        else:
            yield ": ping\n\n"
