"""Roboflow-compatible `/sam3/*` routes: its requests to the internal request; results and errors in its shapes."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Annotated, Literal, Union

import cv2
import numpy as np
from fastapi import APIRouter, Depends, Header, Query
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from serve_app.core.auth import bearer
from serve_app.core.cache import CachedLogits
from serve_app.core.errors import InvalidImage, InvalidPrompt
from serve_app.core.http import register_admitted_path, register_key_rule
from serve_app.core.shapes import roboflow_error_body
from serve_app.core.openapi import error_responses
from serve_app.core.types import (
    Box,
    ConceptPrompt,
    ImageInput,
    Instance,
    SegmentParams,
    SegmentRequest,
    SegmentResult,
    VisualPrompt,
)
from serve_app.image import codecs
from serve_app.image.geometry import cxcywh_to_xyxy, xywh_to_xyxy
from serve_app.image.service import SegmentService, get_service

MAX_PROMPTS = 16  # Roboflow's documented cap on /sam3/concept_segment
DEFAULT_MODEL_ID = "sam3/sam3_final"
MODEL_ID_HELP = ("The model: `sam3/sam3_final` (or unset) is the default; a name from `GET /v1/models` (or "
                 "`sam3/<name>`) picks that model; any other id is a 404.")
Number = Annotated[float, Field(allow_inf_nan=False)]
Size = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


class _Wire(BaseModel):
    """Roboflow's models ignore unknown fields (its SDK sends extras such as `api_key`, `source`); so do we."""

    model_config = ConfigDict(extra="ignore")


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")  # so a box matches exactly one of its two forms


class ImageIn(_Wire):
    """Roboflow's InferenceRequestImage; `numpy` and `pil` are not accepted over HTTP."""

    type: Literal["url", "base64"] = Field(description="`url`: an http(s) URL to fetch; `base64`: inline image bytes.")
    value: str = Field(min_length=1, description="The URL, or base64 (or a data URI) of a PNG/JPEG/WebP/GIF/BMP/TIFF.")


class BoxXYWH(_Shape):
    """Exemplar box, top-left anchored, absolute pixels."""

    x: Number = Field(description="Left edge, pixels.")
    y: Number = Field(description="Top edge, pixels.")
    width: Size = Field(description="Width, pixels.")
    height: Size = Field(description="Height, pixels.")


class BoxXYXY(_Shape):
    """Exemplar box as explicit corners, absolute pixels."""

    x0: Number = Field(description="Left edge, pixels.")
    y0: Number = Field(description="Top edge, pixels.")
    x1: Number = Field(description="Right edge, pixels.")
    y1: Number = Field(description="Bottom edge, pixels.")


class ConceptPromptIn(_Wire):
    """One concept: a noun phrase, exemplar boxes, or both."""

    type: Literal["text", "visual"] | None = Field(None, description="Hint: `text`, or `visual` (needs boxes).")
    text: str | None = Field(None, min_length=1, max_length=256, description="A short noun phrase, e.g. `person`.")
    boxes: list[Union[BoxXYWH, BoxXYXY]] | None = Field(
        None, description="Exemplar boxes, absolute pixels: {x, y, width, height} (top-left) or {x0, y0, x1, y1}."
    )
    box_labels: list[Union[StrictBool, Literal[0, 1]]] | None = Field(
        None, description="Required with boxes, one per box: 1/true = positive exemplar, 0/false = negative."
    )
    output_prob_thresh: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="This prompt's score threshold; overrides the request's."
    )

    @model_validator(mode="after")
    def _labels_match_boxes(self) -> ConceptPromptIn:
        if self.type == "visual" and not self.boxes:
            raise ValueError("a prompt of type 'visual' needs at least one box")
        if self.boxes and self.box_labels is None:
            raise ValueError("box_labels is required when boxes is set: one 1/0 (or true/false) per box")
        if self.box_labels is not None and len(self.box_labels) != len(self.boxes or []):
            raise ValueError(f"{len(self.boxes or [])} boxes but {len(self.box_labels)} box_labels: give one per box")
        return self


