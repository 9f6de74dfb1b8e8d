"""Roboflow-compatible /sam3/* routes through real HTTP: the documented request examples, caches, auth and errors."""

from __future__ import annotations

import base64
import copy

import numpy as np
import pytest
import requests
from pycocotools import mask as mask_utils

from serve_app.image import codecs
from tests.integration.conftest import API_KEY, OTHER_KEY, png_b64, random_image

pytestmark = pytest.mark.integration

HEIGHT, WIDTH = 80, 120  # not square, so a swapped height/width shows
LOW = 0.05  # tiny-random's concept scores sit near 0.07: this threshold keeps instances to check
SCORE_TOL = 1e-5
NATIVE_AUTH = {"x-api-key": API_KEY}
CLICK_1 = {"x": 40, "y": 30, "positive": True}
CLICK_2 = {"x": 90, "y": 60, "positive": False}


def post(url: str, route: str, body: dict, key: str | None = API_KEY) -> requests.Response:
    params = {"api_key": key} if key is not None else None
    return requests.post(f"{url}/sam3/{route}", json=body, params=params, timeout=120)


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def url_image(image_server: str, seed: int) -> dict:
    return {"type": "url", "value": f"{image_server}/img/{seed}.png?h={HEIGHT}&w={WIDTH}"}


def b64_image(seed: int) -> dict:
    return {"type": "base64", "value": png_b64(random_image(seed, HEIGHT, WIDTH))}


def encoded_images(url: str) -> int:
    assert requests.get(f"{url}/v1/stats", timeout=30).status_code == 401  # it shows internals: keyed
    stats = requests.get(f"{url}/v1/stats", headers=NATIVE_AUTH, timeout=30)
    assert stats.status_code == 200, stats.text
    return stats.json()["encoder"]["images"]


def rle_mask(rle: dict) -> np.ndarray:
    """Decode with pycocotools itself: the RLE must be COCO-compatible as sent."""
    assert set(rle) == {"size", "counts"} and isinstance(rle["counts"], str), rle
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def assert_prediction(pred: dict, fmt: str) -> None:
    assert set(pred) == {"masks", "confidence", "format"}, pred
    assert pred["format"] == fmt and isinstance(pred["confidence"], float) and 0.0 <= pred["confidence"] <= 1.0
    if fmt == "rle":
        assert pred["masks"]["size"] == [HEIGHT, WIDTH] and rle_mask(pred["masks"]).shape == (HEIGHT, WIDTH)
    elif fmt == "polygon":
        for polygon in pred["masks"]:
            assert len(polygon) >= 1 and all(len(pt) == 2 and all(isinstance(v, int) for v in pt) for pt in polygon)
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            assert 0 <= min(xs) and max(xs) < WIDTH and 0 <= min(ys) and max(ys) < HEIGHT, polygon
    else:
        assert codecs.png_bytes_to_mask(base64.b64decode(pred["masks"])).shape == (HEIGHT, WIDTH)


def polygon_mask(polygons: list) -> np.ndarray:
    return codecs.polygons_to_mask([{"exterior": p, "holes": []} for p in polygons], HEIGHT, WIDTH)


def assert_concept_response(out: dict, prompts: list[dict], fmt: str) -> int:
    assert set(out) == {"prompt_results", "time"} and isinstance(out["time"], float) and out["time"] > 0
    assert [r["prompt_index"] for r in out["prompt_results"]] == list(range(len(prompts)))
    found = 0
    for result, prompt in zip(out["prompt_results"], prompts):
        assert set(result) == {"prompt_index", "echo", "predictions"}
        boxes = prompt.get("boxes") or []
        assert result["echo"] == {
            "prompt_index": result["prompt_index"], "type": "visual" if boxes else "text",
            "text": prompt.get("text"), "num_boxes": len(boxes),
        }
        confidences = [p["confidence"] for p in result["predictions"]]
        assert confidences == sorted(confidences, reverse=True)
        for pred in result["predictions"]:
            assert_prediction(pred, fmt)
        found += len(result["predictions"])
    return found


def masks_and_scores(result: dict) -> list[tuple[float, np.ndarray]]:
    return [(p["confidence"], rle_mask(p["masks"])) for p in result["predictions"]]


