"""The image engine: batched preprocessing and backbone (`encode`), concept and visual decoding (`decode`)."""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

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
from serve_app.image.decoding import DecodeJob, decode_jobs
from serve_app.image.geometry import normalized_cxcywh_from_xyxy
from serve_app.image.models import ModelBundle

PIXEL_MEAN = 0.5  # Sam3ImageProcessor normalises with IMAGENET_STANDARD mean/std
PIXEL_STD = 0.5
AUTO_POINT_BATCH = 64  # grid points per tracker forward in automatic mask generation
AUTO_POOL_FACTOR = 2  # low-res automatic-mask candidates kept while the grid runs: this many times the mask cap
STABILITY_OFFSET = 1.0  # as SAM's automatic mask generator: IoU of masks cut at logit -1 and +1


class ImageEngine:
    """Plain class wrapping a `ModelBundle`; the Ray deployments and the benchmarks both use it."""

    def __init__(
        self, bundle: ModelBundle, text_cache_size: int = 1024, prompt_batch: int = 1, visual_batch: int = 1,
        auto_pool_factor: int = AUTO_POOL_FACTOR, max_result_bytes: int = pp.MAX_RESULT_RLE_BYTES,
    ) -> None:
        self.bundle = bundle
        self.prompt_batch = prompt_batch  # >1 batches prompts through DETR: faster, not bitwise equal to batch 1
        self.visual_batch = visual_batch  # >1 batches visual prompts through the mask decoder: the same caveat
        self.auto_pool_factor = max(0, auto_pool_factor)  # memory vs recomputation: results never depend on it
        self.auto_recomputed_chunks = 0  # grid chunks run twice because a winner had left the pool
        self.max_result_bytes = max_result_bytes  # RLE bytes of one decode's masks; over it: 413
        self.device, self.dtype = bundle.device, bundle.dtype
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._lock = threading.Lock()

    @property
    def text_cache_entries(self) -> int:
        return len(self._text_cache)

    # ---- encoder side -------------------------------------------------------------------------------

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) images of any sizes -> normalised (B, 3, S, S) on the device, resized there."""
        side = self.bundle.image_size
        batch = []
        for image in images:
            tensor = torch.from_numpy(np.ascontiguousarray(image)).to(self.device, non_blocking=True)
            tensor = tensor.permute(2, 0, 1)[None].float()
            tensor = F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
            batch.append(tensor)
        pixels = torch.cat(batch) / 255.0
        return ((pixels - PIXEL_MEAN) / PIXEL_STD).to(self.dtype)

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision backbone (ViT) alone: (B, 3, S, S) -> (B, tokens, hidden)."""
        return self.bundle.backbone(pixel_values).last_hidden_state

    def encode(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """One backbone pass over a batch; one CPU embedding (tokens, hidden) per image."""
        hidden = self.encode_pixels(self.preprocess(images))
        return [h.to("cpu", copy=True) for h in hidden]

    # ---- decoder side -------------------------------------------------------------------------------

    def _spatial(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """(tokens, hidden) embeddings -> (B, hidden, grid, grid) on the device."""
        grid = self.bundle.image_size // self.bundle.patch_size
        hidden = embeddings[0] if len(embeddings) == 1 else torch.stack(embeddings)
        hidden = hidden.to(self.device, self.dtype)
        return hidden.reshape(len(embeddings), grid, grid, -1).permute(0, 3, 1, 2)

    def detector_levels(self, embeddings: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], ...]:
        """The detector neck's FPN levels and position encodings, (B, ...) each: one pass for all the images."""
        fpn, pos = self.bundle.detector.vision_encoder.neck(self._spatial(embeddings))
        return tuple(fpn), tuple(pos)

    def tracker_levels(self, embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
        """What `Sam3TrackerModel(image_embeddings=...)` reads, (B, ...) per level, built as `get_image_features`
        builds it: one neck pass for all the images."""
        tracker, batch = self.bundle.tracker, len(embeddings)
        fpn, _ = tracker.vision_encoder.neck(self._spatial(embeddings))
        maps = list(fpn)
        maps[0] = tracker.mask_decoder.conv_s0(maps[0])
        maps[1] = tracker.mask_decoder.conv_s1(maps[1])
        maps = [m.flatten(2).permute(2, 0, 1) for m in maps]
        maps[-1] = maps[-1] + tracker.no_memory_embedding
        return [m.permute(1, 2, 0).view(batch, -1, *size) for m, size in zip(maps, tracker.backbone_feature_sizes)]

    def tracker_embeddings(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """One image's tracker features, (1, ...) per level."""
        return self.tracker_levels([embedding])

    def text_features(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text features (B, 32, D) and masks (B, 32), cached per phrase."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            ids, mask = self.bundle.tokenizer(missing)
            feats = self.bundle.detector.get_text_features(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).pooler_output
            with self._lock:
                for i, text in enumerate(missing):
                    self._text_cache[text] = (feats[i], mask[i].to(self.device))
                    while len(self._text_cache) > self._text_cache_size:
                        self._text_cache.popitem(last=False)
        with self._lock:
            pairs = [self._text_cache[t] for t in texts]
            for t in texts:
                self._text_cache.move_to_end(t)
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def decode(
        self, embedding: torch.Tensor, prompts: list[Prompt], params: SegmentParams, size: tuple[int, int],
        deadline: float | None = None, stop=None,
    ) -> SegmentResult:
        """All prompts of one image against its embedding; masks come back as RLE at the original size.

        deadline (time.monotonic()): past it, the work stops at the next chunk with a 504 (GatewayTimeout).
        stop (a threading.Event): once set, the work stops at the next chunk (postprocess.Stopped).
        Concept prompts go through DETR `prompt_batch` at a time, visual prompts `visual_batch` at a time.
        """
        result = decode_jobs(self, [DecodeJob(embedding, prompts, params, size, deadline, stop)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def detr(self, vision: SimpleNamespace, prompts: list[tuple[ConceptPrompt, tuple[int, int]]]):
        """One DETR forward over (prompt, image size) pairs, `vision` holding each pair's FPN rows; all pairs have the
        same number of exemplar boxes."""
        text_embeds, text_mask = self.text_features([p.text or "visual" for p, _ in prompts])
        boxes, labels = self._exemplar_tensors(prompts)
        return self.bundle.detector(
            vision_embeds=vision,
            text_embeds=SimpleNamespace(pooler_output=text_embeds),
            attention_mask=text_mask,
            input_boxes=boxes,
            input_boxes_labels=labels,
        )

    def concept_result(
        self, scores: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor, index: int, prompt: ConceptPrompt,
        params: SegmentParams, size: tuple[int, int], budget: pp.ResultBudget | None = None,
    ) -> PromptResult:
        """One pair's instances from its row of a DETR forward: threshold, NMS, cap, full-size RLE."""
        threshold = params.threshold if prompt.threshold is None else prompt.threshold
        keep, pixel_boxes = pp.select_concept_instances(
            scores, boxes, threshold, params.nms_iou, params.max_instances, size
        )
        instances = pp.instances_from_low_res(  # full-size masks a chunk at a time, never all at once
            masks[keep], size, scores[keep], pixel_boxes, params.mask_threshold, budget=budget,
        )
        return PromptResult(index, prompt, instances)

    def _exemplar_tensors(
        self, prompts: list[tuple[ConceptPrompt, tuple[int, int]]]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Exemplar boxes as the model wants them: normalised (cx, cy, w, h) by each pair's image size, labels 1/0
        (all prompts the same count)."""
        count = len(prompts[0][0].boxes)
        if count == 0:
            return None, None
        cxcywh = torch.tensor(
            np.stack([normalized_cxcywh_from_xyxy(p.boxes, w, h) for p, (h, w) in prompts]), dtype=torch.float32
        )
        labels = torch.tensor([[int(bool(v)) for v in p.box_labels] for p, _ in prompts], dtype=torch.long)
        return cxcywh.to(self.device, self.dtype), labels.to(self.device)

    def visual_inputs(self, prompt: VisualPrompt, size: tuple[int, int]) -> dict:
        """Points/boxes scaled to the model's square input, as Sam3TrackerProcessor scales them."""
        height, width = size
        side = self.bundle.image_size
        sx, sy = side / width, side / height
        inputs: dict = {}
        if prompt.points:
            pts = torch.tensor([[x * sx, y * sy] for x, y in prompt.points], dtype=torch.float32)
            inputs["input_points"] = pts[None, None].to(self.device, self.dtype)
            inputs["input_labels"] = torch.tensor(prompt.point_labels, dtype=torch.long)[None, None].to(self.device)
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            box = torch.tensor([[[x0 * sx, y0 * sy, x1 * sx, y1 * sy]]], dtype=torch.float32)
            inputs["input_boxes"] = box.to(self.device, self.dtype)
        if prompt.mask_logits is not None:
            logits = torch.as_tensor(np.asarray(prompt.mask_logits, dtype=np.float32))
            inputs["input_masks"] = logits.reshape(1, 1, *logits.shape[-2:]).to(self.device, self.dtype)
        return inputs

    def track(self, features: list[torch.Tensor], prompts: list[tuple[VisualPrompt, tuple[int, int]]]):
        """One mask-decoder forward over (prompt, image size) pairs that share points count, box, mask and
        multimask; `features` holds each pair's image rows."""
        each = [self.visual_inputs(p, size) for p, size in prompts]
        inputs = each[0] if len(each) == 1 else {key: torch.cat([e[key] for e in each]) for key in each[0]}
        return self.bundle.tracker(image_embeddings=features, multimask_output=prompts[0][0].multimask, **inputs)

    def visual_result(
        self, logits: torch.Tensor, iou: torch.Tensor, index: int, prompt: VisualPrompt, params: SegmentParams,
        size: tuple[int, int], budget: pp.ResultBudget | None = None,
    ) -> PromptResult:
        """One visual prompt's candidates from its row of a tracker forward, best predicted IoU first."""
        iou = iou.float()
        order = torch.argsort(iou, descending=True, stable=True)
        logits, iou = logits[order], iou[order]
        instances = pp.instances_from_low_res(logits, size, iou, budget=budget)
        low_res = logits.float().cpu().numpy() if params.return_logits else None
        return PromptResult(index, prompt, instances, low_res)

    def auto_result(
        self, features: list[torch.Tensor], index: int, prompt: AutoPrompt, params: SegmentParams,
        size: tuple[int, int], budget: pp.ResultBudget | None = None,
    ) -> PromptResult:
        """A grid of single positive clicks, 3 candidates each; keep confident, stable, non-duplicate masks.

        Streamed, AUTO_POINT_BATCH clicks at a time: each candidate's score, stability, emptiness and low-res box
        come from its own chunk; only the boxes and scores of those that pass are kept, and the low-res masks of
        a pool of auto_pool_factor x cap (the likely winners). NMS then runs on all boxes and stops at the cap.
        A winner that fell out of the pool is recomputed from its chunk (the same forward, the same bits), so the
        result equals filtering and NMS over all candidates at once; memory no longer grows with the grid.
        """
        cap = min(params.max_instances, prompt.max_masks) if prompt.max_masks > 0 else params.max_instances
        chunks = _auto_grid(prompt.points_per_side, self.bundle.image_size).split(AUTO_POINT_BATCH)
        pool = _CandidatePool(self.auto_pool_factor * cap, cap, prompt.nms_iou)
        ids, scores, boxes, offsets = [], [], [], []
        offset = 0
        for chunk in chunks:
            if budget is not None:
                budget.check_deadline()
            logits, chunk_scores = self._auto_forward(features, chunk)
            keep = chunk_scores > prompt.pred_iou_thresh
            if prompt.stability_score_thresh > 0:
                keep &= stability_scores(logits) >= prompt.stability_score_thresh
            keep &= (logits > 0).flatten(1).any(dim=1)  # empty masks have no box
            rows = torch.nonzero(keep).flatten()
            if rows.numel():
                kept = logits[rows]
                ids.append(rows + offset)
                scores.append(chunk_scores[rows])
                boxes.append(pp.mask_boxes(kept > 0))
                pool.add(ids[-1], scores[-1], boxes[-1], kept)
                del kept
            offsets.append(offset)
            offset += chunk_scores.numel()
            del logits, chunk_scores
        if not ids:
            return PromptResult(index, prompt, [])
        ids, scores, boxes = torch.cat(ids), torch.cat(scores), torch.cat(boxes)
        winners = pp.nms_capped(boxes, scores, prompt.nms_iou, cap)
        logits = self._auto_winners(features, chunks, offsets, ids[winners], pool)
        return PromptResult(index, prompt, pp.instances_from_low_res(logits, size, scores[winners], budget=budget))

    def _auto_forward(self, features: list[torch.Tensor], chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (3 x clicks, h, w) and predicted IoUs of one chunk of grid clicks."""
        out = self.bundle.tracker(
            image_embeddings=features,
            input_points=chunk[None, :, None].to(self.device, self.dtype),
            input_labels=torch.ones((1, len(chunk), 1), dtype=torch.long, device=self.device),
            multimask_output=True,
        )
        return out.pred_masks[0].flatten(0, 1).float(), out.iou_scores[0].flatten().float()

    def _auto_winners(
        self, features: list[torch.Tensor], chunks: tuple[torch.Tensor, ...], offsets: list[int],
        winner_ids: torch.Tensor, pool: _CandidatePool,
    ) -> torch.Tensor:
        """The low-res logits of the winners, in order: from the pool, else recomputed from their chunks."""
        found = pool.lookup(winner_ids)
        missing: dict[int, list[int]] = {}
        for j, candidate in enumerate(winner_ids.tolist()):
            if found[j] is None:
                missing.setdefault(bisect.bisect_right(offsets, candidate) - 1, []).append(j)
        rows: list[torch.Tensor | None] = [pool.logits[slot] if slot is not None else None for slot in found]
        for c, positions in missing.items():
            self.auto_recomputed_chunks += 1
            logits, _ = self._auto_forward(features, chunks[c])
            for j in positions:
                rows[j] = logits[int(winner_ids[j]) - offsets[c]].clone()
            del logits
        return torch.stack(rows)

    # ---- both -------------------------------------------------------------------------------------

    def segment(self, image: np.ndarray, prompts: list[Prompt], params: SegmentParams) -> SegmentResult:
        """The whole pipeline in-process (benchmark baseline and unit tests)."""
        embedding = self.encode([image])[0]
        return self.decode(embedding, prompts, params, (image.shape[0], image.shape[1]))


def _auto_grid(points_per_side: int, side: int) -> torch.Tensor:
    """Click centres of a points_per_side^2 grid over the model's square input, row by row."""
    ticks = (torch.arange(points_per_side, dtype=torch.float32) + 0.5) / points_per_side
    return torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), dim=-1).reshape(-1, 2) * side


class _CandidatePool:
    """Low-res automatic-mask candidates held while the grid runs: at most `capacity` of them.

    After each chunk it keeps the winners of NMS (capped) over what it holds plus the chunk, then the best scores
    of the rest. What it holds only decides what need not be recomputed at the end, never the result.
    """

    def __init__(self, capacity: int, cap: int, nms_iou: float) -> None:
        self.capacity, self.cap, self.nms_iou = capacity, cap, nms_iou
        self.ids = self.scores = self.boxes = self.logits = None

    def add(self, ids: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor, logits: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        if self.ids is not None:  # the pool's ids all precede the chunk's: the concatenation stays in grid order
            ids, scores = torch.cat([self.ids, ids]), torch.cat([self.scores, scores])
            boxes, logits = torch.cat([self.boxes, boxes]), torch.cat([self.logits, logits])
        if ids.numel() > self.capacity:
            winners = pp.nms_capped(boxes, scores, self.nms_iou, min(self.cap, self.capacity))
            rest = torch.ones(ids.numel(), dtype=torch.bool, device=ids.device)
            rest[winners] = False
            rest = torch.nonzero(rest).flatten()
            best = rest[torch.sort(scores[rest], descending=True, stable=True).indices[: self.capacity - winners.numel()]]
            keep = torch.sort(torch.cat([winners, best])).values
            ids, scores, boxes, logits = ids[keep], scores[keep], boxes[keep], logits[keep]
        self.ids, self.scores, self.boxes, self.logits = ids, scores, boxes, logits

    def lookup(self, wanted: torch.Tensor) -> list[int | None]:
        """The pool slot of each wanted candidate id, None where it is not held."""
        slots = {} if self.ids is None else {int(c): i for i, c in enumerate(self.ids.tolist())}
        return [slots.get(int(c)) for c in wanted.tolist()]


def stability_scores(logits: torch.Tensor) -> torch.Tensor:
    """IoU between each mask cut at -offset and at +offset: high when the mask edge is sharp."""
    flat = logits.flatten(1)
    inner = (flat > STABILITY_OFFSET).sum(dim=1).float()
    outer = (flat > -STABILITY_OFFSET).sum(dim=1).float()
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(outer))
