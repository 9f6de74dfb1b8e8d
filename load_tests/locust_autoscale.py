"""Locust users for load_tests/autoscale.py: distinct images (so every request reaches the encoder) at /v1/image/segment.

The workload ($SAM3_LOCUST_PROMPT, $SAM3_LOCUST_SIZE) is set by autoscale.py: by default a box prompt (interactive
segmentation) on a 1080x1920 JPEG, where the encoder replica's work (decode, resize, backbone) is the largest share
as the ViT's is on a real model; `text` makes tiny-random's decoder the bottleneck instead. Images are used in turn
from a pool larger than the embedding cache, so that no request is a cache hit.

Every response is recorded as (seconds since start, status, latency ms) and written to $SAM3_LOCUST_RECORD when
Locust quits; autoscale.py reads it next to the replica counts it polled from Serve.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

from locust import LoadTestShape, between, events, task
from locust.contrib.fasthttp import FastHttpUser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import jpeg_b64, make_image  # noqa: E402 - load_tests/ is not a package

API_KEY = os.environ.get("SAM3_LOCUST_KEY", "")
RAMP = json.loads(os.environ.get("SAM3_LOCUST_STAGES", "[[10, 2], [25, 8], [85, 16]]"))  # [[until_s, users]]
PROMPT = os.environ.get("SAM3_LOCUST_PROMPT", "box")  # box | text
HEIGHT, WIDTH = (int(v) for v in os.environ.get("SAM3_LOCUST_SIZE", "1080x1920").lower().split("x"))
POOL_SIZE = 80  # used in turn: more than the embedding cache's 64 entries, so the LRU never holds the next one
POOL = [jpeg_b64(make_image(seed, HEIGHT, WIDTH)) for seed in range(POOL_SIZE)]  # before START: the stages' clock
START = time.time()
RECORD: list[tuple[float, int, float]] = []
NEXT = itertools.count()


def _prompt(index: int) -> dict:
    if PROMPT == "text":
        return {"type": "concept", "text": "a cat"}
    x, y = (index * 37) % (WIDTH // 2), (index * 53) % (HEIGHT // 2)
    return {"type": "visual", "box": [x, y, x + WIDTH // 3, y + HEIGHT // 3]}


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, **kwargs):
    status = getattr(response, "status_code", 0) or 0
    RECORD.append((round(time.time() - START, 3), int(status), float(response_time)))


@events.quitting.add_listener
def _dump(environment, **kwargs):
    path = os.environ.get("SAM3_LOCUST_RECORD")
    if path:
        with open(path, "w") as f:
            json.dump({"start": START, "requests": RECORD}, f)


class Segmenter(FastHttpUser):
    wait_time = between(0.0, 0.05)

    @task
    def segment(self) -> None:
        index = next(NEXT)
        body = {"image": POOL[index % POOL_SIZE], "prompts": [_prompt(index)]}
        headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
        with self.client.post("/v1/image/segment", json=body, headers=headers, catch_response=True) as response:
            if response.status_code == 429:
                response.success()  # expected once every deployment is at its maximum; autoscale.py checks when
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")


class Ramp(LoadTestShape):
    """Users by stage, then the run ends (the driver keeps watching replicas scale back down)."""

    def tick(self):
        elapsed = self.get_run_time()
        for until, users in RAMP:
            if elapsed < until:
                return users, max(1, users)
        return None
