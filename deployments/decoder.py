"""Decoder deployment: necks, text encoder (cached), DETR / mask decoders and post-processing."""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from serve_app.core.config import Config
from serve_app.core.types import Prompt, SegmentParams, SegmentResult
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle


@serve.deployment(name="Decoder")
class Decoder:
    def __init__(self, config: Config) -> None:
        self.engine = ImageEngine(load_bundle(config), prompt_batch=config.decoder_prompt_batch)
        self.timeout_s = config.request_timeout_s  # the ingress stops waiting then; so does the work (504)
        self.requests = 0

    async def decode(
        self, embedding: torch.Tensor, prompts: list[Prompt], params: SegmentParams, size: tuple[int, int]
    ) -> SegmentResult:
        self.requests += 1
        deadline = time.monotonic() + self.timeout_s
        return await asyncio.to_thread(self.engine.decode, embedding, prompts, params, size, deadline)

    def get_stats(self) -> dict:
        return {"requests": self.requests, "text_cache_entries": self.engine.text_cache_entries}

    def ready(self) -> bool:
        return True
