"""What a batch job is asked to do: inputs, prompts (parsed the `/v1` way), thresholds, outputs and resources."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal

from pydantic import TypeAdapter, ValidationError

from serve_app.core.config import Config
from serve_app.core.errors import Sam3Error
from serve_app.core.http import validation_error_message
from serve_app.core.types import Prompt, SegmentParams
from serve_app.image.prompts import validate_prompts
from serve_app.protocols import native
from serve_app.protocols.video import PromptIn as VideoPromptIn

SPEC_VERSION = 1
_ANY_SIDE = 1 << 30  # an image size every coordinate fits, to check prompts before any image is read


class SpecError(ValueError):
    """A job that cannot run as given (bad prompts, inputs, manifest line); the message says what to fix."""


@dataclass(frozen=True)
class Resources:
    """How the job uses the cluster: the actor pool, images per encoder forward, GPU and CPU per actor."""

    actors: int = 1
    batch_size: int = 4
    num_gpus: float | Literal["auto"] = "auto"  # auto: the cluster's GPUs shared by the actors, at most 1 each
    actor_cpus: float = 1.0
    torch_threads: int | None = None  # None: Ray's default for actor_cpus (OMP_NUM_THREADS)
    read_cpus: float = 1.0  # per image-decoding task
    rows_per_block: int = 64  # items per input block; a part holds at most one; a crash loses the blocks in flight

    def __post_init__(self) -> None:
        if self.actors < 1 or self.batch_size < 1 or self.rows_per_block < 1:
            raise SpecError("actors, batch_size and rows_per_block must be at least 1")
        if self.num_gpus != "auto" and float(self.num_gpus) < 0:
            raise SpecError("num_gpus must be auto or a fraction >= 0")
        if self.actor_cpus < 0 or self.read_cpus < 0:
            raise SpecError("actor_cpus and read_cpus must be >= 0")


@dataclass(frozen=True)
class Thresholds:
    """The `/v1/image/segment` request fields that are not the image or the prompts, with its defaults."""

    threshold: float = 0.5
    mask_threshold: float = 0.5
    nms_iou: float | None = 0.5
    cross_prompt_nms_iou: float | None = None
    max_instances: int = 100
    polygon_epsilon: float | None = None


@dataclass
class ImageJob:
    """Segment every image of `inputs` (or of `manifest`) with the same prompts (or the manifest's), into `output`."""

    inputs: list[str]
    output: str
    prompts: list[dict] = field(default_factory=list)  # /v1 prompt objects, e.g. {"type": "concept", "text": "dog"}
    manifest: str | None = None  # JSONL, one {"image": path, "prompts": [...]} per line
    thresholds: Thresholds = field(default_factory=Thresholds)
    polygons: bool = False  # also store polygons (Parquet) and write COCO segmentations as polygons
    coco: bool = True
    limit: int | None = None
    resources: Resources = field(default_factory=Resources)


@dataclass
class VideoJob:
    """Track objects through every video of `inputs`: `texts` in each, or the manifest's per-video prompts."""

    inputs: list[str]
    output: str
    texts: list[str] = field(default_factory=list)
    manifest: str | None = None  # JSONL, one {"video": path, "prompts": [/v1 video prompts]} per line
    jsonl: bool = True
    limit: int | None = None
    resources: Resources = field(default_factory=lambda: Resources(batch_size=1, rows_per_block=1))


_PROMPTS = TypeAdapter(list[native.PromptIn])
_VIDEO_PROMPTS = TypeAdapter(list[VideoPromptIn])


def _request_body(prompts: list[dict], thresholds: Thresholds) -> native.SegmentRequestIn:
    try:
        return native.SegmentRequestIn.model_validate({"prompts": prompts, **asdict(thresholds)})
    except ValidationError as exc:
        raise SpecError(f"invalid prompts or thresholds: {validation_error_message(exc.errors())}") from None


def check_image_prompts(prompts: list[dict], thresholds: Thresholds, config: Config | None = None) -> list[dict]:
    """Validate /v1 prompts and thresholds as far as can be without the image (coordinates wait for its size).

    Returns the prompts in canonical JSON-able form."""
    if not prompts:
        raise SpecError("give at least one prompt (--text, --prompt or --prompts-file), or a manifest")
    body = _request_body(prompts, thresholds)
    config = config or Config()
    try:
        validate_prompts(native.to_internal(body, config).prompts, (_ANY_SIDE, _ANY_SIDE), config)
    except Sam3Error as exc:
        raise SpecError(exc.message) from None
    return [p.model_dump(exclude_none=True) for p in body.prompts]


def check_video_prompts(prompts: list[dict]) -> list[dict]:
    """Validate /v1 video prompts (text, or clicks/box with an object_id)."""
    if not prompts:
        raise SpecError("give at least one text (--text) or a manifest of prompts")
    try:
        parsed = _VIDEO_PROMPTS.validate_python(prompts)
    except ValidationError as exc:
        raise SpecError(f"invalid video prompts: {validation_error_message(exc.errors())}") from None
    for prompt in parsed:
        if prompt.text is None and prompt.object_id is None:
            raise SpecError("a click or box prompt needs an object_id")
        if prompt.text is None and not prompt.points and prompt.box is None:
            raise SpecError("a video prompt needs text, points or a box")
    return [p.model_dump(exclude_none=True) for p in parsed]


@lru_cache(maxsize=256)
def _parse(prompts_json: str, thresholds_json: str, max_instances: int) -> tuple[list[Prompt], SegmentParams]:
    body = _request_body(json.loads(prompts_json), Thresholds(**json.loads(thresholds_json)))
    request = native.to_internal(body, Config(max_instances=max_instances))
    return request.prompts, request.params


def internal_request(prompts_json: str, thresholds: Thresholds, config: Config) -> tuple[list[Prompt], SegmentParams]:
    """The internal prompts and params `/v1/image/segment` would build from the same JSON (cached per distinct set)."""
    return _parse(prompts_json, json.dumps(asdict(thresholds), sort_keys=True), config.max_instances)


def category_name(prompt: dict, position: int) -> str:
    """A COCO category per prompt: its text, else `prompt-<position>` (exemplar-only and visual prompts)."""
    text = prompt.get("text")
    return text if text else f"prompt-{position}"


def global_categories(prompts: list[dict]) -> list[str]:
    """One category per prompt, in prompt order; a repeated name gets `#<position>` so each stays its own."""
    names: list[str] = []
    for i, prompt in enumerate(prompts):
        name = category_name(prompt, i)
        names.append(f"{name} #{i}" if name in names else name)
    return names


def canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
