"""ImageEncoder deployment: the vision backbone, batched across requests with @serve.batch."""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve
from ray.util import metrics

from serve_app.core.config import Config
from serve_app.core.stats import BatchStats
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle


@serve.deployment(name="ImageEncoder")
class ImageEncoder:
    def __init__(self, config: Config) -> None:
        self.engine = ImageEngine(load_bundle(config))
        self.encode_batch.set_max_batch_size(config.encoder_max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(config.encoder_batch_wait_timeout_s)
        self.stats = BatchStats()
        self._batch_hist = metrics.Histogram(
            "sam3_encoder_batch_size", description="Images per encoder batch.", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        self._images = metrics.Counter("sam3_encoder_images", description="Images encoded.")

    async def encode(self, image: np.ndarray) -> torch.Tensor:
        return await self.encode_batch(image)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode_batch(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        self.stats.record(len(images))
        self._batch_hist.observe(len(images))
        self._images.inc(len(images))
        return await asyncio.to_thread(self.engine.encode, images)

    def get_stats(self) -> dict:
        return self.stats.snapshot()

    def info(self) -> dict:
        bundle = self.engine.bundle
        tokens = (bundle.image_size // bundle.patch_size) ** 2
        hidden = bundle.detector.config.vision_config.backbone_config.hidden_size
        return {"embedding_bytes": tokens * hidden * bundle.dtype.itemsize, "image_size": bundle.image_size}

    def ready(self) -> bool:
        return True
