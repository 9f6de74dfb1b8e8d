"""Post-processing after the model: scores, thresholds, NMS, caps, upsampling and RLE (numpy, torch, cv2, pycocotools).

Full-size masks are never held all at once: `full_size_chunks` upsamples a few at a time (MASK_CHUNK_BYTES of
working memory), the caller RLE-encodes the chunk and drops it (docs/memory.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from serve_app.core.errors import GatewayTimeout, PayloadTooLarge
from serve_app.core.types import Instance
from serve_app.image.codecs import coco_encode
from serve_app.image.geometry import _box_iou_torch, nms_torch

MASK_CHUNK_BYTES = 64 * 1024**2  # working memory of one chunk of full-size masks (at least one mask per chunk)
BYTES_PER_MASK_PIXEL = 5  # float32 values and their bool cut, together; then RLE: 2 B/px a mask + 4 B/px once
NMS_BLOCK = 256  # candidates compared against each other at once by `nms_capped`
MAX_RESULT_RLE_BYTES = 256 * 1024**2  # RLE one request's masks may take (the answer's size and the decoder's)


class Stopped(Exception):
    """A decode whose request was cancelled stops at its next chunk: nobody is waiting for its answer."""


class ResultBudget:
    """The RLE bytes one request may produce, charged chunk by chunk so an oversized answer stops early (413).

    With a deadline (time.monotonic()), it also ends work nobody waits for: once the caller's timeout has passed
    (the client already has its 504), the next chunk raises instead of running on for minutes.
    """

    def __init__(self, limit: int = MAX_RESULT_RLE_BYTES, deadline: float | None = None, stop=None) -> None:
        self.limit, self.used, self.deadline = limit, 0, deadline
        self.stop = stop  # a threading.Event the caller sets when the request was cancelled (its client left)

    def check_deadline(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped("the request was cancelled: its client went away")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise GatewayTimeout(
                "the masks of this request took longer than the request timeout (SAM3_REQUEST_TIMEOUT_S): ask for "
                "fewer prompts, instances or points_per_side, or send a smaller image"
            )

    def charge(self, instances: list[Instance]) -> None:
        self.used += sum(len(i.rle["counts"]) for i in instances)
        if self.used > self.limit:
            raise PayloadTooLarge(
                f"the masks of this request take more than {self.limit / 1024**2:.0f} MiB as RLE: ask for fewer "
                "prompts or instances (max_instances), or send a smaller image"
            )


def concept_scores(pred_logits: torch.Tensor, presence_logits: torch.Tensor | None) -> torch.Tensor:
    """Score = detection × presence, both as probabilities (as Sam3Processor computes it)."""
    scores = pred_logits.float().sigmoid()
    if presence_logits is not None:
        scores = scores * presence_logits.float().sigmoid()
    return scores


def select_concept_instances(
    scores: torch.Tensor,
    boxes_xyxy_norm: torch.Tensor,
    threshold: float,
    nms_iou: float | None,
    max_instances: int,
    size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices kept for one prompt (best score first) and their boxes in pixels."""
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=scores.device)
    boxes = (boxes_xyxy_norm.float().clamp(0.0, 1.0)) * scale  # predicted boxes may overhang the image
    keep = torch.nonzero(scores > threshold).flatten()
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    if nms_iou is not None and keep.numel() > 1:
        keep = keep[nms_torch(boxes[keep], scores[keep], nms_iou)]
    keep = keep[:max_instances]
    return keep, boxes[keep]


