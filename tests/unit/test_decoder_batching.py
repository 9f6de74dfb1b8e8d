"""The decoder batched across requests: the exact path equals transformers bit for bit, batches agree with one request
at a time within the stated tolerances, each neck runs once per image, and one request's failure stays its own."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serve_app.core.config import Config
from serve_app.core.errors import GatewayTimeout
from serve_app.core.types import AutoPrompt, ConceptPrompt, SegmentParams, VisualPrompt
from serve_app.image import postprocess as pp
from serve_app.image.codecs import rle_decode
from serve_app.image.decoding import DecodeJob, ForwardStats, decode_jobs
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle
from tests.reference import BATCHED_IOU as IOU_MIN
from tests.reference import BATCHED_SCORE as SCORE_TOL
from tests.reference import concept_reference, mask_iou, visual_reference
SIZES = [(96, 128), (120, 80), (64, 64)]


@pytest.fixture(scope="module")
def engine() -> ImageEngine:
    return ImageEngine(load_bundle(Config()))


def _image(seed: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _mixed_jobs(engine: ImageEngine, count: int) -> list[DecodeJob]:
    """Requests of different sizes, prompt kinds and options, as a loaded decoder sees them."""
    jobs = []
    for i in range(count):
        size = SIZES[i % len(SIZES)]
        h, w = size
        prompts = [ConceptPrompt(text=["cat", "red car", "tree", "person"][i % 4])]
        if i % 2:
            prompts.append(ConceptPrompt(text="dog", boxes=[[2, 3, w // 2, h // 2]], box_labels=[True]))
        if i % 3 == 0:
            prompts.append(VisualPrompt(points=[[w // 3, h // 3]], point_labels=[1], multimask=bool(i % 2)))
        if i % 4 == 1:
            prompts.append(VisualPrompt(box=[4, 4, w - 8, h - 6]))
        params = SegmentParams(threshold=0.05 + 0.02 * (i % 3), return_logits=bool(i % 2))
        jobs.append(DecodeJob(engine.encode([_image(40 + i, size)])[0], prompts, params, size))
    return jobs


def _alone(engine: ImageEngine, job: DecodeJob):
    """The exact path: this request alone, one prompt per forward."""
    return decode_jobs(engine, [DecodeJob(job.embedding, job.prompts, job.params, job.size)], 1, 1)[0]


def _agree(batched, alone) -> tuple[float, float]:
    """Asserts the same instances per prompt; returns the worst mask IoU and score difference."""
    worst_iou, worst_score = 1.0, 0.0
    for b, a in zip(batched.prompts, alone.prompts):
        assert len(b.instances) == len(a.instances), "batching changed which instances survive NMS"
        for x, y in zip(b.instances, a.instances):
            worst_iou = min(worst_iou, mask_iou(rle_decode(x.rle), rle_decode(y.rle)))
            worst_score = max(worst_score, abs(x.score - y.score))
            np.testing.assert_allclose(x.box, y.box, atol=1.0)
    return worst_iou, worst_score


def test_the_exact_path_is_transformers_bit_for_bit(engine):
    bundle = engine.bundle
    image = _image(7, (96, 128))
    pixels, size = engine.preprocess([image]), image.shape[:2]
    prompts = [ConceptPrompt(text="a red car"), ConceptPrompt(text="tree", boxes=[[5, 5, 60, 50]], box_labels=[True]),
               VisualPrompt(points=[[30, 40], [80, 20]], point_labels=[1, 0], multimask=True)]
    params = SegmentParams(threshold=0.1, nms_iou=None, max_instances=1000)
    job = DecodeJob(engine.encode([image])[0], prompts, params, size)
    result = decode_jobs(engine, [job], 1, 1)[0]
    found = 0
    for prompt, served in zip(prompts[:2], result.prompts[:2]):
        expected = concept_reference(bundle, pixels, prompt.text, prompt.boxes, prompt.box_labels, size, 0.1)
        assert len(served.instances) == len(expected)
        for inst, (score, _, mask) in zip(served.instances, expected):
            assert inst.score == score  # the same float, not merely close
            assert np.array_equal(rle_decode(inst.rle), mask)
        found += len(expected)
    expected = visual_reference(bundle, pixels, [[30, 40], [80, 20]], [1, 0], None, size, True)
    for inst, (score, mask) in zip(result.prompts[2].instances, expected):
        assert inst.score == score and np.array_equal(rle_decode(inst.rle), mask)
    assert found > 0, "the case must produce instances, or it proves nothing"


def test_batched_requests_agree_with_one_at_a_time(engine):
    jobs = _mixed_jobs(engine, 8)
    stats = ForwardStats()
    batched = decode_jobs(engine, jobs, 16, 16, stats)
    worst_iou, worst_score, instances = 1.0, 0.0, 0
    for job, result in zip(jobs, batched):
        assert not isinstance(result, BaseException), result
        alone = _alone(engine, job)
        iou, score = _agree(result, alone)
        worst_iou, worst_score = min(worst_iou, iou), max(worst_score, score)
        instances += sum(len(p.instances) for p in alone.prompts)
        for b, a in zip(result.prompts, alone.prompts):
            assert (b.low_res_logits is None) == (a.low_res_logits is None)
    assert instances > 20, "the case must produce instances, or it proves nothing"
    assert worst_iou >= IOU_MIN and worst_score <= SCORE_TOL, (worst_iou, worst_score)
    forwards = stats.snapshot()
    # one detector and one tracker neck pass for the whole batch; pairs grouped by exemplar count (2 forwards);
    # visual prompts by shape: points+multimask, points, box (3 forwards)
    assert forwards["necks"] == 2 and forwards["neck_images"] == 8 + 5, forwards
    assert forwards["detr"] == 2 and forwards["detr_pairs"] == 12, forwards
    assert forwards["tracker"] == 3 and forwards["tracker_prompts"] == 5, forwards


def test_the_neck_runs_once_per_image_not_once_per_prompt_group(engine):
    image = _image(3, (96, 128))
    prompts = [ConceptPrompt(text=t) for t in ("cat", "dog", "bird", "car")]
    prompts.append(ConceptPrompt(text="cup", boxes=[[1, 1, 30, 30]], box_labels=[True]))
    stats = ForwardStats()
    job = DecodeJob(engine.encode([image])[0], prompts, SegmentParams(threshold=0.1), (96, 128))
    decode_jobs(engine, [job], 1, 1, stats)
    assert stats.snapshot()["necks"] == 1 and stats.snapshot()["detr"] == 5


def test_one_requests_failure_leaves_the_rest_of_its_batch_running(engine):
    jobs = _mixed_jobs(engine, 4)
    stopped, expired = threading.Event(), time.monotonic() - 1
    jobs[1].stop = stopped
    stopped.set()
    jobs[2].deadline = expired
    results = decode_jobs(engine, jobs, 16, 16)
    assert isinstance(results[1], pp.Stopped)
    assert isinstance(results[2], GatewayTimeout) and results[2].status_code == 504
    for index in (0, 3):
        worst_iou, worst_score = _agree(results[index], _alone(engine, jobs[index]))
        assert worst_iou >= IOU_MIN and worst_score <= SCORE_TOL


def test_a_request_whose_forward_fails_fails_alone(engine):
    """A forward that raises is retried one request at a time: only the request it belongs to gets the error."""
    jobs = _mixed_jobs(engine, 4)
    jobs[2].embedding = jobs[2].embedding[:-3]  # not a square grid of tokens: its neck cannot run
    results = decode_jobs(engine, jobs, 16, 16)
    assert isinstance(results[2], RuntimeError), results[2]
    for index in (0, 1, 3):
        assert not isinstance(results[index], BaseException), results[index]
        worst_iou, worst_score = _agree(results[index], _alone(engine, jobs[index]))
        assert worst_iou >= IOU_MIN and worst_score <= SCORE_TOL


def test_automatic_masks_in_a_batch_equal_their_own_decode(engine):
    image = _image(9, (96, 128))
    embedding = engine.encode([image])[0]
    auto = DecodeJob(embedding, [AutoPrompt(points_per_side=4)], SegmentParams(), (96, 128))
    other = DecodeJob(embedding, [ConceptPrompt(text="cat")], SegmentParams(threshold=0.1), (96, 128))
    together = decode_jobs(engine, [other, auto], 16, 16)[1]
    alone = _alone(engine, auto)
    assert [i.rle for i in together.prompts[0].instances] == [i.rle for i in alone.prompts[0].instances]
    assert together.prompts[0].instances, "the grid must find masks, or it proves nothing"


def test_a_visual_prompt_to_a_concept_only_model_fails_that_request_only():
    lite = ImageEngine(load_bundle(Config(model="tiny-random-lite")))
    image = _image(5, (64, 64))
    embedding = lite.encode([image])[0]
    concept = DecodeJob(embedding, [ConceptPrompt(text="cat")], SegmentParams(threshold=0.1), (64, 64))
    visual = DecodeJob(embedding, [VisualPrompt(points=[[10, 10]], point_labels=[1])], SegmentParams(), (64, 64))
    results = decode_jobs(lite, [concept, visual], 16, 16)
    assert getattr(results[1], "status_code", None) == 400
    assert not isinstance(results[0], BaseException)


def test_exact_mode_turns_every_batch_knob_to_one():
    assert Config(decoder_exact=True, decoder_max_batch_size=32).decoder_batches() == (1, 1, 1)
    assert Config().decoder_batches() == (8, 8, 8)
