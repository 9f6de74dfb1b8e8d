"""ImageCache deployment: one replica owns every cached embedding (it runs the encoder call) and the logits cache.

Any ingress replica finds any image_id here; an ingress crash loses no cache entry. Its own crash loses the
caches (follow-ups by image_id alone answer 410 "send the image again"); Serve restarts it empty.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.handles import Failover, RayGraph, replica_logging
from serve_app.core.cache import CachedEmbedding, CachedLogits
from serve_app.core.config import Config
from serve_app.image.caches import LocalCaches


@serve.deployment(name="ImageCache", num_replicas=1, max_ongoing_requests=1024, logging_config={"enable_access_log": False})
class ImageCache:
    def __init__(self, encoder: DeploymentHandle, config: Config) -> None:
        replica_logging(config)
        self.caches = LocalCaches(config, RayGraph(encoder, None, config.request_timeout_s,
                                                             Failover(config.failover_retries)))

    async def get_embedding(self, key: tuple) -> CachedEmbedding | None:
        return await self.caches.get_embedding(key)

    async def encode(self, key: tuple, pixels: list, height: int, width: int, model: str | None = None) -> list:
        """`pixels` is [ObjectRef] (a list, so this replica passes it on unresolved); returns [embedding ref].
        `model` picks the encoder replicas (Serve's multiplexed routing); the key carries it too."""
        return [await self.caches.encode(key, pixels[0], height, width, model)]

    async def lookup_or_encode(self, key: tuple, pixels: list, height: int, width: int,
                               model: str | None = None) -> list:
        """One hop for a lookup and, on a miss, the encode: returns [embedding ref, was it cached]."""
        return list(await self.caches.lookup_or_encode(key, pixels[0], height, width, model))

    async def pop_embedding(self, key: tuple) -> None:
        await self.caches.pop_embedding(key)

    async def prior_logits(self, key: tuple, points: tuple, box: tuple | None):
        return await self.caches.prior_logits(key, points, box)

    async def remember_logits(self, key: tuple, entry: CachedLogits) -> None:
        await self.caches.remember_logits(key, entry)

    async def stats(self) -> dict:
        return await self.caches.stats()

    def ready(self) -> bool:
        return True
