"""Mask codecs: COCO RLE, polygons, PNG, overlays, cut-outs and image encoding."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from serve_app.core.errors import BadRequest, InvalidImage

# Distinct, deterministic instance colours (RGB); instance i gets PALETTE[i % len(PALETTE)].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip

IMAGE_FORMATS = ("png", "jpeg", "jpg", "webp")


def _mask2d(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {arr.shape}")
    return arr.astype(bool, copy=False)


# ----------------------------------------------------------------------- RLE


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) mask -> COCO compressed RLE {"size": [H, W], "counts": str}, JSON-safe."""
    m = np.asfortranarray(_mask2d(mask).astype(np.uint8))
    rle = mask_utils.encode(m)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": rle["counts"].decode("utf-8")}


def coco_encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) bool masks -> pycocotools' RLE objects (bytes counts), one call for all of them.

    pycocotools reads column-major masks: one transposed uint8 copy of the stack (cv2's SIMD transpose, about 10x
    numpy's strided copy on 40 MP).
    """
    arr = np.asarray(masks)
    if arr.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {arr.shape}")
    arr = (arr if arr.dtype == np.bool_ else arr.astype(bool)).view(np.uint8)
    count, height, width = (int(v) for v in arr.shape)
    columns = np.empty((count, width, height), dtype=np.uint8)  # row-major (W, H) = column-major (H, W)
    for i in range(count):
        try:
            cv2.transpose(arr[i], dst=columns[i])
        except cv2.error:  # shapes OpenCV refuses: numpy's copy gives the same bytes, slower
            columns[i] = arr[i].T
    return mask_utils.encode(columns.transpose(2, 1, 0))  # (H, W, N), Fortran-ordered: no further copy


def rle_encode_many(masks: np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) masks -> one COCO compressed RLE per mask, in a single pycocotools call."""
    arr = np.asarray(masks)
    if arr.ndim == 3 and arr.shape[0] == 0:
        return []
    size = [int(arr.shape[1]), int(arr.shape[2])] if arr.ndim == 3 else None
    return [{"size": size, "counts": r["counts"].decode("utf-8")} for r in coco_encode(arr)]


def _compressed_counts(s: bytes) -> np.ndarray:
    """Parse COCO's compressed counts string (maskApi.c rleFrString) with numpy; malformed input: the exact error."""
    values = _compressed_counts_fast(s)
    return values if values is not None else np.asarray(_compressed_counts_checked(s), dtype=np.int64)


def _compressed_counts_fast(s: bytes) -> np.ndarray | None:
    """The counts of a well-formed string, vectorised; None if it is malformed (the checked parser says how)."""
    c = np.frombuffer(s, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if c.min() < 0 or c.max() >= 64 or c[-1] & 0x20:
        return None
    ends = np.flatnonzero((c & 0x20) == 0)  # the last character of each value
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 7:
        return None
    shift = 5 * (np.arange(c.size) - np.repeat(starts, lengths))
    x = np.add.reduceat((c & 0x1F) << shift, starts)
    x = np.where(c[ends] & 0x10, x - (np.int64(1) << (5 * lengths)), x)  # sign extension
    x[2::2] = np.cumsum(x[2::2])  # from the fourth value on, each is a difference to the one two before
    x[1::2] = np.cumsum(x[1::2])
    return x


def _compressed_counts_checked(s: bytes) -> list[int]:
    """Parse COCO's compressed counts string in Python (mirror of maskApi.c rleFrString), naming what is wrong."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n or k >= 7:
                raise BadRequest("RLE counts string is truncated or malformed")
            c = s[p] - 48
            if not 0 <= c < 64:
                raise BadRequest(f"RLE counts string has an invalid character {chr(s[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _rle_object(rle: dict[str, Any]) -> dict[str, Any]:
    """Validate a COCO RLE dict and return pycocotools' compressed form (bytes counts)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise BadRequest('an RLE mask must be an object with "size": [H, W] and "counts"')
    try:
        h, w = (int(v) for v in rle["size"])
    except (TypeError, ValueError) as exc:
        raise BadRequest('RLE "size" must be [height, width]') from exc
    if h < 0 or w < 0:
        raise BadRequest(f"RLE size [{h}, {w}] is negative")
    counts = rle["counts"]
    if isinstance(counts, str):
        if not counts.isascii():
            raise BadRequest("RLE counts string must be ASCII (COCO compressed RLE)")
        counts = counts.encode("ascii")
    if isinstance(counts, (bytes, bytearray)):
        values, obj = _compressed_counts(bytes(counts)), {"size": [h, w], "counts": bytes(counts)}
    elif isinstance(counts, (list, tuple)):
        try:
            values = [int(v) for v in counts]
        except (TypeError, ValueError) as exc:
            raise BadRequest('uncompressed RLE "counts" must be a list of integers') from exc
        obj = None
    else:
        raise BadRequest('RLE "counts" must be a string or a list of integers')
    # pycocotools writes counts without bounds checks, so a bad RLE must never reach it.
    if not _counts_fill(values, h * w):
        raise BadRequest(f"RLE counts do not add up to the mask size {h}x{w} ({h * w} pixels)")
    if obj is None:
        obj = mask_utils.frPyObjects({"size": [h, w], "counts": values}, h, w)
    return obj


def _counts_fill(values: np.ndarray | list[int], pixels: int) -> bool:
    """Every run within the mask and all of them together exactly the mask."""
    if not isinstance(values, np.ndarray):
        return not any(v < 0 or v > pixels for v in values) and sum(values) == pixels
    if not values.size:
        return pixels == 0
    if values.min() < 0 or values.max() > pixels:
        return False
    if int(values.max()) * values.size < 2**62:
        return int(values.sum()) == pixels
    return sum(values.tolist()) == pixels  # int64 could overflow: exact Python integers


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts, or uncompressed list counts) -> bool (H, W)."""
    obj = _rle_object(rle)
    h, w = obj["size"]
    if h * w == 0:
        return np.zeros((h, w), dtype=bool)
    return mask_utils.decode(obj).astype(bool)


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of a COCO RLE."""
    return int(mask_utils.area(_rle_object(rle)))


def rle_to_bbox(rle: dict[str, Any]) -> list[float]:
    """Tight box of a COCO RLE in COCO order: top-left [x, y, width, height] (pixel edges)."""
    return [float(v) for v in mask_utils.toBbox(_rle_object(rle))]


# ------------------------------------------------------------------ polygons


def _contour_points(contour: np.ndarray, epsilon: float | None) -> list[list[float]]:
    if epsilon is not None and epsilon > 0:
        contour = cv2.approxPolyDP(contour, float(epsilon), True)
    return contour.reshape(-1, 2).astype(np.float64).tolist()


def mask_to_polygons_with_holes(
    mask: np.ndarray, *, simplify_epsilon: float | None = None, min_area: float = 0.0
) -> list[dict[str, Any]]:
    """Mask -> [{"exterior": [[x, y], ...], "holes": [[[x, y], ...], ...]}] (pixel-centre coordinates).

    Polygons with fewer than 3 points or an area below min_area are dropped (holes too).
    """
    m = _mask2d(mask).astype(np.uint8)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    links = hierarchy[0]  # rows: next, previous, first_child, parent
    out: list[dict[str, Any]] = []
    for i, contour in enumerate(contours):
        if links[i][3] != -1:
            continue
        exterior = _contour_points(contour, simplify_epsilon)
        if len(exterior) < 3 or cv2.contourArea(contour) < min_area:
            continue
        holes = []
        child = links[i][2]
        while child != -1:
            hole = _contour_points(contours[child], simplify_epsilon)
            if len(hole) >= 3 and cv2.contourArea(contours[child]) >= min_area:
                holes.append(hole)
            child = links[child][0]
        out.append({"exterior": exterior, "holes": holes})
    return out


def mask_to_polygons(
    mask: np.ndarray, *, simplify_epsilon: float | None = None, min_area: float = 0.0
) -> list[list[list[float]]]:
    """Mask -> outer contours only, each a list of [x, y] points."""
    polys = mask_to_polygons_with_holes(mask, simplify_epsilon=simplify_epsilon, min_area=min_area)
    return [p["exterior"] for p in polys]


def _cv_poly(points: Sequence[Sequence[float]]) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)


