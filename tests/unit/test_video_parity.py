"""VideoSession equals transformers' video models driven directly (HF sessions holding every preprocessed frame)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serve_app.core.config import Config
from serve_app.image.codecs import rle_decode
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle
from serve_app.video.session import VideoSession
from tests.reference import click_tracking_reference, hf_video_session
from tests.videos import moving_frames

H, W, T = 96, 128, 8


@pytest.fixture(scope="module")
def engine() -> ImageEngine:
    return ImageEngine(load_bundle(Config()))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return moving_frames(T, H, W)


def _ours(session: VideoSession, **kwargs) -> dict[int, dict[int, np.ndarray]]:
    return {r.frame_index: {o["object_id"]: rle_decode(o["rle"]) for o in r.objects} for r in session.propagate(**kwargs)}


def _upsample(logits: torch.Tensor) -> np.ndarray:
    return (F.interpolate(logits.float()[:, None], (H, W), mode="bilinear", align_corners=False)[:, 0] > 0).numpy()


@torch.inference_mode()
def test_click_tracking_matches_sam3_tracker_video_model(engine, frames):
    ours = VideoSession(engine, frames, 10.0)
    ours.add_clicks(0, 7, [[30, 45], [100, 80]], [1, 0], box=[10, 20, 60, 70])
    got = _ours(ours)
    expected = click_tracking_reference(engine, frames, 7, [[30, 45], [100, 80]], [1, 0], [10, 20, 60, 70])
    assert sorted(got) == sorted(expected) == list(range(T))
    for frame in range(T):
        assert np.array_equal(got[frame][7], expected[frame]), f"frame {frame} differs"
    assert any(m.any() for m in expected.values())


@torch.inference_mode()
@pytest.mark.parametrize("texts", [["bright square"], ["bright square", "circle", "dark shape"]], ids=["one", "three"])
def test_text_tracking_matches_sam3_video_model(engine, frames, texts):
    """One text prompt, and several tracked together in one session (each object names the prompt that found it)."""
    from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

    ours = VideoSession(engine, frames, 10.0)
    for text in texts:
        ours.add_text(text)
    calls = []  # detector forwards: ours runs one per frame for all the prompts, transformers one per prompt
    hook = engine.bundle.video.detector_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        results = list(ours.propagate())
    finally:
        hook.remove()
    got = {r.frame_index: {o["object_id"]: rle_decode(o["rle"]) for o in r.objects} for r in results}
    labels = {o["object_id"]: o["text"] for r in results for o in r.objects}

    model = engine.bundle.video
    hf = hf_video_session(Sam3VideoInferenceSession, engine, frames)
    for text in texts:
        prompt_id = hf.add_prompt(text)
        ids, mask = engine.bundle.tokenizer([text])
        hf.prompt_input_ids[prompt_id], hf.prompt_attention_masks[prompt_id] = ids, mask
    expected, ours_calls = {}, len(calls)
    hook = model.detector_model.register_forward_hook(lambda *a: calls.append(1))
    for out in model.propagate_in_video_iterator(hf):
        hidden = set(out.suppressed_obj_ids or ()) | set(hf.hotstart_removed_obj_ids)
        kept = [i for i in sorted(out.obj_id_to_mask) if i not in hidden]
        masks = _upsample(torch.cat([out.obj_id_to_mask[i] for i in kept])) if kept else []
        expected[out.frame_idx] = {i: m for i, m in zip(kept, masks) if m.any()}
    hook.remove()
    assert (ours_calls, len(calls) - ours_calls) == (T, T * len(texts)), "detector forwards (ours, transformers')"
    assert sorted(got) == sorted(expected) == list(range(T))
    for frame in range(T):
        assert got[frame].keys() == expected[frame].keys(), f"frame {frame}: objects differ"
        for obj, mask in expected[frame].items():
            assert np.array_equal(got[frame][obj], mask), f"frame {frame} object {obj} differs"
    assert any(expected.values()), "the reference must find something"
    assert labels == {obj: hf.prompts[hf.obj_id_to_prompt_id[obj]] for obj in labels}
    if len(texts) > 1:
        assert len(set(labels.values())) > 1, f"the prompts should find different objects: {labels}"
