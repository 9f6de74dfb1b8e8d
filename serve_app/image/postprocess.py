"""Post-processing after the model: scores, thresholds, NMS, caps, upsampling and RLE. numpy/torch/pycocotools only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve_app.core.types import Instance
from serve_app.image.codecs import rle_encode_many
from serve_app.image.geometry import nms_torch


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


def build_instances(masks: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor) -> list[Instance]:
    rles = rle_encode_many(masks.cpu().numpy())
    areas = masks.flatten(1).sum(dim=1).tolist() if masks.shape[0] else []
    return [
        Instance(rle=rle, box=tuple(float(v) for v in box), score=float(score), area=int(area))
        for rle, box, score, area in zip(rles, boxes.tolist(), scores.tolist(), areas)
    ]


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
