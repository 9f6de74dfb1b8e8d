"""The one place for box/point coordinate conversions, prompt validation, IoU and NMS."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from serve_app.core.errors import InvalidPrompt

if TYPE_CHECKING:
    import torch

ArrayLike = np.ndarray | Sequence


def _boxes(boxes: ArrayLike) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (..., 4), got {arr.shape}")
    return arr


def _points(points: ArrayLike) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {arr.shape}")
    return arr


# ---------------------------------------------------------------- conversions


def xyxy_to_xywh(boxes: ArrayLike) -> np.ndarray:
    """(x0, y0, x1, y1) -> top-left (x, y, width, height)."""
    b = _boxes(boxes)
    return np.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: ArrayLike) -> np.ndarray:
    """Top-left (x, y, width, height) -> (x0, y0, x1, y1)."""
    b = _boxes(boxes)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def cxcywh_to_xyxy(boxes: ArrayLike) -> np.ndarray:
    """Centre (cx, cy, width, height) -> (x0, y0, x1, y1)."""
    b = _boxes(boxes)
    half = b[..., 2:] / 2.0
    return np.concatenate([b[..., :2] - half, b[..., :2] + half], axis=-1)


def xyxy_to_cxcywh(boxes: ArrayLike) -> np.ndarray:
    """(x0, y0, x1, y1) -> centre (cx, cy, width, height)."""
    b = _boxes(boxes)
    return np.concatenate([(b[..., :2] + b[..., 2:]) / 2.0, b[..., 2:] - b[..., :2]], axis=-1)


def normalize_xyxy(boxes: ArrayLike, width: float, height: float) -> np.ndarray:
    """Pixel xyxy -> xyxy as fractions of the image size ([0, 1] inside the image)."""
    return _boxes(boxes) / np.array([width, height, width, height], dtype=np.float64)


def denormalize_xyxy(boxes: ArrayLike, width: float, height: float) -> np.ndarray:
    """Normalized xyxy -> pixel xyxy."""
    return _boxes(boxes) * np.array([width, height, width, height], dtype=np.float64)


def normalized_cxcywh_from_xyxy(boxes: ArrayLike, width: float, height: float) -> np.ndarray:
    """Pixel xyxy -> normalized (cx, cy, w, h), the form Sam3Model takes for exemplar boxes."""
    return xyxy_to_cxcywh(normalize_xyxy(boxes, width, height))


def scale_points(points: ArrayLike, from_wh: tuple[float, float], to_wh: tuple[float, float]) -> np.ndarray:
    """Rescale (..., 2) x,y points from an image of size from_wh to one of size to_wh."""
    factor = np.array([to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]], dtype=np.float64)
    return _points(points) * factor


def scale_boxes_xyxy(boxes: ArrayLike, from_wh: tuple[float, float], to_wh: tuple[float, float]) -> np.ndarray:
    """Rescale (..., 4) xyxy boxes from an image of size from_wh to one of size to_wh."""
    fx, fy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    return _boxes(boxes) * np.array([fx, fy, fx, fy], dtype=np.float64)


# ----------------------------------------------------------------- validation


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def validate_box_xyxy(
    box: ArrayLike, width: int, height: int, *, allow_outside: bool = False
) -> tuple[float, float, float, float]:
    """Check a pixel xyxy prompt box; clip one that sticks out, reject inverted or off-image ones.

    With allow_outside=True the box is returned unclipped and never rejected for its position.
    """
    arr = np.asarray(box, dtype=np.float64).reshape(-1)
    if arr.shape != (4,):
        raise InvalidPrompt(f"a box needs exactly 4 numbers [x0, y0, x1, y1], got {arr.size}")
    x0, y0, x1, y1 = (float(v) for v in arr)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InvalidPrompt(f"box {_fmt(arr)} has a non-finite coordinate")
    if x1 <= x0 or y1 <= y0:
        raise InvalidPrompt(f"box {_fmt(arr)} is inverted or empty: need x0 < x1 and y0 < y1")
    if allow_outside:
        return x0, y0, x1, y1
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise InvalidPrompt(
            f"box {_fmt(arr)} lies entirely outside the {width}x{height} image "
            f"(width x height); coordinates are pixels in xyxy order"
        )
    return (
        float(min(max(x0, 0.0), width)),
        float(min(max(y0, 0.0), height)),
        float(min(max(x1, 0.0), width)),
        float(min(max(y1, 0.0), height)),
    )


def validate_point(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    """Check a pixel point prompt lies in [0, width] x [0, height] and is finite."""
    try:
        fx, fy = float(x), float(y)
    except (TypeError, ValueError) as exc:
        raise InvalidPrompt(f"point ({x!r}, {y!r}) is not a pair of numbers") from exc
    if not (math.isfinite(fx) and math.isfinite(fy)):
        raise InvalidPrompt(f"point {_fmt((fx, fy))} has a non-finite coordinate")
    if not (0.0 <= fx <= width and 0.0 <= fy <= height):
        raise InvalidPrompt(
            f"point {_fmt((fx, fy))} lies outside the {width}x{height} image (width x height): "
            f"need 0 <= x <= {width} and 0 <= y <= {height}"
        )
    return fx, fy


# ------------------------------------------------------------------ IoU / NMS


def box_iou(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M); 0 where the union is empty."""
    a, b = _boxes(a).reshape(-1, 4), _boxes(b).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boolean masks: (N, H, W) x (M, H, W) -> (N, M); 0 where both are empty."""
    a, b = np.asarray(masks_a).astype(bool), np.asarray(masks_b).astype(bool)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"masks must be (N, H, W) and (M, H, W) of one size, got {a.shape} and {b.shape}")
    fa = a.reshape(a.shape[0], -1).astype(np.float32)
    fb = b.reshape(b.shape[0], -1).astype(np.float32)
    inter = (fa @ fb.T).astype(np.float64)
    union = fa.sum(1, dtype=np.float64)[:, None] + fb.sum(1, dtype=np.float64)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _greedy_keep(order: np.ndarray, overlaps: np.ndarray) -> np.ndarray:
    """Greedy pass over a score-sorted (N, N) 'suppresses' matrix; returns kept positions."""
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return np.asarray(keep, dtype=np.int64)


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on xyxy boxes (torchvision.ops.nms semantics: drop when IoU > threshold).

    Returns kept indices, highest score first.
    """
    b = _boxes(boxes).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(b) != len(s):
        raise ValueError(f"{len(b)} boxes but {len(s)} scores")
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-s, kind="stable")
    overlaps = box_iou(b[order], b[order]) > iou_threshold
    return order[_greedy_keep(order, overlaps)]


def _box_iou_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch  # here, not at the top: the CPU-side replicas validate prompts with this module and load no model
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def nms_torch(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """nms() for tensors on any device, without torchvision; returns a LongTensor on boxes.device."""
    import torch
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    work = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    b = boxes.reshape(-1, 4).to(work)
    order = torch.sort(scores.reshape(-1).to(work), descending=True, stable=True).indices
    sb = b[order]
    overlaps = (_box_iou_torch(sb, sb) > iou_threshold).cpu().numpy()
    keep_pos = torch.from_numpy(_greedy_keep(order.cpu().numpy(), overlaps)).to(boxes.device)
    return order[keep_pos]