class ConceptSegmentIn(_Wire):
    """`POST /sam3/concept_segment` (Roboflow's Sam3SegmentationRequest)."""

    image: ImageIn = Field(description="The image to segment.")
    prompts: list[ConceptPromptIn] = Field(min_length=1, description=f"Concepts to find, at most {MAX_PROMPTS}.")
    format: Literal["polygon", "rle"] = Field("polygon", description="Mask encoding: polygons or COCO RLE.")
    output_prob_thresh: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="Score threshold.")
    nms_iou_threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="IoU threshold for cross-prompt NMS; unset disables it."
    )
    image_id: str | None = Field(None, min_length=1, max_length=256, description="Optional ID for caching embeddings.")
    model_id: str = Field(DEFAULT_MODEL_ID, max_length=128, description=MODEL_ID_HELP)
    api_key: str | None = Field(None, description="Fallback for the `api_key` query parameter.")


class PointIn(_Wire):
    x: Number = Field(description="Absolute pixel x.")
    y: Number = Field(description="Absolute pixel y.")
    positive: bool = Field(description="true: on the object; false: background.")


class CenterBoxIn(_Wire):
    """PVS box: centre-anchored, unlike the PCS exemplar boxes."""

    x: Number = Field(description="Box centre x, pixels.")
    y: Number = Field(description="Box centre y, pixels.")
    width: Size = Field(description="Width, pixels.")
    height: Size = Field(description="Height, pixels.")


class VisualPromptIn(_Wire):
    box: CenterBoxIn | None = Field(None, description="One box around the object, centre-anchored.")
    points: list[PointIn] | None = Field(None, description="Clicks; add more to refine the mask.")


class PromptSetIn(_Wire):
    prompts: list[VisualPromptIn] | None = Field(None, description="One mask is returned per prompt.")


class VisualSegmentIn(_Wire):
    """`POST /sam3/visual_segment` (Roboflow's Sam2SegmentationRequest)."""

    image: ImageIn = Field(description="The image to segment.")
    image_id: str | None = Field(None, min_length=1, max_length=256, description="Embedding (and logits) cache key.")
    prompts: PromptSetIn = Field(
        default_factory=PromptSetIn, description="{prompts: [{box?, points?}]}; a bare list is accepted too."
    )
    format: Literal["json", "rle", "binary"] = Field(
        "json", description="json: polygons; rle: COCO RLE; binary: base64 PNG (0/255) at the image size."
    )
    multimask_output: bool = Field(True, description="Generate 3 proposals; the best one is always returned.")
    save_logits_to_cache: bool = Field(False, description="Keep the low-res logits for later refinement.")
    load_logits_from_cache: bool = Field(False, description="Refine with the logits of an earlier click prefix.")
    sam2_version_id: str | None = Field(None, description="Accepted for compatibility; ignored.")
    model_id: str | None = Field(None, max_length=128, description=MODEL_ID_HELP)
    api_key: str | None = Field(None, description="Fallback for the `api_key` query parameter.")

    @field_validator("prompts", mode="before")
    @classmethod
    def _bare_list(cls, value: object) -> object:
        return {"prompts": value} if isinstance(value, list) else value


class EmbedImageIn(_Wire):
    """`POST /sam3/embed_image`."""

    image: ImageIn | None = Field(None, description="The image to embed; may be omitted when image_id is cached.")
    image_id: str | None = Field(None, min_length=1, max_length=256, description="Cache key; defaults to a digest.")
    model_id: str | None = Field(None, max_length=128, description=MODEL_ID_HELP)
    api_key: str | None = Field(None, description="Fallback for the `api_key` query parameter.")


