"""Locust scenario: users POST /v1/image/segment with text, visual and mixed (text + visual) prompts.

Against a local server (locust is not a runtime dependency: `pip install -e ".[load]"` or `pip install locust`):

    make serve                                   # terminal 1: the graph on http://127.0.0.1:8000
    .venv/bin/locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 \
        --headless --users 16 --spawn-rate 4 --run-time 2m --csv /tmp/sam3_locust   # terminal 2

Drop `--headless` for the web UI on http://localhost:8089. Knobs (environment):
    SAM3_LOCUST_IMAGES      distinct images in the pool (default 64); each request picks one at random
    SAM3_LOCUST_IMAGE_SIZE  HEIGHTxWIDTH of the generated images (default 480x640)
Importing this file does nothing: the image pool is built on the first user's start.
"""

from __future__ import annotations

import base64
import io
import os
import random
import threading

from harness import make_image  # locust puts this file's folder on sys.path
from PIL import Image

try:
    from locust import HttpUser, between, task
except ImportError:  # locust is optional; without it this module only offers the payload helpers below
    HttpUser = None

PHRASES = ("a cat", "the red car", "person", "a wooden chair", "a dog", "tree")
_pool: list[tuple[str, int, int]] = []  # (base64 PNG, height, width)
_pool_lock = threading.Lock()


def image_pool() -> list[tuple[str, int, int]]:
    """Base64 PNGs, generated once per Locust worker process and shared by its users."""
    with _pool_lock:
        if not _pool:
            count = int(os.environ.get("SAM3_LOCUST_IMAGES", "64"))
            height, width = (int(v) for v in os.environ.get("SAM3_LOCUST_IMAGE_SIZE", "480x640").lower().split("x"))
            for seed in range(count):
                buffer = io.BytesIO()
                Image.fromarray(make_image(seed, height, width)).save(buffer, format="PNG")
                _pool.append((base64.b64encode(buffer.getvalue()).decode("ascii"), height, width))
        return _pool


def text_prompt(rng: random.Random) -> dict:
    return {"type": "concept", "text": rng.choice(PHRASES)}


def visual_prompt(rng: random.Random, height: int, width: int) -> dict:
    """One or two positive clicks, sometimes with a box around them."""
    points = [[rng.uniform(0, width - 1), rng.uniform(0, height - 1)] for _ in range(rng.randint(1, 2))]
    prompt: dict = {"type": "visual", "points": points}
    if rng.random() < 0.3:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        prompt["box"] = [max(0.0, min(xs) - 40), max(0.0, min(ys) - 40), min(width - 1.0, max(xs) + 40),
                         min(height - 1.0, max(ys) + 40)]
    return prompt


if HttpUser is not None:

    class SegmentUser(HttpUser):
        """One client: mostly text prompts, some clicks, a few requests carrying both."""

        wait_time = between(0.0, 0.5)

        def on_start(self) -> None:
            self.images = image_pool()
            self.rng = random.Random()

        def _post(self, name: str, prompts_for) -> None:
            image, height, width = self.rng.choice(self.images)
            body = {"image": image, "prompts": prompts_for(height, width)}
            with self.client.post("/v1/image/segment", json=body, name=name, catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}: {response.text[:200]}")

        @task(3)
        def text(self) -> None:
            self._post("segment [text]", lambda h, w: [text_prompt(self.rng)])

        @task(2)
        def visual(self) -> None:
            self._post("segment [visual]", lambda h, w: [visual_prompt(self.rng, h, w)])

        @task(1)
        def mixed(self) -> None:
            self._post("segment [text+visual]", lambda h, w: [text_prompt(self.rng), visual_prompt(self.rng, h, w)])