def assert_same_predictions(a: list[tuple[float, np.ndarray]], b: list[tuple[float, np.ndarray]]) -> None:
    assert len(a) == len(b), f"{len(a)} vs {len(b)} predictions"
    for (score_a, mask_a), (score_b, mask_b) in zip(a, b):
        assert abs(score_a - score_b) < SCORE_TOL
        assert np.array_equal(mask_a, mask_b), f"{int((mask_a != mask_b).sum())} pixels differ"


# ------------------------------------------------------------------------------------------------ PCS examples


def test_documented_text_prompt_example(providers_url, image_server):
    """The page's example verbatim (URL image, two texts, threshold 0.5, polygon)."""
    prompts = [{"type": "text", "text": "person"}, {"type": "text", "text": "backpack"}]
    body = {"image": url_image(image_server, 1), "prompts": prompts, "output_prob_thresh": 0.5, "format": "polygon"}
    assert_concept_response(ok(post(providers_url, "concept_segment", body)), prompts, "polygon")


@pytest.mark.parametrize("source", ["url", "base64"])
def test_text_prompts_polygon_and_rle_describe_the_same_masks(providers_url, image_server, source):
    image = url_image(image_server, 2) if source == "url" else b64_image(2)
    prompts = [{"type": "text", "text": "person"}, {"type": "text", "text": "backpack"}]
    body = {"image": image, "prompts": prompts, "output_prob_thresh": LOW}  # format defaults to polygon
    polygons = ok(post(providers_url, "concept_segment", body))
    assert assert_concept_response(polygons, prompts, "polygon") > 0, "the case must produce instances"
    rles = ok(post(providers_url, "concept_segment", {**body, "format": "rle"}))
    assert_concept_response(rles, prompts, "rle")
    for poly_result, rle_result in zip(polygons["prompt_results"], rles["prompt_results"]):
        assert len(poly_result["predictions"]) == len(rle_result["predictions"])
        for poly, rle in zip(poly_result["predictions"], rle_result["predictions"]):
            mask = rle_mask(rle["masks"])
            outline = polygon_mask(poly["masks"])  # outer contours only: holes fill in, nothing is lost
            assert not (mask & ~outline).any() and outline.sum() >= mask.sum()
            assert bool(poly["masks"]) == bool(mask.any())


def test_exemplar_box_forms_give_the_same_result(providers_url, image_server):
    image = url_image(image_server, 3)

    def ask(boxes: list[dict]) -> list:
        prompts = [{"type": "visual", "boxes": boxes, "box_labels": [1, 0]}]
        body = {"image": image, "prompts": prompts, "output_prob_thresh": LOW, "format": "rle"}
        out = ok(post(providers_url, "concept_segment", body))
        assert_concept_response(out, prompts, "rle")
        return masks_and_scores(out["prompt_results"][0])

    xywh = ask([{"x": 10, "y": 12, "width": 40, "height": 30}, {"x": 60, "y": 20, "width": 50, "height": 45}])
    xyxy = ask([{"x0": 10, "y0": 12, "x1": 50, "y1": 42}, {"x0": 60, "y0": 20, "x1": 110, "y1": 65}])
    assert xywh, "the case must produce instances"
    assert_same_predictions(xywh, xyxy)
    other = ask([{"x": 10, "y": 12, "width": 50, "height": 42}, {"x": 60, "y": 20, "width": 110, "height": 65}])
    assert [s for s, _ in other] != [s for s, _ in xywh], "reading {x0..y1} as a width would change the answer"


def test_text_with_positive_and_negative_exemplars(providers_url, image_server):
    prompts = [
        {"type": "text", "text": "person", "boxes": [{"x": 5, "y": 5, "width": 30, "height": 30},
                                                     {"x0": 70, "y0": 30, "x1": 100, "y1": 70}],
         "box_labels": [True, False]},
        {"type": "text", "text": "person"},
    ]
    body = {"image": url_image(image_server, 4), "prompts": prompts, "output_prob_thresh": LOW, "format": "rle"}
    out = ok(post(providers_url, "concept_segment", body))
    assert assert_concept_response(out, prompts, "rle") > 0
    with_boxes, text_only = (masks_and_scores(r) for r in out["prompt_results"])
    assert [s for s, _ in with_boxes] != [s for s, _ in text_only], "exemplars must change the answer"


