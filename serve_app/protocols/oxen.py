"""Oxen.ai-compatible routes for `sam-3-image`: image edit, the model object, generated media; Oxen's error shape."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from functools import cache
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.core.auth import bearer
from serve_app.core.config import Config
from serve_app.core.errors import NotFound
from serve_app.core.http import register_admitted_path, register_key_rule
from serve_app.core.shapes import oxen_error_body
from serve_app.core.media import MediaStore, media_store
from serve_app.core.openapi import error_responses
from serve_app.core.types import (
    ConceptPrompt,
    ImageInput,
    Instance,
    ResolvedImage,
    SegmentParams,
    SegmentRequest,
    SegmentResult,
)
from serve_app.image import codecs
from serve_app.image.service import SegmentService, get_service
from serve_app.jobs.backend import queued_media

MODEL_ID = "sam-3-image"
MODEL_NAME = "Segment Anything 3 - Image"
MODEL_DESCRIPTION = (
    "Segment Anything 3 - Image is a Large Vision Model (LVM). It excels in zero-shot image segmentation, detecting "
    "and segmenting all instances of objects based on text or visual prompts, with exhaustive instance detection and "
    "a presence head that checks concept existence before localization to reduce false positives."
)
MODEL_PARAMETERS = 848_000_000
MODEL_CREATED = 1763510400  # 2025-11-19, SAM3's release
CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg"}
EXAMPLE_IMAGE = "https://hub.oxen.ai/api/repos/ox/Oxen-AI-Assets/file/main/images/ox_zoom_out_1926_1076.png"
MAX_TEXT_CHARS = 256

# ------------------------------------------------------------------------------------------------ wire models


class Sam3ImageInput(BaseModel):
    """Request parameters of Segment Anything 3 - Image (`sam-3-image`)."""

    model_config = ConfigDict(extra="forbid", title="sam-3-image")

    input_image: str = Field(
        description="Image to use as reference. Must be jpeg, png, gif, or webp. Format: uri "
        "(an http(s) URL or a data:image/...;base64 URI).",
        json_schema_extra={"format": "uri", "examples": [EXAMPLE_IMAGE]},
    )
    prompt: str = Field(
        min_length=1, max_length=MAX_TEXT_CHARS, examples=["the ox horns"],
        description="Text description of what you want to segment out of the image.",
    )
    apply_mask: bool = Field(
        True, strict=True,
        description="Apply the mask on the image: true keeps only the segmented objects (transparent background for "
        "png, black for jpg); false draws coloured masks over the whole image.",
    )
    output_format: Literal["png", "jpg"] = Field("png", description="Format of the output images.")

    @field_validator("input_image")
    @classmethod
    def _uri(cls, value: str) -> str:
        value = value.strip()
        if not value.lower().startswith(("http://", "https://", "data:")):
            raise ValueError("input_image must be an http(s) URL or a data URI (data:image/png;base64,...)")
        return value


class ImageEditRequest(Sam3ImageInput):
    """`POST /api/ai/images/edit` with `model: sam-3-image`."""

    model_config = ConfigDict(extra="forbid", title="ImageEditRequest")

    model: str = Field(max_length=128, description=f"The model id: `{MODEL_ID}` (the default model) or a name "
                       "from `GET /api/ai/models`.")
    response_format: Literal["url", "b64_json"] = Field(
        "url", description="`url` returns links to the generated files; `b64_json` returns their bytes inline."
    )
    target_namespace: str | None = Field(
        None, max_length=256, description="Accepted for compatibility and ignored: results belong to the API key."
    )


class ImageOut(BaseModel):
    url: str | None = Field(None, description="Link to the file (response_format=url); valid for SAM3_MEDIA_TTL_S.")
    b64_json: str | None = Field(None, description="The file's bytes, base64 (response_format=b64_json).")


class MaskOut(BaseModel):
    score: float = Field(description="Detection × presence score of this instance, in (0, 1].")
    box: list[float] = Field(description="[x0, y0, x1, y1] in pixels of the input image.")
    area: int = Field(description="Mask area in pixels.")
    rle: dict = Field(description="The instance mask as COCO compressed RLE {size: [height, width], counts}.")


class ImageEditResponse(BaseModel):
    model: str = Field(description="The model that answered.")
    created: int = Field(description="Unix time of the answer.")
    images: list[ImageOut] = Field(description="The edited image (one), in output_format.")
    mask: ImageOut = Field(description="Union of all instance masks: a grey PNG, 255 = segmented, 0 = background.")
    masks: list[MaskOut] = Field(description="One entry per instance found, best score first.")
    width: int = Field(description="Input image width in pixels (the size of every output).")
    height: int = Field(description="Input image height in pixels.")


class ModelObject(BaseModel):
    id: str = Field(description="The model id used in API calls.")
    object: Literal["model"] = Field("model", description="Always `model`.")
    created: int = Field(description="Unix time the model was released.")
    owned_by: str = Field(description="Who serves the model.")
    name: str = Field(description="Human-readable name.")
    display_name: str = Field(description="Human-readable name (Oxen's newer field name).")
    description: str = Field(description="What the model does.")
    model_type: Literal["base"] = Field("base", description="Always `base`: no fine-tunes are served.")
    endpoint: str = Field(description="The endpoint that runs the model.")
    capabilities: dict[str, list[str]] = Field(description="Input and output modalities.")
    parameter_count: int = Field(description="Parameters of the full SAM3 model.")
    served_weights: str = Field(description="The weights this server loaded (SAM3_MODEL).")
    json_request_schema: dict = Field(description="JSON Schema of the model's request parameters.")
    request_schema: dict = Field(description="The same schema under Oxen's newer field name.")


class ModelList(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[ModelObject] = Field(description="The models served.")


# ------------------------------------------------------------------------------------------------ translation


def served_model(service: SegmentService, model_id: str) -> str:
    """Oxen's `model` -> a served model: `sam-3-image` is the default; a SAM3_MODELS name is that model; anything
    else is a 404 in Oxen's shape."""
    if model_id == MODEL_ID:
        return service.registry.default
    if service.registry.listed and model_id in service.registry.specs:
        return model_id
    served = ", ".join([MODEL_ID, *registry_ids(service)])
    raise NotFound(f"Model not found: {model_id[:80]} (this server serves {served})")


