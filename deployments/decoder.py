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
from ray.serve import metrics  # Serve tags: deployment, replica, application

from deployments.handles import ReplicaModels, replica_logging
from serve_app.core.admission import check_deadline
from serve_app.core.config import Config
from serve_app.core.types import Prompt, SegmentParams, SegmentResult
from serve_app.image.engine import ImageEngine

QUEUE_WAIT_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


def _expired(deadline: float) -> bool:
    return time.time() >= deadline


@serve.deployment(name="Decoder")
class Decoder:
    async def __init__(self, config: Config) -> None:  # Serve awaits an async constructor
        replica_logging(config)
        self.config = config
        self.timeout_s = config.request_timeout_s  # the longest any request may take (a call without a deadline)
        self.threads = asyncio.Semaphore(config.decoder_threads)
        self.running = 0
        self.counts = {"requests": 0, "decoded": 0, "failed": 0, "dropped_expired": 0, "dropped_cancelled": 0,
                       "stopped_expired": 0, "stopped_cancelled": 0}
        self._prompts = metrics.Histogram(
            "sam3_decoder_batch_size", description="Prompts per decode call (one request's prompt set, decoded "
            "SAM3_DECODER_PROMPT_BATCH at a time).", boundaries=[1, 2, 4, 8, 16, 32, 64])
        self._queue_wait = metrics.Histogram(
            "sam3_decoder_queue_wait_ms", description="Milliseconds a decode call waited for one of the replica's "
            "SAM3_DECODER_THREADS before it started.", boundaries=QUEUE_WAIT_BUCKETS_MS)
        self._model_ms = metrics.Histogram(
            "sam3_model_decode_ms", description="Milliseconds of a decode call, queue included, per model.",
            boundaries=QUEUE_WAIT_BUCKETS_MS, tag_keys=("model",))
        self.models = ReplicaModels(
            config, lambda name, bundle: ImageEngine(bundle, prompt_batch=config.decoder_prompt_batch),
            on_request=lambda model, seconds: self._model_ms.observe(seconds * 1000, tags={"model": model}))
        await self.models.get()  # the default model: routable only once it is loaded

    async def decode(
        self, embedding: torch.Tensor, prompts: list[Prompt], params: SegmentParams, size: tuple[int, int],
        deadline: float | None = None, model: str | None = None,
    ) -> SegmentResult:
        """`deadline`: wall-clock seconds (time.time()) past which nobody waits for the answer. `model`: a registry
        name (else the caller's multiplexed model id, else the default)."""
        self.counts["requests"] += 1
        deadline = time.time() + self.timeout_s if deadline is None else deadline
        started, queued = False, time.perf_counter()
        name, engine = await self.models.get(model)
        try:
            if not _expired(deadline):
                async with self.threads:
                    if not _expired(deadline):
                        started = True
                        self._queue_wait.observe((time.perf_counter() - queued) * 1000)
                        self._prompts.observe(len(prompts))
                        try:
                            return await self._run(engine, embedding, prompts, params, size, deadline)
                        finally:
                            self.models.stats.request(name, time.perf_counter() - queued)
            self.counts["dropped_expired"] += 1
            check_deadline(deadline, "before the decoder got to it")
            raise AssertionError("unreachable")
        except asyncio.CancelledError:
            if not started:
                self.counts["dropped_cancelled"] += 1
            raise

    async def _run(self, engine: ImageEngine, embedding, prompts, params, size, deadline: float) -> SegmentResult:
        stop = threading.Event()
        monotonic_deadline = time.monotonic() + (deadline - time.time())
        self.running += 1
        work = asyncio.ensure_future(asyncio.to_thread(
            engine.decode, embedding, prompts, params, size, monotonic_deadline, stop))
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
        """Counts of every decode, and per model (loads nothing)."""
        entries = sum(engine.text_cache_entries for engine in self.models.held().values())
        return {**self.counts, "running": self.running, "text_cache_entries": entries,
                "models": self.models.stats.snapshot()}

    def ready(self) -> bool:
        return True
