"""Bounded memory for the largest requests the API accepts (docs/memory.md).

Two kinds of tests:

- Equality: the streamed algorithms give bitwise the results of the all-at-once ones they replaced (automatic
  masks: filters and NMS over every candidate of the grid at once, transcribed below from the code before the
  change; full-size masks cut in chunks; NMS stopped at the cap).
- Budget: each documented maximum runs in a fresh process (this file run as a script), whose peak RSS over its
  resident memory before the work (VmHWM after /proc/self/clear_refs, else a 5 ms VmRSS sampler) is printed and
  asserted under the documented budget. A watchdog ends the child if it grows past a hard limit, so a regression
  fails the test instead of exhausting the machine.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.core.config import Config
from serve_app.core.stats import allocator_environ, status_bytes
from serve_app.core.types import AutoPrompt, ConceptPrompt, SegmentParams
from serve_app.image import postprocess as pp
from serve_app.image.codecs import rle_encode_many
from serve_app.image.engine import AUTO_POINT_BATCH, ImageEngine, stability_scores
from serve_app.image.geometry import nms_torch
from serve_app.image.models import load_bundle
from serve_app.image.prompts import MAX_POINTS_PER_SIDE

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024**2
SLACK = 96 * MIB  # allocator arenas, Python objects, thread stacks: what no formula term counts
HARD_LIMIT = 3 * 1024 * MIB  # the watchdog ends a child whose RSS grows this much over its baseline


# ---------------------------------------------------------------------------------------------- equality


@pytest.fixture(scope="module")
def engine() -> ImageEngine:
    return ImageEngine(load_bundle(Config(device="cpu")))


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    import cv2

    return cv2.resize(base, (width, height), interpolation=cv2.INTER_LINEAR)


def _old_build_instances(masks: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor) -> list[tuple]:
    """build_instances before the change: RLE of the whole stack, areas counted on the tensor."""
    rles = rle_encode_many(masks.cpu().numpy())
    areas = masks.flatten(1).sum(dim=1).tolist() if masks.shape[0] else []
    return [
        (rle["counts"], tuple(float(v) for v in box), float(score), int(area))
        for rle, box, score, area in zip(rles, boxes.tolist(), scores.tolist(), areas)
    ]


@torch.inference_mode()
def _old_decode_auto(engine: ImageEngine, embedding, prompt: AutoPrompt, params: SegmentParams, size) -> tuple:
    """ImageEngine._decode_auto as it was: every candidate's logits concatenated, filtered, NMS over all of them.

    Also returns the rank (by score among the candidates that passed the filters) of each winner, so a test can
    tell that a winner lay outside the bounded pool the streamed version keeps.
    """
    features = engine.tracker_embeddings(embedding)
    n, side = prompt.points_per_side, engine.bundle.image_size
    ticks = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    grid = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), dim=-1).reshape(-1, 2) * side
    logits_all, scores_all = [], []
    for chunk in grid.split(AUTO_POINT_BATCH):
        out = engine.bundle.tracker(
            image_embeddings=features,
            input_points=chunk[None, :, None].to(engine.device, engine.dtype),
            input_labels=torch.ones((1, len(chunk), 1), dtype=torch.long, device=engine.device),
            multimask_output=True,
        )
        logits_all.append(out.pred_masks[0].flatten(0, 1).float())
        scores_all.append(out.iou_scores[0].flatten().float())
    logits, scores = torch.cat(logits_all), torch.cat(scores_all)
    keep = scores > prompt.pred_iou_thresh
    if prompt.stability_score_thresh > 0:
        keep &= stability_scores(logits) >= prompt.stability_score_thresh
    logits, scores = logits[keep], scores[keep]
    nonempty = (logits > 0).flatten(1).any(dim=1)
    logits, scores = logits[nonempty], scores[nonempty]
    ranks = torch.empty(scores.numel(), dtype=torch.long)
    ranks[torch.sort(scores, descending=True, stable=True).indices] = torch.arange(scores.numel())
    if logits.shape[0] > 1:
        order = nms_torch(pp.mask_boxes(logits > 0), scores, prompt.nms_iou)
        logits, scores, ranks = logits[order], scores[order], ranks[order]
    cap = min(params.max_instances, prompt.max_masks) if prompt.max_masks > 0 else params.max_instances
    logits, scores, ranks = logits[:cap], scores[:cap], ranks[:cap]
    masks = pp.upsample_logits(logits, size)
    return _old_build_instances(masks, pp.mask_boxes(masks), scores), ranks.tolist()


def _served(result) -> list[tuple]:
    return [(i.rle["counts"], i.box, i.score, i.area) for i in result.instances]


AUTO_CASES = [  # points_per_side, thresholds, NMS IoU, cap: many candidates pass, NMS has work, the cap bites
    (8, AutoPrompt(8, pred_iou_thresh=0.5, nms_iou=0.7), 100),
    (8, AutoPrompt(8, pred_iou_thresh=0.0, nms_iou=0.3, max_masks=5), 100),
    (16, AutoPrompt(16), 100),
    (16, AutoPrompt(16, pred_iou_thresh=0.3, stability_score_thresh=0.6, nms_iou=0.5), 100),
    (16, AutoPrompt(16, pred_iou_thresh=0.2, nms_iou=0.9), 7),
    (16, AutoPrompt(16, pred_iou_thresh=0.2, nms_iou=1.0), 40),
]


@pytest.mark.parametrize(("pps", "prompt", "max_instances"), AUTO_CASES)
def test_streamed_automatic_masks_equal_the_all_at_once_algorithm(engine, pps, prompt, max_instances):
    """Pool factor 0 holds no candidate (every winner is recomputed from its chunk); 1 and 2 hold a few."""
    size = (48, 64) if pps == 8 else (150, 200)
    embedding = engine.encode([_image(*size, seed=pps)])[0]
    params = SegmentParams(max_instances=max_instances)
    expected, ranks = _old_decode_auto(engine, embedding, prompt, params, size)
    assert len(expected) >= 1
    for pool_factor in (0, 1, 2):
        streamed = ImageEngine(engine.bundle, auto_pool_factor=pool_factor)
        got = _served(streamed.decode(embedding, [prompt], params, size).prompts[0])
        assert got == expected, pool_factor  # RLE counts, boxes, scores (float32 values), areas: bit for bit
        if pool_factor == 0:
            assert streamed.auto_recomputed_chunks >= 1
        print(f"pps {pps} cap {max_instances}/{prompt.max_masks}: {len(got)} masks, winner ranks {ranks[:12]}, "
              f"pool x{pool_factor}: {streamed.auto_recomputed_chunks} chunk(s) recomputed")


def test_nms_capped_is_the_prefix_of_full_nms():
    rng = np.random.default_rng(7)
    for trial in range(24):
        n = int(rng.integers(1, 600))
        xy = rng.integers(0, 60, (n, 2)).astype(np.float32)
        wh = rng.integers(1, 30, (n, 2)).astype(np.float32)
        boxes = torch.from_numpy(np.concatenate([xy, xy + wh], axis=1))
        values = rng.choice([0.1, 0.5, 0.9], n) if trial % 2 else rng.random(n)  # ties, then distinct scores
        scores = torch.from_numpy(values.astype(np.float32))
        iou = float(rng.choice([0.0, 0.3, 0.7, 1.0]))
        full = nms_torch(boxes, scores, iou)
        for cap in (1, 3, 100, n + 5):
            assert pp.nms_capped(boxes, scores, iou, cap).tolist() == full[:cap].tolist()


def test_full_size_chunks_equal_whole_stack_upsampling():
    rng = torch.Generator().manual_seed(0)
    logits = torch.randn((9, 32, 32), generator=rng) * 4
    size = (301, 207)
    whole_logits, whole_probs = pp.upsample_logits(logits, size), pp.upsample_probabilities(logits, size, 0.5)
    one_mask = size[0] * size[1] * pp.BYTES_PER_MASK_PIXEL
    for chunk_bytes in (1, one_mask * 2, one_mask * 4, 1 << 40):
        parts = list(pp.full_size_chunks(logits, size, chunk_bytes=chunk_bytes))
        assert torch.equal(torch.cat([m for _, m in parts]), whole_logits)
        assert parts[0][0].stop == min(9, max(1, chunk_bytes // one_mask))
        probs = torch.cat([m for _, m in pp.full_size_chunks(logits, size, 0.5, chunk_bytes=chunk_bytes)])
        assert torch.equal(probs, whole_probs)
        instances = pp.instances_from_low_res(logits, size, torch.arange(9.0), chunk_bytes=chunk_bytes)
        assert [(i.rle["counts"], i.box, i.area) for i in instances] == [
            (c, b, a) for c, b, _, a in _old_build_instances(whole_logits, pp.mask_boxes(whole_logits), torch.arange(9.0))
        ]


def test_an_answer_over_the_rle_budget_is_a_413_raised_while_encoding(engine):
    """The RLE of one answer is bounded (MAX_RESULT_RLE_BYTES): past it the decode stops with a clear 413."""
    from serve_app.core.errors import PayloadTooLarge

    embedding = engine.encode([_image(64, 64)])[0]
    params = SegmentParams(threshold=0.0, nms_iou=None)
    prompts = [ConceptPrompt(text="object")] * 3
    full = engine.decode(embedding, prompts, params, (300, 400))
    used = _rle_bytes(full)
    assert used > 0 and pp.MAX_RESULT_RLE_BYTES >= 256 * MIB
    assert _rle_bytes(ImageEngine(engine.bundle, max_result_bytes=used).decode(embedding, prompts, params, (300, 400))) == used
    with pytest.raises(PayloadTooLarge, match="MiB as RLE") as caught:
        ImageEngine(engine.bundle, max_result_bytes=used // 2).decode(embedding, prompts, params, (300, 400))
    assert caught.value.status_code == 413


def test_work_past_the_request_timeout_stops_at_the_next_chunk(engine):
    """The ingress answers 504 after SAM3_REQUEST_TIMEOUT_S; the decoder then stops too instead of running on."""
    from serve_app.core.errors import GatewayTimeout

    embedding = engine.encode([_image(64, 64)])[0]
    params = SegmentParams(threshold=0.0, nms_iou=None)
    size = (2000, 3000)  # 16 prompts x 16 instances of 6 MP: seconds of upsampling and RLE on this CPU
    prompts = [ConceptPrompt(text=f"object {i}") for i in range(16)]
    started = time.perf_counter()
    full = engine.decode(embedding, prompts[:1], params, size)
    one_prompt_s = time.perf_counter() - started
    assert sum(len(p.instances) for p in full.prompts) > 0
    deadline = time.monotonic() + one_prompt_s / 2
    started = time.perf_counter()
    with pytest.raises(GatewayTimeout, match="SAM3_REQUEST_TIMEOUT_S") as caught:
        engine.decode(embedding, prompts, params, size, deadline=deadline)
    stopped_s = time.perf_counter() - started
    assert caught.value.status_code == 504
    print(f"one prompt: {one_prompt_s:.2f} s; 16 prompts with a deadline of {one_prompt_s / 2:.2f} s stopped after "
          f"{stopped_s:.2f} s")
    assert stopped_s < 2 * one_prompt_s + 1.0  # within about one chunk past the deadline, not 16 prompts' time
    with pytest.raises(GatewayTimeout):  # automatic masks check it between grid chunks
        engine.decode(embedding, [AutoPrompt(64)], SegmentParams(), (48, 64), deadline=time.monotonic() - 1)


def test_one_pass_propagation_equals_the_kept_state_one():
    """A render's propagation drops each frame's outputs once the model can no longer read them: same masks.

    Reconditioning every 2nd frame on any match (every 16th, on confident ones, in the checkpoint) piles
    conditioning frames up within 28 frames, so those beyond the latest max_cond_frame_num lose their memories too.
    """
    from serve_app.video.session import VideoSession
    from tests.videos import moving_frames

    engine = _tiny_engine()
    engine.bundle.video.recondition_every_nth_frame = 2
    engine.bundle.video.high_conf_thresh = engine.bundle.video.high_iou_thresh = 0.0  # every match reconditions
    frames = moving_frames(28, 48, 64)
    results = []
    for one_pass in (False, True):
        session = VideoSession(engine, frames, 10.0, max_objects=4)
        session.add_text("square")
        results.append([(r.frame_index, r.objects) for r in session.propagate("forward", 0, None, one_pass=one_pass)])
        outputs = session._hf.output_dict_per_obj.values()
        held = {f for per_obj in outputs for f in per_obj["non_cond_frame_outputs"]}
        cond = [out for per_obj in outputs for out in per_obj["cond_frame_outputs"].values()]
        stripped = sum("maskmem_features" not in out for out in cond)
        if one_pass:
            assert session.memory_window < len(frames) and len(held) <= session.memory_window
            assert stripped > 0 and all("object_pointer" in out for out in cond)
        else:
            assert len(held) > session.memory_window and stripped == 0
    assert len(results[0]) == len(frames) and sum(len(objects) for _, objects in results[0]) > 0
    assert results[1] == results[0]


# ------------------------------------------------------------------------------------------------ budget


class _Meter:
    """Peak RSS of this process from `start()` on: VmHWM reset by clear_refs, and a sampler as a cross-check."""

    def __init__(self, hard_limit: int, progress=None) -> None:
        self.hard_limit, self.baseline, self.sampled = hard_limit, 0, 0
        self.hwm_reset = False
        self.progress, self.by_progress = progress, {}  # peak RSS at each value progress() took
        self._stop = threading.Event()

    def start(self) -> None:
        gc.collect()
        self.baseline = status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.sampled = self.baseline
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            rss = status_bytes("VmRSS")
            self.sampled = max(self.sampled, rss)
            if self.progress is not None:
                step = self.progress()
                self.by_progress[step] = max(self.by_progress.get(step, 0), rss - self.baseline)
            if rss - self.baseline > self.hard_limit:
                print(json.dumps({"killed": True, "extra_mib": round((rss - self.baseline) / MIB, 1)}), flush=True)
                os._exit(3)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()  # a daemon thread still running at exit can abort the interpreter's shutdown
        hwm = status_bytes("VmHWM") if self.hwm_reset else 0
        peak = max(hwm, self.sampled)
        return {
            "baseline_mib": round(self.baseline / MIB, 1), "peak_mib": round(peak / MIB, 1),
            "extra_mib": round((peak - self.baseline) / MIB, 1), "hwm_reset": self.hwm_reset,
        }


def _tiny_engine(num_queries: int | None = None) -> ImageEngine:
    """tiny-random; with num_queries, the same toy SAM3 with as many DETR queries (facebook/sam3 has 200)."""
    if num_queries is None:
        return ImageEngine(load_bundle(Config(device="cpu")))
    from transformers import Sam3VideoModel

    from serve_app.image import models

    config = models.tiny_video_config()
    config.detector_config.detr_decoder_config.num_queries = num_queries
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(models.TINY_SEED)
        video = Sam3VideoModel(config)
    with torch.no_grad():
        video.detector_model.detr_decoder.presence_head.layer3.bias.fill_(models.TINY_PRESENCE_BIAS)
    return ImageEngine(load_bundle(Config(device="cpu"), video.eval()))


def _rle_bytes(result) -> int:
    return sum(len(i.rle["counts"]) for p in result.prompts for i in p.instances)


# The budget's terms, as docs/memory.md writes them, from the model's own dimensions.


def _dims(engine: ImageEngine) -> dict:
    grid = engine.bundle.image_size // engine.bundle.patch_size
    return {"g": grid, "low": 4 * grid, "C": int(engine.bundle.tracker.config.mask_decoder_config.hidden_size)}


def masks_chunk_bytes(height: int, width: int, masks: int | None = None) -> int:
    """One chunk of k full-size masks: 5 B/px each while cut (float32 + bool); RLE: 2 B/px each + 4 B/px once."""
    k = pp.mask_chunk_size((height, width))
    k = k if masks is None else max(1, min(k, masks))
    return max(5 * k, 2 * k + 4) * height * width


def auto_grid_bytes(dims: dict, cap: int, survivors: int, pool_factor: int = 2) -> int:
    """Automatic masks besides the final chunk: one grid chunk's forward, the pool, the survivors' boxes/scores."""
    g, low, c = dims["g"], dims["low"], dims["C"]
    per_point = 4 * 4 * (c * g * g + c // 4 * (2 * g) ** 2 + c // 8 * low**2)  # 4 live float32 copies per level
    pool = 2 * pool_factor * cap * low * low * 4  # the pool and the chunk it is merged with, float32
    return AUTO_POINT_BATCH * per_point + pool + survivors * 64


def workload_automask(args: dict) -> dict:
    """Segmind's automatic masks at points_per_side 128 on a 64x48 PNG (the request that took main down)."""
    engine = _tiny_engine()
    size = (48, 64)
    embedding = engine.encode([_image(*size)])[0]
    params = SegmentParams()
    engine.decode(embedding, [AutoPrompt(4)], params, size)  # warm-up: first-call allocations are baseline
    meter = _Meter(args["hard_limit"])
    meter.start()
    started = time.perf_counter()
    result = engine.decode(embedding, [AutoPrompt(args["points_per_side"])], params, size)
    seconds = time.perf_counter() - started
    report = meter.stop()
    candidates = 3 * args["points_per_side"] ** 2
    budget = auto_grid_bytes(_dims(engine), params.max_instances, candidates) + masks_chunk_bytes(*size) + SLACK
    return {**report, "budget_mib": round(budget / MIB, 1), "seconds": round(seconds, 1),
            "instances": len(result.prompts[0].instances), "candidates": candidates,
            "recomputed_chunks": engine.auto_recomputed_chunks}


