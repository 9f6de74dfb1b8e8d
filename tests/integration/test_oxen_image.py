"""Oxen.ai `sam-3-image` through real Ray Serve and HTTP: the seed page's sync examples, the model object, errors."""

from __future__ import annotations

import base64
import io
import time

import cv2
import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.image.codecs import rle_area, rle_decode
from tests.integration.conftest import API_KEY, random_image

pytestmark = pytest.mark.integration

EDIT, MODEL = "/api/ai/images/edit", "/api/ai/models/sam-3-image"
PROMPT = "the ox horns"
SMALL, WIDE = (96, 128), (108, 192)  # (height, width); WIDE has the seed example's aspect ratio
RESPONSE_KEYS = {"model", "created", "images", "mask", "masks", "width", "height"}
ERROR_KEYS = {"status", "status_message", "status_description", "error"}


def headers(key: str | None = API_KEY) -> dict:
    out = {"Content-Type": "application/json"}
    if key is not None:
        out["Authorization"] = f"Bearer {key}"
    return out


def edit(url: str, body: dict, key: str | None = API_KEY) -> requests.Response:
    return requests.post(url + EDIT, json=body, headers=headers(key), timeout=120)


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def fetch(url: str, content_type: str) -> Image.Image:
    """GET a media URL without credentials (a capability URL) and decode it."""
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    return Image.open(io.BytesIO(response.content))


def assert_error(response: requests.Response, status: int, status_message: str, *words: str) -> dict:
    """Oxen's error shape, with the status, the code, and every word in the message (case-insensitive)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert set(payload) == ERROR_KEYS, payload
    assert payload["status"] == "error"
    assert payload["status_message"] == status_message, payload
    message = payload["status_description"]
    assert isinstance(message, str) and message
    assert payload["error"]["type"] == status_message and payload["error"]["title"] == message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return payload


def check_masks(payload: dict, height: int, width: int) -> np.ndarray:
    """Every mask entry typed and consistent with its RLE; returns the union of the instance masks."""
    union = np.zeros((height, width), dtype=bool)
    scores = []
    for entry in payload["masks"]:
        assert set(entry) == {"score", "box", "area", "rle"}
        assert isinstance(entry["score"], float) and 0.5 < entry["score"] <= 1.0
        assert len(entry["box"]) == 4 and all(isinstance(v, float) for v in entry["box"])
        x0, y0, x1, y1 = entry["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert entry["rle"]["size"] == [height, width] and isinstance(entry["rle"]["counts"], str)
        mask = rle_decode(entry["rle"])
        assert isinstance(entry["area"], int) and entry["area"] == int(mask.sum()) == rle_area(entry["rle"]) > 0
        union |= mask
        scores.append(entry["score"])
    assert scores == sorted(scores, reverse=True), "instances come best first"
    return union


def check_edit_response(payload: dict, height: int, width: int) -> np.ndarray:
    """The response fields and types of a url answer; returns the union of the masks."""
    assert set(payload) == RESPONSE_KEYS, payload.keys()
    assert payload["model"] == "sam-3-image"
    assert isinstance(payload["created"], int) and abs(payload["created"] - time.time()) < 600
    assert (payload["width"], payload["height"]) == (width, height)
    assert isinstance(payload["images"], list) and len(payload["images"]) == 1
    assert set(payload["images"][0]) == {"url"} and set(payload["mask"]) == {"url"}
    union = check_masks(payload, height, width)
    assert payload["masks"], "the case must find instances, or it proves nothing"
    mask = fetch(payload["mask"]["url"], "image/png")
    assert mask.format == "PNG" and mask.mode == "L" and mask.size == (width, height)
    assert np.array_equal(np.asarray(mask), union.astype(np.uint8) * 255)
    return union


def check_cutout_png(url: str, original: np.ndarray, union: np.ndarray) -> None:
    image = fetch(url, "image/png")
    assert image.format == "PNG" and image.mode == "RGBA"
    assert image.size == (original.shape[1], original.shape[0])
    rgba = np.asarray(image)
    assert np.array_equal(rgba[..., 3], union.astype(np.uint8) * 255), "opaque exactly where segmented"
    assert (rgba[..., 3] == 0).any() and (rgba[..., 3] == 255).any()
    assert np.array_equal(rgba[union][:, :3], original[union]), "segmented pixels are the original's"
    assert not rgba[~union].any(), "everything else is transparent black"


def image_url(server: str, seed: int, size: tuple[int, int], ext: str = "png") -> str:
    return f"{server}/img/{seed}.{ext}?h={size[0]}&w={size[1]}"


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    side = 2 * pixels + 1
    return cv2.dilate(mask.astype(np.uint8), np.ones((side, side), np.uint8)).astype(bool)


def find_seed(url: str, server: str, size: tuple[int, int]) -> int:
    """A test image where the (random-weight) model finds the prompt but leaves background, asked via /v1."""
    for seed in range(64):
        body = {"image": image_url(server, seed, size), "prompts": [{"type": "concept", "text": PROMPT}]}
        answer = ok(requests.post(f"{url}/v1/image/segment", json=body, headers=headers(), timeout=120))
        masks = [rle_decode(i["mask"]) for i in answer["prompts"][0]["instances"]]
        if masks and not grow(np.logical_or.reduce(masks), 2).all():
            return seed
    pytest.fail(f"no test image of size {size} where the model finds {PROMPT!r} and leaves background")


@pytest.fixture(scope="module")
def small_seed(providers_url, image_server) -> int:
    return find_seed(providers_url, image_server, SMALL)


@pytest.fixture(scope="module")
def wide_seed(providers_url, image_server) -> int:
    return find_seed(providers_url, image_server, WIDE)


# ------------------------------------------------------------------------------------------------ seed examples


def test_sync_example_minimal(providers_url, image_server, small_seed):
    """First sync curl of the seed page, verbatim but for the image URL."""
    body = {"model": "sam-3-image", "input_image": image_url(image_server, small_seed, SMALL), "prompt": "the ox horns"}
    payload = ok(edit(providers_url, body))
    union = check_edit_response(payload, *SMALL)
    assert payload["images"][0]["url"].startswith(f"{providers_url}/api/media/")
    check_cutout_png(payload["images"][0]["url"], random_image(small_seed, *SMALL), union)


def test_sync_example_with_options(providers_url, image_server, wide_seed):
    """Second sync curl of the seed page (apply_mask, output_format), at the example's aspect ratio."""
    body = {
        "model": "sam-3-image",
        "input_image": image_url(image_server, wide_seed, WIDE),
        "prompt": "the ox horns",
        "apply_mask": True,
        "output_format": "png",
    }
    payload = ok(edit(providers_url, body))
    union = check_edit_response(payload, *WIDE)
    check_cutout_png(payload["images"][0]["url"], random_image(wide_seed, *WIDE), union)


