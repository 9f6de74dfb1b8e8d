"""One image and one phrase through all four provider front doors and /v1: the same instances once decoded."""

from __future__ import annotations

import base64
import io

import numpy as np
import requests
from PIL import Image

from serve_app.image.codecs import rle_decode
from tests.integration.conftest import API_KEY, find_image_seed, image_bytes

TEXT, THRESHOLD = "striped cat", 0.5


def _png(value: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(value))) as img:
        return np.asarray(img.convert("L")) > 0


def _native(url: str, image: str, nms: float | None) -> list[tuple[float, bytes]]:
    body = {"image": image, "prompts": [{"type": "concept", "text": TEXT}], "threshold": THRESHOLD, "nms_iou": nms}
    response = requests.post(f"{url}/v1/image/segment", json=body, headers={"x-api-key": API_KEY}, timeout=120)
    assert response.status_code == 200, response.text
    return [(i["score"], rle_decode(i["mask"]).tobytes()) for i in response.json()["prompts"][0]["instances"]]


def test_all_front_doors_agree(providers_url, image_server):
    seed = find_image_seed([TEXT], THRESHOLD)
    image = base64.b64encode(image_bytes(seed)).decode()
    url = f"{image_server}/img/{seed}.png"
    bearer = {"Authorization": f"Bearer {API_KEY}"}

    oxen = requests.post(f"{providers_url}/api/ai/images/edit", headers=bearer, timeout=120, json={
        "model": "sam-3-image", "input_image": url, "prompt": TEXT}).json()
    segmind = requests.post(f"{providers_url}/v1/sam3-image", headers={"x-api-key": API_KEY}, timeout=120, json={
        "image": url, "text_prompt": TEXT, "threshold": THRESHOLD, "return_masks": True}).json()
    roboflow = requests.post(f"{providers_url}/sam3/concept_segment", params={"api_key": API_KEY}, timeout=120, json={
        "image": {"type": "base64", "value": image}, "prompts": [{"type": "text", "text": TEXT}],
        "output_prob_thresh": THRESHOLD, "format": "rle"}).json()
    space = requests.post(f"{providers_url}/api/sam2_compatible", headers=bearer, timeout=120, json={
        "inputs": {"image": image, "text_prompts": [TEXT], "confidence_threshold": THRESHOLD}}).json()

    with_nms, without_nms = _native(providers_url, image, 0.5), _native(providers_url, image, None)
    assert with_nms, "the comparison must not be empty"
    found = {
        "oxen": [(m["score"], rle_decode(m["rle"]).tobytes()) for m in oxen["masks"]],
        "segmind": [(m["score"], _png(m["mask"]).tobytes()) for m in segmind["masks"]],
        "hf_space": [(s, _png(m).tobytes()) for s, m in zip(space["scores"], space["masks"])],
    }
    for name, instances in found.items():
        assert instances == with_nms, f"{name} differs from /v1"
    # Roboflow's own server applies no per-prompt NMS (only the optional cross-prompt one), and neither do we there
    rf = [(p["confidence"], rle_decode(p["masks"]).tobytes()) for p in roboflow["prompt_results"][0]["predictions"]]
    assert rf == without_nms, "roboflow differs from /v1 without per-prompt NMS"