def test_per_prompt_threshold_overrides_the_request_threshold(providers_url):
    image = b64_image(5)
    base = {"image": image, "prompts": [{"type": "text", "text": "car"}], "output_prob_thresh": LOW, "format": "rle"}
    everything = masks_and_scores(ok(post(providers_url, "concept_segment", base))["prompt_results"][0])
    scores = sorted({round(s, 6) for s, _ in everything})
    assert len(scores) >= 2, f"need distinct scores to split, got {scores}"
    cut = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    prompts = [{"type": "text", "text": "car", "output_prob_thresh": cut}, {"type": "text", "text": "car"}]
    out = ok(post(providers_url, "concept_segment", {**base, "prompts": prompts}))
    strict, default = (masks_and_scores(r) for r in out["prompt_results"])
    assert_same_predictions(default, everything)
    assert_same_predictions(strict, [(s, m) for s, m in everything if s > cut])
    assert 0 < len(strict) < len(everything)
    high = {**base, "output_prob_thresh": 0.99, "prompts": [{"type": "text", "text": "car", "output_prob_thresh": LOW}]}
    assert_same_predictions(masks_and_scores(ok(post(providers_url, "concept_segment", high))["prompt_results"][0]),
                            everything)


def test_cross_prompt_nms_on_and_off(providers_url):
    prompts = [{"type": "text", "text": "dog"}, {"type": "text", "text": "dog"}]  # exact duplicates across prompts
    body = {"image": b64_image(6), "prompts": prompts, "output_prob_thresh": LOW, "format": "rle"}

    def ask(**fields) -> list:
        out = ok(post(providers_url, "concept_segment", {**body, **fields}))
        return [masks_and_scores(r) for r in out["prompt_results"]]

    off = ask()  # nms_iou_threshold unset: NMS disabled
    assert off[0], "the case must produce instances"
    assert_same_predictions(off[0], off[1])
    first, second = ask(nms_iou_threshold=0.5)
    assert second == [], "every instance of the second prompt duplicates one of the first's"
    assert 0 < len(first) <= len(off[0])
    kept = {(round(s, 6), m.tobytes()) for s, m in first}
    assert kept <= {(round(s, 6), m.tobytes()) for s, m in off[0]}
    first, second = ask(nms_iou_threshold=1.0)  # drops only IoU > 1.0, i.e. nothing
    assert_same_predictions(first, off[0])
    assert_same_predictions(second, off[1])


def test_concept_segment_equals_the_native_api(providers_url):
    image = png_b64(random_image(7, HEIGHT, WIDTH))
    rf = {"image": {"type": "base64", "value": image}, "prompts": [{"type": "text", "text": "a red car"}],
          "output_prob_thresh": 0.06, "format": "rle", "model_id": "sam3/sam3_final"}
    ours = masks_and_scores(ok(post(providers_url, "concept_segment", rf))["prompt_results"][0])
    native = {"image": image, "prompts": [{"type": "concept", "text": "a red car"}], "threshold": 0.06,
              "nms_iou": None, "output": "rle"}
    response = requests.post(f"{providers_url}/v1/image/segment", json=native, headers=NATIVE_AUTH, timeout=120)
    reference = [best_of(i) for i in ok(response)["prompts"][0]["instances"]]
    assert reference, "the case must produce instances"
    assert_same_predictions(ours, reference)


# ------------------------------------------------------------------------------------------------ PVS


def native_visual(url: str, image: str, prompt: dict, **fields) -> dict:
    body = {"image": image, "prompts": [{"type": "visual", **prompt}], **fields}
    response = requests.post(f"{url}/v1/image/segment", json=body, headers=NATIVE_AUTH, timeout=120)
    return ok(response)["prompts"][0]


def best_of(instance: dict) -> tuple[float, np.ndarray]:
    """A native instance as (score, mask), to compare with Roboflow predictions."""
    return instance["score"], codecs.rle_decode(instance["mask"])


def assert_visual_response(out: dict, count: int, fmt: str) -> None:
    assert set(out) == {"predictions", "time"} and isinstance(out["time"], float)
    assert len(out["predictions"]) == count
    for pred in out["predictions"]:
        assert_prediction(pred, fmt)


@pytest.mark.parametrize("multimask", [True, False, None], ids=["multimask", "single", "default"])
def test_visual_points_and_centre_box_equal_native(providers_url, multimask):
    image = png_b64(random_image(8, HEIGHT, WIDTH))
    prompt = {"box": {"x": 60, "y": 40, "width": 60, "height": 40},  # centre-anchored: xyxy [30, 20, 90, 60]
              "points": [{"x": 50, "y": 35, "positive": True}, {"x": 85, "y": 55, "positive": False}]}
    body = {"image": {"type": "base64", "value": image}, "prompts": {"prompts": [prompt]}, "format": "rle"}
    if multimask is not None:
        body["multimask_output"] = multimask
    out = ok(post(providers_url, "visual_segment", body))
    assert_visual_response(out, 1, "rle")
    native = native_visual(providers_url, image, {"box": [30, 20, 90, 60], "points": [[50, 35], [85, 55]],
                                                  "point_labels": [1, 0], "multimask": multimask is not False})
    # native returns every proposal, best first; Roboflow returns the best one
    assert_same_predictions(masks_and_scores(out), [best_of(native["instances"][0])])