def workload_concepts(args: dict) -> dict:
    """`prompts` concept prompts x max_instances instances (threshold 0, no NMS) on an HxW image."""
    engine = _tiny_engine(num_queries=200)
    height, width = args["height"], args["width"]
    embedding = engine.encode([_image(256, 256)])[0]  # the decoder never sees pixels: only the size matters
    params = SegmentParams(threshold=0.0, nms_iou=None, max_instances=args["max_instances"])
    prompts = [ConceptPrompt(text=f"object {i}") for i in range(args["prompts"])]
    engine.decode(embedding, prompts[:1], params, (64, 64))  # warm-up
    meter = _Meter(args["hard_limit"])
    meter.start()
    started = time.perf_counter()
    result = engine.decode(embedding, prompts, params, (height, width))
    seconds = time.perf_counter() - started
    report = meter.stop()
    rle = _rle_bytes(result)
    budget = masks_chunk_bytes(height, width) + 2 * rle + SLACK  # the RLE as bytes and as str
    return {**report, "budget_mib": round(budget / MIB, 1), "seconds": round(seconds, 1),
            "instances": [len(p.instances) for p in result.prompts], "rle_mib": round(rle / MIB, 2),
            "rle_limit_mib": round(engine.max_result_bytes / MIB)}


def render_frame_bytes(height: int, width: int, objects: int) -> int:
    """One rendered frame: its masks (bool + uint8 for the contours), the blend (float32 and its masked copies,
    measured 40 B/px), libx264's own state (look-ahead, reference frames: measured 70 B/px at 1080p), the frame's
    preprocessing for the model (uint8 and float32 before the resize, 15 B/px), and its masks being cut."""
    pixels = height * width
    return objects * 2 * pixels + (40 + 72 + 15) * pixels + masks_chunk_bytes(height, width, objects)