# ------------------------------------------------------------------------------------------------ options


def test_jpg_output_has_a_black_background(providers_url, image_server, small_seed):
    body = {"model": "sam-3-image", "input_image": image_url(image_server, small_seed, SMALL), "prompt": PROMPT,
            "output_format": "jpg"}
    payload = ok(edit(providers_url, body))
    union = check_edit_response(payload, *SMALL)
    image = fetch(payload["images"][0]["url"], "image/jpeg")
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (128, 96)
    far_outside = ~grow(union, 2)
    assert far_outside.any()
    assert np.asarray(image)[far_outside].mean() < 8, "the background is black (up to JPEG ringing)"


def test_apply_mask_false_draws_overlays_on_the_whole_image(providers_url, image_server, small_seed):
    body = {"model": "sam-3-image", "input_image": image_url(image_server, small_seed, SMALL), "prompt": PROMPT,
            "apply_mask": False}
    payload = ok(edit(providers_url, body))
    union = check_edit_response(payload, *SMALL)
    image = fetch(payload["images"][0]["url"], "image/png")
    assert image.mode == "RGB" and image.size == (128, 96)
    rgb, original = np.asarray(image), random_image(small_seed, *SMALL)
    outside = ~grow(union, 2)  # outlines are drawn 2 px wide on the mask contours
    assert outside.any() and np.array_equal(rgb[outside], original[outside]), "untouched away from the masks"
    assert (rgb[union] != original[union]).any(), "masks are tinted"