def test_visual_formats_and_bare_prompt_list(providers_url, image_server):
    """json = polygons, rle = COCO RLE, binary = base64 PNG; one prediction per prompt in the set."""
    prompts = [{"points": [{"x": 30, "y": 30, "positive": True}]},
               {"box": {"x": 80, "y": 50, "width": 40, "height": 30}}]
    body = {"image": url_image(image_server, 9), "prompts": {"prompts": prompts}}
    polygons = ok(post(providers_url, "visual_segment", body))  # format defaults to json
    assert_visual_response(polygons, 2, "polygon")
    rle = ok(post(providers_url, "visual_segment", {**body, "format": "rle"}))
    assert_visual_response(rle, 2, "rle")
    binary = ok(post(providers_url, "visual_segment", {**body, "format": "binary", "prompts": prompts}))
    assert_visual_response(binary, 2, "binary")
    for poly, run, png in zip(polygons["predictions"], rle["predictions"], binary["predictions"]):
        mask = rle_mask(run["masks"])
        assert np.array_equal(codecs.png_bytes_to_mask(base64.b64decode(png["masks"])), mask)
        assert not (mask & ~polygon_mask(poly["masks"])).any()
        assert poly["confidence"] == run["confidence"] == png["confidence"]


# ------------------------------------------------------------------------------------------------ caches


def test_embed_image_then_segment_skips_the_encoder(providers_url, image_server):
    image = url_image(image_server, 10)
    out = ok(post(providers_url, "embed_image", {"image": image, "image_id": "rf-embed-10"}))
    assert set(out) == {"image_id", "time"} and out["image_id"] == "rf-embed-10" and isinstance(out["time"], float)
    before = encoded_images(providers_url)
    visual = {"image": image, "image_id": "rf-embed-10", "prompts": [{"points": [CLICK_1]}]}
    assert_visual_response(ok(post(providers_url, "visual_segment", visual)), 1, "polygon")
    concept = {"image": image, "image_id": "rf-embed-10", "prompts": [{"type": "text", "text": "cat"}]}
    ok(post(providers_url, "concept_segment", concept))
    ok(post(providers_url, "embed_image", {"image_id": "rf-embed-10"}))  # image_id alone: already cached
    assert encoded_images(providers_url) == before, "a cached image_id must not run the encoder again"
    digest = ok(post(providers_url, "embed_image", {"image": b64_image(10)}))["image_id"]
    assert len(digest) == 64 and encoded_images(providers_url) == before + 1  # new key (no id): encoded once


def test_another_keys_image_id_is_not_visible(providers_url, image_server):
    ok(post(providers_url, "embed_image", {"image": url_image(image_server, 11), "image_id": "rf-private"}))
    response = post(providers_url, "embed_image", {"image_id": "rf-private"}, key=OTHER_KEY)
    assert_error(response, 404, "rf-private")
    before = encoded_images(providers_url)
    visual = {"image": url_image(image_server, 12), "image_id": "rf-private",
              "prompts": {"prompts": [{"points": [{"x": 20, "y": 20, "positive": True}]}]}, "format": "rle"}
    theirs = ok(post(providers_url, "visual_segment", visual, key=OTHER_KEY))
    assert encoded_images(providers_url) == before + 1, "the other tenant's image must be encoded, not borrowed"
    plain = ok(post(providers_url, "visual_segment", {**visual, "image_id": None}, key=OTHER_KEY))
    assert_same_predictions(masks_and_scores(theirs), masks_and_scores(plain))  # image 12, not 11's embedding


