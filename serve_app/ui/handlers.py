"""What the web UI does, free of Gradio: the same service and video calls as the APIs, answers as pixels and files."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydantic import ValidationError

from serve_app.core.auth import bearer
from serve_app.core.config import Config
from serve_app.core.errors import InvalidPrompt, ValidationFailed
from serve_app.core.http import validation_error_message
from serve_app.core.types import (
    AutoPrompt,
    Box,
    ConceptPrompt,
    ImageInput,
    Prompt,
    SegmentParams,
    SegmentRequest,
    SegmentResult,
    VisualPrompt,
)
from serve_app.image import codecs
from serve_app.image.service import SegmentService
from serve_app.protocols import hf_space
from serve_app.video.backend import VideoBackend
from serve_app.video.io import VideoLimits, decode_video, render_masks_video

logger = logging.getLogger(__name__)

KEY_HOW = "your API key in the UI's key field, or `Authorization: Bearer <key>` from API clients"
Click = tuple[float, float, int]  # x, y, label (1 = on the object, 0 = background)


@dataclass
class Found:
    """One instance as the UI shows and downloads it."""

    label: str
    score: float
    box: list[float]
    area: int
    rle: dict

    def mask(self) -> np.ndarray:
        return codecs.rle_decode(self.rle)


@dataclass
class ImageAnswer:
    pixels: np.ndarray  # the input, RGB, with the clicks and boxes drawn on it
    found: list[Found]

    def summary(self) -> list[dict]:
        return [{"label": f.label, "score": round(f.score, 4), "box": [round(v, 1) for v in f.box], "area": f.area}
                for f in self.found]


def tenant(service: SegmentService, typed_key: str | None, headers: dict[str, str]) -> str:
    """The UI's key field, else `Authorization: Bearer` (or gradio_client's `token=`, sent as x-hf-authorization)."""
    key = (typed_key or "").strip() or bearer(headers.get("authorization")) or bearer(headers.get("x-hf-authorization"))
    return service.auth.tenant(key, KEY_HOW)


def image_source(path: str | None) -> str:
    """An uploaded file as the base64 the service reads (the same bytes an API client would send)."""
    if not path:
        raise InvalidPrompt("upload an image first")
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def parse_texts(text: str | None) -> list[str]:
    """Prompts separated by commas or new lines: "cat, dog" is two concepts."""
    parts = (text or "").replace("\n", ",").split(",")
    return [p.strip() for p in parts if p.strip()]


def _json_list(name: str, text: str | None, width: int, example: str) -> list[list[float]]:
    try:
        value = json.loads(text) if text and text.strip() else []
    except ValueError:
        raise InvalidPrompt(f"{name} must be a JSON list such as {example}") from None
    if not isinstance(value, list) or not all(
        isinstance(v, list) and len(v) == width and all(isinstance(n, (int, float)) for n in v) for v in value
    ):
        raise InvalidPrompt(f"{name} must be a JSON list such as {example}")
    return [[float(n) for n in v] for v in value]


def parse_clicks(text: str | None) -> list[Click]:
    rows = _json_list("clicks", text, 3, "[[40, 30, 1], [90, 60, 0]] (x, y, 1 = object / 0 = background)")
    return [(x, y, 1 if label else 0) for x, y, label in rows]


def parse_boxes(text: str | None) -> list[Box]:
    return [tuple(b) for b in _json_list("boxes", text, 4, "[[10, 20, 110, 90]] (x0, y0, x1, y1)")]  # type: ignore


def add_click(
    mode: str, x: float, y: float, clicks: str, boxes: str, corner: list | None
) -> tuple[str, str, list | None]:
    """A click on the image: a point (object / background), or one corner of a box (the second click closes it)."""
    x, y = round(float(x)), round(float(y))
    if mode.startswith("box"):
        if corner is None:
            return clicks, boxes, [x, y]
        x0, y0 = corner
        box = [min(x0, x), min(y0, y), max(x0, x), max(y0, y)]
        return clicks, json.dumps([*map(list, parse_boxes(boxes)), box]), None
    label = 0 if mode.startswith("background") else 1
    return json.dumps([[int(a), int(b), c] for a, b, c in parse_clicks(clicks)] + [[x, y, label]]), boxes, None


def image_prompts(texts: list[str], clicks: list[Click], boxes: list[Box]) -> list[Prompt]:
    """Texts find every instance (boxes are their exemplars); without text, clicks (+ a box) make one object and
    each box alone another."""
    if texts:
        prompts: list[Prompt] = [ConceptPrompt(t, tuple(boxes), (True,) * len(boxes)) for t in texts]
        if clicks:
            prompts.append(VisualPrompt(tuple((x, y) for x, y, _ in clicks), tuple(c for *_, c in clicks)))
        return prompts
    if clicks:
        points, labels = tuple((x, y) for x, y, _ in clicks), tuple(c for *_, c in clicks)
        first = [VisualPrompt(points, labels, boxes[0] if boxes else None)]
        return first + [VisualPrompt(box=b) for b in boxes[1:]]
    if boxes:
        return [VisualPrompt(box=b) for b in boxes]
    raise InvalidPrompt("nothing to segment: type a prompt, click on the image, or draw a box")


def _label(prompt: Prompt) -> str:
    if isinstance(prompt, ConceptPrompt):
        return prompt.text or "exemplar"
    return "mask" if isinstance(prompt, AutoPrompt) else "object"


def found_of(result: SegmentResult) -> list[Found]:
    out = []
    for r in result.prompts:
        for i in r.instances:
            out.append(Found(f"{_label(r.prompt)} #{len(out) + 1}", float(i.score), list(i.box), i.area, i.rle))
    return out


def draw_prompts(pixels: np.ndarray, clicks: list[Click], boxes: list[Box]) -> np.ndarray:
    out = np.ascontiguousarray(pixels.copy())
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), (255, 255, 0), 2)
    for x, y, label in clicks:
        cv2.circle(out, (int(x), int(y)), 5, (0, 255, 0) if label else (255, 0, 0), -1)
        cv2.circle(out, (int(x), int(y)), 5, (255, 255, 255), 1)
    return out


async def run_image(
    service: SegmentService, who: str, source: str, prompts: list[Prompt], params: SegmentParams,
    clicks: list[Click] = (), boxes: list[Box] = (),
) -> ImageAnswer:
    result, resolved = await service.segment(SegmentRequest(ImageInput(source), prompts, params), who, need_pixels=True)
    return ImageAnswer(draw_prompts(resolved.pixels, list(clicks), list(boxes)), found_of(result))


async def segment_image(
    service: SegmentService, who: str, path: str | None, text: str | None, clicks_text: str | None,
    boxes_text: str | None, threshold: float,
) -> ImageAnswer:
    """The Image tab: text prompts, clicks and boxes on one uploaded image."""
    clicks, boxes = parse_clicks(clicks_text), parse_boxes(boxes_text)
    prompts = image_prompts(parse_texts(text), clicks, boxes)
    params = SegmentParams(threshold=float(threshold), max_instances=service.config.max_instances)
    return await run_image(service, who, image_source(path), prompts, params, clicks, boxes)


async def automatic_masks(
    service: SegmentService, who: str, path: str | None, points_per_side: int, pred_iou_thresh: float, max_masks: int,
) -> ImageAnswer:
    """The Automatic masks tab: a click grid over the whole image."""
    prompt = AutoPrompt(int(points_per_side), float(pred_iou_thresh), max_masks=int(max_masks))
    cap = min(service.config.max_instances, int(max_masks)) if max_masks else service.config.max_instances
    return await run_image(service, who, image_source(path), [prompt], SegmentParams(max_instances=cap))


def write_downloads(answer: ImageAnswer, directory: Path) -> list[str]:
    """masks.zip (one 0/255 PNG per instance, at the image size) and masks_rle.json (COCO RLE, score, box)."""
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / "masks.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for index, found in enumerate(answer.found):
            zf.writestr(f"mask_{index:03d}.png", codecs.mask_to_png_bytes(found.mask()))
    rles = directory / "masks_rle.json"
    rles.write_text(json.dumps([{**row, "rle": f.rle} for row, f in zip(answer.summary(), answer.found)]))
    return [str(archive), str(rles)]


# ------------------------------------------------------------------------------ the Space's API, as Gradio calls


async def api_predict(service: SegmentService, who: str, image: str, text: str, threshold: float) -> dict:
    """The Space's `predict(image_b64, text, threshold)`: its structured result."""
    args = hf_space.PredictRequest(data=[image, text, threshold]).args()
    return await _space(service, who, hf_space.predict_inputs(args))


