"""Decoder deployment: necks, text encoder (cached), DETR / mask decoders and post-processing, batched across requests.

Requests that arrive while the decoder is busy wait in a `Batcher` (per model) and form the next batch: one neck pass
per image, DETR over their stacked (image, prompt) pairs, the mask decoder over their stacked visual prompts
(`serve_app/image/decoding.py`). A request alone never waits. SAM3_DECODER_THREADS batches run at once, each in a
worker thread. A queued request whose deadline passes, or whose caller cancels it (a client that left), is dropped
before it reaches the model; a running one checks its deadline and a stop flag between chunks (prompt groups, mask
chunks, point batches) and stops at the next one, while the rest of its batch goes on.
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
from serve_app.core.stats import BatchStats
from serve_app.core.types import Prompt, SegmentParams, SegmentResult
from serve_app.image.batching import BatchedModel, Batcher, merged_stats
from serve_app.image.decoding import DecodeJob, ForwardStats, decode_jobs
from serve_app.image.engine import ImageEngine

QUEUE_WAIT_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]


@serve.deployment(name="Decoder")
class Decoder:
    async def __init__(self, config: Config) -> None:  # Serve awaits an async constructor
        replica_logging(config)
        self.config = config
        self.timeout_s = config.request_timeout_s  # the longest any request may take (a call without a deadline)
        self.max_batch, self.pair_batch, self.visual_batch = config.decoder_batches()
        self.running, self._running_lock = 0, threading.Lock()
        self.counts = {"requests": 0, "decoded": 0, "failed": 0, "dropped_expired": 0, "dropped_cancelled": 0,
                       "stopped_expired": 0, "stopped_cancelled": 0}
        self.batches, self.forwards = BatchStats(), ForwardStats()
        self._batch_hist = metrics.Histogram(
            "sam3_decoder_batch_size", description="Requests per decoder batch (SAM3_DECODER_MAX_BATCH_SIZE at most).",
            boundaries=[1, 2, 4, 8, 16, 32, 64])
        self._queue_wait = metrics.Histogram(
            "sam3_decoder_queue_wait_ms", description="Milliseconds a request waited in the decoder's batcher before "
            "its batch started.", boundaries=QUEUE_WAIT_BUCKETS_MS)
        self._model_ms = metrics.Histogram(
            "sam3_model_decode_ms", description="Milliseconds of a decode call, queue included, per model.",
            boundaries=QUEUE_WAIT_BUCKETS_MS, tag_keys=("model",))
        self.models = ReplicaModels(
            config, self._build,
            on_request=lambda model, seconds: self._model_ms.observe(seconds * 1000, tags={"model": model}))
        await self.models.get()  # the default model: routable only once it is loaded

    def _build(self, name: str, bundle) -> BatchedModel:
        """What the multiplexer holds per model (it calls this for a model this replica does not hold)."""
        engine = ImageEngine(bundle, prompt_batch=self.pair_batch, visual_batch=self.visual_batch)

        def run(jobs: list[DecodeJob]) -> list:
            return self._decode_batch(engine, jobs)

        batcher = Batcher(run, self.max_batch, self.config.decoder_batch_wait_timeout_s, self._record,
                          concurrency=self.config.decoder_threads, name="decoder")
        return BatchedModel(engine, batcher)

    async def decode(
        self, embedding: torch.Tensor, prompts: list[Prompt], params: SegmentParams, size: tuple[int, int],
        deadline: float | None = None, model: str | None = None, expected: int = 1,
    ) -> SegmentResult:
        """`deadline`: wall-clock seconds (time.time()) past which nobody waits for the answer. `model`: a registry
        name (else the caller's multiplexed model id, else the default). `expected`: requests the caller has in
        flight, this one included (a batch waits for that many, at most SAM3_DECODER_BATCH_WAIT_TIMEOUT_S)."""
        self.counts["requests"] += 1
        deadline = time.time() + self.timeout_s if deadline is None else deadline
        name, held = await self.models.get(model)
        if time.time() >= deadline:
            self.counts["dropped_expired"] += 1
            check_deadline(deadline, "before the decoder got to it")
        job = DecodeJob(embedding, prompts, params, size, time.monotonic() + (deadline - time.time()),
                        threading.Event())
        queued = time.perf_counter()
        try:
            result = await held.batcher.submit(job, expected, deadline)
        except asyncio.CancelledError:
            job.stop.set()  # a running job stops at its next chunk; a queued one is dropped unrun
            self.counts["stopped_cancelled" if job.started else "dropped_cancelled"] += 1
            raise
        except Exception as exc:
            if getattr(exc, "status_code", None) == 504:
                self.counts["stopped_expired" if job.started else "dropped_expired"] += 1
            else:
                self.counts["failed"] += 1
            raise
        finally:
            self.models.stats.request(name, time.perf_counter() - queued)
        self.counts["decoded"] += 1
        return result

    def _decode_batch(self, engine: ImageEngine, jobs: list[DecodeJob]) -> list:
        """The batcher's run (a worker thread): each job's wait goes to sam3_decoder_queue_wait_ms."""
        now = time.perf_counter()
        for job in jobs:
            self._queue_wait.observe((now - job.queued) * 1000)
        with self._running_lock:
            self.running += len(jobs)
        try:
            return decode_jobs(engine, jobs, stats=self.forwards)
        finally:
            with self._running_lock:
                self.running -= len(jobs)

    def _record(self, size: int) -> None:
        self.batches.record(size)
        self._batch_hist.observe(size)

    def get_stats(self) -> dict:
        """Counts of every decode, the batches and forwards they made, and per model (loads nothing)."""
        held = self.models.held().values()
        merged = merged_stats([model.batcher for model in held])
        return {**self.counts, "running": self.running, "queued": merged["queued"],
                "text_cache_entries": sum(model.engine.text_cache_entries for model in held),
                **self.batches.snapshot(),
                "mean_queue_wait_ms": merged["mean_queue_wait_ms"], "mean_batch_run_ms": merged["mean_batch_run_ms"],
                "forwards": self.forwards.snapshot(),
                "batching": {"max_batch_size": self.max_batch, "prompt_batch": self.pair_batch,
                             "visual_batch": self.visual_batch, "exact": self.config.decoder_exact},
                "models": self.models.stats.snapshot()}

    def ready(self) -> bool:
        return True
