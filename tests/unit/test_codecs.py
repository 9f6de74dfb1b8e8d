"""Unit tests for serve_app.image.codecs: RLE, polygons, PNG, overlay, cut-outs, image encoding."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from serve_app.core.errors import BadRequest, InvalidImage
from serve_app.image import codecs


def _ring(h: int = 120, w: int = 160) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    cv2.circle(m, (80, 60), 50, 1, -1)
    cv2.circle(m, (80, 60), 20, 0, -1)
    return m.astype(bool)


def _random_mask(rng: np.random.Generator, h: int = 37, w: int = 53) -> np.ndarray:
    return rng.random((h, w)) > 0.6


def test_rle_matches_pycocotools_and_round_trips() -> None:
    rng = np.random.default_rng(1)
    for mask in (_random_mask(rng), _ring(), np.zeros((5, 7), bool), np.ones((5, 7), bool)):
        rle = codecs.rle_encode(mask)
        ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle == {"size": list(mask.shape), "counts": ref["counts"].decode()}
        assert isinstance(rle["counts"], str)
        np.testing.assert_array_equal(codecs.rle_decode(rle), mask)
        assert codecs.rle_decode(rle).dtype == bool
        assert codecs.rle_area(rle) == int(mask.sum())


def test_rle_decode_accepts_bytes_and_uncompressed_counts() -> None:
    mask = _random_mask(np.random.default_rng(2), 6, 5)
    rle = codecs.rle_encode(mask)
    np.testing.assert_array_equal(codecs.rle_decode({**rle, "counts": rle["counts"].encode()}), mask)
    flat = mask.flatten(order="F").astype(int)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    np.testing.assert_array_equal(codecs.rle_decode({"size": [6, 5], "counts": runs}), mask)


def test_rle_many_and_bbox() -> None:
    masks = np.zeros((2, 10, 12), dtype=bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7:, :2] = True
    rles = codecs.rle_encode_many(masks)
    assert rles == [codecs.rle_encode(m) for m in masks]
    assert codecs.rle_to_bbox(rles[0]) == [3.0, 2.0, 6.0, 3.0]


@pytest.mark.parametrize(
    "rle, message",
    [
        ({"size": [4, 4], "counts": [3, 4]}, "do not add up"),
        ({"size": [4, 4], "counts": [20, -4]}, "do not add up"),
        ({"size": [4, 4], "counts": "oooo"}, "truncated or malformed"),
        ({"size": [4, 4], "counts": "02"}, "do not add up"),
        ({"size": [4, 4], "counts": "0O"}, "do not add up"),
        ({"size": [4, 4], "counts": "1 "}, "invalid character"),
        ({"counts": "12"}, '"size"'),
    ],
)
def test_rle_decode_rejects_bad_input(rle: dict, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        codecs.rle_decode(rle)


def test_ring_polygons_round_trip_with_hole() -> None:
    ring = _ring()
    polys = codecs.mask_to_polygons_with_holes(ring)
    assert len(polys) == 1 and len(polys[0]["holes"]) == 1
    back = codecs.polygons_to_mask(polys, *ring.shape)
    assert not back[60, 80], "the hole centre must stay empty"
    assert abs(int(back.sum()) - int(ring.sum())) <= 0.02 * ring.sum()
    assert (back ^ ring).sum() <= 0.01 * ring.sum()
    outers = codecs.mask_to_polygons(ring)
    assert outers == [polys[0]["exterior"]]
    assert all(len(pt) == 2 for pt in outers[0])


def test_simplification_reduces_points_and_keeps_shape() -> None:
    ring = _ring()
    full = codecs.mask_to_polygons_with_holes(ring)
    simple = codecs.mask_to_polygons_with_holes(ring, simplify_epsilon=2.0)
    assert len(simple[0]["exterior"]) < len(full[0]["exterior"]) / 2
    assert len(simple[0]["holes"][0]) < len(full[0]["holes"][0])
    back = codecs.polygons_to_mask(simple, *ring.shape)
    assert abs(int(back.sum()) - int(ring.sum())) <= 0.05 * ring.sum()


def test_polygons_drop_degenerate_and_small() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[5, 5] = True  # single pixel: 1 contour point
    mask[10, 10:20] = True  # a line: 2 contour points
    mask[20:35, 20:35] = True
    polys = codecs.mask_to_polygons(mask)
    assert len(polys) == 1 and sorted(polys[0]) == [[20, 20], [20, 34], [34, 20], [34, 34]]
    assert codecs.mask_to_polygons(mask, min_area=500) == []
    assert codecs.mask_to_polygons(np.zeros((8, 8), bool)) == []


def test_png_round_trip_exact() -> None:
    mask = _random_mask(np.random.default_rng(3))
    data = codecs.mask_to_png_bytes(mask)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    assert img.mode == "L" and set(np.unique(np.asarray(img))) == {0, 255}
    np.testing.assert_array_equal(codecs.png_bytes_to_mask(data), mask)
    b64 = codecs.mask_to_png_base64(mask)
    np.testing.assert_array_equal(codecs.png_bytes_to_mask(base64.b64decode(b64)), mask)
    with pytest.raises(InvalidImage):
        codecs.png_bytes_to_mask(b"not a png")


def test_overlay_changes_only_masked_pixels() -> None:
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    m1 = np.zeros((60, 80), dtype=bool)
    m1[10:30, 10:30] = True
    m2 = np.zeros((60, 80), dtype=bool)
    m2[35:55, 40:75] = True
    out = codecs.overlay(image, [m1, m2], alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    near = cv2.dilate((m1 | m2).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    np.testing.assert_array_equal(out[~near], image[~near])
    interior = cv2.erode(m1.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    expected = np.rint(0.5 * image[interior] + 0.5 * np.array(codecs.PALETTE[0])).astype(np.uint8)
    np.testing.assert_allclose(out[interior], expected, atol=1)
    interior2 = cv2.erode(m2.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    expected2 = np.rint(0.5 * image[interior2] + 0.5 * np.array(codecs.PALETTE[1])).astype(np.uint8)
    np.testing.assert_allclose(out[interior2], expected2, atol=1)
    assert codecs.PALETTE[0] != codecs.PALETTE[1]
    edge = out[10, 10:30].astype(int)  # the outline is drawn in the instance colour
    assert (np.abs(edge - np.array(codecs.PALETTE[0])).sum(axis=1) == 0).mean() > 0.8
    np.testing.assert_array_equal(codecs.overlay(image, [m1, m2]), out)  # deterministic


def test_overlay_draws_boxes() -> None:
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    out = codecs.overlay(image, [], draw_boxes=[[5, 5, 30, 30]], colors=[(0, 255, 0)])
    assert tuple(out[5, 15]) == (0, 255, 0)
    assert tuple(out[18, 18]) == (0, 0, 0)


def test_cutouts() -> None:
    image = np.full((4, 5, 3), 200, dtype=np.uint8)
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2:4] = True
    rgba = codecs.cutout(image, mask)
    assert rgba.shape == (4, 5, 4)
    np.testing.assert_array_equal(rgba[..., 3], mask.astype(np.uint8) * 255)
    np.testing.assert_array_equal(rgba[mask, :3], image[mask])
    black = codecs.cutout_on_black(image, mask)
    assert black.shape == (4, 5, 3) and black[~mask].max() == 0 and black[mask].min() == 200


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_encode_image_formats(fmt: str, pil_format: str) -> None:
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    image[:, 12:] = (255, 0, 0)
    decoded = Image.open(io.BytesIO(codecs.encode_image(image, fmt)))
    assert decoded.format == pil_format and decoded.size == (24, 16)
    arr = np.asarray(decoded.convert("RGB")).astype(int)
    if fmt == "png":
        np.testing.assert_array_equal(arr, image)
    else:
        assert np.abs(arr - image).mean() < 10


def test_encode_image_rgba_and_errors() -> None:
    rgba = codecs.cutout(np.full((8, 8, 3), 200, np.uint8), np.eye(8, dtype=bool))
    png = Image.open(io.BytesIO(codecs.encode_image(rgba, "png")))
    assert png.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(png), rgba)
    jpg = Image.open(io.BytesIO(codecs.encode_image(rgba, "jpg")))
    assert jpg.mode == "RGB"
    with pytest.raises(BadRequest, match="unsupported image format 'bmp'"):
        codecs.encode_image(rgba, "bmp")
