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
from tests.videos import moving_frames

H, W, T = 96, 128, 8


@pytest.fixture(scope="module")
def engine() -> ImageEngine:
    return ImageEngine(load_bundle(Config()))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return moving_frames(T, H, W)


def _hf_session(cls, engine: ImageEngine, frames: list[np.ndarray]):
    video = torch.stack([engine.preprocess([f])[0] for f in frames])  # what init_video_session would store
    return cls(video=video, video_height=H, video_width=W, inference_device=engine.device,
               inference_state_device=engine.device, video_storage_device="cpu", dtype=engine.dtype)


def _ours(session: VideoSession, **kwargs) -> dict[int, dict[int, np.ndarray]]:
    return {r.frame_index: {o["object_id"]: rle_decode(o["rle"]) for o in r.objects} for r in session.propagate(**kwargs)}


def _upsample(logits: torch.Tensor) -> np.ndarray:
    return (F.interpolate(logits.float()[:, None], (H, W), mode="bilinear", align_corners=False)[:, 0] > 0).numpy()


@torch.inference_mode()
def test_click_tracking_matches_sam3_tracker_video_model(engine, frames):
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    ours = VideoSession(engine, frames, 10.0)
    ours.add_clicks(0, 7, [[30, 45], [100, 80]], [1, 0], box=[10, 20, 60, 70])
    got = _ours(ours)

    model, side = engine.bundle.video_tracker, engine.bundle.image_size
    hf = _hf_session(Sam3TrackerVideoInferenceSession, engine, frames)
    # Sam3TrackerVideoProcessor.add_inputs_to_inference_session, by hand: pixels -> model square, box first (2, 3)
    coords = [[10 * side / W, 20 * side / H], [60 * side / W, 70 * side / H],
              [30 * side / W, 45 * side / H], [100 * side / W, 80 * side / H]]
    obj_idx = hf.obj_id_to_idx(7)
    hf.add_point_inputs(obj_idx, 0, {"point_coords": torch.tensor(coords).reshape(1, 1, -1, 2),
                                     "point_labels": torch.tensor([2, 3, 1, 0], dtype=torch.int32).reshape(1, 1, -1)})
    hf.obj_with_new_inputs = [7]
    model(inference_session=hf, frame_idx=0)
    expected = {out.frame_idx: _upsample(out.pred_masks[:, 0])[0] for out in model.propagate_in_video_iterator(hf)}
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
    hf = _hf_session(Sam3VideoInferenceSession, engine, frames)
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