def polygons_to_mask(polygons: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Rasterise polygons-with-holes; boundaries belong to the shape, hole interiors do not."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        cv2.fillPoly(canvas, [_cv_poly(poly["exterior"])], 1)
        holes = [_cv_poly(h) for h in poly.get("holes", [])]
        if holes:
            cv2.fillPoly(canvas, holes, 0)
            # findContours traces holes through foreground pixels, so their outline is foreground.
            cv2.polylines(canvas, holes, True, 1)
    return canvas.astype(bool)


# ------------------------------------------------------------------------ PNG


def mask_to_png_bytes(mask: np.ndarray) -> bytes:
    """Mask -> single-channel 8-bit PNG with 0 for background and 255 for foreground."""
    ok, buf = cv2.imencode(".png", _mask2d(mask).astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG mask")
    return buf.tobytes()


def mask_to_png_base64(mask: np.ndarray) -> str:
    """Mask -> base64 (ASCII) of its PNG bytes."""
    return base64.b64encode(mask_to_png_bytes(mask)).decode("ascii")


def png_bytes_to_mask(data: bytes, *, threshold: int = 0) -> np.ndarray:
    """Image bytes (PNG or any format OpenCV reads) -> bool mask of pixels brighter than threshold."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE) if data else None
    if img is None:
        raise InvalidImage("the mask image could not be decoded: send a PNG (0 = background)")
    return img > threshold


# ------------------------------------------------------------ visualisation


def _rgb_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {img.dtype} {img.shape}")
    return img


def overlay(
    image_rgb: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    alpha: float = 0.5,
    colors: Sequence[tuple[int, int, int]] | None = None,
    draw_boxes: Sequence[Sequence[float]] | None = None,
) -> np.ndarray:
    """Blend each mask in its own colour over the image, outline it, optionally draw xyxy boxes."""
    img = _rgb_image(image_rgb)
    palette = list(colors) if colors else list(PALETTE)
    out = img.astype(np.float32)
    outlines = []
    for i, mask in enumerate(masks):
        m = _mask2d(mask)
        if m.shape != img.shape[:2]:
            raise ValueError(f"mask {i} has shape {m.shape}, image is {img.shape[:2]}")
        color = np.asarray(palette[i % len(palette)], dtype=np.float32)
        out[m] = (1.0 - alpha) * out[m] + alpha * color
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        outlines.append((contours, tuple(int(c) for c in palette[i % len(palette)])))
    result = np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    for contours, color in outlines:
        cv2.drawContours(result, contours, -1, color, 2)
    for i, box in enumerate(draw_boxes or []):
        x0, y0, x1, y1 = (round(float(v)) for v in box)
        cv2.rectangle(result, (x0, y0), (x1, y1), tuple(int(c) for c in palette[i % len(palette)]), 2)
    return result


def cutout(image_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGBA cut-out: the image where the mask is set, transparent (and zeroed) elsewhere."""
    img, m = _rgb_image(image_rgb), _mask2d(mask)
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask has shape {m.shape}, image is {img.shape[:2]}")
    rgba = np.zeros((*img.shape[:2], 4), dtype=np.uint8)
    rgba[m, :3] = img[m]
    rgba[..., 3] = m.astype(np.uint8) * 255
    return rgba


def cutout_on_black(image_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB cut-out for formats without alpha (JPEG): background painted black."""
    return np.ascontiguousarray(cutout(image_rgb, mask)[..., :3])


def encode_image(image: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """Encode an RGB/RGBA/grey uint8 image as png, jpeg/jpg or webp; JPEG drops alpha onto black."""
    key = fmt.lower().lstrip(".")
    if key not in IMAGE_FORMATS:
        raise BadRequest(f"unsupported image format {fmt!r}: use one of {', '.join(IMAGE_FORMATS)}")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"expected a uint8 image (H, W), (H, W, 3) or (H, W, 4), got {arr.dtype} {arr.shape}")
    if key in ("jpeg", "jpg") and arr.ndim == 3 and arr.shape[2] == 4:
        arr = (arr[..., :3].astype(np.uint16) * arr[..., 3:4] // 255).astype(np.uint8)
    buf = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(arr))
    if key == "png":
        pil.save(buf, format="PNG")
    elif key == "webp":
        pil.save(buf, format="WEBP", quality=int(quality))
    else:
        pil.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()
