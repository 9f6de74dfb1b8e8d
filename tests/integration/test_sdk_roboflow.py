"""Roboflow's own `inference-sdk` against the served /sam3/* routes: every sam3_* method, sync and async, over every
key transport the SDK has (query, body, Authorization: Bearer, both), with the SDK's own response handling."""

from __future__ import annotations

import asyncio
import base64
import warnings

import numpy as np
import pytest
import requests

INSTALL = "pip install -e '.[test]' && pip install --no-deps inference-sdk==1.8.3 (the Makefile does both)"
pytest.importorskip("inference_sdk", reason=f"inference-sdk is a test dependency: {INSTALL}")
sv = pytest.importorskip("supervision", reason=f"supervision is a test dependency: {INSTALL}")

from inference_sdk import InferenceConfiguration, InferenceHTTPClient  # noqa: E402
from inference_sdk.http.errors import HTTPCallErrorError  # noqa: E402

from serve_app.image import codecs  # noqa: E402
from tests.integration.conftest import API_KEY, png_b64, random_image  # noqa: E402

pytestmark = pytest.mark.integration

HEIGHT, WIDTH = 80, 120
IMAGE = png_b64(random_image(7, HEIGHT, WIDTH))  # the SDK sends a base64 string as it is: REST parity is exact
TRANSPORTS = ["query", "body", "header", "both"]
PROMPTS = [{"type": "text", "text": "cat"}, {"type": "text", "text": "dog", "output_prob_thresh": 0.0}]
CLICKS = [{"points": [{"x": 40, "y": 30, "positive": True}]}, {"box": {"x": 60, "y": 40, "width": 40, "height": 30}}]


def client(url: str, transport: str, key: str = API_KEY) -> InferenceHTTPClient:
    """The SDK as its docs set it up; `query` is its v0 mode (the key as ?api_key=), `body` its v1 legacy mode."""
    sdk = InferenceHTTPClient(api_url=url, api_key=key)
    mode = "legacy" if transport in ("query", "body") else transport
    sdk.configure(InferenceConfiguration(api_key_transport=mode))
    if transport == "query":
        sdk.select_api_v0()
    return sdk