class PredictionOut(BaseModel):
    masks: list[list[list[int]]] | dict | str = Field(
        description="polygon: list of polygons, each a list of [x, y]; rle: COCO RLE {size, counts}; binary: base64 PNG"
    )
    confidence: float = Field(description="PCS: detection x presence score. PVS: predicted IoU of the best proposal.")
    format: Literal["polygon", "rle", "binary"] = Field(description="Encoding of `masks`.")


class EchoOut(BaseModel):
    prompt_index: int = Field(description="Position of the prompt in the request.")
    type: Literal["text", "visual"] = Field(description="`visual` when the prompt had exemplar boxes.")
    text: str | None = Field(description="The prompt's text, if any.")
    num_boxes: int = Field(description="Number of exemplar boxes.")


class PromptResultOut(BaseModel):
    prompt_index: int = Field(description="Index of the prompt this result answers.")
    echo: EchoOut = Field(description="Summary of the prompt as given.")
    predictions: list[PredictionOut] = Field(description="Every instance found, best first.")


class ConceptSegmentOut(BaseModel):
    prompt_results: list[PromptResultOut] = Field(description="One entry per prompt, in request order.")
    time: float = Field(description="Seconds to produce the segmentation, including preprocessing.")


class VisualSegmentOut(BaseModel):
    predictions: list[PredictionOut] = Field(description="The best mask of each prompt, in request order.")
    time: float = Field(description="Seconds to produce the segmentation, including preprocessing.")


class EmbedImageOut(BaseModel):
    image_id: str = Field(description="The key the embedding is cached under; send it as image_id to skip the encoder.")
    time: float = Field(description="Seconds to produce the embedding, including preprocessing.")


# ---------------------------------------------------------------- wire -> internal


def image_input(image: ImageIn | None, image_id: str | None) -> ImageInput:
    """Roboflow's {type, value} as an ImageInput; the declared type must match the value."""
    if image is None:
        return ImageInput(None, image_id)
    value = image.value.strip()
    looks_like_url = bool(_SCHEME.match(value)) and value[:5].lower() != "data:"
    if image.type == "url" and not value.lower().startswith(("http://", "https://")):
        raise InvalidImage("image.type is 'url' but image.value is not an http(s) URL")
    if image.type == "base64" and looks_like_url:
        raise InvalidImage("image.type is 'base64' but image.value is a URL: send it with type 'url'")
    return ImageInput(value, image_id)


def exemplar_xyxy(box: BoxXYWH | BoxXYXY) -> Box:
    if isinstance(box, BoxXYXY):
        return box.x0, box.y0, box.x1, box.y1
    return tuple(float(v) for v in xywh_to_xyxy([box.x, box.y, box.width, box.height]))


def served_model(service: SegmentService, model_id: str | None) -> str:
    """Roboflow's `model_id` -> a served model: unset or `sam3/sam3_final` is the default; a SAM3_MODELS name (or
    `sam3/<name>`) is that model; anything else is a 404 in Roboflow's shape."""
    if model_id is None or model_id == DEFAULT_MODEL_ID:
        return service.registry.default
    name = model_id.removeprefix("sam3/") if model_id.removeprefix("sam3/") in service.registry.specs else model_id
    return service.model(name).name


def concept_to_internal(body: ConceptSegmentIn, max_instances: int) -> SegmentRequest:
    if len(body.prompts) > MAX_PROMPTS:
        raise InvalidPrompt(f"{len(body.prompts)} prompts; a request accepts at most {MAX_PROMPTS}")
    prompts = [
        ConceptPrompt(
            p.text,
            tuple(exemplar_xyxy(b) for b in p.boxes or []),
            tuple(bool(v) for v in p.box_labels or []),
            p.output_prob_thresh,
        )
        for p in body.prompts
    ]
    # Roboflow applies no per-prompt NMS; nms_iou_threshold is its cross-prompt NMS.
    params = SegmentParams(
        threshold=body.output_prob_thresh, nms_iou=None, cross_prompt_nms_iou=body.nms_iou_threshold,
        max_instances=max_instances,
    )
    return SegmentRequest(image_input(body.image, body.image_id), prompts, params)