async def api_sam2_compatible(service: SegmentService, who: str, inputs: dict) -> dict:
    """The Space's `sam2_compatible(inputs)`: the `inputs` object of POST /api/sam2_compatible."""
    try:
        parsed = hf_space.Sam2Inputs.model_validate(inputs)
    except ValidationError as exc:
        raise ValidationFailed(f"invalid request: {validation_error_message(exc.errors())}") from None
    return await _space(service, who, parsed)


async def _space(service: SegmentService, who: str, inputs: hf_space.Sam2Inputs) -> dict:
    request, negative = hf_space.to_internal(inputs, service.config)
    result, _ = await service.segment(request, who)
    return hf_space.render(result, inputs, negative).model_dump(exclude_none=True)


# ------------------------------------------------------------------------------------------------------ video


def first_frame(path: str, config: Config) -> np.ndarray:
    """The frame the Video tab's clicks are drawn on."""
    return decode_video(Path(path).read_bytes(), VideoLimits.from_config(config), max_frames=1).frames[0]


async def track_video(
    videos: VideoBackend, config: Config, who: str, path: str, text: str | None, clicks: list[Click],
    apply_mask: bool, progress: Callable[[int, int], None],
) -> bytes:
    """A session on the video: the text (every instance) or the clicks (one object) on frame 0, propagated frame by
    frame (progress after each batch), rendered as mp4; the session is always closed."""
    text = (text or "").strip()
    if not text and not clicks:
        raise InvalidPrompt("type what to track, or click on the object in the first frame")
    data = Path(path).read_bytes()
    info = await videos.create(who, data, None, None)
    session, total = info["session_id"], int(info["num_frames"])
    per_frame: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(total)]
    try:
        if text:
            await videos.call(session, who, "add_text", 0, text)
        else:
            await videos.call(session, who, "add_clicks", 0, 1, [[x, y] for x, y, _ in clicks],
                              [c for *_, c in clicks], None)
        await videos.call(session, who, "start_propagation", "forward", 0, None)
        done = 0
        while (batch := await videos.call(session, who, "next_frames", 4)) is not None:
            for frame in batch:
                objects = frame["objects"]
                per_frame[frame["frame_index"]] = [(o["object_id"], codecs.rle_decode(o["rle"])) for o in objects]
            done += len(batch)
            progress(done, total)
    finally:
        try:
            await asyncio.shield(videos.close(session, who))
        except Exception as exc:  # noqa: BLE001 - never hides the tracking's own outcome
            logger.warning("closing video session %s failed: %s", session, exc)
    video = await asyncio.to_thread(decode_video, data, VideoLimits.from_config(config))
    return await asyncio.to_thread(render_masks_video, video, per_frame, apply_mask=apply_mask)


def mp4_file(data: bytes, directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tracked.mp4"
    path.write_bytes(data)
    return str(path)
