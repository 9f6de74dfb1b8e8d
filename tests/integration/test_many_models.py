"""Many models on one service (SAM3_MODELS): each request's model answers, each equal to its checkpoint called
directly through transformers; LRU eviction across three models with two per replica; caches keyed by model; an
unknown model is a 404 on every front door in its own shape."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import requests

from serve_app.core.config import Config
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle
from tests.integration.conftest import deploy, png_b64, random_image, segment, undeploy
from tests.reference import concept_reference, served_instances

APP = "models"
MODELS = "base=tiny-random,alt=tiny-random:1,lite=tiny-random-lite"
THRESHOLD = 0.1
SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def models_url(serve_instance: str) -> Iterator[str]:
    config = Config(models=MODELS, models_per_replica=2, web_ui=False, video_warm_sessions=0, url_allowlist=[])
    yield deploy(APP, config, serve_instance)
    undeploy(APP)


@pytest.fixture(scope="module")
def references() -> dict[str, tuple]:
    """Each registry model's weights in this process, loaded as the replicas load them."""
    out = {}
    for name, source in (("base", "tiny-random"), ("alt", "tiny-random:1"), ("lite", "tiny-random-lite")):
        bundle = load_bundle(Config(model=source))
        out[name] = (bundle, ImageEngine(bundle))
    return out


def _ask(url: str, image: np.ndarray, text: str, model: str | None, **extra) -> requests.Response:
    body = {"image": png_b64(image), "prompts": [{"type": "concept", "text": text}], "threshold": THRESHOLD,
            "nms_iou": None, "max_instances": 1000, **extra}
    if model is not None:
        body["model"] = model
    return segment(url, body)


def _expected(references, name: str, image: np.ndarray, text: str) -> list:
    bundle, engine = references[name]
    return concept_reference(bundle, engine.preprocess([image]), text, [], [], image.shape[:2], THRESHOLD)


def _assert_same(served: list, expected: list) -> None:
    assert len(served) == len(expected), f"{len(served)} instances served, {len(expected)} expected"
    for (s_score, s_box, s_mask), (e_score, e_box, e_mask) in zip(served, expected):
        assert abs(s_score - e_score) < SCORE_TOL
        np.testing.assert_allclose(s_box, np.clip(e_box, 0, [e_mask.shape[1], e_mask.shape[0]] * 2), atol=1e-3)
        assert np.array_equal(s_mask, e_mask), f"{int((s_mask != e_mask).sum())} mask pixels differ"


def _check(url, references, name: str, seed: int, text: str = "a red square") -> list:
    image = random_image(seed)
    response = _ask(url, image, text, name)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["model"] == (name or "base")
    served = served_instances(payload["prompts"][0])
    expected = _expected(references, name or "base", image, text)
    assert expected, "the case must produce instances, or it proves nothing"
    _assert_same(served, expected)
    return served


def _stats(url: str) -> dict:
    response = requests.get(f"{url}/v1/models", timeout=30)
    assert response.status_code == 200, response.text
    return {m["name"]: m for m in response.json()["models"]}


def test_the_models_are_listed_with_the_default_first(models_url):
    response = requests.get(f"{models_url}/v1/models", timeout=30)
    assert response.status_code == 200, response.text
    listing = response.json()
    assert listing["default"] == "base"
    assert [(m["name"], m["architecture"], m["default"]) for m in listing["models"]] == [
        ("base", "sam3_video", True), ("alt", "sam3_video", False), ("lite", "sam3_lite_text", False)]
    assert listing["models"][2]["prompts"] == ["concept"] and listing["models"][2]["video"] is False


def test_each_model_answers_with_its_own_weights_and_they_differ(models_url, references):
    base = _check(models_url, references, "base", 3)
    alt = _check(models_url, references, "alt", 3)
    default = _check(models_url, references, None, 3)
    assert [s for s, _, _ in default] == [s for s, _, _ in base]
    assert [round(s, 4) for s, _, _ in base] != [round(s, 4) for s, _, _ in alt], "two checkpoints, one answer"


def test_the_lite_model_matches_sam3_lite_text_and_refuses_visual_prompts(models_url, references):
    _check(models_url, references, "lite", 5)
    image = png_b64(random_image(5))
    response = segment(models_url, {"image": image, "model": "lite",
                                    "prompts": [{"type": "visual", "points": [[10, 10]], "point_labels": [1]}]})
    assert response.status_code == 400, response.text
    assert "sam3_lite_text" in response.json()["error"]["message"]


