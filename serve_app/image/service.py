"""What the ingress does per request, free of Ray: resolve the image (cache first), validate prompts, run the graph."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serve_app.core.admission import current_deadline
from serve_app.core.auth import Authenticator
from serve_app.core.config import Config
from serve_app.core.errors import BadRequest, Gone, InvalidImage, NotFound
from serve_app.core.registry import LITE_ARCH, LITE_ONLY, ModelSpec, Registry
from serve_app.core.security import UrlFetcher
from serve_app.core.slots import Slot
from serve_app.core.types import ImageInput, Prompt, ResolvedImage, SegmentParams, SegmentRequest, SegmentResult
from serve_app.image.caches import Caches, LocalCaches
from serve_app.image.imageio import ImageLoader, image_digest
from serve_app.image.sources import checkpoint_arch
from serve_app.image.prompts import check_text, validate_prompts


class EmbeddingLost(Exception):
    """The embedding a cache entry pointed at is gone (its replica or node died)."""


@dataclass(frozen=True)
class EncoderInput:
    """What the encoder is sent for one image: the pixels, or the encoded bytes whose header this side checked.

    Sending the bytes moves the decode off the ingress onto the encoder replica (and a JPEG is a tenth of its
    pixels through the object store). `in_flight` is how many requests the sender has in flight, this one
    included: the encoder waits for that many to batch them, so a request alone never waits. `deadline`
    (time.time()): the request's; past it the encoder drops the image unencoded.
    """

    data: bytes | None
    pixels: np.ndarray | None
    height: int
    width: int
    in_flight: int = 1
    deadline: float | None = None
    model: str | None = None  # a registry name: the encoder replica encodes with it

    def decoded(self, loader: ImageLoader) -> np.ndarray:
        """The pixels, decoding the bytes when they are what was sent."""
        if self.pixels is not None:
            return self.pixels
        pixels = loader.decode(self.data)
        if pixels.shape[:2] != (self.height, self.width):  # the sender read the size from the header
            raise InvalidImage(f"image decodes to {pixels.shape[1]}x{pixels.shape[0]}, its header says "
                               f"{self.width}x{self.height}")
        return pixels


class Graph(Protocol):
    """Encoder and decoder; in Serve the embedding is an ObjectRef that never passes through the ingress."""

    async def encode(self, image: np.ndarray | EncoderInput, model: str | None = None) -> object: ...

    async def decode(
        self, embedding: object, prompts: list[Prompt], params: SegmentParams, size: tuple[int, int],
        model: str | None = None, expected: int = 1,
    ) -> SegmentResult: ...

    async def embedding_bytes(self, model: str | None = None) -> int: ...


class SegmentService:
    """One per ingress replica: image loading, the embedding and logits caches, auth, and the graph."""

    def __init__(
        self, config: Config, graph: Graph, on_cache: Callable[[bool], None] | None = None, caches: Caches | None = None,
    ) -> None:
        self.config = config
        self.graph = graph
        self.on_cache = on_cache or (lambda hit: None)  # the ingress feeds Ray metrics from it
        self.loader = ImageLoader.from_config(config, UrlFetcher.from_config(config))
        self.auth = Authenticator(config.api_keys)
        self.registry = Registry.from_config(config)
        self._archs: dict[str, str] = {}
        self.caches = caches if caches is not None else LocalCaches(config, graph)  # Serve: the ImageCache replica
        self.in_flight = 0  # segment requests in this replica: the encoder's batching hint (EncoderInput)

    async def load_pixels(self, source: str) -> tuple[np.ndarray, str]:
        """Decode an image (for rendering overlays); returns pixels and the digest of the encoded bytes."""
        data = await self.loader.load_bytes(source)
        return await asyncio.to_thread(self.loader.decode, data), image_digest(data)

    def model(self, name: str | None) -> ModelSpec:
        """The registry's model for a request's field (None: the default); 404 model_not_found otherwise."""
        return self.registry.resolve(name)

    def arch(self, name: str) -> str:
        """sam3_video or sam3_lite_text (read once per model from its source)."""
        if name not in self._archs:
            self._archs[name] = checkpoint_arch(self.registry.specs[name].source)
        return self._archs[name]

    def check_prompts_for(self, model: str, prompts: list) -> None:
        """A sam3_lite_text model serves concept prompts only: anything else is a 400 before the encoder runs."""
        if self.arch(model) == LITE_ARCH and any(getattr(p, "kind", "concept") != "concept" for p in prompts):
            raise BadRequest(LITE_ONLY.format(model=model))

    @staticmethod
    def cache_key(tenant: str, model: str, key: str) -> tuple:
        """What the embedding and logits caches are keyed by: one key's, one model's entries."""
        return (tenant, model, key)

    async def resolve(self, image: ImageInput, tenant: str, need_pixels: bool = False,
                      model: str | None = None) -> ResolvedImage:
        """The image's embedding: from the cache by image_id before anything is fetched or decoded, else encoded."""
        name = self.model(model).name
        return await self.encode(await self.load(image, tenant, need_pixels, name), tenant, name)

    async def load(self, image: ImageInput, tenant: str, need_pixels: bool = False,
                   model: str | None = None) -> ResolvedImage:
        """All that can be had without the encoder: a cached embedding, or the image's size and bytes (or pixels).

        Pixels are decoded here only when the caller needs them or the header cannot tell the size; otherwise the
        encoder replica decodes the bytes (`EncoderInput`).
        """
        if image.image_id is not None:
            check_text(image.image_id, "image_id")
        model = self.model(model).name
        if image.image_id is not None and not need_pixels:
            hit = await self.caches.get_embedding(self.cache_key(tenant, model, image.image_id))
            if hit is not None:
                self.on_cache(True)
                return ResolvedImage(image.image_id, hit.height, hit.width, hit.embedding, cache_hit=True)
        if image.source is not None and not image.source.strip():
            raise InvalidImage("image is empty")
        if image.source is None:
            if image.image_id is not None:
                raise NotFound(f"no cached embedding for image_id {image.image_id!r}: send the image with it")
            raise InvalidImage("no image given: send the image (base64, data URI or URL) or a cached image_id")
        data = await self.loader.load_bytes(image.source)
        key = image.image_id or image_digest(data)
        size = None if need_pixels else self.loader.probe(data)  # header only: microseconds, on the loop
        if size is not None:  # the cache is asked when the encoder would be: one call (lookup_or_encode)
            return _Encodable(key, size[0], size[1], None, data=data)
        hit = await self.caches.get_embedding(self.cache_key(tenant, model, key))
        self.on_cache(hit is not None)
        pixels = await asyncio.to_thread(self.loader.decode, data) if hit is None or need_pixels else None
        if hit is not None:
            return ResolvedImage(key, hit.height, hit.width, hit.embedding, pixels, cache_hit=True)
        return ResolvedImage(key, int(pixels.shape[0]), int(pixels.shape[1]), None, pixels)

    async def encode(self, resolved: ResolvedImage, tenant: str, model: str | None = None) -> ResolvedImage:
        """The embedding of an image `load` left without one: from the cache, or encoded (and cached)."""
        if resolved.embedding is not None:
            return resolved
        model = self.model(model).name
        key, in_flight = self.cache_key(tenant, model, resolved.key), max(1, self.in_flight)
        if isinstance(resolved, _Encodable):  # not looked up yet: the cache looks and encodes in one call
            image = EncoderInput(resolved.data, None, resolved.height, resolved.width, in_flight, current_deadline(),
                                 model)
            resolved.embedding, resolved.cache_hit = await self.caches.lookup_or_encode(
                key, image, resolved.height, resolved.width, model)
            self.on_cache(resolved.cache_hit)
        else:
            image = EncoderInput(None, resolved.pixels, resolved.height, resolved.width, in_flight, current_deadline(),
                                 model)
            resolved.embedding = await self.caches.encode(key, image, resolved.height, resolved.width, model)
        return resolved

    async def segment(
        self, request: SegmentRequest, tenant: str, need_pixels: bool = False
    ) -> tuple[SegmentResult, ResolvedImage]:
        self.in_flight += 1
        try:
            return await self._segment(request, tenant, need_pixels)
        finally:
            self.in_flight -= 1

    async def _segment(self, request: SegmentRequest, tenant: str, need_pixels: bool) -> tuple[SegmentResult, ResolvedImage]:
        started = time.perf_counter()
        model = self.model(request.model).name
        self.check_prompts_for(model, request.prompts)
        resolved = await self.load(request.image, tenant, need_pixels, model)
        loaded = time.perf_counter()
        prompts = validate_prompts(request.prompts, resolved.size, self.config)  # before the encoder runs
        resolved = await self.encode(resolved, tenant, model)
        encoded = time.perf_counter()
        try:
            result = await self.graph.decode(resolved.embedding, prompts, request.params, resolved.size, model,
                                             max(1, self.in_flight))
        except EmbeddingLost:
            await self.caches.pop_embedding(self.cache_key(tenant, model, resolved.key))
            if not request.image.source:
                raise Gone(f"the cached embedding for image_id {resolved.key!r} was lost; send the image again") from None
            resolved = await self.resolve(request.image, tenant, need_pixels, model)
            result = await self.graph.decode(resolved.embedding, prompts, request.params, resolved.size, model,
                                             max(1, self.in_flight))
        result.model = model
        finished = time.perf_counter()
        result.timings_ms.update({
            "load_ms": (loaded - started) * 1000, "encode_ms": (encoded - loaded) * 1000,
            "decoder_call_ms": (finished - encoded) * 1000, "total_ms": (finished - started) * 1000,
            "cache_hit": float(resolved.cache_hit),
        })
        return result, resolved

    async def stats(self) -> dict:
        return await self.caches.stats()


@dataclass
class _Encodable(ResolvedImage):
    """An image not yet encoded whose pixels were not decoded here: the encoder replica decodes `data`."""

    data: bytes | None = None


_slot: Slot[SegmentService] = Slot("the service is starting")


def set_service(value: SegmentService | None) -> None:
    _slot.set(value)


async def get_service() -> SegmentService:
    """FastAPI dependency: the ingress replica's service.

    A plain function: Serve pickles it by reference; a bound method would carry a copy of the slot. `async`, so
    FastAPI calls it on the event loop: a plain `def` dependency costs every request a hop to a worker thread.
    """
    return _slot.get()
