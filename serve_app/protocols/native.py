"""The native `/v1` API: its pydantic request/response models and their translation to and from the internal types."""

from __future__ import annotations

import base64
import io
from typing import Annotated, Literal, Union

import numpy as np
from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.core.auth import bearer
from serve_app.core.config import Config
from serve_app.core.errors import InvalidPrompt
from serve_app.core.http import native_error_body, register_admitted_path, register_key_rule
from serve_app.core.openapi import NativeError, error_responses
from serve_app.core.types import (
    ConceptPrompt,
    ImageInput,
    Prompt,
    SegmentParams,
    SegmentRequest,
    SegmentResult,
    VisualPrompt,
)
from serve_app.image import codecs
from serve_app.image.service import SegmentService, get_service

MAX_TEXT_CHARS = 256
MAX_LOGITS_SIDE = 1024  # SAM3 low-res logits are 288 x 288
Number = Annotated[float, Field(allow_inf_nan=False)]
BoxXYXY = Annotated[list[Number], Field(min_length=4, max_length=4, description="[x0, y0, x1, y1] in pixels")]
PointXY = Annotated[list[Number], Field(min_length=2, max_length=2, description="[x, y] in pixels")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConceptPromptIn(_Strict):
    """Find every instance of a concept: a noun phrase, exemplar boxes, or both."""

    type: Literal["concept"] = Field(description="Concept segmentation (SAM3 detector).")
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS, description="A short noun phrase.")
    boxes: list[BoxXYXY] = Field(default_factory=list, description="Exemplar boxes, xyxy pixels.")
    box_labels: list[bool] | None = Field(
        None, description="One per box: true = positive exemplar, false = negative. Defaults to all positive."
    )
    threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False, description="Overrides the request threshold.")


class VisualPromptIn(_Strict):
    """Segment one object from clicks and/or a box (SAM-style interactive segmentation)."""

    type: Literal["visual"] = Field(description="Visual segmentation (SAM3 tracker).")
    points: list[PointXY] = Field(default_factory=list, description="Clicks, [x, y] pixels.")
    point_labels: list[Literal[0, 1]] | None = Field(
        None, description="One per point: 1 = on the object, 0 = background. Defaults to all 1."
    )
    box: BoxXYXY | None = Field(None, description="One box around the object, xyxy pixels.")
    multimask: bool = Field(False, description="Return 3 candidate masks, best first.")
    mask_logits: str | None = Field(
        None, description="Low-res logits from an earlier answer's `low_res_logits` (base64 .npy), to refine."
    )


PromptIn = Annotated[Union[ConceptPromptIn, VisualPromptIn], Field(discriminator="type")]


class SegmentRequestIn(_Strict):
    """`POST /v1/image/segment`."""

    image: str | None = Field(
        None, description="The image: base64, a data URI, or an http(s) URL. May be omitted when `image_id` is cached."
    )
    image_id: str | None = Field(
        None, max_length=256, description="Optional client key for the embedding cache; same id = same image."
    )
    prompts: list[PromptIn] = Field(min_length=1, description="What to segment; each prompt is answered separately.")
    threshold: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="Minimum concept score (detection × presence).")
    mask_threshold: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="Probability above which a pixel is in a mask.")
    nms_iou: float | None = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="Per-prompt box NMS IoU; null disables.")
    cross_prompt_nms_iou: float | None = Field(
        None, ge=0.0, le=1.0, description="NMS across prompts (drop duplicates of different phrases); null disables."
    )
    max_instances: int = Field(100, ge=1, description="Most instances returned per prompt.")
    output: Literal["rle", "polygon", "png"] = Field("rle", description="Mask encoding in the response.")
    polygon_epsilon: float | None = Field(
        None, ge=0.0, le=100.0, description="With output=polygon: Douglas-Peucker tolerance in pixels."
    )
    return_logits: bool = Field(False, description="Visual prompts: include low-res logits for refinement.")
    model: str | None = Field(
        None, max_length=64, description="Which served model answers (`GET /v1/models`); omitted: the default. An "
        "unknown name is a 404 `model_not_found`.")

    @field_validator("image")
    @classmethod
    def _strip(cls, value: str | None) -> str | None:
        return value.strip() if value is not None else None


class InstanceOut(BaseModel):
    score: float = Field(description="Concept: detection × presence. Visual: predicted IoU.")
    box: list[float] = Field(description="[x0, y0, x1, y1] in pixels of the original image.")
    area: int = Field(description="Mask area in pixels.")
    mask: dict | list | str = Field(
        description="rle: COCO RLE {size: [h, w], counts}; polygon: list of {exterior, holes}; png: base64 PNG."
    )


class PromptResultOut(BaseModel):
    prompt_index: int
    type: Literal["concept", "visual"]
    instances: list[InstanceOut]
    low_res_logits: str | None = Field(None, description="base64 .npy float32 (K, h, w); pass back to refine.")


class SegmentResponseOut(BaseModel):
    width: int
    height: int
    image_id: str = Field(description="The embedding-cache key of this image; send it again to skip the encoder.")
    output: str
    prompts: list[PromptResultOut]
    timings_ms: dict[str, float]
    model: str = Field(description="The served model that answered.")


