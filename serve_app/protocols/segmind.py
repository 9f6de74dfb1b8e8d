"""Segmind-compatible `POST /v1/sam3-image`: its request as the internal one, masks back as base64 PNG images."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.core.config import Config
from serve_app.core.errors import BadRequest, Sam3Error, ServiceUnavailable
from serve_app.core.http import register_admitted_path, register_key_rule
from serve_app.core.shapes import SEGMIND_PATH, segmind_error_body
from serve_app.core.openapi import error_responses, request_body
from serve_app.core.types import (
    AutoPrompt,
    Box,
    ConceptPrompt,
    ImageInput,
    Point,
    Prompt,
    ResolvedImage,
    SegmentParams,
    SegmentRequest,
    SegmentResult,
    VisualPrompt,
)
from serve_app.image import codecs
from serve_app.image.service import SegmentService, get_service

logger = logging.getLogger(__name__)

SLUG = "sam3-image"
PATH = f"/v1/{SLUG}"
MAX_ARRAY_CHARS = 100_000  # a JSON-array string longer than this is not a prompt
Mode = Literal["concept", "visual", "concept+visual", "automatic"]
Source = Literal["concept", "visual", "automatic"]
ArrayField = str | list | None
_SOURCE: dict[str, Source] = {"concept": "concept", "visual": "visual", "auto": "automatic"}


class SegmindRequest(BaseModel):
    """`POST /v1/sam3-image`, every field of Segmind's sam3-image page (arrays may be JSON strings or arrays)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Input image: an http(s) URL, raw base64, or a base64 data URI.")
    text_prompt: str | None = Field(
        None, max_length=256, description="Find every instance of this phrase (SAM3 concept segmentation)."
    )
    points_input: ArrayField = Field(
        None, description='Clicks in pixels, e.g. "[[300, 400]]"; [[[x, y], ...], ...] for one object per list.'
    )
    point_labels_input: ArrayField = Field(
        "[[1]]", description="One label per point (1 = foreground, 0 = background); a single label applies to all."
    )
    boxes_input: ArrayField = Field(
        None, description='Boxes [x0, y0, x1, y1] in pixels, e.g. "[[100, 150, 200, 250]]". Exemplars with text.'
    )
    return_preview: bool = Field(True, description="Return the combined mask image (each mask coloured, on black).")
    return_overlay: bool = Field(False, description="Return the masks coloured over the input image.")
    return_masks: bool = Field(False, description="Return each mask separately (base64 PNG) with its score and box.")
    threshold: float = Field(0.5, ge=0.1, le=1.0, allow_inf_nan=False, description="Minimum score of a text detection.")
    points_per_side: int = Field(32, ge=0, le=128, description="Automatic masks: the click grid is this many per side.")
    pred_iou_thresh: float = Field(
        0.88, ge=0.5, le=1.0, allow_inf_nan=False, description="Automatic masks: minimum predicted IoU."
    )
    max_masks: int = Field(0, ge=0, le=100, description="Most masks returned; 0 = no limit but the server's cap.")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("image is empty: send an image URL or a base64 string")
        return value.strip()

    @field_validator("text_prompt")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return (value.strip() or None) if value is not None else None


class MaskOut(BaseModel):
    mask: str = Field(description="base64 PNG, one channel at the input's size: 255 = object, 0 = background.")
    score: float = Field(description="Concept: detection × presence. Visual and automatic: predicted IoU.")
    box: list[float] = Field(description="[x0, y0, x1, y1] in pixels of the input image.")
    area: int = Field(description="Mask area in pixels.")
    source: Source = Field(description="Which kind of prompt produced the mask.")


class SegmindResponse(BaseModel):
    width: int = Field(description="Input image width in pixels (every returned image has this size).")
    height: int = Field(description="Input image height in pixels.")
    mode: Mode = Field(description="How the request was read: text, clicks/boxes, both, or automatic masks.")
    num_masks: int = Field(description="Masks found (after max_masks).")
    preview: str | None = Field(description="return_preview: base64 PNG (RGB), each mask in its colour on black.")
    overlay: str | None = Field(description="return_overlay: base64 PNG (RGB), masks blended over the input.")
    masks: list[MaskOut] | None = Field(description="return_masks: each mask, best first within each prompt.")


class SegmindErrorOut(BaseModel):
    error: str = Field(description="What went wrong, in words a person can act on.")
    code: str = Field(description="A stable machine-readable code (bad_request, unauthorized, ...).")


class BadGateway(Sam3Error):
    """A model replica died mid-request: Segmind's 502 'service temporarily unavailable'."""

    status_code = 502
    code = "bad_gateway"


error_body = segmind_error_body  # registered for PATH and /v2/ (serve_app/core/shapes.py)
assert PATH == SEGMIND_PATH
register_key_rule(PATH, ("header:x-api-key",), "the `x-api-key` header")
register_admitted_path(PATH)  # runs the model: a deadline and admission control (core/admission.py)


