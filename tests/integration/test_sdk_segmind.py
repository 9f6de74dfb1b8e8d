"""Segmind's own `segmind` SDK against the server: `run()` (the v2 queue: submit, poll, result), `submit_async()`
with its job handle, `run_sync()` (v1), and errors the SDK reads as `SegmindError.detail` strings."""

from __future__ import annotations

import base64
import time

import pytest
import requests

pytest.importorskip("segmind", reason="segmind is a test dependency: pip install -e '.[test]'")

from segmind import SegmindClient  # noqa: E402
from segmind.exceptions import SegmindError  # noqa: E402
from segmind.v2 import InferenceFailed  # noqa: E402

from serve_app.image.codecs import png_bytes_to_mask  # noqa: E402
from tests.integration.conftest import API_KEY, OTHER_KEY, png_b64, random_image  # noqa: E402

pytestmark = pytest.mark.integration

HEIGHT, WIDTH = 96, 128
IMAGE = png_b64(random_image(11, HEIGHT, WIDTH))
REQUEST = {"image": IMAGE, "text_prompt": "cat", "threshold": 0.1, "return_masks": True, "return_overlay": True}


def sdk(url: str, key: str | None = API_KEY) -> SegmindClient:
    """The SDK's documented setup, pointed at this server: its base URL is the /v1 of the app."""
    return SegmindClient(api_key=key, base_url=f"{url}/v1")


def decoded(masks: list[dict]) -> list:
    return [png_bytes_to_mask(base64.b64decode(m["mask"])).tolist() for m in masks]


def same_answer(a: dict, b: dict) -> None:
    """The v1 body, field by field (scores to float precision across runs)."""
    assert {k: v for k, v in a.items() if k != "masks"} == {k: v for k, v in b.items() if k != "masks"}
    assert decoded(a["masks"]) == decoded(b["masks"])
    assert [m["score"] for m in a["masks"]] == pytest.approx([m["score"] for m in b["masks"]], abs=1e-6)


def test_run_queues_polls_and_returns_the_v1_answer(providers_url):
    result = sdk(providers_url).run("sam3-image", **REQUEST)
    assert result["status"] == "COMPLETED" and isinstance(result["request_id"], str)
    assert set(result["metrics"]) == {"created_at", "started_at", "completed_at"}
    assert result["metrics"]["created_at"] <= result["metrics"]["started_at"] <= result["metrics"]["completed_at"]
    output = result["output"]
    assert (output["width"], output["height"], output["mode"]) == (WIDTH, HEIGHT, "concept")
    assert output["num_masks"] == len(output["masks"]) >= 1 and output["overlay"] and output["preview"]
    same_answer(output, sdk(providers_url).run_sync("sam3-image", **REQUEST).json())


def test_submit_async_gives_a_job_to_poll(providers_url):
    job = sdk(providers_url).submit_async("sam3-image", image=IMAGE, points_input="[[40, 30]]", return_masks=True)
    assert job.submit_response["status"] == "QUEUED"
    assert job.status_url == f"{providers_url}/v2/requests/{job.request_id}/status"
    assert job.response_url == f"{providers_url}/v2/requests/{job.request_id}"
    seen = {job.status()["status"]}
    assert seen <= {"QUEUED", "PROCESSING", "COMPLETED"}
    result = job.wait(timeout=120, interval=0.2)
    seen.add(job.status()["status"])
    assert "COMPLETED" in seen and result["output"]["mode"] == "visual" and result["output"]["num_masks"] == 1
    assert job.result() == result  # the response URL keeps answering until the job expires


def test_a_failed_request_raises_inference_failed_with_the_reason(providers_url):
    """The image is only read by the worker: a bad one makes the request FAILED, with the reason as a string."""
    with pytest.raises(InferenceFailed) as caught:
        sdk(providers_url).run("sam3-image", image="bm90IGFuIGltYWdl", text_prompt="cat")  # base64 of "not an image"
    assert isinstance(caught.value.detail, str) and "image" in caught.value.detail
    assert caught.value.status_body["status"] == "FAILED"
    request_id = caught.value.status_body["request_id"]
    status = requests.get(f"{providers_url}/v2/requests/{request_id}/status", headers={"x-api-key": API_KEY},
                          timeout=30)
    assert status.status_code == 422 and status.json()["error"] == caught.value.detail


@pytest.mark.parametrize("params,status,words", [
    ({"image": IMAGE, "threshold": 5}, 400, "threshold"),
    ({"image": IMAGE, "points_input": "[[1, 2], [3]]"}, 400, "points_input"),
    ({"text_prompt": "cat"}, 400, "image"),
])
def test_a_bad_request_is_refused_at_submit_in_segmind_shape(providers_url, params, status, words):
    with pytest.raises(SegmindError) as caught:
        sdk(providers_url).run("sam3-image", **params)
    assert caught.value.status == status and isinstance(caught.value.detail, str) and words in caught.value.detail


def test_unknown_model_and_keys_are_segmind_errors(providers_url):
    with pytest.raises(SegmindError) as caught:
        sdk(providers_url).run("sdxl-turbo", prompt="a cat")
    assert caught.value.status == 404 and isinstance(caught.value.detail, str) and "sam3-image" in caught.value.detail
    for key, words in ((None, "x-api-key"), ("wrong", "invalid API key")):
        with pytest.raises(SegmindError) as caught:
            sdk(providers_url, key).run("sam3-image", **REQUEST)
        assert caught.value.status == 401 and words in caught.value.detail


def test_a_request_belongs_to_its_key(providers_url):
    job = sdk(providers_url).submit_async("sam3-image", image=IMAGE, text_prompt="cat")
    other = requests.get(job.status_url, headers={"x-api-key": OTHER_KEY}, timeout=30)
    assert other.status_code == 404 and set(other.json()) == {"error", "code"}
    job.wait(timeout=120, interval=0.2)


def test_every_v2_path_answers_in_segmind_shape(providers_url):
    headers = {"x-api-key": API_KEY}
    for method, path in (("GET", "/v2/requests/nope/status"), ("GET", "/v2/requests/nope"), ("GET", "/v2/nope"),
                         ("DELETE", "/v2/sam3-image")):
        response = requests.request(method, f"{providers_url}{path}", headers=headers, timeout=30)
        assert response.status_code in (404, 405), (path, response.text)
        body = response.json()
        assert set(body) == {"error", "code"} and isinstance(body["error"], str), (path, body)


def test_the_result_url_says_the_status_until_the_result_is_there(providers_url):
    submitted = requests.post(f"{providers_url}/v2/sam3-image", json={"image": IMAGE, "text_prompt": "cat"},
                              headers={"x-api-key": API_KEY}, timeout=30)
    assert submitted.status_code == 200, submitted.text
    body = submitted.json()
    assert set(body) == {"request_id", "status", "status_url", "response_url"} and body["status"] == "QUEUED"
    deadline = time.monotonic() + 120
    while (result := requests.get(body["response_url"], headers={"x-api-key": API_KEY}, timeout=30).json())[
            "status"] != "COMPLETED":
        assert result["status"] in ("QUEUED", "PROCESSING") and result["output"] is None
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert result["output"]["mode"] == "concept" and result["output"]["preview"]