def visual_prompt(item: VisualPromptIn, multimask: bool) -> VisualPrompt:
    points = item.points or []
    box = None
    if item.box is not None:
        box = tuple(float(v) for v in cxcywh_to_xyxy([item.box.x, item.box.y, item.box.width, item.box.height]))
    return VisualPrompt(
        tuple((p.x, p.y) for p in points), tuple(int(p.positive) for p in points), box, multimask
    )


def click_history(prompt: VisualPrompt) -> tuple[tuple, Box | None]:
    """The logits-cache key of a prompt: its clicks in order (x, y, label) and its box."""
    return tuple((x, y, label) for (x, y), label in zip(prompt.points, prompt.point_labels)), prompt.box


async def prior_logits(service: SegmentService, key: tuple, prompt: VisualPrompt) -> np.ndarray | None:
    """Logits of the longest cached prompt (same box) whose clicks are a strict prefix of this one's, as Roboflow
    looks them up: re-sending an identical prompt never feeds it its own logits. None when nothing matches."""
    points, box = click_history(prompt)
    return await service.caches.prior_logits(key, points[:-1], box) if points else None


# ---------------------------------------------------------------- internal -> wire


def outer_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """As Roboflow's masks2multipoly: every outer contour (1- and 2-point ones too), holes dropped; [] when empty."""
    contours = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
    return [c.reshape(-1, 2).tolist() for c in contours]


def render_prediction(instance: Instance, fmt: str) -> PredictionOut:
    if fmt == "rle":
        return PredictionOut(masks=instance.rle, confidence=instance.score, format="rle")
    mask = codecs.rle_decode(instance.rle)
    if fmt == "binary":
        return PredictionOut(masks=codecs.mask_to_png_base64(mask), confidence=instance.score, format="binary")
    return PredictionOut(masks=outer_polygons(mask), confidence=instance.score, format="polygon")


def render_concept(result: SegmentResult, body: ConceptSegmentIn, started: float) -> ConceptSegmentOut:
    results = []
    for r in result.prompts:
        given = body.prompts[r.prompt_index]
        echo = EchoOut(
            prompt_index=r.prompt_index, type="visual" if given.boxes else "text", text=given.text,
            num_boxes=len(given.boxes or []),
        )
        predictions = [render_prediction(i, body.format) for i in r.instances]
        results.append(PromptResultOut(prompt_index=r.prompt_index, echo=echo, predictions=predictions))
    return ConceptSegmentOut(prompt_results=results, time=time.perf_counter() - started)


def render_visual(result: SegmentResult, body: VisualSegmentIn, started: float) -> VisualSegmentOut:
    fmt = {"json": "polygon"}.get(body.format, body.format)
    best = [r.instances[0] for r in result.prompts if r.instances]  # instances come best first
    return VisualSegmentOut(predictions=[render_prediction(i, fmt) for i in best], time=time.perf_counter() - started)


class RoboflowError(BaseModel):
    """Roboflow's error body, as `error_body` renders it."""

    message: str = Field(description="What went wrong, in words a person can act on.")


error_body = roboflow_error_body  # registered for /sam3/ (serve_app/core/shapes.py)


# ---------------------------------------------------------------- routes

router = APIRouter(tags=["roboflow"])
ApiKey = Query(None, description="Your API key (Roboflow's legacy transport: a query parameter on every request).")
Authorization = Header(None, description="`Bearer <api key>`: inference-sdk's `api_key_transport='header'`/'both'.")
KEY_TRANSPORTS = "`Authorization: Bearer <key>`, the `api_key` query parameter or the `api_key` body field"
register_key_rule("/sam3/", ("bearer", "query:api_key", "body:api_key"), KEY_TRANSPORTS)
register_admitted_path("/sam3/concept_segment")  # runs the model: a deadline and admission control (core/admission.py)
register_admitted_path("/sam3/visual_segment")  # runs the model: a deadline and admission control (core/admission.py)
register_admitted_path("/sam3/embed_image")  # runs the model: a deadline and admission control (core/admission.py)