# ---- parsing ---------------------------------------------------------------------------------------


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        field = ".".join(str(p) for p in err.get("loc", ())) or "body"
        value = err.get("input")
        shown = f" (got {value!r})" if isinstance(value, (int, float, str)) and len(repr(value)) < 60 else ""
        parts.append(f"{field}: {err.get('msg', 'invalid')}{shown}")
    return "; ".join(parts)


def parse_body(raw: bytes) -> SegmindRequest:
    """The JSON body as a SegmindRequest; anything malformed or out of range is a 400 naming the field."""
    if not raw.strip():
        raise BadRequest("request body is empty: send a JSON object with at least `image`")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON (send Content-Type: application/json): {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return SegmindRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(f"invalid parameters: {_describe(exc)}") from None


def _json_array(name: str, value: ArrayField, example: str) -> list | None:
    """A field sent as a JSON-array string or as an array; None when absent, empty or null."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_ARRAY_CHARS:
            raise BadRequest(f"{name} is {len(text)} characters; the limit is {MAX_ARRAY_CHARS}")
        try:
            value = json.loads(text) if text else None
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"{name} is not a JSON array such as {example}: {exc}") from None
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be a JSON array such as {example}, got {json.dumps(value)[:60]}")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)


def parse_points(value: list) -> list[list[Point]]:
    """[x, y] | [[x, y], ...] (one object) | [[[x, y], ...], ...] (one list of clicks per object)."""
    if _pair(value):
        return [[(float(value[0]), float(value[1]))]]
    if all(_pair(p) for p in value):
        return [[(float(x), float(y)) for x, y in value]]
    if all(isinstance(g, list) and g and all(_pair(p) for p in g) for g in value):
        return [[(float(x), float(y)) for x, y in group] for group in value]
    raise BadRequest(
        "points_input must hold finite [x, y] pixel pairs: [[x, y], ...] for one object, "
        f"or [[[x, y], ...], ...] for one object per list; got {json.dumps(value)[:80]}"
    )


def _flatten(value: list, depth: int = 0) -> Iterator[Any]:
    for item in value:
        if isinstance(item, list) and depth < 2:
            yield from _flatten(item, depth + 1)
        else:
            yield item


def parse_labels(value: list) -> list[int]:
    """Labels flattened: [1, 0], [[1, 0]] and [[1], [0]] are the same two labels."""
    flat = list(_flatten(value))
    if any(isinstance(v, bool) or not _number(v) or v not in (0, 1) for v in flat):
        raise BadRequest(f"point_labels_input must hold 1 (foreground) or 0 (background), got {json.dumps(value)[:80]}")
    return [int(v) for v in flat]


def parse_boxes(value: list) -> list[Box]:
    """[x0, y0, x1, y1] or [[x0, y0, x1, y1], ...] in pixels."""
    boxes = [value] if value and all(_number(v) for v in value) else value
    if not all(isinstance(b, list) and len(b) == 4 and all(_number(v) for v in b) for b in boxes):
        raise BadRequest(f"boxes_input must be [[x0, y0, x1, y1], ...] in pixels, got {json.dumps(value)[:80]}")
    return [tuple(float(v) for v in b) for b in boxes]  # type: ignore[misc]


def _split_labels(groups: list[list[Point]], labels: list[int] | None) -> list[tuple[int, ...]]:
    total = sum(len(g) for g in groups)
    if labels is None or len(labels) == 1:
        label = labels[0] if labels else 1
        return [(label,) * len(g) for g in groups]
    if len(labels) != total:
        raise BadRequest(
            f"point_labels_input has {len(labels)} labels for {total} points: give one label per point "
            "(1 = foreground, 0 = background), or a single label for all of them"
        )
    out, start = [], 0
    for group in groups:
        out.append(tuple(labels[start : start + len(group)]))
        start += len(group)
    return out


def _visual(groups: list[list[Point]], labels: list[tuple[int, ...]], boxes: list[Box]) -> list[Prompt]:
    """One object per click list and/or per box; click lists pair with boxes in order."""
    if not boxes:
        return [VisualPrompt(tuple(g), lab) for g, lab in zip(groups, labels)]
    if not groups:
        return [VisualPrompt(box=b) for b in boxes]
    if len(groups) != len(boxes):
        raise BadRequest(
            f"points_input has {len(groups)} object(s) but boxes_input has {len(boxes)} boxes: with several boxes, "
            "give one list of clicks per box ([[[x, y], ...], ...], same order), or send the clicks alone"
        )
    return [VisualPrompt(tuple(g), lab, b) for g, lab, b in zip(groups, labels, boxes)]


def to_internal(body: SegmindRequest, config: Config) -> tuple[SegmentRequest, Mode]:
    """text (+ boxes as positive exemplars) → concept; clicks/boxes → visual; nothing → automatic masks."""
    raw_points = _json_array("points_input", body.points_input, "[[300, 400]]")
    raw_labels = _json_array("point_labels_input", body.point_labels_input, "[[1]]")
    raw_boxes = _json_array("boxes_input", body.boxes_input, "[[100, 150, 200, 250]]")
    groups = parse_points(raw_points) if raw_points else []
    labels = _split_labels(groups, parse_labels(raw_labels) if raw_labels else None) if groups else []
    boxes = parse_boxes(raw_boxes) if raw_boxes else []
    prompts: list[Prompt]
    mode: Mode
    if body.text_prompt:
        prompts = [ConceptPrompt(body.text_prompt, tuple(boxes), (True,) * len(boxes))]
        prompts += [VisualPrompt(tuple(g), lab) for g, lab in zip(groups, labels)]
        mode = "concept+visual" if groups else "concept"
    elif groups or boxes:
        prompts, mode = _visual(groups, labels, boxes), "visual"
    else:
        if body.points_per_side == 0:
            raise BadRequest(
                "points_per_side=0 gives no click grid: automatic masks (no text_prompt, points_input or "
                "boxes_input) need points_per_side between 1 and 128"
            )
        prompts = [AutoPrompt(body.points_per_side, body.pred_iou_thresh, max_masks=body.max_masks)]
        mode = "automatic"
    cap = min(config.max_instances, body.max_masks) if body.max_masks else config.max_instances
    params = SegmentParams(threshold=body.threshold, max_instances=cap)
    return SegmentRequest(ImageInput(body.image), prompts, params), mode


# ---- rendering -------------------------------------------------------------------------------------


def _png_b64(image: np.ndarray) -> str:
    return base64.b64encode(codecs.encode_image(image, "png")).decode("ascii")


def preview_image(masks: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Each mask in its palette colour on black; the first (best) mask is painted last, so on top."""
    out = np.zeros((height, width, 3), dtype=np.uint8)
    for i in reversed(range(len(masks))):
        out[masks[i]] = codecs.PALETTE[i % len(codecs.PALETTE)]
    return out


def render(
    result: SegmentResult, resolved: ResolvedImage, body: SegmindRequest, mode: Mode
) -> SegmindResponse:
    """Masks in prompt order (best first within a prompt), capped by max_masks, as the images asked for."""
    items = [(r.prompt.kind, inst) for r in result.prompts for inst in r.instances]
    if body.max_masks:
        items = items[: body.max_masks]
    masks = [codecs.rle_decode(inst.rle) for _, inst in items]
    height, width = result.height, result.width
    out_masks = None
    if body.return_masks:
        out_masks = [
            MaskOut(mask=codecs.mask_to_png_base64(mask), score=inst.score, box=list(inst.box), area=inst.area,
                    source=_SOURCE[kind])
            for (kind, inst), mask in zip(items, masks)
        ]
    return SegmindResponse(
        width=width, height=height, mode=mode, num_masks=len(items),
        preview=_png_b64(preview_image(masks, height, width)) if body.return_preview else None,
        overlay=_png_b64(codecs.overlay(resolved.pixels, masks)) if body.return_overlay else None,
        masks=out_masks,
    )


# ---- route -----------------------------------------------------------------------------------------


@contextmanager
def segmind_statuses() -> Iterator[None]:
    """Map to the page's codes: a dead replica is its 502; anything unexpected a 500 in its error shape."""
    try:
        yield
    except ServiceUnavailable as exc:
        raise BadGateway(exc.message) from None
    except Sam3Error:
        raise
    except Exception:
        logger.exception("segmind %s failed", PATH)
        raise Sam3Error("internal server error") from None


router = APIRouter(tags=["segmind"])
SEGMIND_ERRORS = {  # the words of Segmind's page for its codes
    400: "Invalid parameters or request format", 401: "Missing or invalid API key", 429: "Too many requests",
    500: "Internal server error", 502: "Service temporarily unavailable", 504: "Request timed out",
}
API_KEY_PARAMETER = {"name": "x-api-key", "in": "header", "required": True, "schema": {"type": "string"},
                     "description": "Your API key."}
# the body is parsed by hand so that schema errors are 400s; document it and the key here
REQUEST_DOC = {**request_body(SegmindRequest.model_json_schema()), "parameters": [API_KEY_PARAMETER]}


@router.post(
    PATH, response_model=SegmindResponse, openapi_extra=REQUEST_DOC,
    responses=error_responses(SegmindErrorOut, 400, 401, 413, 429, 500, 502, 503, 504, descriptions=SEGMIND_ERRORS),
)
async def sam3_image(request: Request, service: SegmentService = Depends(get_service)) -> SegmindResponse:
    """Segmind sam3-image: text, clicks/boxes or automatic masks; JSON with base64 PNG images."""
    with segmind_statuses():
        tenant = segmind_tenant(service, request)
        return await run_sam3_image(service, parse_body(await request.body()), tenant)


def segmind_tenant(service: SegmentService, request: Request) -> str:
    """Segmind's key transport: the `x-api-key` header."""
    return service.auth.tenant(request.headers.get("x-api-key"), "the `x-api-key` header")


async def run_sam3_image(service: SegmentService, body: SegmindRequest, tenant: str) -> SegmindResponse:
    """One sam3-image request, as the sync route and the v2 queue's workers both run it."""
    internal, mode = to_internal(body, service.config)
    result, resolved = await service.segment(internal, tenant, need_pixels=body.return_overlay)
    return await asyncio.to_thread(render, result, resolved, body, mode)
