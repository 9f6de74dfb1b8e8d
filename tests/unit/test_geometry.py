"""Unit tests for serve_app.image.geometry: conversions, validation, IoU and NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.core.errors import InvalidPrompt
from serve_app.image import geometry as g


def _random_boxes(rng: np.random.Generator, n: int, size: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _brute_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    def iou(a: np.ndarray, b: np.ndarray) -> float:
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    remaining = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    while remaining:
        best = remaining.pop(0)
        keep.append(best)
        remaining = [i for i in remaining if iou(boxes[best], boxes[i]) <= thr]
    return keep


def test_known_conversions() -> None:
    xyxy = [10.0, 20.0, 40.0, 60.0]
    np.testing.assert_allclose(g.xyxy_to_xywh(xyxy), [10, 20, 30, 40])
    np.testing.assert_allclose(g.xyxy_to_cxcywh(xyxy), [25, 40, 30, 40])
    np.testing.assert_allclose(g.xywh_to_xyxy([10, 20, 30, 40]), xyxy)
    np.testing.assert_allclose(g.cxcywh_to_xyxy([25, 40, 30, 40]), xyxy)
    np.testing.assert_allclose(g.normalize_xyxy(xyxy, 100, 200), [0.1, 0.1, 0.4, 0.3])
    np.testing.assert_allclose(g.normalized_cxcywh_from_xyxy(xyxy, 100, 200), [0.25, 0.2, 0.3, 0.2])
    assert g.xyxy_to_xywh(np.array(xyxy, dtype=np.int32)).dtype == np.float64


def test_random_round_trips_keep_batch_shape() -> None:
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 60).reshape(3, 20, 4)
    np.testing.assert_allclose(g.xywh_to_xyxy(g.xyxy_to_xywh(boxes)), boxes, atol=1e-9)
    np.testing.assert_allclose(g.cxcywh_to_xyxy(g.xyxy_to_cxcywh(boxes)), boxes, atol=1e-9)
    via_all = g.xywh_to_xyxy(g.xyxy_to_xywh(g.cxcywh_to_xyxy(g.xyxy_to_cxcywh(boxes))))
    np.testing.assert_allclose(via_all, boxes, atol=1e-9)
    np.testing.assert_allclose(g.denormalize_xyxy(g.normalize_xyxy(boxes, 640, 480), 640, 480), boxes)
    assert g.xyxy_to_cxcywh(boxes).shape == (3, 20, 4)


def test_scaling_points_and_boxes() -> None:
    np.testing.assert_allclose(g.scale_points([[10, 20], [0, 5]], (100, 50), (200, 25)), [[20, 10], [0, 2.5]])
    np.testing.assert_allclose(g.scale_boxes_xyxy([10, 20, 30, 40], (100, 50), (50, 100)), [5, 40, 15, 80])


def test_bad_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        g.xyxy_to_xywh([1, 2, 3])


def test_validate_box_accepts_and_clips() -> None:
    assert g.validate_box_xyxy([1, 2, 30, 40], 100, 50) == (1.0, 2.0, 30.0, 40.0)
    assert g.validate_box_xyxy([-10, -5, 120, 40], 100, 50) == (0.0, 0.0, 100.0, 40.0)
    assert g.validate_box_xyxy([-10, -5, 120, 40], 100, 50, allow_outside=True) == (-10.0, -5.0, 120.0, 40.0)


@pytest.mark.parametrize(
    "box, message",
    [
        ([30, 2, 10, 40], "box [30, 2, 10, 40] is inverted or empty: need x0 < x1 and y0 < y1"),
        ([10, 40, 30, 40], "box [10, 40, 30, 40] is inverted or empty: need x0 < x1 and y0 < y1"),
        ([10, float("nan"), 30, 40], "non-finite"),
        ([150, 10, 200, 40], "lies entirely outside the 100x50 image"),
        ([-30, 10, -1, 40], "lies entirely outside the 100x50 image"),
        ([-30, 10, 0, 40], "lies entirely outside the 100x50 image"),
        ([1, 2, 3], "exactly 4 numbers"),
    ],
)
def test_validate_box_rejects(box: list[float], message: str) -> None:
    with pytest.raises(InvalidPrompt) as info:
        g.validate_box_xyxy(box, 100, 50)
    assert message in str(info.value)
    assert info.value.status_code == 400


def test_validate_point() -> None:
    assert g.validate_point(0, 50, 100, 50) == (0.0, 50.0)
    with pytest.raises(InvalidPrompt, match=r"point \[101, 3\] lies outside the 100x50 image"):
        g.validate_point(101, 3, 100, 50)
    with pytest.raises(InvalidPrompt, match="non-finite"):
        g.validate_point(float("inf"), 3, 100, 50)


def test_box_iou_known_values() -> None:
    a = [[0, 0, 10, 10], [0, 0, 0, 0]]
    b = [[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]]
    expected = [[50 / 150, 0, 1], [0, 0, 0]]
    np.testing.assert_allclose(g.box_iou(a, b), expected)


def test_mask_iou_hand_computed() -> None:
    a = np.zeros((2, 4, 4), dtype=bool)
    a[0, :2, :] = True  # 8 pixels, top half
    a[1, :, :1] = True  # 4 pixels, left column
    b = np.zeros((2, 4, 4), dtype=bool)
    b[0, :, :2] = True  # 8 pixels, left half
    expected = [[4 / 12, 0.0], [4 / 8, 0.0]]
    np.testing.assert_allclose(g.mask_iou(a, b), expected)
    with pytest.raises(ValueError):
        g.mask_iou(a, np.zeros((1, 3, 4), dtype=bool))


@pytest.mark.parametrize("thr", [0.1, 0.3, 0.5, 0.7])
def test_nms_matches_brute_force(thr: float) -> None:
    rng = np.random.default_rng(int(thr * 10))
    boxes = _random_boxes(rng, 200)
    scores = rng.permutation(200).astype(np.float64) / 200 + rng.uniform(0, 1e-4, 200)
    expected = _brute_nms(boxes, scores, thr)
    assert 1 < len(expected) < 200
    got = g.nms(boxes, scores, thr)
    assert got.dtype == np.int64
    assert got.tolist() == expected
    got_t = g.nms_torch(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), thr)
    assert got_t.dtype == torch.long
    assert got_t.tolist() == expected


def test_nms_threshold_is_strict_and_handles_empty() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], dtype=np.float64)  # IoU exactly 1/3
    scores = np.array([0.9, 0.8])
    assert g.nms(boxes, scores, 1 / 3).tolist() == [0, 1]
    assert g.nms(boxes, scores, 0.3).tolist() == [0]
    assert g.nms_torch(torch.from_numpy(boxes), torch.from_numpy(scores), 1 / 3).tolist() == [0, 1]
    assert g.nms_torch(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3).tolist() == [0]
    assert g.nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)
    assert g.nms_torch(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
