"""The SAM3 Hugging Face Space API (`/api/predict`, `/api/sam2_compatible`) as the internal request, and back."""

from __future__ import annotations

import math
import re
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.core.auth import bearer
from serve_app.core.config import Config
from serve_app.core.errors import InvalidImage, InvalidPrompt, ValidationFailed
from serve_app.core.http import register_admitted_path, register_key_rule
from serve_app.core.shapes import hf_space_error_body
from serve_app.core.openapi import error_responses
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
from serve_app.image.geometry import validate_box_xyxy
from serve_app.image.service import SegmentService, get_service

SAM_VERSION = "3.0"
MAX_TEXT_CHARS = 256
DEFAULT_THRESHOLD = 0.5
_URL = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.\-]*:")

Number = Annotated[float, Field(allow_inf_nan=False)]
PointXY = Annotated[list[Number], Field(min_length=2, max_length=2, description="[x, y] in pixels")]
BoxXYXY = Annotated[list[Number], Field(min_length=4, max_length=4, description="[x1, y1, x2, y2] in pixels")]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
PromptType = Literal["text", "visual"]


# ----------------------------------------------------------------- requests


class Sam2Inputs(BaseModel):
    """The `inputs` object of `POST /api/sam2_compatible`."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="The image as base64 (or a base64 `data:` URI). URLs are refused.")
    text_prompts: list[Text] = Field(
        default_factory=list,
        description="SAM3 concept prompts; each is segmented separately. A single string counts as one prompt.",
    )
    points: list[PointXY] = Field(
        default_factory=list, description="Individual clicks [[x, y], ...] in pixels (not nested per object)."
    )
    point_labels: list[Literal[0, 1]] | None = Field(
        None, description="One per point: 1 = foreground, 0 = background. Defaults to all 1."
    )
    boxes: list[BoxXYXY] = Field(default_factory=list, description="Boxes [[x1, y1, x2, y2], ...] in pixels.")
    box_labels: list[Literal[0, 1]] | None = Field(
        None, description="One per box: 1 = positive, 0 = negative (exclude this area). Defaults to all 1."
    )
    multimask_output: bool = Field(False, description="Visual prompts: return 3 candidate masks each, best first.")
    confidence_threshold: Threshold = Field(
        DEFAULT_THRESHOLD, description="Minimum score (detection x presence) of a text-prompt mask."
    )
    vectorize: bool = Field(False, description="Also return one polygon per mask and the original image size.")
    simplify_epsilon: float = Field(
        2.0, ge=0.0, le=100.0, allow_inf_nan=False, description="Douglas-Peucker tolerance of the polygons, in pixels."
    )

    @field_validator("text_prompts", mode="before")
    @classmethod
    def _one_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("points", mode="before")
    @classmethod
    def _not_nested(cls, value: object) -> object:
        if isinstance(value, list) and any(isinstance(p, list) and p and isinstance(p[0], list) for p in value):
            raise ValueError("points are individual [x, y] pairs, not nested lists: send [[x1, y1], [x2, y2]]")
        return value


class Sam2Request(BaseModel):
    """`POST /api/sam2_compatible` (Inference Endpoint format)."""

    model_config = ConfigDict(extra="forbid")

    inputs: Sam2Inputs = Field(description="The image and its prompts.")


class PredictArgs(BaseModel):
    """The positional inputs of the Gradio `predict` function, by name."""

    image: str = Field(min_length=1, description="data[0]: the image as base64 or a base64 `data:` URI.")
    text: Text = Field(description="data[1]: the text prompt.")
    threshold: Threshold = Field(DEFAULT_THRESHOLD, description="data[2]: minimum score of a returned mask.")


# what each position of `data` must be, as `PredictRequest.args` checks it: documented as the array's prefixItems
_ARGS = PredictArgs.model_json_schema()["properties"].values()
_POSITIONS = [{key: value for key, value in arg.items() if key != "title"} for arg in _ARGS]


class PredictRequest(BaseModel):
    """`POST /api/predict` (Gradio format). Extra Gradio keys (fn_index, session_hash...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    data: list[Any] = Field(
        min_length=2, max_length=3, description="[image_b64, text, threshold]; threshold is optional (0.5).",
        json_schema_extra={"prefixItems": _POSITIONS},
    )

    def args(self) -> PredictArgs:
        names = list(PredictArgs.model_fields)
        try:
            return PredictArgs(**dict(zip(names, self.data)))
        except ValidationError as exc:
            problems = [
                f"data[{names.index(str(e['loc'][0]))}] ({e['loc'][0]}): {e['msg']}" for e in exc.errors()
            ]
            raise ValidationFailed("invalid request: " + "; ".join(problems)) from None


# ---------------------------------------------------------------- responses


class Sam2Response(BaseModel):
    """The Space's structured result; polygon fields only with `vectorize`."""

    masks: list[str] = Field(description="One base64 PNG per object (8-bit, 255 = object), at the original size.")
    scores: list[float] = Field(description="Per mask: detection x presence (text) or predicted IoU (visual).")
    labels: list[str] = Field(description="Per mask: the text prompt it answers, or \"visual\" (an extension).")
    num_objects: int = Field(description="Number of masks.")
    sam_version: Literal["3.0"] = Field(SAM_VERSION, description="Always \"3.0\".")
    prompt_types: list[PromptType] = Field(description="Kinds of prompt in the request: text and/or visual.")
    success: Literal[True] = Field(True, description="Always true here; errors carry false.")
    polygons: list[list[list[float]]] | None = Field(
        None, description="vectorize: per mask, the outline [[x, y], ...] of its largest part ([] if empty)."
    )
    polygon_format: Literal["pixel_coordinates"] | None = Field(
        None, description="vectorize: always pixel_coordinates."
    )
    original_image_size: list[int] | None = Field(None, description="vectorize: [width, height] of the image.")


class PredictResponse(BaseModel):
    """Gradio's `/api/predict` envelope around the one output, the structured result."""

    data: list[Sam2Response] = Field(description="The function's outputs: one structured result.")
    is_generating: Literal[False] = Field(False, description="Always false (not a generator).")
    duration: float = Field(description="Seconds spent on the request.")


# ------------------------------------------------------------- translation


def _image(value: str) -> ImageInput:
    if _URL.match(value) and not value.lstrip()[:5].lower() == "data:":
        raise InvalidImage("image must be base64-encoded image bytes (or a base64 data: URI); URLs are not accepted")
    return ImageInput(value)


def _labels(labels: list[int] | None, items: list, what: str, plural: str) -> list[int]:
    if labels is None:
        return [1] * len(items)
    if len(labels) != len(items):
        raise InvalidPrompt(
            f"{len(items)} {plural} but {len(labels)} {what}_labels: give one label per {what} (1 or 0)"
        )
    return list(labels)


def _visual(inputs: Sam2Inputs, point_labels: list[int], positive: list[tuple]) -> list[VisualPrompt]:
    points = tuple(tuple(p) for p in inputs.points)
    if inputs.text_prompts:
        return [VisualPrompt(points, tuple(point_labels), None, inputs.multimask_output)] if points else []
    if points and len(positive) > 1:
        raise InvalidPrompt(
            f"points refine one object, but {len(positive)} positive boxes were given: "
            "send at most one positive box with points, or the boxes without points"
        )
    if points:
        box = positive[0] if positive else None
        return [VisualPrompt(points, tuple(point_labels), box, inputs.multimask_output)]
    return [VisualPrompt((), (), box, inputs.multimask_output) for box in positive]


def to_internal(inputs: Sam2Inputs, config: Config) -> tuple[SegmentRequest, list[tuple]]:
    """The internal request, and the negative boxes whose area is cleared from visual masks."""
    point_labels = _labels(inputs.point_labels, inputs.points, "point", "points")
    box_labels = _labels(inputs.box_labels, inputs.boxes, "box", "boxes")
    boxes = [tuple(b) for b in inputs.boxes]
    positive = [b for b, label in zip(boxes, box_labels) if label == 1]
    negative = [b for b, label in zip(boxes, box_labels) if label == 0]
    prompts: list[Prompt] = [
        ConceptPrompt(text, tuple(boxes), tuple(bool(v) for v in box_labels)) for text in inputs.text_prompts
    ]
    prompts += _visual(inputs, point_labels, positive)
    if not prompts:
        raise InvalidPrompt(
            "nothing to segment: give text_prompts, points or a positive box (negative boxes only exclude areas)"
        )
    params = SegmentParams(threshold=inputs.confidence_threshold, max_instances=config.max_instances)
    return SegmentRequest(_image(inputs.image), prompts, params), negative


def prompt_types(inputs: Sam2Inputs) -> list[PromptType]:
    kinds: list[PromptType] = ["text"] if inputs.text_prompts else []
    return kinds + (["visual"] if inputs.points or inputs.boxes else [])


def _clear(mask: np.ndarray, boxes: list[tuple]) -> np.ndarray:
    """Switch off every pixel that a (validated, clipped) xyxy box touches."""
    for x0, y0, x1, y1 in boxes:
        mask[math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1)] = False
    return mask