def test_a_third_model_evicts_the_least_recently_used_and_all_keep_answering(models_url, references):
    for name in ("base", "alt", "lite", "base", "alt", "lite"):  # two per replica: each request past two evicts
        _check(models_url, references, name, 7)
    stats = _stats(models_url)
    encoder = {name: stats[name]["stats"]["encoder"] for name in stats}
    decoder = {name: stats[name]["stats"]["decoder"] for name in stats}
    for name in ("base", "alt", "lite"):
        assert encoder[name]["loads"] >= 2 and decoder[name]["loads"] >= 2, (encoder, decoder)
        assert encoder[name]["evictions"] >= 1 and decoder[name]["evictions"] >= 1, (encoder, decoder)
    held = [name for name in stats if stats[name]["loaded"]["decoder"]]
    assert len(held) == 2 and "lite" in held, stats  # the last two used, alt and lite


def test_an_image_id_cached_under_one_model_is_never_used_for_another(models_url, references):
    image = random_image(11)
    first = _ask(models_url, image, "a red square", "base", image_id="shared-id")
    assert first.status_code == 200, first.text
    # by image_id alone, under another model: nothing is cached for alt, so it must not answer from base's embedding
    by_id = segment(models_url, {"image_id": "shared-id", "model": "alt",
                                 "prompts": [{"type": "concept", "text": "a red square"}]})
    assert by_id.status_code == 404, by_id.text
    # with the image again: re-encoded by alt, so alt's own answer
    again = _ask(models_url, image, "a red square", "alt", image_id="shared-id")
    assert again.status_code == 200, again.text
    _assert_same(served_instances(again.json()["prompts"][0]), _expected(references, "alt", image, "a red square"))
    assert again.json()["timings_ms"]["cache_hit"] == 0.0


def test_an_unknown_model_is_a_404_on_every_front_door(models_url):
    image = png_b64(random_image(1))
    native = segment(models_url, {"image": image, "model": "nope", "prompts": [{"type": "concept", "text": "x"}]})
    assert native.status_code == 404 and native.json()["error"]["code"] == "model_not_found", native.text
    assert "base, alt, lite" in native.json()["error"]["message"]
    roboflow = requests.post(f"{models_url}/sam3/concept_segment", timeout=60, json={
        "image": {"type": "base64", "value": image}, "prompts": [{"type": "text", "text": "x"}], "model_id": "nope/1"})
    assert roboflow.status_code == 404 and "message" in roboflow.json() and "error" not in roboflow.json()
    oxen = requests.post(f"{models_url}/api/ai/images/edit", timeout=60, json={
        "model": "nope", "prompt": "x", "input_image": f"data:image/png;base64,{image}"})
    assert oxen.status_code == 404 and oxen.json()["status"] == "error", oxen.text
    video = requests.post(f"{models_url}/v1/video/sessions?model=nope", data=b"\x00" * 64, timeout=60,
                          headers={"Content-Type": "video/mp4"})
    assert video.status_code == 404 and video.json()["error"]["code"] == "model_not_found", video.text
    lite_video = requests.post(f"{models_url}/v1/video/sessions?model=lite", data=b"\x00" * 64, timeout=60,
                               headers={"Content-Type": "video/mp4"})
    assert lite_video.status_code == 400 and "sam3_lite_text" in lite_video.text


def test_roboflow_and_oxen_pick_models_by_their_own_fields(models_url, references):
    image = random_image(3)
    b64 = png_b64(image)
    expected = {name: _expected(references, name, image, "a red square") for name in ("base", "alt")}
    for model_id, name in (("sam3/sam3_final", "base"), ("alt", "alt"), ("sam3/alt", "alt")):
        response = requests.post(f"{models_url}/sam3/concept_segment", timeout=60, json={
            "image": {"type": "base64", "value": b64}, "prompts": [{"type": "text", "text": "a red square"}],
            "model_id": model_id, "format": "rle", "output_prob_thresh": THRESHOLD})
        assert response.status_code == 200, response.text
        scores = sorted(p["confidence"] for p in response.json()["prompt_results"][0]["predictions"])
        assert scores == pytest.approx(sorted(s for s, _, _ in expected[name]), abs=SCORE_TOL), model_id
    listing = requests.get(f"{models_url}/api/ai/models", timeout=30).json()
    assert {m["id"] for m in listing["data"]} >= {"sam-3-image", "sam-3-video", "base", "alt", "lite"}