def upsample_probabilities(mask_logits: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Concept masks: sigmoid, bilinear to the original size, then the probability cut."""
    if mask_logits.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=mask_logits.device)
    probs = F.interpolate(mask_logits.float().sigmoid()[None], size=size, mode="bilinear", align_corners=False)[0]
    return probs > threshold


def upsample_logits(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Visual masks: bilinear on the logits to the original size, then > 0 (as Sam3TrackerProcessor does)."""
    if mask_logits.shape[0] == 0:  # automatic masks may all be filtered out
        return torch.zeros((0, *size), dtype=torch.bool, device=mask_logits.device)
    return F.interpolate(mask_logits.float()[None], size=size, mode="bilinear", align_corners=False)[0] > 0.0


def mask_chunk_size(size: tuple[int, int], chunk_bytes: int = MASK_CHUNK_BYTES) -> int:
    """Full-size masks cut per chunk: as many as fit `chunk_bytes` of working memory, at least one."""
    return max(1, chunk_bytes // max(1, size[0] * size[1] * BYTES_PER_MASK_PIXEL))


def full_size_chunks(
    mask_logits: torch.Tensor, size: tuple[int, int], threshold: float | None = None,
    chunk_bytes: int = MASK_CHUNK_BYTES,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, bool (k, H, W) masks) for consecutive chunks of low-res masks, cut at the original size.

    threshold None: logits > 0 (visual masks); else sigmoid > threshold (concept masks). Bilinear interpolation
    treats every mask on its own, so the chunks are bitwise the masks `upsample_*` makes for the whole stack.
    """
    step = mask_chunk_size(size, chunk_bytes)
    for start in range(0, mask_logits.shape[0], step):
        rows = slice(start, min(start + step, mask_logits.shape[0]))
        chunk = mask_logits[rows]
        if threshold is None:
            yield rows, upsample_logits(chunk, size)
        else:
            yield rows, upsample_probabilities(chunk, size, threshold)


def instances_from_low_res(
    mask_logits: torch.Tensor, size: tuple[int, int], scores: torch.Tensor, boxes: torch.Tensor | None = None,
    threshold: float | None = None, chunk_bytes: int = MASK_CHUNK_BYTES, budget: ResultBudget | None = None,
) -> list[Instance]:
    """Instances (RLE at the original size) from low-res masks, chunk by chunk: memory is one chunk, not N masks.

    boxes None: the tight box of each full-size mask (visual masks); else the given pixel boxes (concept).
    """
    instances: list[Instance] = []
    for rows, masks in full_size_chunks(mask_logits, size, threshold, chunk_bytes):
        if budget is not None:
            budget.check_deadline()
        chunk = build_instances(masks, None if boxes is None else boxes[rows], scores[rows])
        del masks  # before the next chunk is cut: one chunk alive at a time
        if budget is not None:
            budget.charge(chunk)
        instances.extend(chunk)
    return instances


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (pixel edges) around (N, H, W) masks; zeros for empty masks."""
    n = masks.shape[0]
    out = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0:
        return out
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    for i in range(n):
        ys, xs = torch.nonzero(rows[i]).flatten(), torch.nonzero(cols[i]).flatten()
        if ys.numel():
            out[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return out


def encode_masks(masks: torch.Tensor) -> tuple[list[dict], list[tuple[float, float, float, float]], list[int]]:
    """(k, H, W) bool masks -> COCO compressed RLE, tight xyxy box (pixel edges; zeros when empty) and area of each.

    Boxes and areas come from the RLE runs: the integers `mask_boxes` and a pixel count give.
    """
    if masks.shape[0] == 0:
        return [], [], []
    height, width = int(masks.shape[1]), int(masks.shape[2])
    encoded = coco_encode(masks.cpu().numpy())
    areas = [int(a) for a in mask_utils.area(encoded)]
    boxes = [(float(x), float(y), float(x + w), float(y + h)) for x, y, w, h in mask_utils.toBbox(encoded).tolist()]
    rles = [{"size": [height, width], "counts": r["counts"].decode("utf-8")} for r in encoded]
    return rles, boxes, areas


def build_instances(masks: torch.Tensor, boxes: torch.Tensor | None, scores: torch.Tensor) -> list[Instance]:
    """Instances of one chunk of full-size masks; boxes None: each mask's tight box."""
    rles, tight, areas = encode_masks(masks)
    given = tight if boxes is None else [tuple(float(v) for v in box) for box in boxes.tolist()]
    return [
        Instance(rle=rle, box=box, score=float(score), area=area)
        for rle, box, score, area in zip(rles, given, scores.tolist(), areas)
    ]


def nms_capped(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, cap: int) -> torch.Tensor:
    """The first `cap` indices `nms_torch` keeps, without its N x N matrix: O(N + cap) memory.

    Greedy NMS decides each box from the boxes kept before it (in score order), so stopping at `cap` kept
    boxes changes nothing before it; each pair's IoU is the same elementwise arithmetic as in `nms_torch`.
    """
    if boxes.numel() == 0 or cap <= 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    work = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    b = boxes.reshape(-1, 4).to(work)
    order = torch.sort(scores.reshape(-1).to(work), descending=True, stable=True).indices
    kept: list[int] = []
    for start in range(0, order.numel(), NMS_BLOCK):
        block = order[start : start + NMS_BLOCK]
        candidates = b[block]
        if kept:
            suppressed = (_box_iou_torch(b[order[kept]], candidates) > iou_threshold).any(dim=0).cpu().numpy()
        else:
            suppressed = np.zeros(block.numel(), dtype=bool)
        overlaps = (_box_iou_torch(candidates, candidates) > iou_threshold).cpu().numpy()
        for i in range(block.numel()):
            if suppressed[i]:
                continue
            kept.append(start + i)
            if len(kept) == cap:
                return order[kept]
            suppressed |= overlaps[i]
    return order[kept]


def cross_prompt_nms(per_prompt: list[list[Instance]], iou_threshold: float) -> list[list[Instance]]:
    """Drop instances that overlap a better-scoring instance of any prompt."""
    flat = [(p, inst) for p, insts in enumerate(per_prompt) for inst in insts]
    if len(flat) < 2:
        return per_prompt
    boxes = torch.tensor([inst.box for _, inst in flat], dtype=torch.float32)
    scores = torch.tensor([inst.score for _, inst in flat], dtype=torch.float32)
    kept = sorted(int(k) for k in nms_torch(boxes, scores, iou_threshold))
    out: list[list[Instance]] = [[] for _ in per_prompt]
    for k in kept:
        out[flat[k][0]].append(flat[k][1])
    for insts in out:
        insts.sort(key=lambda inst: -inst.score)
    return out