def _outline(mask: np.ndarray, epsilon: float) -> list[list[float]]:
    """The exterior of the mask's largest connected part, simplified; [] for an empty mask."""
    best, best_area = [], -1.0
    for exterior in codecs.mask_to_polygons(mask, simplify_epsilon=epsilon or None):
        xy = np.asarray(exterior, dtype=np.float64)
        area = 0.5 * abs(float(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1))))
        if area > best_area:
            best, best_area = exterior, area
    return best


def render(result: SegmentResult, inputs: Sam2Inputs, negative: list[tuple]) -> Sam2Response:
    """Masks of every prompt in order (text prompts, then visual), best first within each."""
    negative = [validate_box_xyxy(b, result.width, result.height) for b in negative]
    masks, scores, labels, polygons = [], [], [], []
    for prompt_result in result.prompts:
        prompt = prompt_result.prompt
        for instance in prompt_result.instances:
            mask = codecs.rle_decode(instance.rle)
            if isinstance(prompt, VisualPrompt) and negative:
                mask = _clear(mask.copy(), negative)
            masks.append(codecs.mask_to_png_base64(mask))
            scores.append(float(instance.score))
            labels.append(prompt.text if isinstance(prompt, ConceptPrompt) and prompt.text else "visual")
            if inputs.vectorize:
                polygons.append(_outline(mask, inputs.simplify_epsilon))
    response = Sam2Response(
        masks=masks, scores=scores, labels=labels, num_objects=len(masks), prompt_types=prompt_types(inputs)
    )
    if inputs.vectorize:
        response.polygons = polygons
        response.polygon_format = "pixel_coordinates"
        response.original_image_size = [result.width, result.height]
    return response