def _tenant(service: SegmentService, authorization: str | None, query_key: str | None, body_key: str | None) -> str:
    """The header first (as Roboflow's servers since 1.5 read it), then the query parameter, then the body field."""
    return service.auth.tenant(bearer(authorization) or query_key or body_key, KEY_TRANSPORTS)


async def _segment_visual(service: SegmentService, body: VisualSegmentIn, tenant: str) -> SegmentResult:
    """PVS through the service, with Roboflow's logits cache: per (tenant, image key), looked up by click prefix."""
    model = served_model(service, body.model_id)
    prompts = [visual_prompt(p, body.multimask_output) for p in body.prompts.prompts or []]
    service.check_prompts_for(model, prompts)
    image = image_input(body.image, body.image_id)
    if body.load_logits_from_cache:
        key = (await service.resolve(image, tenant, model=model)).key  # the cache key is known once the image is
        image = ImageInput(image.source, key)
        prompts = [replace(p, mask_logits=await prior_logits(service, service.cache_key(tenant, model, key), p))
                   for p in prompts]
    params = SegmentParams(max_instances=service.config.max_instances, return_logits=body.save_logits_to_cache)
    result, resolved = await service.segment(SegmentRequest(image, prompts, params, model), tenant)
    if body.save_logits_to_cache:
        for r in result.prompts:
            if r.low_res_logits is not None and len(r.low_res_logits):
                points, box = click_history(prompts[r.prompt_index])
                await service.caches.remember_logits(service.cache_key(tenant, model, resolved.key),
                                                     CachedLogits(points, box, r.low_res_logits[0]))
    return result


@router.post(
    "/sam3/concept_segment", response_model=ConceptSegmentOut,
    responses=error_responses(RoboflowError, 400, 401, 404, 413, 422, 429, 503, 504),
)
async def concept_segment(
    body: ConceptSegmentIn, api_key: str | None = ApiKey, service: SegmentService = Depends(get_service),
    authorization: str | None = Authorization,
) -> ConceptSegmentOut:
    """SAM3 PCS: every instance of each concept (text, exemplar boxes, or both)."""
    started = time.perf_counter()
    tenant = _tenant(service, authorization, api_key, body.api_key)
    request = concept_to_internal(body, service.config.max_instances)
    request.model = served_model(service, body.model_id)
    result, _ = await service.segment(request, tenant)
    return render_concept(result, body, started)


@router.post(
    "/sam3/visual_segment", response_model=VisualSegmentOut,
    responses=error_responses(RoboflowError, 400, 401, 404, 413, 422, 429, 503, 504),
)
async def visual_segment(
    body: VisualSegmentIn, api_key: str | None = ApiKey, service: SegmentService = Depends(get_service),
    authorization: str | None = Authorization,
) -> VisualSegmentOut:
    """SAM3 PVS: the single best mask of one object per prompt, from clicks and/or a centre-anchored box."""
    started = time.perf_counter()
    tenant = _tenant(service, authorization, api_key, body.api_key)
    result = await _segment_visual(service, body, tenant)
    return render_visual(result, body, started)


@router.post(
    "/sam3/embed_image", response_model=EmbedImageOut,
    responses=error_responses(RoboflowError, 400, 401, 404, 413, 422, 429, 503, 504),
)
async def embed_image(
    body: EmbedImageIn, api_key: str | None = ApiKey, service: SegmentService = Depends(get_service),
    authorization: str | None = Authorization,
) -> EmbedImageOut:
    """Encode an image once; later requests with the returned image_id skip the encoder."""
    started = time.perf_counter()
    tenant = _tenant(service, authorization, api_key, body.api_key)
    resolved = await service.resolve(image_input(body.image, body.image_id), tenant,
                                     model=served_model(service, body.model_id))
    return EmbedImageOut(image_id=resolved.key, time=time.perf_counter() - started)