def registry_ids(service: SegmentService) -> list[str]:
    """The SAM3_MODELS names, each an Oxen model id of its own (none with SAM3_MODEL alone)."""
    return list(service.registry.specs) if service.registry.listed else []


def registry_object(service: SegmentService, name: str) -> ModelObject:
    spec = service.registry.specs[name]
    base = model_object(service.config)
    return base.model_copy(update={
        "id": name, "name": f"{MODEL_NAME} ({name})", "display_name": f"{MODEL_NAME} ({name})",
        "description": f"{MODEL_DESCRIPTION} Weights: {spec.source}"
                       + (" (the default: `sam-3-image` answers with it)." if name == service.registry.default else "."),
        "served_weights": spec.source})


def to_internal(body: Sam3ImageInput, config: Config) -> SegmentRequest:
    """Concept segmentation of the prompt, with the same defaults as the native API."""
    params = SegmentParams(max_instances=min(SegmentParams().max_instances, config.max_instances))
    return SegmentRequest(ImageInput(source=body.input_image), [ConceptPrompt(text=body.prompt)], params)


def union_mask(instances: list[Instance], height: int, width: int) -> np.ndarray:
    union = np.zeros((height, width), dtype=bool)
    for instance in instances:
        union |= codecs.rle_decode(instance.rle)
    return union


def edited_image(pixels: np.ndarray, instances: list[Instance], union: np.ndarray, body: Sam3ImageInput) -> bytes:
    """apply_mask: only the segmented pixels (png: transparent elsewhere, jpg: black); else coloured overlays."""
    if body.apply_mask:
        image = codecs.cutout(pixels, union) if body.output_format == "png" else codecs.cutout_on_black(pixels, union)
    else:
        # a generator: one decoded mask in memory at a time, however many instances there are
        image = codecs.overlay(pixels, (codecs.rle_decode(i.rle) for i in instances))
    return codecs.encode_image(image, body.output_format)


Publisher = Callable[[bytes, str], str]  # (file bytes, content type) -> URL


def publisher(request: Request, store: MediaStore, owner: str) -> Publisher:
    """Store a file; its absolute URL on the host and route prefix the request came in on."""

    def publish(data: bytes, content_type: str) -> str:
        return str(request.url_for("oxen_media", media_id=store.put(data, content_type, owner)))

    return publish


def _out(data: bytes, content_type: str, response_format: str, publish: Publisher | None) -> ImageOut:
    if response_format == "b64_json" or publish is None:
        return ImageOut(b64_json=base64.b64encode(data).decode("ascii"))
    return ImageOut(url=publish(data, content_type))


def render_edit(
    body: ImageEditRequest, result: SegmentResult, resolved: ResolvedImage, *,
    publish: Publisher | None = None, created: int | None = None,
) -> dict:
    """The Oxen image-edit response; files go through `publish` (url) or inline (b64_json). CPU-bound."""
    if resolved.pixels is None:
        raise ValueError("render_edit needs the decoded pixels: call segment(..., need_pixels=True)")
    instances = result.prompts[0].instances if result.prompts else []
    union = union_mask(instances, result.height, result.width)
    image = edited_image(resolved.pixels, instances, union, body)
    fmt = body.response_format
    response = ImageEditResponse(
        model=MODEL_ID,
        created=int(time.time()) if created is None else created,
        images=[_out(image, CONTENT_TYPES[body.output_format], fmt, publish)],
        mask=_out(codecs.mask_to_png_bytes(union), "image/png", fmt, publish),
        masks=[MaskOut(score=i.score, box=list(i.box), area=i.area, rle=i.rle) for i in instances],
        width=result.width,
        height=result.height,
    )
    return response.model_dump(exclude_none=True)


