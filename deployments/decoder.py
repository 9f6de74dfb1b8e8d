"""Decoder deployment: necks, text encoder (cached), DETR / mask decoders and post-processing.

Decodes run on a bounded pool of worker threads (SAM3_DECODER_THREADS); the calls past it wait on this replica's
loop, where a call whose deadline passes, or whose caller cancels it (a client that left), is dropped before it
reaches the model. A running decode checks its deadline and a stop flag between chunks (prompts, point batches):
a cancelled one stops at its next chunk.
"""

from __future__ import annotations

import asyncio
import threading
import time

import torch
from ray import serve

from serve_app.core.admission import check_deadline
from serve_app.core.config import Config
from serve_app.core.types import Prompt, SegmentParams, SegmentResult
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle


def _expired(deadline: float) -> bool:
    return time.time() >= deadline


@serve.deployment(name="Decoder")
class Decoder:
    def __init__(self, config: Config) -> None:
        self.engine = ImageEngine(load_bundle(config), prompt_batch=config.decoder_prompt_batch)
        self.timeout_s = config.request_timeout_s  # the longest any request may take (a call without a deadline)
        self.threads = asyncio.Semaphore(config.decoder_threads)
        self.running = 0
        self.counts = {"requests": 0, "decoded": 0, "failed": 0, "dropped_expired": 0, "dropped_cancelled": 0,
                       "stopped_expired": 0, "stopped_cancelled": 0}

    async def decode(
        self, embedding: torch.Tensor, prompts: list[Prompt], params: SegmentParams, size: tuple[int, int],
        deadline: float | None = None,
    ) -> SegmentResult:
        """`deadline`: wall-clock seconds (time.time()) past which nobody waits for the answer."""
        self.counts["requests"] += 1
        deadline = time.time() + self.timeout_s if deadline is None else deadline
        started = False
        try:
            if not _expired(deadline):
                async with self.threads:
                    if not _expired(deadline):
                        started = True
                        return await self._run(embedding, prompts, params, size, deadline)
            self.counts["dropped_expired"] += 1
            check_deadline(deadline, "before the decoder got to it")
            raise AssertionError("unreachable")
        except asyncio.CancelledError:
            if not started:
                self.counts["dropped_cancelled"] += 1
            raise

    async def _run(self, embedding, prompts, params, size, deadline: float) -> SegmentResult:
        stop = threading.Event()
        monotonic_deadline = time.monotonic() + (deadline - time.time())
        self.running += 1
        work = asyncio.ensure_future(asyncio.to_thread(
            self.engine.decode, embedding, prompts, params, size, monotonic_deadline, stop))
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()  # the thread stops at its next chunk; the pool's slot is held until it has
            self.counts["stopped_cancelled"] += 1
            try:
                await work
            except BaseException:  # noqa: BLE001 - Stopped, or whatever it ended with: nobody waits for it
                pass
            raise
        except Exception as exc:
            self.counts["stopped_expired" if getattr(exc, "status_code", None) == 504 else "failed"] += 1
            raise
        finally:
            self.running -= 1
        self.counts["decoded"] += 1
        return result

    def get_stats(self) -> dict:
        return {**self.counts, "running": self.running, "text_cache_entries": self.engine.text_cache_entries}

    def ready(self) -> bool:
        return True