def tracker_state_bytes(session, frames: int, objects: int) -> int:
    """What transformers keeps per tracked object and frame once high_res_masks are dropped (low-res logits, the
    memory in bfloat16, its positional encoding in float32 on the CPU, the object pointer), for the frames a
    one-pass render keeps of each object: the memory window, the frames processed ahead of the one yielded
    (hotstart), the latest max_cond_frame_num conditioning frames and those inside num_maskmem."""
    dims, config = _dims(session.engine), session._tracker_config
    g, low, c = dims["g"], dims["low"], dims["C"]
    ahead = int(getattr(session.bundle.video, "hotstart_delay", 0))
    kept = min(frames, session.memory_window + ahead + int(config.max_cond_frame_num) + int(config.num_maskmem) + 1)
    return kept * objects * (low * low * 4 + 64 * g * g * 2 + 64 * g * g * 4 + c * 4)


def workload_render(args: dict) -> dict:
    """Oxen's videos/generate: track a text through every frame and render the mp4 (SessionState.render)."""
    from serve_app.video.actor import SessionState
    from tests.videos import write_long_video

    engine = _tiny_engine()
    state = SessionState(Config(device="cpu", video_max_objects=args["max_objects"]), engine)
    upload = write_long_video(args["frames"], args["height"], args["width"], fps=25)  # what Oxen clients send
    state.load(upload, None, None)
    del upload
    held = state.video.frames  # 90 frames of 1080p (534 MiB) are over SAM3_VIDEO_MAX_DECODED_BYTES (512 MiB): re-read
    # from the container, a cache kept
    cache = 0 if isinstance(held, list) else held.capacity * args["height"] * args["width"] * 3
    meter = _Meter(args["hard_limit"], progress=lambda: state.frames_propagated)
    meter.start()
    started = time.perf_counter()
    mp4 = state.render("square", apply_mask=True)
    seconds = time.perf_counter() - started
    report = meter.stop()
    quarter = max(1, args["frames"] // 4)  # peak RSS while each quarter of the frames was rendered
    peaks = [max((v for k, v in meter.by_progress.items() if q * quarter <= k < (q + 1) * quarter), default=0)
             for q in range(4)]
    objects = max(1, state.objects_rendered)
    budget = (render_frame_bytes(args["height"], args["width"], objects) + 2 * len(mp4)
              + tracker_state_bytes(state.session, args["frames"], objects) + cache + SLACK)
    return {**report, "budget_mib": round(budget / MIB, 1), "seconds": round(seconds, 1),
            "mp4_mib": round(len(mp4) / MIB, 2), "frames_propagated": state.frames_propagated, "objects": objects,
            "peak_by_quarter_mib": [round(v / MIB, 1) for v in peaks],
            "decoded_frames_mib": round(args["frames"] * args["height"] * args["width"] * 3 / MIB, 1),
            "frame_cache_mib": round(cache / MIB, 1), "frames_held": type(held).__name__}


WORKLOADS = {"automask": workload_automask, "concepts": workload_concepts, "render": workload_render}


def _run(name: str, timeout: float = 1800, **args) -> dict:
    args.setdefault("hard_limit", HARD_LIMIT)
    # glibc malloc as every Ray process runs it (docs/memory.md: under glibc's defaults the peak creeps up a frame
    # at a time, a measure of an allocator the service does not use)
    env = {**allocator_environ(os.environ), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__, name, json.dumps(args)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{name} printed no report (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    print(f"{name} {args}: {report}")
    assert not report.get("killed"), f"{name} grew past the hard limit: {report}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["extra_mib"] <= report["budget_mib"], report
    return report


@pytest.mark.slow
def test_automatic_masks_at_points_per_side_128_fit_the_budget():
    """The documented maximum, 128 x 128 x 3 = 49,152 candidates (main: 19 GB; 256 grid forwards, minutes on CPU)."""
    report = _run("automask", points_per_side=MAX_POINTS_PER_SIDE)
    assert report["instances"] >= 1 and report["candidates"] == 49_152  # main: +1.1 GiB already at 64 (12,288)


def test_one_prompt_with_100_instances_on_a_40_megapixel_image_fits_the_budget():
    """The largest image (SAM3_MAX_IMAGE_PIXELS) with the most instances one prompt returns (SAM3_MAX_INSTANCES)."""
    config = Config()
    height, width = 5000, config.max_image_pixels // 5000
    report = _run("concepts", prompts=1, max_instances=config.max_instances, height=height, width=width)
    assert report["instances"] == [config.max_instances]


def test_16_prompts_with_100_instances_each_fit_the_budget():
    """SAM3_MAX_PROMPTS x SAM3_MAX_INSTANCES = 1,600 instances, all streamed through one chunk at a time."""
    config = Config()
    report = _run("concepts", prompts=config.max_prompts, max_instances=config.max_instances, height=1000, width=1000)
    assert report["instances"] == [config.max_instances] * config.max_prompts


@pytest.mark.maxima  # 1,600 masks of 40 MP: 8.5 min on 2 cores; make test-maxima
def test_16_prompts_with_100_instances_on_a_40_megapixel_image_fit_the_budget():
    """The documented maximum of one image request, whole: 1,600 masks of 40 MP (minutes on 2 CPU cores)."""
    config = Config()
    height, width = 5000, config.max_image_pixels // 5000
    report = _run(
        "concepts", timeout=3600, prompts=config.max_prompts, max_instances=config.max_instances,
        height=height, width=width,
    )
    assert report["instances"] == [config.max_instances] * config.max_prompts


@pytest.mark.slow
def test_oxen_render_of_a_long_video_fits_the_budget():
    """90 frames of 1080p, up to 4 objects: one frame's memory and the tracking window's, flat to the end.

    Frames x objects x pixels never pile up: once the tracking window is full (16 frames) the peak stays where it is
    (main grew by (3 + objects) x 2 MP a frame: every rendered frame and every frame's masks were kept to the end;
    +507 MiB at 36 frames with one object against +313 MiB now)."""
    report = _run("render", timeout=7200, frames=90, height=1080, width=1920, max_objects=4)
    assert report["frames_propagated"] == 90 and report["frames_held"] != "list", report  # re-read, not held decoded
    second, third, last = report["peak_by_quarter_mib"][1:]
    # flat, but for the answer itself: the mp4 is written into memory as the frames are rendered, so the last
    # quarter may hold up to all of it more (32 MiB for the allocator). main grew ~14 MiB a frame: 300 MiB a quarter of
    # these 90 frames (the last three quarters start past the 16-frame window).
    assert last <= max(second, third) + 32 + report["mp4_mib"], report


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(json.dumps(WORKLOADS[sys.argv[1]](json.loads(sys.argv[2]))), flush=True)
