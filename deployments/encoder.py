"""ImageEncoder deployment: decodes the images it is sent and runs the vision backbone, batched across requests."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch
from ray import serve
from ray.serve import metrics  # Serve tags: deployment, replica, application

from deployments.handles import ReplicaModels, replica_logging
from serve_app.core.admission import check_deadline
from serve_app.core.config import Config
from serve_app.core.stats import BatchStats
from serve_app.image.batching import BatchedModel, Batcher, merged_stats
from serve_app.image.engine import ImageEngine
from serve_app.image.imageio import ImageLoader
from serve_app.image.service import EncoderInput

QUEUE_WAIT_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


@serve.deployment(name="ImageEncoder")
class ImageEncoder:
    """Multiplexed (Serve's `@serve.multiplexed`): up to SAM3_MODELS_PER_REPLICA models, least recently used out;
    callers route by `multiplexed_model_id`, so a request goes to a replica that holds its model. The default
    model loads at start-up."""

    async def __init__(self, config: Config) -> None:  # Serve awaits an async constructor
        replica_logging(config)
        self.config = config
        self.loader = ImageLoader.from_config(config, None)  # decodes only: the ingress fetched the bytes
        self.stats = BatchStats()
        self._batch_hist = metrics.Histogram(
            "sam3_encoder_batch_size", description="Images per encoder batch.", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        self._images = metrics.Counter("sam3_encoder_images", description="Images encoded.")
        self._queue_wait = metrics.Histogram(
            "sam3_encoder_queue_wait_ms", description="Milliseconds an image waited in the encoder's batcher before "
            "its batch started.", boundaries=QUEUE_WAIT_BUCKETS_MS)
        self.models = ReplicaModels(config, self._build)
        await self.models.get()  # the default model: routable only once it is loaded

    def _build(self, name: str, bundle) -> BatchedModel:
        """What the multiplexer holds per model (it calls this for a model this replica does not hold)."""
        engine = ImageEngine(bundle)

        def run(items: list[tuple[float, np.ndarray]]) -> list[torch.Tensor]:
            return self._encode_batch(engine, items)

        return BatchedModel(engine, Batcher(run, self.config.encoder_max_batch_size,
                                             self.config.encoder_batch_wait_timeout_s, self._record))

    async def encode(self, image: EncoderInput | np.ndarray, model: str | None = None) -> torch.Tensor:
        """One image's embedding by `model` (else the caller's multiplexed model id, else the default); encoded
        bytes are decoded here, in a thread, off the single ingress."""
        name, held = await self.models.get(model or getattr(image, "model", None))
        started = time.perf_counter()
        try:
            if isinstance(image, np.ndarray):
                return await held.batcher.submit((time.perf_counter(), image))
            if image.deadline is not None and time.time() >= image.deadline:  # not even decoded: nobody waits
                held.batcher.dropped["expired"] += 1
                check_deadline(image.deadline, "before the image encoder got to it")
            pixels = image.pixels if image.pixels is not None else await asyncio.to_thread(image.decoded, self.loader)
            return await held.batcher.submit((time.perf_counter(), pixels), image.in_flight, image.deadline)
        finally:
            self.models.stats.request(name, time.perf_counter() - started)

    def _encode_batch(self, engine: ImageEngine, items: list[tuple[float, np.ndarray]]) -> list[torch.Tensor]:
        """The batcher's run: items are (queued at, pixels); each one's wait goes to sam3_encoder_queue_wait_ms."""
        started = time.perf_counter()
        for queued, _ in items:
            self._queue_wait.observe((started - queued) * 1000)
        return engine.encode([pixels for _, pixels in items])

    def _record(self, size: int) -> None:
        self.stats.record(size)
        self._batch_hist.observe(size)
        self._images.inc(size)

    def get_stats(self) -> dict:
        """Batches of every model this replica holds (loads nothing), and the per-model counts."""
        merged = merged_stats([held.batcher for held in self.models.held().values()])
        return {**self.stats.snapshot(), **merged, "models": self.models.stats.snapshot()}

    async def info(self, model: str | None = None) -> dict:
        bundle = (await self.models.get(model))[1].engine.bundle
        tokens = (bundle.image_size // bundle.patch_size) ** 2
        hidden = bundle.detector.config.vision_config.backbone_config.hidden_size
        return {"embedding_bytes": tokens * hidden * bundle.dtype.itemsize, "image_size": bundle.image_size}

    def ready(self) -> bool:
        return True
