"""The embedding and logits caches behind one async interface, so that in Serve one process can own them for all.

`LocalCaches` keeps them in this process (in-process use, tests, and inside the ImageCache deployment, which owns
every cached embedding for every ingress replica: see docs/architecture.md). `encode` both runs the encoder and
caches its output, so the process that holds the cache is the one that owns the embedding.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from serve_app.core.cache import CachedEmbedding, CachedLogits, EmbeddingCache, LogitsCache
from serve_app.core.config import Config


class Encoder(Protocol):
    async def encode(self, image: np.ndarray, model: str | None = None) -> object: ...

    async def embedding_bytes(self, model: str | None = None) -> int: ...


class Caches(Protocol):
    """What SegmentService needs of the caches; keys are (tenant, model, image key): a key never sees another's
    entries, and an embedding of one model is never used for another."""

    async def get_embedding(self, key: tuple) -> CachedEmbedding | None: ...

    async def encode(self, key: tuple, pixels: np.ndarray, height: int, width: int,
                     model: str | None = None) -> object: ...

    async def lookup_or_encode(self, key: tuple, pixels: object, height: int, width: int,
                               model: str | None = None) -> tuple[object, bool]: ...

    async def pop_embedding(self, key: tuple) -> None: ...

    async def prior_logits(self, key: tuple, points: tuple, box: tuple | None) -> np.ndarray | None: ...

    async def remember_logits(self, key: tuple, entry: CachedLogits) -> None: ...

    async def stats(self) -> dict: ...


class LocalCaches:
    """Both caches in this process, bounded by SAM3_EMBEDDING_CACHE_* and SAM3_LOGITS_CACHE_*."""

    def __init__(self, config: Config, encoder: Encoder) -> None:
        self.encoder = encoder
        self.embeddings = EmbeddingCache(config.embedding_cache_entries, config.embedding_cache_bytes)
        self.logits = LogitsCache(config.logits_cache_entries, config.logits_cache_bytes)

    async def get_embedding(self, key: tuple) -> CachedEmbedding | None:
        return self.embeddings.get(key)

    async def encode(self, key: tuple, pixels: object, height: int, width: int, model: str | None = None) -> object:
        """Encode by `model` and keep: the embedding (a tensor in process, an ObjectRef this process owns under
        Serve). `pixels` is the image, or under Serve an ObjectRef of it that only the encoder replica resolves."""
        embedding = await self.encoder.encode(pixels, model)
        entry = CachedEmbedding(embedding, int(height), int(width))
        self.embeddings.put(key, entry, await self.encoder.embedding_bytes(model))
        return embedding

    async def lookup_or_encode(self, key: tuple, pixels: object, height: int, width: int,
                               model: str | None = None) -> tuple[object, bool]:
        """The cached embedding and True, or `encode`'s and False: one call (one hop under Serve) for both."""
        hit = self.embeddings.get(key)
        if hit is not None:
            return hit.embedding, True
        return await self.encode(key, pixels, height, width, model), False

    async def pop_embedding(self, key: tuple) -> None:
        self.embeddings.pop(key)

    async def prior_logits(self, key: tuple, points: tuple, box: tuple | None) -> np.ndarray | None:
        return self.logits.best_prefix(key, points, box)

    async def remember_logits(self, key: tuple, entry: CachedLogits) -> None:
        self.logits.remember(key, entry)

    async def stats(self) -> dict:
        return {"embedding_cache": self.embeddings.stats(), "logits_cache": self.logits.stats()}