def test_a_video_session_on_alt_tracks_with_alts_weights(models_url):
    """Clicks tracked through a session opened with model=alt equal transformers' Sam3TrackerVideoModel on alt's
    checkpoint, and differ from the default model's tracking of the same clicks."""
    import base64
    import io
    import json

    from PIL import Image

    from serve_app.image.codecs import rle_decode
    from tests.reference import click_tracking_reference
    from tests.videos import moving_frames

    frames = moving_frames(8, 96, 128)
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    clicks = {"points": [[30, 45], [100, 80]], "point_labels": [1, 0], "box": [10, 20, 60, 70]}

    def served(model: str | None) -> dict[int, np.ndarray]:
        body = {"frames": encoded, "fps": 10, **({"model": model} if model else {})}
        opened = requests.post(f"{models_url}/v1/video/sessions", json=body, timeout=120)
        assert opened.status_code == 201, opened.text
        assert opened.json()["model"] == (model or "base")
        sid = opened.json()["session_id"]
        try:
            prompt = requests.post(f"{models_url}/v1/video/sessions/{sid}/prompts", timeout=120,
                                   json={"frame_index": 0, "object_id": 7, **clicks})
            assert prompt.status_code == 200, prompt.text
            out = {}
            with requests.post(f"{models_url}/v1/video/sessions/{sid}/propagate", json={}, stream=True,
                               timeout=300) as r:
                assert r.status_code == 200, r.text
                for line in r.iter_lines():
                    item = json.loads(line)
                    if "frame_index" in item:
                        out[item["frame_index"]] = {o["object_id"]: rle_decode(o["mask"]) for o in item["objects"]}
            return {frame: objects[7] for frame, objects in out.items() if 7 in objects}
        finally:
            requests.delete(f"{models_url}/v1/video/sessions/{sid}", timeout=60)

    alt_engine = ImageEngine(load_bundle(Config(model="tiny-random:1")))
    base_engine = ImageEngine(load_bundle(Config(model="tiny-random")))
    expected_alt = click_tracking_reference(alt_engine, frames, 7, clicks["points"], clicks["point_labels"], clicks["box"])
    expected_base = click_tracking_reference(base_engine, frames, 7, clicks["points"], clicks["point_labels"],
                                             clicks["box"])
    got = served("alt")
    assert sorted(got) == sorted(expected_alt) == list(range(8))
    for frame in range(8):
        assert np.array_equal(got[frame], expected_alt[frame]), f"frame {frame} differs from alt's reference"
    assert any(m.any() for m in expected_alt.values())
    assert any(not np.array_equal(expected_alt[f], expected_base[f]) for f in range(8)), "alt tracks like base"
    default = served(None)
    assert all(np.array_equal(default[f], expected_base[f]) for f in range(8))


@pytest.mark.parametrize("value", ["x" * 10_000, 7, None, ["base"], {"a": 1}, "", " base", "ba\x00se", "../../etc"])
def test_hostile_model_fields_are_4xx_never_5xx(models_url, value):
    image = png_b64(random_image(1))
    answers = [
        segment(models_url, {"image": image, "model": value, "prompts": [{"type": "concept", "text": "x"}]}),
        requests.post(f"{models_url}/sam3/concept_segment", timeout=60, json={
            "image": {"type": "base64", "value": image}, "prompts": [{"type": "text", "text": "x"}], "model_id": value}),
        requests.post(f"{models_url}/api/ai/images/edit", timeout=60, json={
            "model": value, "prompt": "x", "input_image": f"data:image/png;base64,{image}"}),
        requests.post(f"{models_url}/v1/video/sessions", timeout=60, json={"frames": [image], "model": value}),
    ]
    if isinstance(value, str):
        answers.append(requests.post(f"{models_url}/v1/video/sessions", params={"model": value}, data=b"\x00" * 64,
                                     headers={"Content-Type": "video/mp4"}, timeout=60))
    for response in answers:
        assert response.status_code < 500, (response.request.url, response.status_code, response.text[:300])
        if response.status_code >= 400:
            assert response.headers["content-type"].startswith("application/json"), response.text[:200]
