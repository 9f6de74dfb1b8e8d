"""The SAM3 Hugging Face Space API through real HTTP: every request example of its page, its errors, parity with /v1."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.image.codecs import polygons_to_mask
from tests.integration.conftest import API_KEY, find_image_seed, png_b64, random_image
from tests.reference import assert_batched_close

pytestmark = pytest.mark.integration

HEIGHT, WIDTH = 240, 320  # not square, so a swapped [width, height] shows; large enough for the page's boxes
# an image on which tiny-random finds each phrase the tests send, at the threshold they send
IMAGE = png_b64(random_image(find_image_seed(["kitten", "toy", "cat", "dog"], 0.5, HEIGHT, WIDTH), HEIGHT, WIDTH))
BASE_KEYS = {"masks", "scores", "labels", "num_objects", "sam_version", "prompt_types", "success"}
VECTOR_KEYS = {"polygons", "polygon_format", "original_image_size"}


def post(url: str, path: str, body: dict, key: str | None = API_KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}{path}", json=body, headers=headers, timeout=120)


def sam2(url: str, **inputs: object) -> dict:
    response = post(url, "/api/sam2_compatible", {"inputs": {"image": IMAGE, **inputs}})
    assert response.status_code == 200, response.text
    return response.json()


def decode_png(value: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(value, validate=True))) as img:
        assert img.format == "PNG" and img.mode == "L"
        assert img.size == (WIDTH, HEIGHT), f"mask is {img.size}, the image {(WIDTH, HEIGHT)}"
        array = np.asarray(img)
    assert set(np.unique(array)) <= {0, 255}
    return array > 0


def check_result(payload: dict, prompt_types: list[str], vectorize: bool = False) -> list[np.ndarray]:
    """Every documented field with its type; returns the decoded masks."""
    assert set(payload) == BASE_KEYS | (VECTOR_KEYS if vectorize else set())
    assert payload["success"] is True and payload["sam_version"] == "3.0"
    assert payload["prompt_types"] == prompt_types
    n = payload["num_objects"]
    assert isinstance(n, int) and len(payload["masks"]) == len(payload["scores"]) == len(payload["labels"]) == n
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in payload["scores"])
    assert all(isinstance(m, str) for m in payload["masks"])
    return [decode_png(m) for m in payload["masks"]]


def check_polygons(payload: dict, masks: list[np.ndarray], exact: bool = True) -> None:
    """Format and bounds; with exact (simplify_epsilon 0) also that each ring outlines the mask's largest part."""
    assert payload["polygon_format"] == "pixel_coordinates"
    assert payload["original_image_size"] == [WIDTH, HEIGHT]
    assert len(payload["polygons"]) == len(masks)
    for polygon, mask in zip(payload["polygons"], masks):
        assert len(polygon) >= 3 and all(len(p) == 2 for p in polygon)
        xy = np.asarray(polygon, dtype=float)
        assert (xy >= 0).all() and (xy[:, 0] <= WIDTH).all() and (xy[:, 1] <= HEIGHT).all()
        if not exact:
            continue
        filled = polygons_to_mask([{"exterior": polygon}], HEIGHT, WIDTH)
        largest = _largest_part(mask)
        iou = (filled & largest).sum() / (filled | largest).sum()
        assert iou > 0.8, f"the polygon must outline the mask's largest connected part (IoU {iou:.2f})"