@cache
def request_schema() -> dict:
    return Sam3ImageInput.model_json_schema()


def model_object(config: Config) -> ModelObject:
    return ModelObject(
        id=MODEL_ID, created=MODEL_CREATED, owned_by="sam3-serve", name=MODEL_NAME, display_name=MODEL_NAME,
        description=MODEL_DESCRIPTION, endpoint="/images/edit",
        capabilities={"input": ["image", "text"], "output": ["image"]}, parameter_count=MODEL_PARAMETERS,
        served_weights=config.model, json_request_schema=request_schema(), request_schema=request_schema(),
    )


# every Oxen model this server answers for: id -> its model object (oxen_video adds sam-3-video)
MODEL_OBJECTS: dict[str, Callable[[Config], ModelObject]] = {MODEL_ID: model_object}


class OxenErrorDetail(BaseModel):
    type: str = Field(description="The error code (resource_not_found, unauthorized, bad_request, ...).")
    title: str = Field(description="What went wrong.")
    details: Any = Field(None, description="Validation errors: [{field, message}, ...]; absent otherwise.")


class OxenError(BaseModel):
    """Oxen's error body, as `error_body` renders it."""

    status: Literal["error"] = Field(description="Always `error`.")
    status_message: str = Field(description="The error code.")
    status_description: str = Field(description="What went wrong, in words a person can act on.")
    error: OxenErrorDetail


error_body = oxen_error_body  # registered for /api/ai, /api/media and /api/events (serve_app/core/shapes.py)
register_key_rule("/api/ai", ("bearer",), "`Authorization: Bearer <key>`")
register_key_rule("/api/events", ("bearer",), "`Authorization: Bearer <key>`")
register_admitted_path("/api/ai/images/edit")  # runs the model: a deadline and admission control (core/admission.py)

# ------------------------------------------------------------------------------------------------ routes

router = APIRouter(tags=["oxen"])


def oxen_tenant(service: SegmentService = Depends(get_service), authorization: str | None = Header(None)) -> str:
    """Runs before the body is validated, so an unauthenticated caller learns nothing about the schema."""
    return service.auth.tenant(bearer(authorization), "`Authorization: Bearer <key>`")


@router.post(
    "/api/ai/images/edit", response_model=ImageEditResponse, response_model_exclude_none=True,
    responses=error_responses(OxenError, 400, 401, 404, 413, 422, 429, 503, 504),
)
async def images_edit(
    body: ImageEditRequest,
    request: Request,
    tenant: str = Depends(oxen_tenant),
    service: SegmentService = Depends(get_service),
) -> dict:
    """Segment everything the prompt names; answer with the edited image, the union mask and per-instance masks."""
    internal = to_internal(body, service.config)
    internal.model = served_model(service, body.model)
    result, resolved = await service.segment(internal, tenant, need_pixels=True)
    publish = publisher(request, media_store(service.config), tenant)
    return await asyncio.to_thread(render_edit, body, result, resolved, publish=publish)


@router.get("/api/ai/models", response_model=ModelList, responses=error_responses(OxenError, 401, 422, 503))
async def list_models(_: str = Depends(oxen_tenant), service: SegmentService = Depends(get_service)) -> ModelList:
    """The models this server answers for: sam-3-image (the default model), sam-3-video, and each SAM3_MODELS name."""
    return ModelList(data=[build(service.config) for build in MODEL_OBJECTS.values()]
                     + [registry_object(service, name) for name in registry_ids(service)])


@router.get(
    "/api/ai/models/{model_id}", response_model=ModelObject, responses=error_responses(OxenError, 401, 404, 422, 503)
)
async def get_model(
    model_id: str, _: str = Depends(oxen_tenant), service: SegmentService = Depends(get_service)
) -> ModelObject:
    """The model object, with the JSON Schema of its request parameters."""
    if model_id in registry_ids(service) and model_id not in MODEL_OBJECTS:
        return registry_object(service, model_id)
    if model_id not in MODEL_OBJECTS:
        served = ", ".join([*MODEL_OBJECTS, *registry_ids(service)])
        raise NotFound(f"Model not found: {model_id[:80]} (this server serves {served})")
    return MODEL_OBJECTS[model_id](service.config)


@router.get(
    "/api/media/{media_id}", name="oxen_media", response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "video/mp4": {}}, "description": "The file."},
               **error_responses(OxenError, 404, 422, 503)},
)
async def get_media(media_id: str, service: SegmentService = Depends(get_service)) -> Response:
    """A generated file. No auth: the id is an unguessable capability, like a signed URL, until it expires."""
    store = media_store(service.config)
    item = store.get(media_id) or await queued_media(media_id)
    if item is None:
        raise NotFound("media not found: the id is unknown, or the file expired or was evicted (SAM3_MEDIA_TTL_S)")
    headers = {"Cache-Control": f"private, max-age={int(store.remaining_s(item))}", "X-Content-Type-Options": "nosniff"}
    return Response(item.data, media_type=item.content_type, headers=headers)