def rest(url: str, route: str, body: dict) -> dict:
    response = requests.post(f"{url}/sam3/{route}", json=body, params={"api_key": API_KEY}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def without_time(payload: dict) -> dict:
    return {k: v for k, v in payload.items() if k != "time"}


def call(sdk: InferenceHTTPClient, name: str, asynchronous: bool, *args, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if asynchronous:
            return asyncio.run(getattr(sdk, f"{name}_async")(*args, **kwargs))
        return getattr(sdk, name)(*args, **kwargs)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concept_segment_through_the_sdk(providers_url, transport, asynchronous):
    out = call(client(providers_url, transport), "sam3_concept_segment", asynchronous, IMAGE, PROMPTS,
               output_prob_thresh=0.05)
    expected = rest(providers_url, "concept_segment", {
        "image": {"type": "base64", "value": IMAGE}, "prompts": PROMPTS, "output_prob_thresh": 0.05})
    assert without_time(out) == without_time(expected)
    assert [r["echo"]["text"] for r in out["prompt_results"]] == ["cat", "dog"]
    # supervision reads the polygon results: one detection per prediction with a polygon, in prompt order
    detections = sv.Detections.from_sam3(out, resolution_wh=(WIDTH, HEIGHT))
    drawn = [(r["prompt_index"], p) for r in out["prompt_results"] for p in r["predictions"] if p["masks"]]
    assert len(drawn) >= 1 and len(detections) == len(drawn)
    assert detections.mask.shape == (len(drawn), HEIGHT, WIDTH)
    assert detections.class_id.tolist() == [index for index, _ in drawn]
    assert np.allclose(detections.confidence, [p["confidence"] for _, p in drawn])
    for mask, (_, prediction) in zip(detections.mask, drawn):
        expected_mask = codecs.polygons_to_mask([{"exterior": p, "holes": []} for p in prediction["masks"]],
                                                HEIGHT, WIDTH)
        assert (mask & expected_mask).sum() >= 0.9 * expected_mask.sum()  # the same pixels (lines aside)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_visual_segment_through_the_sdk(providers_url, transport, asynchronous):
    out = call(client(providers_url, transport), "sam3_visual_segment", asynchronous, IMAGE, CLICKS,
               mask_input_format="rle")
    expected = rest(providers_url, "visual_segment", {
        "image": {"type": "base64", "value": IMAGE}, "prompts": {"prompts": CLICKS}, "format": "rle"})
    assert without_time(out) == without_time(expected)
    assert len(out["predictions"]) == 2 and all(p["masks"]["size"] == [HEIGHT, WIDTH] for p in out["predictions"])
    detections = sv.Detections.from_sam3(
        call(client(providers_url, transport), "sam3_visual_segment", asynchronous, IMAGE, CLICKS),
        resolution_wh=(WIDTH, HEIGHT),
    )
    assert detections.mask.shape[1:] == (HEIGHT, WIDTH)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_embed_image_through_the_sdk(providers_url, transport, asynchronous):
    image_id = f"sdk-{transport}-{asynchronous}"
    out = call(client(providers_url, transport), "sam3_embed_image", asynchronous, IMAGE, image_id=image_id)
    assert out["image_id"] == image_id and out["time"] > 0
    # the embedding is cached under that id for this key: asking by the id alone finds it (else a 404)
    cached = requests.post(f"{providers_url}/sam3/embed_image", params={"api_key": API_KEY}, timeout=120,
                           json={"image_id": image_id})
    assert cached.status_code == 200 and cached.json()["image_id"] == image_id, cached.text


def test_a_bare_numpy_image_and_a_file_path_work_too(providers_url, tmp_path):
    """The SDK's other image inputs: a BGR numpy array (sent as JPEG) and a file on disk."""
    path = tmp_path / "image.png"
    path.write_bytes(base64.b64decode(IMAGE))
    sdk = client(providers_url, "header")
    from_file = call(sdk, "sam3_concept_segment", False, str(path), PROMPTS, output_prob_thresh=0.05)
    from_b64 = call(sdk, "sam3_concept_segment", False, IMAGE, PROMPTS, output_prob_thresh=0.05)
    assert without_time(from_file) == without_time(from_b64)
    bgr = np.ascontiguousarray(random_image(7, HEIGHT, WIDTH)[..., ::-1])
    out = call(sdk, "sam3_visual_segment", False, bgr, CLICKS, mask_input_format="rle")
    assert [p["masks"]["size"] for p in out["predictions"]] == [[HEIGHT, WIDTH]] * 2


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("method,args", [
    ("sam3_concept_segment", (IMAGE, PROMPTS)), ("sam3_visual_segment", (IMAGE, CLICKS)),
    ("sam3_embed_image", (IMAGE,)),
])
def test_a_wrong_key_is_refused_on_every_transport(providers_url, transport, method, args):
    """The key is checked whichever channel carries it; the SDK shows the server's message."""
    with pytest.raises(HTTPCallErrorError) as caught:
        call(client(providers_url, transport, key="not-a-key"), method, False, *args)
    assert caught.value.status_code == 401 and "invalid API key" in caught.value.api_message


def test_the_header_wins_over_a_stale_body_key(providers_url):
    """As Roboflow's servers: with the key in both places the header is the one read."""
    body = {"image": {"type": "base64", "value": IMAGE}, "api_key": "stale-key"}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ok = requests.post(f"{providers_url}/sam3/embed_image", json=body, headers=headers, timeout=120)
    assert ok.status_code == 200, ok.text
    wrong = requests.post(f"{providers_url}/sam3/embed_image", json={**body, "api_key": API_KEY}, timeout=120,
                          headers={"Authorization": "Bearer stale-key"})
    assert wrong.status_code == 401 and wrong.json() == {"message": "invalid API key"}
