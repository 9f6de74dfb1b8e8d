"""The one internal request and result type every provider adapter translates to and from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np

Box = tuple[float, float, float, float]  # xyxy, pixels of the original image
Point = tuple[float, float]  # x, y, pixels of the original image


@dataclass(frozen=True)
class ConceptPrompt:
    """Find every instance of a concept: a phrase, exemplar boxes (label True = positive), or both."""

    text: str | None = None
    boxes: tuple[Box, ...] = ()
    box_labels: tuple[bool, ...] = ()
    threshold: float | None = None  # overrides the request threshold for this prompt

    kind: Literal["concept"] = "concept"


@dataclass(frozen=True)
class VisualPrompt:
    """Segment one object from clicks (label 1 = positive, 0 = negative) and/or one box."""

    points: tuple[Point, ...] = ()
    point_labels: tuple[int, ...] = ()
    box: Box | None = None
    multimask: bool = False
    mask_logits: np.ndarray | None = field(default=None, compare=False)  # low-res logits from an earlier answer

    kind: Literal["visual"] = "visual"


@dataclass(frozen=True)
class AutoPrompt:
    """Automatic masks: a points_per_side² grid of single clicks through the visual path, filtered and de-duplicated."""

    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.0  # 0 disables the stability filter
    nms_iou: float = 0.7  # mask IoU above which the lower-scoring mask is a duplicate
    max_masks: int = 0  # 0 = no cap beyond SegmentParams.max_instances

    kind: Literal["auto"] = "auto"


Prompt = Union[ConceptPrompt, VisualPrompt, AutoPrompt]


@dataclass(frozen=True)
class SegmentParams:
    """Thresholds and caps applied after the model."""

    threshold: float = 0.5  # concept: minimum detection × presence score
    mask_threshold: float = 0.5  # concept: probability cut for mask pixels
    nms_iou: float | None = 0.5  # per-prompt NMS on boxes; None disables
    cross_prompt_nms_iou: float | None = None  # NMS across prompts; None disables
    max_instances: int = 100
    return_logits: bool = False  # visual: return the low-res logits for refinement


@dataclass(frozen=True)
class ImageInput:
    """Where the image comes from: base64 / data URI / URL, and/or a client id for its cached embedding."""

    source: str | None = None
    image_id: str | None = None


@dataclass
class SegmentRequest:
    """What every provider adapter produces: an image reference, prompts in original-image pixels, params."""

    image: ImageInput
    prompts: list[Prompt]
    params: SegmentParams = field(default_factory=SegmentParams)
    model: str | None = None  # a registry name (serve_app/core/registry.py); None: the default model


@dataclass
class ResolvedImage:
    """An image once the service has it: its cache key, size, embedding handle and (when decoded) pixels."""

    key: str
    height: int
    width: int
    embedding: object | None  # a Ray ObjectRef in the Serve graph, a tensor in-process; None until encoded
    pixels: np.ndarray | None = None
    cache_hit: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass
class Instance:
    """One segmented object: a COCO RLE mask at the original size, an xyxy box in pixels, a score."""

    rle: dict  # {"size": [H, W], "counts": str}
    box: Box
    score: float
    area: int = 0


@dataclass
class PromptResult:
    prompt_index: int
    prompt: Prompt
    instances: list[Instance]
    low_res_logits: np.ndarray | None = None  # visual prompts, best mask first, when requested


@dataclass
class SegmentResult:
    height: int
    width: int
    prompts: list[PromptResult]
    timings_ms: dict[str, float] = field(default_factory=dict)
    model: str | None = None  # the registry name of the model that answered
