"""Concurrent requests meet in one encoder batch and one decoder batch. Encoder batching changes no result; decoder
batching agrees with one request at a time within the documented tolerances, and SAM3_DECODER_EXACT keeps every bit."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serve_app.core.config import Config
from serve_app.image.codecs import rle_decode
from tests.integration.conftest import deploy, png_b64, random_image, segment, undeploy
from tests.reference import BATCHED_IOU, BATCHED_SCORE, mask_iou

TEXTS = ["cat", "dog", "red car", "tree", "person", "boat", "bird", "cup", "chair", "kite", "bus", "clock", "fox"]


def _body(i: int) -> dict:
    prompts = [{"type": "concept", "text": TEXTS[i]}]
    if i % 3 == 0:
        prompts.append({"type": "visual", "points": [[20 + i, 30]], "multimask": True})
    return {"image": png_b64(random_image(100 + i)), "prompts": prompts, "threshold": 0.05}


@pytest.fixture(scope="module")
def nocache_url(serve_instance) -> Iterator[str]:
    """The embedding cache off, so every request runs the encoder; a wide batch window; the exact decoder."""
    config = Config(encoder_max_batch_size=16, encoder_batch_wait_timeout_s=0.2, embedding_cache_entries=0, web_ui=False,
                    video_warm_sessions=0, decoder_exact=True)  # image-only module: no pooled session actor to start
    yield deploy("nocache", config, serve_instance)
    undeploy("nocache")


def _histogram(app_url: str, stage: str = "encoder") -> dict[int, int]:
    stats = requests.get(f"{app_url}/v1/stats", timeout=30).json()
    return {int(k): v for k, v in stats[stage]["batch_size_histogram"].items()}


def _grown(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {size: after[size] - before.get(size, 0) for size in after if after[size] - before.get(size, 0) > 0}


def _strip(payload: dict) -> list:
    return [[(i["score"], i["box"], i["mask"]) for i in p["instances"]] for p in payload["prompts"]]


def test_concurrent_requests_are_batched_and_unchanged(nocache_url):
    app_url = nocache_url
    bodies = [_body(i) for i in range(12)]
    segment(app_url, _body(12))  # warm the path so the burst is not serialised behind start-up
    before = _histogram(app_url)
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        together = list(pool.map(lambda b: segment(app_url, b), bodies))
    after = _histogram(app_url)
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    batched = _grown(before, after)
    assert sum(size * n for size, n in batched.items()) == len(bodies), batched
    assert max(batched) > 1, f"no batch larger than 1: {batched}"
    assert set(_histogram(app_url, "decoder")) == {1}, "SAM3_DECODER_EXACT decodes one request at a time"

    alone = [segment(app_url, body) for body in bodies]  # one at a time: batches of 1
    for i, (a, b) in enumerate(zip(together, alone)):
        assert _strip(a.json()) == _strip(b.json()), f"request {i} changed when batched"
    assert any(p["instances"] for r in alone for p in r.json()["prompts"]), "results must not be empty"


def _agreement(batched: dict, alone: dict) -> tuple[float, float, int]:
    """Worst mask IoU and score difference between two answers with the same instances; and how many there were."""
    worst_iou, worst_score, count = 1.0, 0.0, 0
    for b, a in zip(batched["prompts"], alone["prompts"]):
        assert len(b["instances"]) == len(a["instances"]), "batching changed which instances survive NMS"
        for x, y in zip(b["instances"], a["instances"]):
            worst_iou = min(worst_iou, mask_iou(rle_decode(x["mask"]), rle_decode(y["mask"])))
            worst_score = max(worst_score, abs(x["score"] - y["score"]))
            count += 1
    return worst_iou, worst_score, count


def test_the_decoder_batches_concurrent_requests_within_the_stated_tolerances(app_url):
    """The default graph: requests that wait while the decoder runs share its forwards; each answer agrees with the
    same request sent alone (a batch of one: the exact computation)."""
    bodies = [_body(i) for i in range(12)]
    segment(app_url, _body(12))
    before = requests.get(f"{app_url}/v1/stats", timeout=30).json()["decoder"]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        together = list(pool.map(lambda b: segment(app_url, b), bodies))
    after = requests.get(f"{app_url}/v1/stats", timeout=30).json()["decoder"]
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    batched = _grown({int(k): v for k, v in before["batch_size_histogram"].items()},
                     {int(k): v for k, v in after["batch_size_histogram"].items()})
    assert sum(size * n for size, n in batched.items()) == len(bodies), batched
    assert max(batched) > 1, f"no decoder batch larger than 1: {batched}"
    pairs = after["forwards"]["detr_pairs"] - before["forwards"]["detr_pairs"]
    forwards = after["forwards"]["detr"] - before["forwards"]["detr"]
    assert pairs == len(bodies) and forwards < pairs, (forwards, pairs)

    alone = [segment(app_url, body) for body in bodies]
    worst_iou, worst_score, count = 1.0, 0.0, 0
    for a, b in zip(together, alone):
        iou, score, n = _agreement(a.json(), b.json())
        worst_iou, worst_score, count = min(worst_iou, iou), max(worst_score, score), count + n
    print(f"decoder batches {batched}; worst mask IoU {worst_iou:.6f}, worst score difference {worst_score:.2e}, "
          f"{count} instances")
    assert count > 0, "results must not be empty"
    assert worst_iou >= BATCHED_IOU and worst_score <= BATCHED_SCORE, (worst_iou, worst_score)
