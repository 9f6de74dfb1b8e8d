"""Decoding many requests in one pass: each neck once per image, DETR over stacked (image, prompt) pairs, the tracker's
mask decoder over stacked visual prompts.

Every request (a `DecodeJob`) keeps its own parameters, image size, deadline, stop flag, result budget and errors: a
request that fails, expires or is cancelled stops at its next chunk and leaves the others of its batch running.
What may share a forward: concept prompts with the same number of exemplar boxes (no padding changes a result);
visual prompts with the same number of points, a box or not, a mask input or not and the same `multimask`.
Automatic masks stream their own grid per request. With one job and batches of 1 (`SAM3_DECODER_EXACT`), every
forward is the one transformers makes for a single prompt, bit for bit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from serve_app.core.errors import BadRequest
from serve_app.core.registry import LITE_ONLY
from serve_app.core.types import (
    AutoPrompt,
    ConceptPrompt,
    Prompt,
    PromptResult,
    SegmentParams,
    SegmentResult,
    VisualPrompt,
)
from serve_app.image import postprocess as pp

if TYPE_CHECKING:
    from serve_app.image.engine import ImageEngine


@dataclass
class DecodeJob:
    """One request's decode: its embedding (tokens, hidden), prompts, parameters and original (height, width).

    deadline (time.monotonic()): past it, the job stops at its next chunk with a 504. stop (a threading.Event): once
    set (the client left), it stops at its next chunk (postprocess.Stopped)."""

    embedding: torch.Tensor
    prompts: list[Prompt]
    params: SegmentParams
    size: tuple[int, int]
    deadline: float | None = None
    stop: threading.Event | None = None
    queued: float = field(default_factory=time.perf_counter)  # when it was made (the batcher's wait starts)
    started: bool = False  # set when a batch takes it up (the deployment counts stopped vs dropped by it)
    error: BaseException | None = None
    results: list[PromptResult | None] = field(default_factory=list)
    budget: pp.ResultBudget | None = None
    _began: float = 0.0

    def begin(self, max_result_bytes: int) -> None:
        self.started, self._began = True, time.perf_counter()
        self.budget = pp.ResultBudget(max_result_bytes, self.deadline, self.stop)
        self.results = [None] * len(self.prompts)

    def live(self) -> bool:
        """False once it failed; checks its deadline and stop flag (a failure is recorded, not raised)."""
        return self.guard(self.budget.check_deadline)

    def guard(self, work: Callable[[], object]) -> bool:
        """Runs `work` for this job; its exception becomes the job's error (the batch goes on). True if it ran."""
        if self.error is not None:
            return False
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - the job's own error: 504, 413, 400, Stopped
            self.error = exc
            return False
        return True

    def put(self, index: int, work: Callable[[], PromptResult]) -> None:
        """Prompt `index`'s result from `work`, unless the job already failed (its error is recorded)."""
        self.guard(lambda: self.results.__setitem__(index, work()))

    def answer(self) -> SegmentResult | BaseException:
        if self.error is not None:
            return self.error
        concept = [i for i, p in enumerate(self.prompts) if isinstance(p, ConceptPrompt)]
        if self.params.cross_prompt_nms_iou is not None and concept:
            kept = pp.cross_prompt_nms([self.results[i].instances for i in concept], self.params.cross_prompt_nms_iou)
            for i, instances in zip(concept, kept):
                self.results[i].instances = instances
        elapsed = (time.perf_counter() - self._began) * 1000
        return SegmentResult(self.size[0], self.size[1], self.results, {"decode_ms": elapsed})


@dataclass
class ForwardStats:
    """Forwards run and what each carried, since the replica started (GET /v1/stats, `decoder.forwards`)."""

    necks: int = 0  # detector or tracker neck passes
    neck_images: int = 0
    detr: int = 0  # DETR forwards
    detr_pairs: int = 0  # (image, prompt) pairs through them
    tracker: int = 0  # mask-decoder forwards for visual prompts (automatic masks not counted)
    tracker_prompts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict:
        with self._lock:
            return {k: getattr(self, k) for k in ("necks", "neck_images", "detr", "detr_pairs", "tracker",
                                                  "tracker_prompts")}


def decode_jobs(
    engine: ImageEngine, jobs: list[DecodeJob], pair_batch: int | None = None, visual_batch: int | None = None,
    stats: ForwardStats | None = None,
) -> list[SegmentResult | BaseException]:
    """Each job's result, or the exception it ended with, in order. Pairs per DETR forward and visual prompts per
    mask-decoder forward: the engine's `prompt_batch` and `visual_batch` unless given."""
    stats = stats or ForwardStats()
    pair_batch = engine.prompt_batch if pair_batch is None else pair_batch
    visual_batch = engine.visual_batch if visual_batch is None else visual_batch
    for job in jobs:
        job.begin(engine.max_result_bytes)
    with torch.inference_mode():
        _concepts(engine, jobs, max(1, pair_batch), stats)
        _visuals(engine, jobs, max(1, visual_batch), stats)
    return [job.answer() for job in jobs]


