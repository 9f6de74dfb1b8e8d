"""Segmind's v2 async queue, as its SDK's `run()` uses it: POST /v2/{slug}, then poll status and fetch the result.

Jobs go on the same queue as Oxen's (the JobBackend: submit, get) under their own kind; JobRunner replicas run them
with `SegmindJobs`, through the same function as the sync `POST /v1/sam3-image`. Every /v2 path answers errors in
Segmind's shape ({"error": message, "code"}), which the SDK reads into `SegmindError.detail`.
"""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from serve_app.core.config import Config
from serve_app.core.errors import NotFound
from serve_app.core.failover import IDEMPOTENCY_DOC, idempotency_key
from serve_app.core.http import register_key_rule
from serve_app.core.openapi import error_responses
from serve_app.core.security import UrlFetcher
from serve_app.image.service import SegmentService, get_service
from serve_app.jobs.backend import JobBackend, get_job_backend
from serve_app.jobs.store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Outcome
from serve_app.protocols import segmind

KIND = "segmind"  # the job kind in the queue; the job's `model` is the slug
SLUGS = (segmind.SLUG,)
STATUS = {QUEUED: "QUEUED", RUNNING: "PROCESSING", SUCCEEDED: "COMPLETED", FAILED: "FAILED", CANCELLED: "FAILED"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
FAILED_HTTP_STATUS = 422  # as Segmind's gateway answers a FAILED request (its SDK reads the body regardless)


class SubmitOut(BaseModel):
    request_id: str = Field(description="The request's id.")
    status: str = Field(description="`QUEUED`.")
    status_url: str = Field(description="Poll this (GET) for the status.")
    response_url: str = Field(description="GET this for the result once the status is `COMPLETED`.")


class StatusOut(BaseModel):
    request_id: str = Field(description="The request's id.")
    status: str = Field(description="`QUEUED`, `PROCESSING`, `COMPLETED` or `FAILED`.")
    error: str | None = Field(None, description="FAILED only: what went wrong.")


class ResultOut(StatusOut):
    output: segmind.SegmindResponse | None = Field(
        None, description="COMPLETED only: the body `POST /v1/sam3-image` answers for the same request."
    )
    metrics: dict[str, int] | None = Field(
        None, description="Unix times: `created_at`, `started_at`, `completed_at` (those reached so far)."
    )


register_key_rule("/v2/", ("header:x-api-key",), "the `x-api-key` header")


# ------------------------------------------------------------------------------------------------ the worker side


class SegmindJobs:
    """Runs one queued Segmind job in a worker: the stored request through the sync route's function."""

    def __init__(self, service: SegmentService) -> None:
        self.service = service

    async def __call__(self, job: dict) -> Outcome:
        with segmind.segmind_statuses():
            body = segmind.SegmindRequest.model_validate(job["request"])
            response = await segmind.run_sam3_image(self.service, body, job["tenant"])
        return Outcome(result=response.model_dump())


# ------------------------------------------------------------------------------------------------ routes


def check_slug(slug: str) -> None:
    if slug not in SLUGS:
        raise NotFound(f"model not found: {slug!r} (this server serves {', '.join(SLUGS)})")


async def check_image(source: str, config: Config) -> None:
    """Refuse a URL to a private or unresolvable address now (400), not later as a FAILED request."""
    if source.lower().startswith(("http://", "https://")):
        await asyncio.to_thread(UrlFetcher.from_config(config).check_url, source)


def as_data_uri(image: str) -> str:
    """Raw base64 as a data URI (same bytes): the queue echoes data URIs shortened, not whole images."""
    return image if _SCHEME.match(image) else "data:;base64," + image  # base64 has no ':'


async def segmind_job(jobs: JobBackend, tenant: str, request_id: str) -> dict:
    """The queue's record of a Segmind request of this key; another kind's id is as unknown as a made-up one."""
    record = await jobs.get(tenant, request_id)
    if record.get("type", KIND) != KIND:
        raise NotFound(f"request not found: {request_id!r}")
    return record


def status_of(record: dict) -> StatusOut:
    status = STATUS.get(record["status"], "FAILED")
    error = record.get("error_message") if status == "FAILED" else None
    return StatusOut(request_id=record["generation_id"], status=status, error=error or None)


def answer(body: StatusOut) -> JSONResponse:
    """A FAILED request under 422, as Segmind's gateway; everything else 200."""
    code = FAILED_HTTP_STATUS if body.status == "FAILED" else 200
    return JSONResponse(status_code=code, content=body.model_dump(exclude_none=True))


router = APIRouter(tags=["segmind"])


_FAILED = "The request FAILED: its status and `error` (as Segmind's gateway answers it)."


def _errors(*statuses: int) -> dict:
    return error_responses(segmind.SegmindErrorOut, *statuses, descriptions=segmind.SEGMIND_ERRORS)


@router.post(
    "/v2/{slug}", response_model=SubmitOut, openapi_extra=segmind.REQUEST_DOC,
    responses=_errors(400, 401, 404, 413, 422, 429, 503, 504),
)
async def submit(
    slug: str, request: Request, service: SegmentService = Depends(get_service),
    jobs: JobBackend = Depends(get_job_backend),
    idempotency: str | None = Header(None, alias="Idempotency-Key", description=IDEMPOTENCY_DOC),
) -> SubmitOut:
    """Queue a request (the body of `POST /v1/{slug}`); answers at once with its id and where to poll.

    With an `Idempotency-Key`, a repeated submission returns the first one's id."""
    tenant = segmind.segmind_tenant(service, request)
    check_slug(slug)
    body = segmind.parse_body(await request.body())
    segmind.to_internal(body, service.config)  # a bad prompt is a 400 now, not a FAILED request later
    await check_image(body.image, service.config)
    params = body.model_dump(exclude_unset=True)
    params["image"] = as_data_uri(body.image)
    [record] = await jobs.submit(tenant, slug, KIND, params, "", 1, idempotency_key(idempotency))
    request_id = record["generation_id"]
    return SubmitOut(
        request_id=request_id, status="QUEUED",
        status_url=str(request.url_for("segmind_status", request_id=request_id)),
        response_url=str(request.url_for("segmind_result", request_id=request_id)),
    )


@router.get(
    "/v2/requests/{request_id}/status", name="segmind_status", response_model=StatusOut,
    responses={**_errors(401, 404, 429, 503, 504), FAILED_HTTP_STATUS: {"model": StatusOut, "description": _FAILED}},
)
async def request_status(
    request_id: str, request: Request, service: SegmentService = Depends(get_service),
    jobs: JobBackend = Depends(get_job_backend),
) -> JSONResponse:
    """QUEUED, PROCESSING, COMPLETED, or FAILED with `error` (under HTTP 422)."""
    tenant = segmind.segmind_tenant(service, request)
    return answer(status_of(await segmind_job(jobs, tenant, request_id)))


@router.get(
    "/v2/requests/{request_id}", name="segmind_result", response_model=ResultOut,
    responses={**_errors(401, 404, 429, 503, 504), FAILED_HTTP_STATUS: {"model": ResultOut, "description": _FAILED}},
)
async def request_result(
    request_id: str, request: Request, service: SegmentService = Depends(get_service),
    jobs: JobBackend = Depends(get_job_backend),
) -> JSONResponse:
    """COMPLETED: the result in `output`; before that only the status; FAILED: `error` (under HTTP 422)."""
    tenant = segmind.segmind_tenant(service, request)
    record = await segmind_job(jobs, tenant, request_id)
    status = status_of(record)
    metrics = {key: record[key] for key in ("created", "started_at", "completed_at") if key in record}
    if "created" in metrics:
        metrics["created_at"] = metrics.pop("created")
    body = status.model_dump(exclude_none=True)
    body.update(output=record.get("result") if status.status == "COMPLETED" else None, metrics=metrics)
    return JSONResponse(status_code=FAILED_HTTP_STATUS if status.status == "FAILED" else 200, content=body)