def test_logits_cache_refines_like_explicit_mask_logits(providers_url):
    image = png_b64(random_image(13, HEIGHT, WIDTH))

    def rf(clicks: list[dict], image_id: str, key: str = API_KEY, **flags) -> list:
        body = {"image": {"type": "base64", "value": image}, "image_id": image_id, "format": "rle",
                "prompts": {"prompts": [{"points": clicks}]}, **flags}
        return masks_and_scores(ok(post(providers_url, "visual_segment", body, key=key)))

    first = rf([CLICK_1], "rf-logits", save_logits_to_cache=True)
    refined = rf([CLICK_1, CLICK_2], "rf-logits", load_logits_from_cache=True)
    plain = rf([CLICK_1, CLICK_2], "rf-logits")
    assert refined[0][0] != plain[0][0] or not np.array_equal(refined[0][1], plain[0][1]), "logits must matter"
    # the same refinement through the native API with the first answer's logits passed explicitly
    step1 = native_visual(providers_url, image, {"points": [[40, 30]], "multimask": True}, return_logits=True,
                          output="rle")
    assert_same_predictions(first, [best_of(step1["instances"][0])])
    step2 = native_visual(providers_url, image, {"points": [[40, 30], [90, 60]], "point_labels": [1, 0],
                                                 "multimask": True, "mask_logits": step1["low_res_logits"]})
    assert_same_predictions(refined, [best_of(step2["instances"][0])])
    # nothing cached (fresh id, another tenant, or an identical prompt): a plain prediction, not an error
    assert_same_predictions(rf([CLICK_1, CLICK_2], "rf-logits-fresh", load_logits_from_cache=True), plain)
    assert_same_predictions(rf([CLICK_1, CLICK_2], "rf-logits", key=OTHER_KEY, load_logits_from_cache=True), plain)
    assert_same_predictions(rf([CLICK_1], "rf-logits", load_logits_from_cache=True), first)


# ------------------------------------------------------------------------------------------------ errors


def assert_error(response: requests.Response, status: int, *words: str) -> None:
    """Roboflow's error shape: {"message": "..."} naming every word (case-insensitive)."""
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"message"} and isinstance(payload["message"], str) and payload["message"], payload
    for word in words:
        assert word.lower() in payload["message"].lower(), f"{word!r} not in {payload['message']!r}"


IMAGE = b64_image(14)
TEXT = {"type": "text", "text": "cat"}
CONCEPT = {"image": IMAGE, "prompts": [TEXT]}
VISUAL = {"image": IMAGE, "prompts": {"prompts": [{"points": [{"x": 10, "y": 10, "positive": True}]}]}}


def with_(body: dict, path: str, value: object) -> dict:
    """A deep copy of body with the dotted path set (or removed when value is ...)."""
    out = copy.deepcopy(body)
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is ...:
        del node[leaf]
    else:
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return out