def test_b64_json_returns_the_same_files_inline(providers_url, image_server, small_seed):
    body = {"model": "sam-3-image", "input_image": image_url(image_server, small_seed, SMALL), "prompt": PROMPT}
    by_url = ok(edit(providers_url, body))
    inline = ok(edit(providers_url, {**body, "response_format": "b64_json"}))
    assert set(inline["images"][0]) == {"b64_json"} and set(inline["mask"]) == {"b64_json"}
    assert inline["masks"] == by_url["masks"]
    for url_item, b64_item in ((by_url["images"][0], inline["images"][0]), (by_url["mask"], inline["mask"])):
        assert requests.get(url_item["url"], timeout=30).content == base64.b64decode(b64_item["b64_json"])


def test_data_uri_and_gif_input(providers_url):
    buffer = io.BytesIO()
    Image.fromarray(random_image(1)).save(buffer, format="GIF")
    uri = "data:image/gif;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    payload = ok(edit(providers_url, {"model": "sam-3-image", "input_image": uri, "prompt": PROMPT,
                                      "target_namespace": "ox"}))
    assert (payload["width"], payload["height"]) == (128, 96)
    check_masks(payload, 96, 128)


def test_same_masks_and_scores_as_the_native_api(providers_url, image_server, wide_seed):
    url = image_url(image_server, wide_seed, WIDE)
    oxen = ok(edit(providers_url, {"model": "sam-3-image", "input_image": url, "prompt": PROMPT}))
    native = ok(requests.post(
        f"{providers_url}/v1/image/segment", headers=headers(),
        json={"image": url, "prompts": [{"type": "concept", "text": PROMPT}], "threshold": 0.5},
        timeout=120,
    ))
    instances = native["prompts"][0]["instances"]
    assert len(instances) == len(oxen["masks"]) > 0
    for ours, theirs in zip(oxen["masks"], instances):
        assert ours["rle"] == theirs["mask"]
        assert ours["score"] == theirs["score"] and ours["box"] == theirs["box"] and ours["area"] == theirs["area"]


# ------------------------------------------------------------------------------------------------ model object


def test_model_object_has_a_generated_request_schema(providers_url):
    model = ok(requests.get(providers_url + MODEL, headers=headers(), timeout=30))
    assert model["id"] == "sam-3-image" and model["object"] == "model"
    assert isinstance(model["name"], str) and model["name"] == model["display_name"] == "Segment Anything 3 - Image"
    assert isinstance(model["description"], str) and "segment" in model["description"].lower()
    assert model["parameter_count"] == 848_000_000
    assert model["endpoint"] == "/images/edit" and model["served_weights"] == "tiny-random"
    schema = model["json_request_schema"]
    assert schema == model["request_schema"]
    props = schema["properties"]
    assert set(props) == {"input_image", "prompt", "apply_mask", "output_format"}
    assert sorted(schema["required"]) == ["input_image", "prompt"]
    assert props["input_image"]["type"] == "string" and props["input_image"]["format"] == "uri"
    assert props["prompt"]["type"] == "string"
    assert props["apply_mask"] == {**props["apply_mask"], "type": "boolean", "default": True}
    assert props["output_format"]["enum"] == ["png", "jpg"] and props["output_format"]["default"] == "png"
    assert all(p["description"] for p in props.values())


def test_model_list(providers_url):
    listing = ok(requests.get(providers_url + "/api/ai/models", headers=headers(), timeout=30))
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["sam-3-image", "sam-3-video"]


def test_unknown_model_id_is_404(providers_url):
    response = requests.get(providers_url + "/api/ai/models/flux-2-dev", headers=headers(), timeout=30)
    assert_error(response, 404, "resource_not_found", "model not found", "flux-2-dev")


# ------------------------------------------------------------------------------------------------ errors

GOOD = {"model": "sam-3-image", "input_image": "https://example.com/a.png", "prompt": "the ox horns"}


def _without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


