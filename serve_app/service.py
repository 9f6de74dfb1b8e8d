"""What the ingress does per request, free of Ray: load and validate the image, run the graph, time it."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import numpy as np

from serve_app.config import Config
from serve_app.engine import ImageEngine
from serve_app.imageio import ImageLoader, image_digest
from serve_app.security import UrlFetcher
from serve_app.types import SegmentRequest, SegmentResult


class Graph(Protocol):
    """Encoder then decoder; the Ray version passes the embedding between replicas without the ingress."""

    async def segment(self, request: SegmentRequest) -> SegmentResult: ...


class LocalGraph:
    """The same graph in-process (tests and the benchmark baseline)."""

    def __init__(self, engine: ImageEngine) -> None:
        self.engine = engine

    async def segment(self, request: SegmentRequest) -> SegmentResult:
        embedding = (await asyncio.to_thread(self.engine.encode, [request.image]))[0]
        return await asyncio.to_thread(self.engine.decode, embedding, request.prompts, request.params, request.size)


class ImageInputs:
    """Turns a client's image field into (decoded RGB array, cache key)."""

    def __init__(self, config: Config) -> None:
        self.loader = ImageLoader.from_config(config, UrlFetcher.from_config(config))

    async def load(self, source: str, image_id: str | None = None) -> tuple[np.ndarray, str]:
        data = await self.loader.load_bytes(source)
        image = await asyncio.to_thread(self.loader.decode, data)
        return image, image_id or image_digest(data)


async def timed_segment(graph: Graph, request: SegmentRequest, started: float) -> SegmentResult:
    result = await graph.segment(request)
    result.timings_ms["total_ms"] = (time.perf_counter() - started) * 1000
    return result
