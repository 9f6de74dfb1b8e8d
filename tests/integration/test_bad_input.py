"""Hostile input through real HTTP: every bad request gets a 4xx native JSON error a person can act on, never a 500."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from PIL import Image

from serve_app.core.config import Config
from tests.integration.conftest import deploy, png_b64, random_image, segment, undeploy

pytestmark = pytest.mark.integration

HEIGHT, WIDTH = 96, 128
IMAGE = png_b64(random_image(0, HEIGHT, WIDTH))
TEXT = {"type": "concept", "text": "a square"}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def body(*prompts: dict, **fields: object) -> dict:
    return {"image": IMAGE, "prompts": list(prompts) or [TEXT], **fields}


def assert_error(response: requests.Response, status: int, code: str, *words: str) -> str:
    """The native error shape with the expected status and code; the message names every word (case-insensitive)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    payload = response.json()
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert error["code"] == code, error
    message = error["message"]
    assert isinstance(message, str) and message, error
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    return message


def npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return b64(buffer.getvalue())


def post_raw(url: str, data: bytes | str, content_type: str = "application/json") -> requests.Response:
    return requests.post(f"{url}/v1/image/segment", data=data, headers={"content-type": content_type}, timeout=60)


# ------------------------------------------------------------------------------------------------ happy path


def test_valid_image_and_text_prompt_is_segmented(app_url: str) -> None:
    response = segment(app_url, body(TEXT))
    assert response.status_code == 200, response.text
    out = response.json()
    assert (out["width"], out["height"]) == (WIDTH, HEIGHT)
    assert [p["type"] for p in out["prompts"]] == ["concept"]


# ------------------------------------------------------------------------------------------------ image bytes