@pytest.mark.parametrize(
    "body,status,code,words",
    [
        pytest.param(_without("input_image"), 422, "validation_error", ("input_image", "required"), id="no-image"),
        pytest.param(_without("prompt"), 422, "validation_error", ("prompt", "required"), id="no-prompt"),
        pytest.param(_without("model"), 422, "validation_error", ("model", "required"), id="no-model"),
        pytest.param({**GOOD, "apply_mask": "yes"}, 422, "validation_error", ("apply_mask", "boolean"), id="mask-yes"),
        pytest.param({**GOOD, "apply_mask": "true"}, 422, "validation_error", ("apply_mask",), id="mask-str"),
        pytest.param({**GOOD, "apply_mask": 1}, 422, "validation_error", ("apply_mask",), id="mask-int"),
        pytest.param({**GOOD, "prompt": 42}, 422, "validation_error", ("prompt", "string"), id="prompt-int"),
        pytest.param({**GOOD, "prompt": ""}, 422, "validation_error", ("prompt",), id="prompt-empty"),
        pytest.param({**GOOD, "input_image": ["https://a/b.png"]}, 422, "validation_error", ("input_image",),
                     id="image-list"),
        pytest.param({**GOOD, "input_image": "iVBORw0KGgo="}, 422, "validation_error", ("input_image", "uri"),
                     id="image-not-uri"),
        pytest.param({**GOOD, "output_format": "gif"}, 422, "validation_error", ("output_format", "png", "jpg"),
                     id="gif-output"),
        pytest.param({**GOOD, "response_format": "file"}, 422, "validation_error", ("response_format",),
                     id="response-format"),
        pytest.param({**GOOD, "apply_masks": True}, 422, "validation_error", ("apply_masks",), id="unknown-field"),
        pytest.param({**GOOD, "model": "qwen-image-edit"}, 404, "resource_not_found",
                     ("model not found", "qwen-image-edit"), id="unknown-model"),
        pytest.param({**GOOD, "input_image": "http://10.0.0.1/a.png"}, 400, "url_not_allowed", ("10.0.0.1",),
                     id="private-url"),
        pytest.param({**GOOD, "input_image": "http://169.254.169.254/latest/meta-data"}, 400, "url_not_allowed",
                     ("169.254.169.254",), id="metadata-url"),
        pytest.param({**GOOD, "input_image": "ftp://example.com/a.png"}, 422, "validation_error", ("input_image",),
                     id="ftp-url"),
        pytest.param({**GOOD, "input_image": "data:image/png;base64,AAAA"}, 400, "invalid_image", ("decode",),
                     id="not-an-image"),
    ],
)
def test_bad_requests_are_4xx_in_oxen_shape(providers_url, body, status, code, words):
    assert_error(edit(providers_url, body), status, code, *words)


def test_blank_prompt_and_unreachable_image(providers_url, image_server):
    image = image_url(image_server, 0, SMALL)
    assert_error(edit(providers_url, {**GOOD, "input_image": image, "prompt": "   "}), 400, "invalid_prompt", "blank")
    missing = f"{image_server}/nothing.png"
    assert_error(edit(providers_url, {**GOOD, "input_image": missing}), 400, "fetch_failed", "404")


def test_body_that_is_not_json(providers_url):
    response = requests.post(providers_url + EDIT, data="{not json", headers=headers(), timeout=30)
    assert_error(response, 400, "bad_request", "json")


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["missing", "wrong"])
def test_auth_is_checked_before_the_body(providers_url, key):
    assert_error(edit(providers_url, GOOD, key), 401, "unauthorized")
    assert_error(edit(providers_url, {"model": 1}, key), 401, "unauthorized")
    response = requests.get(providers_url + MODEL, headers=headers(key), timeout=30)
    assert_error(response, 401, "unauthorized")


def test_unknown_media_id_is_404(providers_url):
    for media_id in ("unknown", "A" * 32, "x" * 500):
        response = requests.get(f"{providers_url}/api/media/{media_id}", timeout=30)
        assert_error(response, 404, "resource_not_found", "media not found")


def test_unknown_oxen_route_is_404_in_oxen_shape(providers_url):
    response = requests.get(providers_url + "/api/ai/images/generate", headers=headers(), timeout=30)
    assert_error(response, 404, "resource_not_found")