class ModelOut(BaseModel):
    name: str = Field(description="What a request's `model` field names.")
    source: str = Field(description="Where its weights come from (SAM3_MODELS).")
    architecture: Literal["sam3_video", "sam3_lite_text"]
    default: bool = Field(description="Requests that name no model get this one.")
    loaded: dict[str, bool] = Field(description="Whether an encoder and a decoder replica hold it now.")
    prompts: list[str] = Field(description="Prompt types it serves: sam3_lite_text serves concept prompts only.")
    video: bool = Field(description="Whether video sessions and streams can use it.")
    stats: dict[str, dict] = Field(description="Per replica asked: requests, mean ms, loads, evictions.")


class ModelList(BaseModel):
    default: str
    models: list[ModelOut]


def encode_logits(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_logits(value: str) -> np.ndarray:
    """base64 .npy -> (h, w) float32; refuses pickles, wrong shapes and non-finite values."""
    try:
        array = np.load(io.BytesIO(base64.b64decode(value, validate=True)), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's
        raise InvalidPrompt(f"mask_logits is not a base64 .npy array: {exc}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise InvalidPrompt(f"mask_logits must be a real-valued .npy array as returned in low_res_logits, got {kind}")
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3:
        array = array[0]
    if array.ndim != 2 or max(array.shape) > MAX_LOGITS_SIDE or min(array.shape) < 1 or not np.isfinite(array).all():
        raise InvalidPrompt(f"mask_logits must be a finite (h, w) array as returned in low_res_logits, got {array.shape}")
    return array


def to_prompt(item: ConceptPromptIn | VisualPromptIn) -> Prompt:
    """A wire prompt as an internal one; the service checks it against the image."""
    if isinstance(item, ConceptPromptIn):
        labels = item.box_labels if item.box_labels is not None else [True] * len(item.boxes)
        return ConceptPrompt(item.text, tuple(tuple(b) for b in item.boxes), tuple(labels), item.threshold)
    labels = item.point_labels if item.point_labels is not None else [1] * len(item.points)
    logits = decode_logits(item.mask_logits) if item.mask_logits else None
    box = tuple(item.box) if item.box is not None else None
    return VisualPrompt(tuple(tuple(p) for p in item.points), tuple(labels), box, item.multimask, logits)


def to_internal(body: SegmentRequestIn, config: Config) -> SegmentRequest:
    params = SegmentParams(
        threshold=body.threshold,
        mask_threshold=body.mask_threshold,
        nms_iou=body.nms_iou,
        cross_prompt_nms_iou=body.cross_prompt_nms_iou,
        max_instances=min(body.max_instances, config.max_instances),
        return_logits=body.return_logits,
    )
    return SegmentRequest(ImageInput(body.image, body.image_id), [to_prompt(p) for p in body.prompts], params,
                          body.model)


def render_mask(rle: dict, output: str, epsilon: float | None) -> dict | list | str:
    if output == "rle":
        return rle
    mask = codecs.rle_decode(rle)
    if output == "png":
        return codecs.mask_to_png_base64(mask)
    return codecs.mask_to_polygons_with_holes(mask, simplify_epsilon=epsilon)


def render(result: SegmentResult, body: SegmentRequestIn, cache_key: str) -> SegmentResponseOut:
    prompts = [
        PromptResultOut(
            prompt_index=r.prompt_index,
            type=r.prompt.kind,
            instances=[
                InstanceOut(
                    score=i.score, box=list(i.box), area=i.area,
                    mask=render_mask(i.rle, body.output, body.polygon_epsilon),
                )
                for i in r.instances
            ],
            low_res_logits=encode_logits(r.low_res_logits) if r.low_res_logits is not None else None,
        )
        for r in result.prompts
    ]
    return SegmentResponseOut(
        width=result.width, height=result.height, image_id=cache_key, output=body.output, prompts=prompts,
        timings_ms=result.timings_ms, model=result.model or "",
    )


error_body = native_error_body  # the native shape is the service's fallback, defined in the core
KEY_HOW = "`Authorization: Bearer <key>` or `x-api-key`"
register_key_rule("/v1/", ("bearer", "header:x-api-key"), KEY_HOW)  # image, video sessions and /v1/stats
register_admitted_path("/v1/image/segment")  # runs the model: a deadline and admission control (core/admission.py)


router = APIRouter(tags=["native"])


def _tenant(service: SegmentService, authorization: str | None, api_key: str | None) -> str:
    return service.auth.tenant(bearer(authorization) or api_key, "`Authorization: Bearer <key>` or `x-api-key`")


@router.post(
    "/v1/image/segment", response_model=SegmentResponseOut,
    responses=error_responses(NativeError, 400, 401, 404, 410, 413, 422, 429, 503, 504),
)
async def segment(
    body: SegmentRequestIn,
    service: SegmentService = Depends(get_service),
    authorization: str | None = Header(None),
    x_api_key: str | None = Header(None),
) -> SegmentResponseOut:
    """Concept (text / exemplar boxes) and visual (points / box) segmentation of one image."""
    tenant = _tenant(service, authorization, x_api_key)
    result, resolved = await service.segment(to_internal(body, service.config), tenant)
    return render(result, body, resolved.key)