def predict_inputs(args: PredictArgs) -> Sam2Inputs:
    """The Gradio function is the text-only case of the SAM2-compatible one."""
    return Sam2Inputs(image=args.image, text_prompts=[args.text], confidence_threshold=args.threshold)


class SpaceError(BaseModel):
    """The Space's error body, as `error_body` renders it."""

    success: Literal[False] = Field(description="Always false.")
    error: str = Field(description="What went wrong, in words a person can act on.")
    error_type: str = Field(description="A stable machine-readable code (bad_request, unauthorized, ...).")


error_body = hf_space_error_body  # registered for /api/predict and /api/sam2_compatible (serve_app/core/shapes.py)
register_key_rule("/api/predict", ("bearer",), "`Authorization: Bearer <token>`")
register_key_rule("/api/sam2_compatible", ("bearer",), "`Authorization: Bearer <token>`")
register_admitted_path("/api/predict")  # runs the model: a deadline and admission control (core/admission.py)
register_admitted_path("/api/sam2_compatible")  # runs the model: a deadline and admission control (core/admission.py)


# ------------------------------------------------------------------- routes

router = APIRouter(tags=["hf_space"])


def _tenant(service: SegmentService, authorization: str | None) -> str:
    return service.auth.tenant(bearer(authorization), "`Authorization: Bearer <token>`")


async def _segment(service: SegmentService, inputs: Sam2Inputs, tenant: str) -> Sam2Response:
    request, negative = to_internal(inputs, service.config)
    result, _ = await service.segment(request, tenant)
    return render(result, inputs, negative)


@router.post(
    "/api/sam2_compatible", response_model=Sam2Response, response_model_exclude_none=True,
    responses=error_responses(SpaceError, 400, 401, 413, 422, 429, 503, 504),
)
async def sam2_compatible(
    body: Sam2Request, service: SegmentService = Depends(get_service), authorization: str | None = Header(None)
) -> Sam2Response:
    """Text prompts (each separately), points and boxes in one call; PNG masks, optional polygons."""
    return await _segment(service, body.inputs, _tenant(service, authorization))


@router.post(
    "/api/predict", response_model=PredictResponse, response_model_exclude_none=True,
    responses=error_responses(SpaceError, 400, 401, 413, 422, 429, 503, 504),
)
async def predict(
    body: PredictRequest, service: SegmentService = Depends(get_service), authorization: str | None = Header(None)
) -> PredictResponse:
    """Gradio-style `{"data": [image_b64, text, threshold]}`; the structured result is `data[0]`."""
    started = time.perf_counter()
    tenant = _tenant(service, authorization)
    result = await _segment(service, predict_inputs(body.args()), tenant)
    return PredictResponse(data=[result], duration=time.perf_counter() - started)