def _chunks(items: list, key: Callable, size: int) -> list[list]:
    """Consecutive runs of at most `size` items sharing `key(item)`, groups in order of first appearance."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def _rows(levels: tuple[torch.Tensor, ...], index: list[int]) -> tuple[torch.Tensor, ...]:
    """Each level's rows for the pairs of one forward: the levels themselves when the pairs are the images in order,
    expanded (no copy) when they all come from one image, else gathered."""
    if index == list(range(levels[0].shape[0])):
        return levels
    if len(set(index)) == 1:
        return tuple(level[index[0] : index[0] + 1].expand(len(index), *level.shape[1:]) for level in levels)
    at = torch.tensor(index, device=levels[0].device)
    return tuple(level.index_select(0, at) for level in levels)


def _isolated(items: list, run: Callable[[list], object], job_of: Callable = lambda item: item) -> list[tuple]:
    """[(items, run(items))] for the items of one forward. If it raises, each item runs alone and only those whose
    own forward fails get the error, so one request's bad input (or a batch too large for the device's memory)
    never fails the rest of its batch."""
    if not items:
        return []
    try:
        return [(items, run(items))]
    except Exception as exc:  # noqa: BLE001 - recorded on the job(s) it belongs to
        if len(items) == 1:
            job = job_of(items[0])
            job.error = job.error or exc
            return []
        return [part for item in items for part in _isolated([item], run, job_of)]


def _concepts(engine: ImageEngine, jobs: list[DecodeJob], pair_batch: int, stats: ForwardStats) -> None:
    images = [job for job in jobs if any(isinstance(p, ConceptPrompt) for p in job.prompts) and job.live()]
    for group, (fpn, pos) in _isolated(images, lambda js: engine.detector_levels([j.embedding for j in js])):
        stats.add(necks=1, neck_images=len(group))
        row = {id(job): k for k, job in enumerate(group)}
        pairs = [(job, i, p) for job in group for i, p in enumerate(job.prompts) if isinstance(p, ConceptPrompt)]

        def detr(chunk: list, fpn=fpn, pos=pos, row=row):
            index = [row[id(job)] for job, _, _ in chunk]
            vision = SimpleNamespace(fpn_hidden_states=_rows(fpn, index), fpn_position_encoding=_rows(pos, index),
                                     hidden_states=None, attentions=None)
            return engine.detr(vision, [(p, job.size) for job, _, p in chunk])

        for chunk in _chunks(pairs, lambda pair: len(pair[2].boxes), pair_batch):
            for part, outputs in _isolated([pair for pair in chunk if pair[0].live()], detr, lambda pair: pair[0]):
                stats.add(detr=1, detr_pairs=len(part))
                scores = pp.concept_scores(outputs.pred_logits, outputs.presence_logits)
                for r, (job, i, prompt) in enumerate(part):
                    job.put(i, lambda r=r, job=job, i=i, prompt=prompt: engine.concept_result(
                        scores[r], outputs.pred_boxes[r], outputs.pred_masks[r], i, prompt, job.params, job.size,
                        job.budget))


def _visual_key(pair: tuple[DecodeJob, int, VisualPrompt]) -> tuple:
    """Visual prompts that may share a forward; one with a mask input (a refinement) always runs alone."""
    prompt = pair[2]
    alone = None if prompt.mask_logits is None else id(prompt)
    return len(prompt.points), prompt.box is not None, alone, bool(prompt.multimask)


def _visuals(engine: ImageEngine, jobs: list[DecodeJob], visual_batch: int, stats: ForwardStats) -> None:
    wanted = [job for job in jobs if any(isinstance(p, (VisualPrompt, AutoPrompt)) for p in job.prompts)]
    if wanted and engine.bundle.tracker is None:
        for job in wanted:
            job.error = job.error or BadRequest(LITE_ONLY.format(model=engine.bundle.name))
        return
    images = [job for job in wanted if job.live()]
    for group, levels in _isolated(images, lambda js: engine.tracker_levels([j.embedding for j in js])):
        stats.add(necks=1, neck_images=len(group))
        _clicks(engine, group, levels, visual_batch, stats)
        for k, job in enumerate(group):
            for i, prompt in enumerate(job.prompts):
                if isinstance(prompt, AutoPrompt) and job.live():
                    features = [level[k : k + 1] for level in levels]
                    job.put(i, lambda: engine.auto_result(features, i, prompt, job.params, job.size, job.budget))


def _clicks(engine: ImageEngine, group: list[DecodeJob], levels: list[torch.Tensor], visual_batch: int,
            stats: ForwardStats) -> None:
    """The visual prompts of `group` (whose tracker levels are `levels`), stacked by shape."""
    row = {id(job): k for k, job in enumerate(group)}

    def track(chunk: list):
        features = list(_rows(tuple(levels), [row[id(job)] for job, _, _ in chunk]))
        return engine.track(features, [(p, job.size) for job, _, p in chunk])

    clicks = [(job, i, p) for job in group for i, p in enumerate(job.prompts) if isinstance(p, VisualPrompt)]
    for chunk in _chunks(clicks, _visual_key, visual_batch):
        for part, out in _isolated([pair for pair in chunk if pair[0].live()], track, lambda pair: pair[0]):
            stats.add(tracker=1, tracker_prompts=len(part))
            for r, (job, i, prompt) in enumerate(part):
                job.put(i, lambda r=r, job=job, i=i, prompt=prompt: engine.visual_result(
                    out.pred_masks[r, 0], out.iou_scores[r, 0], i, prompt, job.params, job.size, job.budget))
