"""The SAM3 Hugging Face Space API through real HTTP: every request example of its page, its errors, parity with /v1."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.codecs import polygons_to_mask
from tests.integration.conftest import API_KEY, find_image_seed, png_b64, random_image

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


def check_polygons(payload: dict, masks: list[np.ndarray]) -> None:
    assert payload["polygon_format"] == "pixel_coordinates"
    assert payload["original_image_size"] == [WIDTH, HEIGHT]
    assert len(payload["polygons"]) == len(masks)
    for polygon, mask in zip(payload["polygons"], masks):
        assert len(polygon) >= 3 and all(len(p) == 2 for p in polygon)
        xy = np.asarray(polygon, dtype=float)
        assert (xy >= 0).all() and (xy[:, 0] <= WIDTH).all() and (xy[:, 1] <= HEIGHT).all()
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
