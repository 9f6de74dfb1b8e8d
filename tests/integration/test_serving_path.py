"""The ingress sends encoded bytes and the encoder replica decodes them: same pixels, same answers, same errors.

A lone request never waits for the batch window; a repeated image is found by one cache call.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from serve_app.core.config import Config
from serve_app.image.imageio import ImageLoader
from tests.integration.conftest import deploy, png_b64, random_image, segment, undeploy

WINDOW_S = 20.0  # the encoder's batch window here: a request that waited for it would take this long


@pytest.fixture(scope="module")
def wide_window_url(serve_instance) -> Iterator[str]:
    config = Config(encoder_batch_wait_timeout_s=WINDOW_S, encoder_max_batch_size=8, web_ui=False,
                    video_warm_sessions=0)  # image-only module: no pooled session actor to start
    yield deploy("widewindow", config, serve_instance)
    undeploy("widewindow")


def jpeg_b64(image: np.ndarray, **params) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92, **params)
    data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii"), data


def _instances(response) -> list:
    assert response.status_code == 200, response.text
    return [[(i["score"], i["box"], i["mask"]) for i in p["instances"]] for p in response.json()["prompts"]]


PROMPTS = [{"type": "concept", "text": "a red car"}, {"type": "visual", "points": [[30, 20]], "multimask": True}]


def test_a_lone_request_does_not_wait_for_the_batch_window(wide_window_url):
    segment(wide_window_url, {"image": png_b64(random_image(40)), "prompts": PROMPTS[:1]})  # warm
    started = time.perf_counter()
    response = segment(wide_window_url, {"image": png_b64(random_image(41)), "prompts": PROMPTS[:1]})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert elapsed < WINDOW_S / 2, f"a lone request took {elapsed:.1f} s with a {WINDOW_S:.0f} s batch window"
    assert response.json()["timings_ms"]["encode_ms"] < WINDOW_S * 1000 / 2


def test_a_rotated_jpeg_decoded_on_the_encoder_equals_its_pixels_sent_as_png(wide_window_url):
    """EXIF orientation 6: the ingress reads the turned size from the header, the encoder turns the pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6
    text, data = jpeg_b64(random_image(42, 96, 128), exif=exif)
    pixels = ImageLoader(10**8, 10**8, 2, None).decode(data)  # what decoding on the ingress gave before
    assert pixels.shape[:2] == (128, 96)
    as_jpeg = segment(wide_window_url, {"image": text, "prompts": PROMPTS, "threshold": 0.05})
    as_png = segment(wide_window_url, {"image": png_b64(pixels), "prompts": PROMPTS, "threshold": 0.05})
    assert (as_jpeg.json()["height"], as_jpeg.json()["width"]) == (128, 96)
    assert _instances(as_jpeg) == _instances(as_png)
    assert any(_instances(as_png)), "the case must produce instances, or it proves nothing"


def test_a_jpeg_cut_after_its_header_is_a_400_from_the_encoder(wide_window_url):
    noisy = np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    _, data = jpeg_b64(noisy)
    cut = base64.b64encode(data[: len(data) // 2]).decode("ascii")
    response = segment(wide_window_url, {"image": cut, "prompts": PROMPTS[:1]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and "truncated or corrupt" in error["message"], error


def test_the_same_image_again_is_a_cache_hit_with_the_same_answer(wide_window_url):
    body = {"image": jpeg_b64(random_image(43))[0], "prompts": PROMPTS, "threshold": 0.05}
    first, again = segment(wide_window_url, body), segment(wide_window_url, body)
    assert first.json()["timings_ms"]["cache_hit"] == 0.0
    assert again.json()["timings_ms"]["cache_hit"] == 1.0
    assert first.json()["image_id"] == again.json()["image_id"]
    assert _instances(first) == _instances(again)
