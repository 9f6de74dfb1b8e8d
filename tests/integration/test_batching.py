"""Concurrent requests meet in one encoder batch, and batching changes no result."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serve_app.core.config import Config
from tests.integration.conftest import deploy, png_b64, random_image, segment, undeploy

TEXTS = ["cat", "dog", "red car", "tree", "person", "boat", "bird", "cup", "chair", "kite", "bus", "clock", "fox"]


def _body(i: int) -> dict:
    prompts = [{"type": "concept", "text": TEXTS[i]}]
    if i % 3 == 0:
        prompts.append({"type": "visual", "points": [[20 + i, 30]], "multimask": True})
    return {"image": png_b64(random_image(100 + i)), "prompts": prompts, "threshold": 0.05}


@pytest.fixture(scope="module")
def nocache_url(serve_instance) -> Iterator[str]:
    """The embedding cache off, so every request runs the encoder; a wide batch window."""
    config = Config(encoder_max_batch_size=16, encoder_batch_wait_timeout_s=0.2, embedding_cache_entries=0, web_ui=False,
                    video_warm_sessions=0)  # image-only module: no pooled session actor to start
    yield deploy("nocache", config, serve_instance)
    undeploy("nocache")


def _histogram(app_url: str) -> dict[int, int]:
    stats = requests.get(f"{app_url}/v1/stats", timeout=30).json()
    return {int(k): v for k, v in stats["encoder"]["batch_size_histogram"].items()}


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
    grown = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    batched = {size: n for size, n in grown.items() if n > 0}
    assert sum(size * n for size, n in batched.items()) == len(bodies), batched
    assert max(batched) > 1, f"no batch larger than 1: {batched}"

    alone = [segment(app_url, body) for body in bodies]  # one at a time: batches of 1
    for i, (a, b) in enumerate(zip(together, alone)):
        assert _strip(a.json()) == _strip(b.json()), f"request {i} changed when batched"
    assert any(p["instances"] for r in alone for p in r.json()["prompts"]), "results must not be empty"