BOX = {"x": 5, "y": 5, "width": 20, "height": 20}
ERROR_CASES = [
    ("concept_segment", with_(CONCEPT, "image", ...), 422, ("image", "required")),
    ("concept_segment", with_(CONCEPT, "prompts", ...), 422, ("prompts", "required")),
    ("concept_segment", with_(CONCEPT, "prompts", []), 422, ("prompts",)),
    ("concept_segment", with_(CONCEPT, "prompts", "cat"), 422, ("prompts", "list")),
    ("concept_segment", with_(CONCEPT, "image.type", "numpy"), 422, ("image.type", "url", "base64")),
    ("concept_segment", with_(CONCEPT, "output_prob_thresh", "high"), 422, ("output_prob_thresh",)),
    ("concept_segment", with_(CONCEPT, "output_prob_thresh", -1), 422, ("output_prob_thresh", "greater")),
    ("concept_segment", with_(CONCEPT, "nms_iou_threshold", 1.5), 422, ("nms_iou_threshold", "less")),
    ("concept_segment", with_(CONCEPT, "prompts.0.output_prob_thresh", 2), 422, ("output_prob_thresh",)),
    ("concept_segment", with_(CONCEPT, "format", "mask"), 422, ("format", "polygon", "rle")),
    ("concept_segment", with_(CONCEPT, "prompts", [TEXT] * 17), 400, ("17 prompts", "16")),
    ("concept_segment", with_(CONCEPT, "prompts.0.boxes", [BOX]), 422, ("box_labels", "required")),
    ("concept_segment", {**CONCEPT, "prompts": [{**TEXT, "boxes": [BOX], "box_labels": [1, 0]}]}, 422,
     ("1 boxes", "2 box_labels")),
    ("concept_segment", {**CONCEPT, "prompts": [{**TEXT, "boxes": [BOX], "box_labels": [2]}]}, 422, ("box_labels",)),
    ("concept_segment", {**CONCEPT, "prompts": [{**TEXT, "boxes": [{"x": 1, "y": 1, "w": 5, "height": 5}],
                                                 "box_labels": [1]}]}, 422, ("boxes", "width")),
    ("concept_segment", {**CONCEPT, "prompts": [{**TEXT, "boxes": [{"x": 500, "y": 500, "width": 5, "height": 5}],
                                                 "box_labels": [1]}]}, 400, ("outside",)),
    ("concept_segment", {**CONCEPT, "prompts": [{"type": "text"}]}, 400, ("text", "boxes")),
    ("concept_segment", {**CONCEPT, "prompts": [{"type": "visual", "text": "cat"}]}, 422, ("visual", "box")),
    ("concept_segment", with_(CONCEPT, "image", {"type": "url", "value": "http://10.0.0.1/a.png"}), 400,
     ("10.0.0.1", "private")),
    ("concept_segment", with_(CONCEPT, "image", {"type": "url", "value": "http://169.254.169.254/"}), 400,
     ("169.254.169.254",)),
    ("concept_segment", with_(CONCEPT, "image", {"type": "url", "value": "file:///etc/passwd"}), 400, ("http",)),
    ("concept_segment", with_(CONCEPT, "image", {"type": "base64", "value": "http://127.0.0.1/x.png"}), 400,
     ("url",)),
    ("concept_segment", with_(CONCEPT, "image.value", "not base64!"), 400, ("base64",)),
    ("visual_segment", with_(VISUAL, "image", ...), 422, ("image", "required")),
    ("visual_segment", with_(VISUAL, "prompts.prompts.0.points.0.positive", ...), 422, ("positive", "required")),
    ("visual_segment", with_(VISUAL, "prompts.prompts.0.points.0.x", "left"), 422, ("x",)),
    ("visual_segment", with_(VISUAL, "multimask_output", "maybe"), 422, ("multimask_output",)),
    ("visual_segment", with_(VISUAL, "format", "polygon"), 422, ("format", "json")),
    ("visual_segment", with_(VISUAL, "prompts.prompts.0.points.0.x", 1000), 400, ("outside",)),
    ("visual_segment", with_(VISUAL, "prompts", {"prompts": []}), 400, ("prompt",)),
    ("visual_segment", {**VISUAL, "prompts": [{"box": {"x": 5, "y": 5, "width": -4, "height": 5}}]}, 422,
     ("width", "greater")),
    ("visual_segment", with_(VISUAL, "image", {"type": "url", "value": "http://169.254.169.254/"}), 400,
     ("169.254.169.254",)),
    ("embed_image", {}, 400, ("no image",)),
    ("embed_image", {"image_id": "never-embedded"}, 404, ("never-embedded",)),
    ("embed_image", {"image": {"type": "url", "value": "http://10.0.0.1/a.png"}}, 400, ("private",)),
]


@pytest.mark.parametrize(("route", "body", "status", "words"), ERROR_CASES)
def test_bad_requests_are_4xx_in_roboflow_shape(providers_url, route, body, status, words):
    assert_error(post(providers_url, route, body), status, *words)


@pytest.mark.parametrize("route", ["concept_segment", "visual_segment", "embed_image"])
def test_api_key_is_required_and_checked(providers_url, route):
    body = VISUAL if route == "visual_segment" else CONCEPT
    assert_error(post(providers_url, route, body, key=None), 401, "api_key")
    assert_error(post(providers_url, route, body, key="wrong-key"), 401, "invalid API key")


def test_body_api_key_and_unknown_fields_are_accepted(providers_url):
    """Roboflow's SDK sends api_key (and other fields) in the body; its server ignores unknown fields."""
    body = {**CONCEPT, "api_key": API_KEY, "source": "sdk", "model_id": "sam3/sam3_final"}
    assert ok(post(providers_url, "concept_segment", body, key=None))["prompt_results"]


def test_malformed_json_and_unknown_route(providers_url):
    response = requests.post(f"{providers_url}/sam3/concept_segment", data="{not json",
                             params={"api_key": API_KEY}, headers={"content-type": "application/json"}, timeout=30)
    assert_error(response, 400, "JSON")
    assert_error(requests.post(f"{providers_url}/sam3/nope", json={}, params={"api_key": API_KEY}, timeout=30), 404,
                 "no route")
    assert_error(requests.post(f"{providers_url}/sam3/nope", json={}, timeout=30), 401, "api_key")  # keys first
