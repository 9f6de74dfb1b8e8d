"""Segmind `POST /v1/sam3-image` through real Serve and HTTP: the page's example, every mode, errors in its shape."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.core.config import Config
from serve_app.core.types import AutoPrompt, ConceptPrompt, Instance, SegmentParams
from serve_app.image.codecs import png_bytes_to_mask, rle_decode
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle
from tests.integration.conftest import API_KEY, random_image
from tests.reference import assert_batched_close

pytestmark = pytest.mark.integration

HEIGHT, WIDTH = 96, 128


def post(url: str, body: dict, key: str | None = API_KEY) -> requests.Response:
    headers = {"x-api-key": key} if key else {}
    return requests.post(f"{url}/v1/sam3-image", json=body, headers=headers, timeout=180)


def ok(url: str, body: dict) -> dict:
    response = post(url, body)
    assert response.status_code == 200, response.text
    return response.json()


def image_url(server: str, seed: int) -> str:
    return f"{server}/img/{seed}.png?h={HEIGHT}&w={WIDTH}"


def decode_png(value: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
    assert image.format == "PNG"
    return image


def masks_of(payload: dict) -> list[np.ndarray]:
    return [png_bytes_to_mask(base64.b64decode(m["mask"])) for m in payload["masks"]]


def assert_masks(payload: dict) -> list[np.ndarray]:
    """return_masks: every mask at the input size, its area and tight box consistent with its pixels."""
    assert isinstance(payload["masks"], list) and len(payload["masks"]) == payload["num_masks"]
    masks = masks_of(payload)
    for item, mask in zip(payload["masks"], masks):
        assert set(item) == {"mask", "score", "box", "area", "source"}
        assert mask.shape == (HEIGHT, WIDTH)
        assert item["area"] == int(mask.sum())
        assert isinstance(item["score"], float) and len(item["box"]) == 4
    return masks


# ---- the page's request example --------------------------------------------------------------------


def test_page_example_conformance(providers_url, image_server):
    data = {
        "image": image_url(image_server, 1),
        "text_prompt": "plants",
        "point_labels_input": "[[1]]",
        "return_preview": True,
        "return_overlay": False,
        "return_masks": False,
        "threshold": 0.5,
        "points_per_side": 32,
        "pred_iou_thresh": 0.88,
        "max_masks": 0,
    }
    response = post(providers_url, data)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"width", "height", "mode", "num_masks", "preview", "overlay", "masks"}
    assert (payload["width"], payload["height"]) == (WIDTH, HEIGHT)
    assert payload["mode"] == "concept"
    assert isinstance(payload["num_masks"], int) and payload["num_masks"] >= 0
    assert payload["overlay"] is None and payload["masks"] is None
    preview = decode_png(payload["preview"])
    assert preview.size == (WIDTH, HEIGHT) and preview.mode == "RGB"


# ---- modes -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> ImageEngine:
    """The same tiny-random weights in-process: picks test images and is the reference for automatic masks."""
    return ImageEngine(load_bundle(Config()))


@pytest.fixture(scope="module")
def text_seed(engine) -> int:
    """An image where tiny-random finds at least 3 "plants" at threshold 0.1 (so caps and ordering show)."""
    for seed in range(1, 60):
        image = random_image(seed, HEIGHT, WIDTH)
        result = engine.segment(image, [ConceptPrompt("plants")], SegmentParams(threshold=0.1))
        if len(result.prompts[0].instances) >= 3:
            return seed
    pytest.fail("no test image gives 3 text instances: the tiny-random model changed")


def auto_instances(engine, seed: int, pps: int, iou: float, max_masks: int = 0) -> list:
    image = random_image(seed, HEIGHT, WIDTH)
    params = SegmentParams(max_instances=min(Config().max_instances, max_masks or 10**6))
    return engine.segment(image, [AutoPrompt(pps, iou, max_masks=max_masks)], params).prompts[0].instances


@pytest.fixture(scope="module")
def auto_case(engine) -> tuple[int, int, float]:
    """(seed, points_per_side, high): >= 2 automatic masks at pred_iou_thresh 0.5, fewer at `high`."""
    for seed in range(1, 40):
        for pps in (8, 16):
            low = len(auto_instances(engine, seed, pps, 0.5))
            for high in (0.9, 0.99, 0.999, 1.0):
                if low >= 2 and len(auto_instances(engine, seed, pps, high)) < low:
                    return seed, pps, high
    pytest.fail("no test image gives automatic masks that pred_iou_thresh filters: the tiny-random model changed")


def native(url: str, image: str, *prompts: dict, threshold: float = 0.5) -> list[dict]:
    """The native API's instances for the same image, all prompts' instances in order."""
    response = requests.post(
        f"{url}/v1/image/segment", headers={"x-api-key": API_KEY}, timeout=180,
        json={"image": image, "prompts": list(prompts), "threshold": threshold, "nms_iou": 0.5},
    )
    assert response.status_code == 200, response.text
    return [inst for p in response.json()["prompts"] for inst in p["instances"]]


def assert_same(payload: dict, instances: list) -> None:
    """Segmind masks equal the given instances (native JSON dicts or internal Instance objects), in order."""
    assert payload["num_masks"] == len(instances)
    for mine, mask, theirs in zip(payload["masks"], masks_of(payload), instances):
        if isinstance(theirs, dict):
            theirs = Instance(rle=theirs["mask"], box=tuple(theirs["box"]), score=theirs["score"], area=theirs["area"])
        assert abs(mine["score"] - theirs.score) < 1e-4 and mine["area"] == theirs.area
        np.testing.assert_allclose(mine["box"], theirs.box, atol=1e-3)
        assert np.array_equal(mask, rle_decode(theirs.rle))


def test_text_prompt_masks_preview_and_overlay(providers_url, image_server, text_seed):
    payload = ok(providers_url, {
        "image": image_url(image_server, text_seed), "text_prompt": "plants", "threshold": 0.1,
        "return_masks": True, "return_overlay": True,
    })
    assert payload["mode"] == "concept" and payload["num_masks"] >= 3
    masks = assert_masks(payload)
    scores = [m["score"] for m in payload["masks"]]
    assert all(s > 0.1 for s in scores) and scores == sorted(scores, reverse=True)
    assert {m["source"] for m in payload["masks"]} == {"concept"}
    union = np.logical_or.reduce(masks)
    preview = np.asarray(decode_png(payload["preview"]))
    assert preview.shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(preview.any(axis=2), union), "the preview is the union of the masks, in colour on black"
    overlay = np.asarray(decode_png(payload["overlay"]))
    original = random_image(text_seed, HEIGHT, WIDTH)
    assert overlay.shape == original.shape
    assert not np.array_equal(overlay[union], original[union]), "masks are coloured over the image"


def test_flags_off_return_nothing_but_the_count(providers_url, image_server, text_seed):
    body = {"image": image_url(image_server, text_seed), "text_prompt": "plants", "threshold": 0.1}
    payload = ok(providers_url, {**body, "return_preview": False})
    assert payload["preview"] is None and payload["overlay"] is None and payload["masks"] is None
    assert payload["num_masks"] == ok(providers_url, {**body, "return_masks": True})["num_masks"] >= 3


def test_max_masks_caps_text_results(providers_url, image_server, text_seed):
    body = {"image": image_url(image_server, text_seed), "text_prompt": "plants", "threshold": 0.1,
            "return_masks": True}
    full, capped = ok(providers_url, body), ok(providers_url, {**body, "max_masks": 2})
    assert full["num_masks"] > 2 and capped["num_masks"] == 2
    assert capped["masks"] == full["masks"][:2]


def test_points_and_label_shapes(providers_url, image_server):
    url = image_url(image_server, 6)
    points = [[30, 40], [90, 70]]
    body = {"image": url, "points_input": "[[30, 40], [90, 70]]", "return_masks": True}
    payload = ok(providers_url, {**body, "point_labels_input": "[[1, 0]]"})
    assert payload["mode"] == "visual" and payload["num_masks"] == 1
    assert_masks(payload)
    assert payload["masks"][0]["source"] == "visual"
    assert_same(payload, native(providers_url, url, {"type": "visual", "points": points, "point_labels": [1, 0]}))
    # the same labels flat, nested per point, and as real JSON arrays instead of strings
    for labels in ("[1, 0]", "[[1], [0]]", [[1, 0]]):
        assert ok(providers_url, {**body, "point_labels_input": labels})["masks"] == payload["masks"], labels
    as_arrays = ok(providers_url, {**body, "points_input": points, "point_labels_input": [1, 0]})
    assert as_arrays["masks"] == payload["masks"]
    # the default "[[1]]" (a single label) marks every point foreground
    default = ok(providers_url, body)
    assert_same(default, native(providers_url, url, {"type": "visual", "points": points, "point_labels": [1, 1]}))


def test_boxes_one_object_per_box(providers_url, image_server):
    url = image_url(image_server, 7)
    payload = ok(providers_url, {"image": url, "boxes_input": "[[20, 10, 100, 80], [5, 5, 40, 40]]",
                                 "return_masks": True})
    assert payload["mode"] == "visual" and payload["num_masks"] == 2
    assert_masks(payload)
    boxes = [{"type": "visual", "box": [20, 10, 100, 80]}, {"type": "visual", "box": [5, 5, 40, 40]}]
    assert_same(payload, native(providers_url, url, *boxes))
    single = ok(providers_url, {"image": url, "boxes_input": "[20, 10, 100, 80]", "return_masks": True})
    assert single["num_masks"] == 1, "a bare [x0, y0, x1, y1] is one box"
    # the two boxes shared a mask-decoder forward, the bare one ran alone: equal within the batched tolerances
    assert_batched_close(masks_of(single), [m["score"] for m in single["masks"]], masks_of(payload)[:1],
                         [payload["masks"][0]["score"]])


def test_points_with_boxes(providers_url, image_server):
    url = image_url(image_server, 7)
    one = ok(providers_url, {"image": url, "points_input": "[[60, 40]]", "boxes_input": "[[20, 10, 100, 80]]",
                             "return_masks": True})
    assert one["mode"] == "visual" and one["num_masks"] == 1
    assert_same(one, native(providers_url, url, {"type": "visual", "points": [[60, 40]], "box": [20, 10, 100, 80]}))
    per_box = ok(providers_url, {
        "image": url, "points_input": "[[[60, 40]], [[20, 20], [30, 30]]]", "point_labels_input": "[[1], [1, 0]]",
        "boxes_input": "[[20, 10, 100, 80], [5, 5, 40, 40]]", "return_masks": True,
    })
    assert_same(per_box, native(
        providers_url, url,
        {"type": "visual", "points": [[60, 40]], "point_labels": [1], "box": [20, 10, 100, 80]},
        {"type": "visual", "points": [[20, 20], [30, 30]], "point_labels": [1, 0], "box": [5, 5, 40, 40]},
    ))


def test_text_with_exemplar_boxes_and_points(providers_url, image_server, text_seed):
    url = image_url(image_server, text_seed)
    body = {"image": url, "text_prompt": "plants", "threshold": 0.1, "boxes_input": "[[10, 10, 60, 60]]",
            "return_masks": True}
    exemplar = ok(providers_url, body)
    assert exemplar["mode"] == "concept"
    both = ok(providers_url, {**body, "points_input": "[[30, 40]]"})
    assert both["mode"] == "concept+visual" and both["num_masks"] == exemplar["num_masks"] + 1
    assert both["masks"][:-1] == exemplar["masks"] and both["masks"][-1]["source"] == "visual"
    assert_same(both, native(
        providers_url, url, {"type": "concept", "text": "plants", "boxes": [[10, 10, 60, 60]]},
        {"type": "visual", "points": [[30, 40]]}, threshold=0.1,
    ))


def test_automatic_masks(providers_url, image_server, engine, auto_case):
    seed, pps, high = auto_case
    body = {"image": image_url(image_server, seed), "points_per_side": pps, "pred_iou_thresh": 0.5,
            "return_masks": True}
    low = ok(providers_url, body)
    assert low["mode"] == "automatic" and low["num_masks"] >= 2
    assert_masks(low)
    assert all(m["score"] > 0.5 and m["source"] == "automatic" for m in low["masks"])
    assert_same(low, auto_instances(engine, seed, pps, 0.5))
    capped = ok(providers_url, {**body, "max_masks": 1})
    assert capped["num_masks"] <= 1 and capped["masks"] == low["masks"][:1]
    strict = ok(providers_url, {**body, "pred_iou_thresh": high})
    assert strict["num_masks"] < low["num_masks"], "a higher pred_iou_thresh keeps fewer masks"
    assert all(m["score"] > high for m in strict["masks"])
    assert_same(strict, auto_instances(engine, seed, pps, high))


def test_automatic_masks_with_nothing_left(providers_url, image_server, engine):
    assert auto_instances(engine, 2, 4, 1.0) == [], "predicted IoUs are probabilities: none exceeds 1.0"
    none = ok(providers_url, {"image": image_url(image_server, 2), "points_per_side": 4, "pred_iou_thresh": 1.0,
                              "return_masks": True, "return_overlay": True})
    assert none["mode"] == "automatic" and none["masks"] == [] and none["num_masks"] == 0
    assert not np.asarray(decode_png(none["preview"])).any(), "an empty preview is black"
    assert np.array_equal(np.asarray(decode_png(none["overlay"])), random_image(2, HEIGHT, WIDTH))


# ---- parity with the native API --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "prompt"),
    [
        ({"text_prompt": "plants"}, {"type": "concept", "text": "plants"}),
        ({"text_prompt": "plants", "boxes_input": "[[10, 10, 60, 60]]"},
         {"type": "concept", "text": "plants", "boxes": [[10, 10, 60, 60]]}),
        ({"points_input": "[[30, 40], [90, 70]]", "point_labels_input": "[[1, 0]]",
          "boxes_input": "[[20, 10, 100, 80]]"},
         {"type": "visual", "points": [[30, 40], [90, 70]], "point_labels": [1, 0], "box": [20, 10, 100, 80]}),
    ],
    ids=["text", "text+exemplar", "points+box"],
)
def test_parity_with_native(providers_url, image_server, text_seed, fields, prompt):
    url = image_url(image_server, text_seed)
    segmind = ok(providers_url, {"image": url, "threshold": 0.1, "return_masks": True, **fields})
    instances = native(providers_url, url, prompt, threshold=0.1)
    assert len(instances) > 0, "the case must produce masks, or it proves nothing"
    assert_same(segmind, instances)
    for mine, theirs in zip(segmind["masks"], instances):
        assert (mine["score"], mine["box"]) == (theirs["score"], theirs["box"]), "bit-identical through both APIs"


# ---- errors ----------------------------------------------------------------------------------------


def assert_segmind_error(response: requests.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == {"error", "code"}, payload
    assert isinstance(payload["error"], str) and isinstance(payload["code"], str)
    for word in words:
        assert word.lower() in payload["error"].lower(), f"{word!r} not in {payload['error']!r}"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"image": None}, ["image", "required"]),
        ({"image": "   "}, ["image is empty"]),
        ({"threshold": "abc"}, ["threshold", "number"]),
        ({"points_input": "[[300,"}, ["points_input", "JSON"]),
        ({"boxes_input": "[[1, 2, 3]]"}, ["boxes_input"]),
        ({"points_input": "[[30, 40]]", "point_labels_input": "[[1, 2]]"}, ["point_labels_input"]),
        ({"points_input": '[["a", 1]]'}, ["points_input"]),
        ({"threshold": 0.05}, ["threshold", "0.1"]),
        ({"threshold": 1.5}, ["threshold"]),
        ({"points_per_side": 129}, ["points_per_side", "128"]),
        ({"points_per_side": 0}, ["points_per_side"]),
        ({"pred_iou_thresh": 0.3}, ["pred_iou_thresh", "0.5"]),
        ({"max_masks": 101}, ["max_masks", "100"]),
        ({"max_masks": -1}, ["max_masks"]),
        ({"points_input": "[[1, 2], [3, 4], [5, 6]]", "point_labels_input": "[[1, 0]]"}, ["2 labels for 3 points"]),
        ({"points_input": "[[10, 10]]", "boxes_input": "[[0, 0, 9, 9], [5, 5, 20, 20]]"}, ["clicks per box"]),
        ({"points_input": "[[500, 40]]"}, ["outside"]),
        ({"boxes_input": "[[50, 50, 10, 10]]"}, ["inverted"]),
        ({"image": "http://10.0.0.1/a.png"}, ["10.0.0.1"]),
        ({"image": "not base64!"}, ["base64"]),
        ({"return_masks": "maybe"}, ["return_masks"]),
        ({"base64": False}, ["base64", "not permitted"]),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_requests_are_400_in_segmind_shape(providers_url, image_server, change, words):
    body = {"image": image_url(image_server, 1), **change}
    body = {k: v for k, v in body.items() if not (k == "image" and v is None)}
    assert_segmind_error(post(providers_url, body), 400, *words)


@pytest.mark.parametrize(
    ("data", "words"),
    [(b"", ["empty"]), (b"{not json", ["JSON"]), (b"[1, 2]", ["object"]), (b"[" * 100_000 + b"]" * 100_000, ["JSON"])],
    ids=["empty", "invalid", "array", "deep"],
)
def test_malformed_bodies_are_400(providers_url, data, words):
    response = requests.post(
        f"{providers_url}/v1/sam3-image", data=data, timeout=60,
        headers={"x-api-key": API_KEY, "content-type": "application/json"},
    )
    assert_segmind_error(response, 400, *words)


@pytest.mark.parametrize(
    ("key", "words"), [(None, ["x-api-key"]), ("wrong", ["invalid API key"])], ids=["missing", "wrong"]
)
def test_api_key_is_required(providers_url, image_server, key, words):
    assert_segmind_error(post(providers_url, {"image": image_url(image_server, 1)}, key), 401, *words)


def test_other_routes_keep_their_shapes(providers_url):
    wrong_method = requests.get(f"{providers_url}/v1/sam3-image", headers={"x-api-key": API_KEY}, timeout=60)
    assert_segmind_error(wrong_method, 405)
    body = {"image": "x", "prompts": [{"type": "concept", "text": "a"}]}
    native = requests.post(f"{providers_url}/v1/image/segment", json=body, timeout=60)
    assert native.status_code == 401 and set(native.json()["error"]) >= {"code", "message"}
