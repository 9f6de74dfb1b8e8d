"""Results through the full Serve graph equal transformers' SAM3 called directly on the same pixel values.

A request's forwards that carry one prompt are the exact computation: every mask bit equal. Prompts that share a DETR
forward (several texts of one request, SAM3_DECODER_PROMPT_BATCH) agree within the documented tolerances."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.core.config import Config
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle
from tests.integration.conftest import png_b64, random_image, segment
from tests.reference import BATCHED_IOU, BATCHED_SCORE, concept_reference, mask_iou, served_instances, visual_reference

THRESHOLD = 0.1
SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    """The same tiny-random weights in this process, and the pixel values our preprocessing gives."""
    bundle = load_bundle(Config())
    return bundle, ImageEngine(bundle)


def _ask(app_url: str, image: np.ndarray, prompts: list[dict]) -> list[dict]:
    body = {"image": png_b64(image), "prompts": prompts, "threshold": THRESHOLD, "nms_iou": None, "max_instances": 1000}
    response = segment(app_url, body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert (payload["height"], payload["width"]) == image.shape[:2]
    return payload["prompts"]


def _assert_same(served: list, expected: list) -> None:
    assert len(served) == len(expected), f"{len(served)} instances served, {len(expected)} expected"
    for (s_score, s_box, s_mask), (e_score, e_box, e_mask) in zip(served, expected):
        assert abs(s_score - e_score) < SCORE_TOL
        np.testing.assert_allclose(s_box, np.clip(e_box, 0, [e_mask.shape[1], e_mask.shape[0]] * 2), atol=1e-3)
        assert s_mask.shape == e_mask.shape
        assert np.array_equal(s_mask, e_mask), f"{int((s_mask != e_mask).sum())} mask pixels differ"


def _assert_close(served: list, expected: list) -> None:
    """A batched forward: the same instances, scores within 1e-3, masks with IoU >= 0.99."""
    assert len(served) == len(expected), f"{len(served)} instances served, {len(expected)} expected"
    for (s_score, s_box, s_mask), (e_score, e_box, e_mask) in zip(served, expected):
        assert abs(s_score - e_score) <= BATCHED_SCORE
        np.testing.assert_allclose(s_box, np.clip(e_box, 0, [e_mask.shape[1], e_mask.shape[0]] * 2), atol=0.5)
        assert mask_iou(s_mask, e_mask) >= BATCHED_IOU


def _concept_case(app_url, reference, seed, prompts, stacked: bool = False):
    bundle, engine = reference
    image = random_image(seed)
    pixels = engine.preprocess([image])
    served = _ask(app_url, image, prompts)
    assert len(served) == len(prompts)
    found = 0
    for prompt, result in zip(prompts, served):
        expected = concept_reference(
            bundle, pixels, prompt.get("text"), prompt.get("boxes", []),
            prompt.get("box_labels", [True] * len(prompt.get("boxes", []))), image.shape[:2], THRESHOLD,
        )
        (_assert_close if stacked else _assert_same)(served_instances(result), expected)
        found += len(expected)
    assert found > 0, "the case must produce instances, or it proves nothing"


def test_text_prompt(app_url, reference):
    _concept_case(app_url, reference, 1, [{"type": "concept", "text": "a red car"}])


def test_several_texts_at_once(app_url, reference):
    prompts = [{"type": "concept", "text": t} for t in ("cat", "dog", "traffic light", "person")]
    _concept_case(app_url, reference, 2, prompts, stacked=True)  # one DETR forward for the four


def test_positive_and_negative_exemplar_boxes(app_url, reference):
    prompts = [{"type": "concept", "boxes": [[10, 12, 50, 60], [70, 20, 120, 90]], "box_labels": [True, False]}]
    _concept_case(app_url, reference, 3, prompts)


def test_text_with_exemplars(app_url, reference):
    prompts = [
        {"type": "concept", "text": "car", "boxes": [[5, 5, 40, 40]], "box_labels": [True]},
        {"type": "concept", "text": "tree"},  # a prompt without boxes in the same request
    ]
    _concept_case(app_url, reference, 4, prompts)


def test_different_prompts_give_different_results(app_url):
    image = random_image(5)
    served = _ask(app_url, image, [{"type": "concept", "text": "cat"}, {"type": "concept", "text": "bicycle"}])
    scores = [[i["score"] for i in p["instances"]] for p in served]
    assert scores[0] != scores[1]


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
def test_points(app_url, reference, multimask):
    bundle, engine = reference
    image = random_image(6)
    pixels = engine.preprocess([image])
    prompt = {"type": "visual", "points": [[30, 40], [90, 70]], "point_labels": [1, 0], "multimask": multimask}
    served = _ask(app_url, image, [prompt])[0]
    expected = visual_reference(bundle, pixels, prompt["points"], prompt["point_labels"], None, image.shape[:2], multimask)
    assert len(served["instances"]) == (3 if multimask else 1)
    scores = [i["score"] for i in served["instances"]]
    assert scores == sorted(scores, reverse=True), "best-scoring mask first"
    for inst, (score, mask) in zip(served["instances"], expected):
        assert abs(inst["score"] - score) < SCORE_TOL
        from serve_app.image.codecs import rle_decode

        assert np.array_equal(rle_decode(inst["mask"]), mask)


def test_box_prompt(app_url, reference):
    bundle, engine = reference
    image = random_image(7)
    pixels = engine.preprocess([image])
    served = _ask(app_url, image, [{"type": "visual", "box": [20, 10, 100, 80]}])[0]
    expected = visual_reference(bundle, pixels, [], [], [20, 10, 100, 80], image.shape[:2], False)
    from serve_app.image.codecs import rle_decode

    assert abs(served["instances"][0]["score"] - expected[0][0]) < SCORE_TOL
    assert np.array_equal(rle_decode(served["instances"][0]["mask"]), expected[0][1])