_half_png = png_bytes(Image.fromarray(random_image(1, HEIGHT, WIDTH)))
_cut_b64 = IMAGE[: (len(IMAGE) // 2) // 4 * 4 + 1]  # 4k+1 characters can never be base64

IMAGE_CASES = [
    pytest.param(b64(np.random.default_rng(7).bytes(3000)), 400, "invalid_image", ("decode", "format"),
                 id="random-bytes"),
    pytest.param(b64(b"hello, this is a text file\nnot an image at all\n" * 20), 400, "invalid_image",
                 ("decode", "format"), id="text-file"),
    pytest.param(_cut_b64, 400, "invalid_image", ("base64",), id="truncated-base64"),
    pytest.param(b64(_half_png[: len(_half_png) // 2]), 400, "invalid_image", ("truncated",), id="truncated-png"),
    pytest.param("data:image/png;base64,%%%%", 400, "invalid_image", ("base64",), id="data-uri-garbage"),
    pytest.param("   ", 400, "invalid_image", ("empty",), id="blank-image"),
    pytest.param(png_b64(np.zeros((1, 1, 3), np.uint8)), 400, "invalid_image", ("1x1", "smallest"), id="1x1"),
]


@pytest.mark.parametrize(("image", "status", "code", "words"), IMAGE_CASES)
def test_bad_image_bytes(app_url: str, image: str, status: int, code: str, words: tuple[str, ...]) -> None:
    assert_error(segment(app_url, body(image=image)), status, code, *words)


def test_empty_image_string(app_url: str) -> None:
    assert_error(segment(app_url, body(image="")), 400, "invalid_image", "image is empty")


def test_png_declaring_20000x20000_pixels_is_refused_quickly(app_url: str) -> None:
    bomb = png_bytes(Image.new("1", (20000, 20000)))
    assert len(bomb) < 200_000  # a small file...
    started = time.perf_counter()
    response = segment(app_url, body(image=b64(bomb)), timeout=30)
    elapsed = time.perf_counter() - started
    assert_error(response, 413, "payload_too_large", "400000000 pixels", "40000000", "SAM3_MAX_IMAGE_PIXELS")
    assert elapsed < 5, f"refusing a decompression bomb took {elapsed:.1f} s"  # ...refused from its header


# ------------------------------------------------------------------------------------------------ size limits


@pytest.fixture(scope="module")
def small_url(serve_instance: str) -> Iterator[str]:
    """One extra app with a 10 000-pixel image limit and a 100 kB body limit."""
    yield deploy("smallpix", Config(max_image_pixels=10_000, max_request_bytes=100_000, web_ui=False, video_warm_sessions=0), serve_instance)
    undeploy("smallpix")


def test_image_over_pixel_limit(small_url: str) -> None:
    image = png_b64(np.full((200, 200, 3), 90, np.uint8))  # smooth: a tiny file, far under the body limit
    response = segment(small_url, body(image=image))
    assert_error(response, 413, "payload_too_large", "200x200", "40000 pixels", "10000", "SAM3_MAX_IMAGE_PIXELS")


def test_image_under_pixel_limit_passes_on_the_small_app(small_url: str) -> None:
    image = png_b64(random_image(2, 50, 60))
    response = segment(small_url, body(image=image))
    assert response.status_code == 200, response.text


def test_request_body_over_limit(small_url: str) -> None:
    response = segment(small_url, body(image="A" * 200_000))
    assert_error(response, 413, "payload_too_large", "100000", "SAM3_MAX_REQUEST_BYTES")


# ------------------------------------------------------------------------------------------------ prompt geometry

PROMPT_CASES = [
    pytest.param({"type": "concept", "boxes": [[500, 500, 600, 600]]}, 400, "invalid_prompt",
                 ("outside", f"{WIDTH}x{HEIGHT}"), id="box-outside"),
    pytest.param({"type": "concept", "boxes": [[-50, -50, -10, -10]]}, 400, "invalid_prompt",
                 ("outside",), id="box-negative-outside"),
    pytest.param({"type": "visual", "box": [100, 80, 10, 10]}, 400, "invalid_prompt", ("inverted",),
                 id="box-inverted"),
    pytest.param({"type": "concept", "boxes": [[10, 10, 50]]}, 422, "validation_error",
                 ("prompts.0.concept.boxes.0", "at least 4"), id="box-3-numbers"),
    pytest.param({"type": "visual", "points": [[500, 20]]}, 400, "invalid_prompt", ("outside", "500"),
                 id="point-outside"),
    pytest.param({"type": "visual", "points": [[-1, 20]]}, 400, "invalid_prompt", ("outside",),
                 id="point-negative"),
    pytest.param({"type": "visual", "points": [[10, 10], [20, 20]], "point_labels": [1]}, 400, "invalid_prompt",
                 ("2 points", "1 point labels"), id="point-labels-mismatch"),
    pytest.param({"type": "concept", "boxes": [[10, 10, 50, 50]], "box_labels": [True, False]}, 400,
                 "invalid_prompt", ("1 boxes", "2 box labels"), id="box-labels-mismatch"),
    pytest.param({"type": "visual", "points": [[10, 10]], "mask_logits": "not base64 npy!"}, 400,
                 "invalid_prompt", ("mask_logits", "base64 .npy"), id="mask-logits-garbage"),
    pytest.param({"type": "visual", "points": [[10, 10]], "mask_logits": b64(b"\x93NUMPY not really")}, 400,
                 "invalid_prompt", ("mask_logits", "base64 .npy"), id="mask-logits-not-npy"),
    pytest.param({"type": "visual", "points": [[10, 10]], "mask_logits": npy_b64(np.array(["ab", "cd"]))}, 400,
                 "invalid_prompt", ("mask_logits", "real-valued", "<U2"), id="mask-logits-strings"),
    pytest.param({"type": "visual", "points": [[10, 10]], "mask_logits": npy_b64(np.zeros((1, 1, 8, 8), "f4"))},
                 400, "invalid_prompt", ("mask_logits", "(h, w)", "(1, 1, 8, 8)"), id="mask-logits-4d"),
]


@pytest.mark.parametrize(("prompt", "status", "code", "words"), PROMPT_CASES)
def test_bad_prompt_geometry(app_url: str, prompt: dict, status: int, code: str, words: tuple[str, ...]) -> None:
    assert_error(segment(app_url, body(prompt)), status, code, *words)


def test_nan_in_box(app_url: str) -> None:
    raw = '{"image": "%s", "prompts": [{"type": "visual", "box": [1, 2, NaN, 40]}]}' % IMAGE
    assert_error(post_raw(app_url, raw), 422, "validation_error", "prompts.0.visual.box.2", "finite")


def test_nan_threshold(app_url: str) -> None:
    raw = '{"image": "%s", "prompts": [{"type": "concept", "text": "x"}], "threshold": NaN}' % IMAGE
    assert_error(post_raw(app_url, raw), 422, "validation_error", "threshold")


# ------------------------------------------------------------------------------------------------ prompt shape

SHAPE_CASES = [
    pytest.param({"type": "polygon", "text": "cat"}, 422, "validation_error", ("polygon", "concept", "visual"),
                 id="unknown-type"),
    pytest.param({"text": "cat"}, 422, "validation_error", ("type",), id="missing-type"),
    pytest.param({"type": "concept"}, 400, "invalid_prompt", ("text", "boxes"), id="concept-empty"),
    pytest.param({"type": "visual"}, 400, "invalid_prompt", ("points", "box"), id="visual-empty"),
    pytest.param({"type": "concept", "text": "   "}, 400, "invalid_prompt", ("blank",), id="blank-text"),
    pytest.param({"type": "concept", "text": ""}, 422, "validation_error", ("text", "at least 1"), id="empty-text"),
    pytest.param({"type": "concept", "text": "x" * 300}, 422, "validation_error", ("text", "256"),
                 id="text-too-long"),
    pytest.param({"type": "concept", "boxes": ["10,10,50,50"]}, 422, "validation_error", ("boxes", "list"),
                 id="boxes-as-strings"),
    pytest.param({"type": "concept", "boxes": "10,10,50,50"}, 422, "validation_error", ("boxes", "list"),
                 id="boxes-as-string"),
    pytest.param({"type": "visual", "points": [[10, 10]], "point_labels": [2]}, 422, "validation_error",
                 ("point_labels",), id="point-label-2"),
    pytest.param({"type": "concept", "text": "cat", "colour": "red"}, 422, "validation_error",
                 ("colour", "extra"), id="prompt-extra-field"),
]


@pytest.mark.parametrize(("prompt", "status", "code", "words"), SHAPE_CASES)
def test_bad_prompt_shape(app_url: str, prompt: dict, status: int, code: str, words: tuple[str, ...]) -> None:
    assert_error(segment(app_url, body(prompt)), status, code, *words)


def test_too_many_prompts(app_url: str) -> None:
    response = segment(app_url, body(*[TEXT] * 17))
    assert_error(response, 400, "invalid_prompt", "17 prompts", "limit is 16", "SAM3_MAX_PROMPTS")


# ------------------------------------------------------------------------------------------------ request fields

FIELD_CASES = [
    pytest.param({"prompts": "a cat"}, ("prompts", "list"), id="prompts-as-string"),
    pytest.param({"prompts": []}, ("prompts", "at least 1"), id="prompts-empty"),
    pytest.param({"threshold": "high"}, ("threshold", "number"), id="threshold-as-string"),
    pytest.param({"image": 12345}, ("image", "string"), id="image-as-number"),
    pytest.param({"threshold": 1.5}, ("threshold", "less than or equal to 1"), id="threshold-1.5"),
    pytest.param({"threshold": -0.1}, ("threshold", "greater than or equal to 0"), id="threshold-negative"),
    pytest.param({"max_instances": 0}, ("max_instances", "greater than or equal to 1"), id="max-instances-0"),
    pytest.param({"nms_iou": 2}, ("nms_iou", "less than or equal to 1"), id="nms-iou-2"),
    pytest.param({"output": "jpeg"}, ("output", "rle"), id="unknown-output"),
    pytest.param({"colour": "red"}, ("colour", "extra"), id="unknown-field"),
]


@pytest.mark.parametrize(("fields", "words"), FIELD_CASES)
def test_bad_request_field(app_url: str, fields: dict, words: tuple[str, ...]) -> None:
    assert_error(segment(app_url, body(**fields)), 422, "validation_error", *words)


def test_missing_image(app_url: str) -> None:
    assert_error(segment(app_url, {"prompts": [TEXT]}), 400, "invalid_image", "no image given", "image_id")


def test_unknown_image_id_without_image(app_url: str) -> None:
    assert_error(segment(app_url, {"image_id": "never-seen", "prompts": [TEXT]}), 404, "not_found", "never-seen")


# ------------------------------------------------------------------------------------------------ the body itself


def test_malformed_json(app_url: str) -> None:
    assert_error(post_raw(app_url, '{"image": "abc", "prompts": ['), 400, "bad_request", "JSON")


UNPARSABLE_BODIES = [
    pytest.param(b'{"image": "\xff\xfe", "prompts": []}', id="not-utf8"),
    pytest.param('{"prompts": ' + "[" * 100_000 + "]" * 100_000 + "}", id="nested-100k-deep"),
    pytest.param('{"threshold": ' + "9" * 5000 + "}", id="5000-digit-number"),
]


@pytest.mark.parametrize("raw", UNPARSABLE_BODIES)
def test_unparsable_json_body(app_url: str, raw: bytes | str) -> None:
    assert_error(post_raw(app_url, raw), 400, "bad_request", "JSON")


def test_empty_body(app_url: str) -> None:
    assert_error(post_raw(app_url, b""), 422, "validation_error", "body", "required")


def test_json_array_body(app_url: str) -> None:
    assert_error(post_raw(app_url, "[1, 2, 3]"), 422, "validation_error", "object")


# ------------------------------------------------------------------------------------------------ image URLs

URL_CASES = [
    pytest.param("http://127.0.0.1:1/x.png", "loopback", id="loopback"),
    pytest.param("http://169.254.169.254/latest", "metadata", id="metadata"),
    pytest.param("http://169.254.10.10/a.png", "link-local", id="link-local"),
    pytest.param("http://10.0.0.1/a.png", "private", id="private"),
    pytest.param("http://[::1]/a.png", "loopback", id="ipv6-loopback"),
    pytest.param("http://[::ffff:127.0.0.1]/a.png", "loopback", id="ipv4-mapped-loopback"),
]


@pytest.mark.parametrize(("url", "reason"), URL_CASES)
def test_internal_url_is_refused(app_url: str, url: str, reason: str) -> None:
    response = segment(app_url, body(image=url), timeout=30)
    assert_error(response, 400, "url_not_allowed", "refusing", reason, "SAM3_URL_ALLOWLIST")


def test_file_url_is_refused(app_url: str) -> None:
    response = segment(app_url, body(image="file:///etc/passwd"))
    assert_error(response, 400, "bad_request", "file", "only http and https")


# ------------------------------------------------------------------------------------------------ routes


def test_unknown_route(app_url: str) -> None:
    response = requests.get(f"{app_url}/v1/no/such/route", timeout=30)
    assert_error(response, 404, "not_found", "no route", "/v1/no/such/route")


def test_wrong_method(app_url: str) -> None:
    response = requests.get(f"{app_url}/v1/image/segment", timeout=30)
    assert_error(response, 405, "method_not_allowed", "GET is not allowed", "/v1/image/segment", "POST")
    assert response.headers["allow"] == "POST"
