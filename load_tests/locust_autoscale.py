"""Locust users for load_tests/autoscale.py: distinct images (so every request reaches the encoder) at /v1/image/segment.

Every response is recorded as (seconds since start, status, latency ms) and written to $SAM3_LOCUST_RECORD when
Locust quits; autoscale.py reads it next to the replica counts it polled from Serve.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import time

import numpy as np
from locust import LoadTestShape, between, events, task
from locust.contrib.fasthttp import FastHttpUser
from PIL import Image

API_KEY = os.environ.get("SAM3_LOCUST_KEY", "")
RAMP = json.loads(os.environ.get("SAM3_LOCUST_STAGES", "[[15, 2], [35, 8], [95, 16]]"))  # [[until_s, users]]
START = time.time()
RECORD: list[tuple[float, int, float]] = []


def _image(seed: int) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


POOL = [_image(seed) for seed in range(256)]  # > the embedding cache's 64 entries: every request is a miss


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
        body = {"image": random.choice(POOL), "prompts": [{"type": "concept", "text": "a cat"}]}
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
