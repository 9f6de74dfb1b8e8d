"""`gradio_client` against the web UI (/ui): the HF Space's `/predict` and `/sam2_compatible` answer as its REST
routes do, keys go in the way the Space takes them, and the UI's own tabs run through the same service."""

from __future__ import annotations

import json

import av
import pytest
import requests

pytest.importorskip("gradio_client", reason="gradio_client is a test dependency: pip install -e '.[test]'")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from tests.integration.conftest import API_KEY, find_image_seed, image_bytes, png_b64, random_image  # noqa: E402
from tests.videos import write_video  # noqa: E402

pytestmark = pytest.mark.integration

HEIGHT, WIDTH = 96, 128
SEED = find_image_seed(["kitten"], 0.5, HEIGHT, WIDTH)
IMAGE = png_b64(random_image(SEED, HEIGHT, WIDTH))
BEARER = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def ui(providers_url) -> Client:
    return Client(f"{providers_url}/ui/", headers=BEARER, verbose=False)


def rest(url: str, path: str, body: dict) -> dict:
    response = requests.post(f"{url}{path}", json=body, headers=BEARER, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_space_api_is_there_by_name(ui):
    named = ui.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/predict", "/sam2_compatible"} <= set(named)
    assert [p["parameter_name"] for p in named["/predict"]["parameters"]] == ["image", "text", "threshold"]


def test_predict_returns_the_spaces_simple_result(ui, providers_url):
    result = ui.predict(IMAGE, "kitten", 0.5, api_name="/predict")
    assert result == rest(providers_url, "/api/predict", {"data": [IMAGE, "kitten", 0.5]})["data"][0]
    assert result["success"] is True and result["num_objects"] == len(result["masks"]) >= 1
    assert result["labels"] == ["kitten"] * result["num_objects"] and result["prompt_types"] == ["text"]


def test_sam2_compatible_returns_the_spaces_result(ui, providers_url):
    inputs = {"image": IMAGE, "text_prompts": ["kitten"], "points": [[40, 30]], "confidence_threshold": 0.5,
              "vectorize": True}
    result = ui.predict(inputs, api_name="/sam2_compatible")
    assert result == rest(providers_url, "/api/sam2_compatible", {"inputs": inputs})
    assert result["prompt_types"] == ["text", "visual"] and result["original_image_size"] == [WIDTH, HEIGHT]


def test_errors_and_keys_as_the_space(providers_url, ui):
    with pytest.raises(AppError, match="data\\[1\\] \\(text\\)"):
        ui.predict(IMAGE, "", 0.5, api_name="/predict")
    with pytest.raises(AppError, match="nothing to segment"):
        ui.predict({"image": IMAGE}, api_name="/sam2_compatible")
    keyless = Client(f"{providers_url}/ui/", verbose=False)  # the UI's page and API description need no key
    with pytest.raises(AppError, match="missing API key"):
        keyless.predict(IMAGE, "kitten", 0.5, api_name="/predict")
    wrong = Client(f"{providers_url}/ui/", headers={"Authorization": "Bearer wrong"}, verbose=False)
    with pytest.raises(AppError, match="invalid API key"):
        wrong.predict(IMAGE, "kitten", 0.5, api_name="/predict")
    by_token = Client(f"{providers_url}/ui/", token=API_KEY, verbose=False)  # a private Space's token= works too
    assert by_token.predict(IMAGE, "kitten", 0.5, api_name="/predict")["success"] is True


def test_the_image_tab_segments_and_offers_the_masks(ui, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(image_bytes(SEED, height=HEIGHT, width=WIDTH))
    clicks = json.dumps([[40, 30, 1]])
    overlay, table, files, summary = ui.predict(
        "", handle_file(str(path)), "kitten", clicks, "[]", 0.5, api_name="/segment"
    )
    labels = [row["label"] for row in table]
    assert summary == f"{len(table)} instance(s) found" and len(table) >= 2
    assert labels[-1].startswith("object") and all(label.startswith("kitten") for label in labels[:-1])
    assert len(overlay["annotations"]) == len(table)
    names = sorted(f.rsplit("/", 1)[-1] for f in files)
    assert names == ["masks.zip", "masks_rle.json"]
    rles = json.loads(open(next(f for f in files if f.endswith(".json"))).read())
    assert [r["rle"]["size"] for r in rles] == [[HEIGHT, WIDTH]] * len(table)


def test_the_automatic_masks_tab(ui, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(image_bytes(SEED, height=HEIGHT, width=WIDTH))
    _, table, _, summary = ui.predict("", handle_file(str(path)), 4, 0.5, 5, api_name="/automatic")
    assert 1 <= len(table) <= 5 and summary == f"{len(table)} instance(s) found"


def test_the_video_tab_tracks_and_renders(ui, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(write_video(6, 96, 128))
    rendered = ui.predict("", handle_file(str(path)), "", json.dumps([[40, 30, 1]]), True, api_name="/track")
    rendered = rendered["video"] if isinstance(rendered, dict) else rendered  # gradio_client's shape for a video
    with av.open(rendered) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (96, 128, 3)
    with pytest.raises(AppError, match="type what to track"):
        ui.predict("", handle_file(str(path)), "", "[]", True, api_name="/track")
