"""Oxen.ai-compatible `sam-3-video`: POST /api/ai/videos/generate renders every instance of a text, tracked."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from functools import cache
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.core.config import Config
from serve_app.core.errors import InvalidPrompt, NotFound
from serve_app.core.media import media_store
from serve_app.core.openapi import error_responses
from serve_app.core.security import UrlFetcher
from serve_app.image.service import SegmentService, get_service
from serve_app.protocols import oxen
from serve_app.video.backend import VideoBackend, get_video_backend
from serve_app.video.io import VideoLimits, probe_video, video_bytes_from_base64

logger = logging.getLogger(__name__)

MODEL_ID = "sam-3-video"
MODEL_NAME = "Segment Anything 3 - Video"
MODEL_DESCRIPTION = (
    "Segment Anything 3 - Video is a vision model for video object segmentation and tracking: it detects, segments "
    "and tracks every instance of a text prompt across the frames, with memory that carries predictions through "
    "occlusions and re-appearances."
)
EXAMPLE_VIDEO = "https://hub.oxen.ai/api/repos/ox/Oxen-AI-Assets/file/main/images/winter_summer_ox.mp4"
CONTENT_TYPE = "video/mp4"


class Sam3VideoInput(BaseModel):
    """Request parameters of Segment Anything 3 - Video (`sam-3-video`)."""

    model_config = ConfigDict(extra="forbid", title="sam-3-video")

    input_video: str = Field(
        description="Video to use as reference (mp4, mov, mkv, webm or avi). Format: uri (an http(s) URL or a "
        "data:video/...;base64 URI).",
        json_schema_extra={"format": "uri", "examples": [EXAMPLE_VIDEO]},
    )
    prompt: str = Field(
        min_length=1, max_length=oxen.MAX_TEXT_CHARS, examples=["the ox horns"],
        description="Text description of what you want to segment out of the video.",
    )
    apply_mask: bool = Field(
        True, strict=True,
        description="Apply the mask on the video: true fills each tracked instance in its own colour (50 %) and "
        "outlines it; false only outlines them.",
    )

    @field_validator("input_video")
    @classmethod
    def _uri(cls, value: str) -> str:
        value = value.strip()
        if not value.lower().startswith(("http://", "https://", "data:")):
            raise ValueError("input_video must be an http(s) URL or a data URI (data:video/mp4;base64,...)")
        return value


class VideoGenerateRequest(Sam3VideoInput):
    """`POST /api/ai/videos/generate` with `model: sam-3-video`."""

    model_config = ConfigDict(extra="forbid", title="VideoGenerateRequest")

    model: str = Field(description=f"The model id; this route serves `{MODEL_ID}`.")
    response_format: Literal["url", "b64_json"] = Field(
        "url", description="`url` returns a link to the rendered video; `b64_json` returns its bytes inline."
    )
    target_namespace: str | None = Field(
        None, max_length=256, description="Accepted for compatibility and ignored: results belong to the API key."
    )


class VideoOut(BaseModel):
    url: str | None = Field(None, description="Link to the mp4 (response_format=url); valid for SAM3_MEDIA_TTL_S.")
    b64_json: str | None = Field(None, description="The mp4's bytes, base64 (response_format=b64_json).")


class VideoGenerateResponse(BaseModel):
    model: str = Field(description="The model that answered.")
    created: int = Field(description="Unix time of the answer.")
    videos: list[VideoOut] = Field(description="The rendered video (one): H.264 mp4, the input's frames and size.")
    width: int = Field(description="Frame width in pixels.")
    height: int = Field(description="Frame height in pixels.")
    num_frames: int = Field(description="Frames in the input and in the rendered video.")
    fps: float = Field(description="Frame rate of the input and of the rendered video.")


def check_model(model_id: str) -> None:
    if model_id != MODEL_ID:
        raise NotFound(f"Model not found: {model_id} (this endpoint serves {MODEL_ID})")


async def video_bytes(source: str, config: Config) -> bytes:
    """The encoded video behind an http(s) URL (SSRF-checked) or a data URI, within SAM3_VIDEO_MAX_BYTES."""
    limits = VideoLimits.from_config(config)
    if source.lower().startswith(("http://", "https://")):
        fetcher = UrlFetcher(config.url_allowlist, config.fetch_timeout_s, limits.max_bytes, config.fetch_max_redirects)
        return await fetcher.fetch(source)
    return video_bytes_from_base64(source, limits)


async def generate_video(
    body: VideoGenerateRequest, tenant: str, config: Config, videos: VideoBackend, publish: oxen.Publisher | None
) -> dict:
    """Fetch, open a session, render the tracked text as mp4, always close the session; the Oxen response."""
    if not body.prompt.strip():
        raise InvalidPrompt("prompt is blank: name what to segment, e.g. \"the ox horns\"")
    data = await video_bytes(body.input_video, config)
    await asyncio.to_thread(probe_video, data, VideoLimits.from_config(config))  # refused before an actor starts
    info = await videos.create(tenant, data, None, None)
    try:
        mp4 = await videos.call(info["session_id"], tenant, "render", body.prompt, body.apply_mask)
    finally:
        try:  # shielded: a cancelled job still frees its tracker actor
            await asyncio.shield(videos.close(info["session_id"], tenant))
        except Exception as exc:  # noqa: BLE001 - never hides the render's own outcome
            logger.warning("closing video session %s failed: %s", info["session_id"], exc)
    if body.response_format == "b64_json" or publish is None:
        out = VideoOut(b64_json=base64.b64encode(mp4).decode("ascii"))
    else:
        out = VideoOut(url=publish(mp4, CONTENT_TYPE))
    response = VideoGenerateResponse(
        model=MODEL_ID, created=int(time.time()), videos=[out], width=info["width"], height=info["height"],
        num_frames=info["num_frames"], fps=info["fps"],
    )
    return response.model_dump(exclude_none=True)


@cache
def request_schema() -> dict:
    return Sam3VideoInput.model_json_schema()


def model_object(config: Config) -> oxen.ModelObject:
    return oxen.ModelObject(
        id=MODEL_ID, created=oxen.MODEL_CREATED, owned_by="sam3-serve", name=MODEL_NAME, display_name=MODEL_NAME,
        description=MODEL_DESCRIPTION, endpoint="/videos/generate",
        capabilities={"input": ["video", "text"], "output": ["video"]}, parameter_count=oxen.MODEL_PARAMETERS,
        served_weights=config.model, json_request_schema=request_schema(), request_schema=request_schema(),
    )


oxen.MODEL_OBJECTS[MODEL_ID] = model_object

router = APIRouter(tags=["oxen"])


@router.post(
    "/api/ai/videos/generate", response_model=VideoGenerateResponse, response_model_exclude_none=True,
    responses=error_responses(oxen.OxenError, 400, 401, 404, 410, 413, 422, 429, 503),
)
async def videos_generate(
    body: VideoGenerateRequest,
    request: Request,
    tenant: str = Depends(oxen.oxen_tenant),
    service: SegmentService = Depends(get_service),
    videos: VideoBackend = Depends(get_video_backend),
) -> dict:
    """Track every instance of the prompt through the video; answer with the rendered mp4 (blocks until ready)."""
    check_model(body.model)
    publish = oxen.publisher(request, media_store(service.config), tenant)
    return await generate_video(body, tenant, service.config, videos, publish)