def _largest_part(mask: np.ndarray) -> np.ndarray:
    """The mask's part with the largest outer outline, holes filled: all one polygon ring can describe."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(mask.shape, np.uint8)
    if contours:
        cv2.drawContours(filled, [max(contours, key=cv2.contourArea)], -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def native(url: str, prompts: list[dict], **extra: object) -> dict:
    body = {"image": IMAGE, "prompts": prompts, "output": "png", "nms_iou": 0.5, **extra}
    response = requests.post(
        f"{url}/v1/image/segment", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: requests.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"success", "error", "error_type"} and payload["success"] is False
    for word in words:
        assert word.lower() in payload["error"].lower(), payload["error"]


# ------------------------------------------------------------------- the page's request examples


def test_predict_gradio_format(providers_url):
    response = post(providers_url, "/api/predict", {"data": [IMAGE, "kitten", 0.5]})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"data", "is_generating", "duration"}
    assert payload["is_generating"] is False and isinstance(payload["duration"], float)
    assert isinstance(payload["data"], list) and len(payload["data"]) == 1
    result = payload["data"][0]
    masks = check_result(result, ["text"])
    assert masks and all(s >= 0.5 for s in result["scores"]) and set(result["labels"]) == {"kitten"}
    assert result == sam2(providers_url, text_prompts=["kitten"], confidence_threshold=0.5)


def test_text_prompts_only(providers_url):
    payload = sam2(providers_url, text_prompts=["kitten", "toy"], confidence_threshold=0.5)
    masks = check_result(payload, ["text"])
    assert masks and all(s >= 0.5 for s in payload["scores"])
    assert {"kitten", "toy"} <= set(payload["labels"])
    assert payload["labels"] == sorted(payload["labels"], key=["kitten", "toy"].index)


def test_boxes_only_is_a_visual_prompt(providers_url):
    payload = sam2(providers_url, boxes=[[100, 100, 200, 200]], box_labels=[1], confidence_threshold=0.5)
    masks = check_result(payload, ["visual"])
    assert len(masks) == 1 and payload["labels"] == ["visual"]
    [instance] = native(providers_url, [{"type": "visual", "box": [100, 100, 200, 200]}])["prompts"][0]["instances"]
    assert payload["masks"] == [instance["mask"]] and payload["scores"] == [instance["score"]]


def test_multiple_text_prompts_are_processed_separately(providers_url):
    both = sam2(providers_url, text_prompts=["cat", "dog"], confidence_threshold=0.5)
    check_result(both, ["text"])
    cat = sam2(providers_url, text_prompts=["cat"], confidence_threshold=0.5)
    dog = sam2(providers_url, text_prompts=["dog"], confidence_threshold=0.5)
    assert cat["masks"] and dog["masks"]
    # the two phrases shared a DETR forward, each alone ran by itself: equal within the batched tolerances
    assert_batched_close([decode_png(m) for m in both["masks"]], both["scores"],
                         [decode_png(m) for m in cat["masks"] + dog["masks"]], cat["scores"] + dog["scores"])


def test_combined_visual_prompts_with_a_negative_box(providers_url):
    payload = sam2(
        providers_url, boxes=[[50, 50, 150, 150]], box_labels=[0], points=[[200, 200]], point_labels=[1],
        confidence_threshold=0.5,
    )
    [mask] = check_result(payload, ["visual"])
    points_only = sam2(providers_url, points=[[200, 200]], point_labels=[1])
    [plain] = [decode_png(m) for m in points_only["masks"]]
    expected = plain.copy()
    expected[50:150, 50:150] = False  # the negative box excludes its area
    assert np.array_equal(mask, expected)
    assert payload["scores"] == points_only["scores"]


def test_vectorize_returns_polygons(providers_url):
    payload = sam2(providers_url, text_prompts=["cat"], confidence_threshold=0.5, vectorize=True, simplify_epsilon=2.0)
    masks = check_result(payload, ["text"], vectorize=True)
    assert masks
    check_polygons(payload, masks, exact=False)
    exact = sam2(providers_url, text_prompts=["cat"], confidence_threshold=0.5, vectorize=True, simplify_epsilon=0.0)
    check_polygons(exact, check_result(exact, ["text"], vectorize=True))
    assert sum(map(len, exact["polygons"])) > sum(map(len, payload["polygons"])), "simplifying drops points"


def test_multimask_output_gives_three_candidates_best_first(providers_url):
    payload = sam2(providers_url, points=[[160, 120]], point_labels=[1], multimask_output=True)
    check_result(payload, ["visual"])
    assert payload["num_objects"] == 3 and payload["scores"] == sorted(payload["scores"], reverse=True)


def test_parity_with_native_api(providers_url):
    payload = sam2(providers_url, text_prompts=["kitten"], confidence_threshold=0.3)
    result = native(providers_url, [{"type": "concept", "text": "kitten"}], threshold=0.3)
    instances = result["prompts"][0]["instances"]
    assert instances, "the comparison must not be empty"
    assert payload["masks"] == [i["mask"] for i in instances]
    assert payload["scores"] == [i["score"] for i in instances]


# ------------------------------------------------------------------- errors, in the Space's shape


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        pytest.param("/api/sam2_compatible", {}, 422, ["inputs"], id="missing-inputs"),
        pytest.param("/api/sam2_compatible", {"inputs": {"text_prompts": ["cat"]}}, 422, ["image"], id="no-image"),
        pytest.param("/api/sam2_compatible", {"inputs": {"image": IMAGE, "text_prompts": [1]}}, 422,
                     ["text_prompts"], id="text-not-string"),
        pytest.param("/api/sam2_compatible", {"inputs": {"image": IMAGE, "text_prompts": ["cat"],
                     "confidence_threshold": 2}}, 422, ["confidence_threshold"], id="threshold-out-of-range"),
        pytest.param("/api/sam2_compatible", {"inputs": {"image": IMAGE, "points": [[10, 10], [20, 20]],
                     "point_labels": [1]}}, 400, ["2 points", "1 point_labels"], id="label-count"),
        pytest.param("/api/sam2_compatible", {"inputs": {"image": IMAGE, "points": [[9999, 10]]}}, 400,
                     ["outside"], id="point-outside"),
        pytest.param("/api/sam2_compatible", {"inputs": {"image": IMAGE, "boxes": [[200, 200, 100, 100]]}}, 400,
                     ["inverted"], id="inverted-box"),
        pytest.param("/api/sam2_compatible", {"inputs": {"image": IMAGE, "boxes": [[10, 10, 50, 50]],
                     "box_labels": [0]}}, 400, ["nothing to segment"], id="only-negative-box"),
        pytest.param("/api/sam2_compatible", {"inputs": {"image": "not base64!!", "text_prompts": ["cat"]}}, 400,
                     ["base64"], id="bad-base64"),
        pytest.param("/api/sam2_compatible", {"inputs": {"image": "http://169.254.169.254/latest/meta-data",
                     "text_prompts": ["cat"]}}, 400, ["URL"], id="metadata-url"),
        pytest.param("/api/predict", {"data": [IMAGE]}, 422, ["data"], id="predict-missing-text"),
        pytest.param("/api/predict", {"data": [IMAGE, 5, 0.5]}, 422, ["data[1]"], id="predict-text-not-string"),
        pytest.param("/api/predict", {"data": "x"}, 422, ["data"], id="predict-data-not-list"),
    ],
)
def test_bad_requests(providers_url, path, body, status, words):
    assert_error(post(providers_url, path, body), status, *words)


@pytest.mark.parametrize("path", ["/api/predict", "/api/sam2_compatible"])
@pytest.mark.parametrize(("key", "words"), [(None, ["missing", "Bearer"]), ("wrong", ["invalid API key"])])
def test_auth(providers_url, path, key, words):
    body = {"data": [IMAGE, "cat", 0.5]} if path == "/api/predict" else {"inputs": {"image": IMAGE, "text_prompts": ["cat"]}}
    assert_error(post(providers_url, path, body, key), 401, *words)


def test_key_without_bearer_scheme_is_refused(providers_url):
    response = requests.post(
        f"{providers_url}/api/sam2_compatible", json={"inputs": {"image": IMAGE, "text_prompts": ["cat"]}},
        headers={"Authorization": API_KEY}, timeout=60,
    )
    assert_error(response, 401, "missing")
