"""The live stream's state class in-process (no Ray): bounded state, exact results, frame checks, prompt checks."""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.core.config import Config
from serve_app.core.errors import InvalidImage, InvalidPrompt, PayloadTooLarge
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle
from serve_app.video.session import VideoSession
from serve_app.video.stream import FrameWindow, StreamObject, StreamPrompt, VideoStream, check_prompt
from tests.videos import moving_frames

H, W = 48, 64
CLICK = StreamPrompt(objects=(StreamObject(3, ((6.0, 6.0),), (1,)),))


@pytest.fixture(scope="module")
def engine() -> Iterator[ImageEngine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a stream's actor (Ray gives 0-CPU actors one thread); 2 threads on a loaded
    try:  # 2-core machine are many times slower
        yield ImageEngine(load_bundle(Config()))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return moving_frames(40, H, W)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_frame_window_keeps_the_current_frame_and_counts_them_all():
    window = FrameWindow(kept=1)
    for i in range(5):
        window[i] = torch.zeros(1)
    assert len(window) == 5 and list(dict.keys(window)) == [4] and 4 in window and 3 not in window


def test_click_stream_state_is_flat_over_many_frames(engine, frames):
    stream = VideoStream(engine, Config(), CLICK)
    stored = {}
    for i in range(60):
        stream.push(png(frames[i % len(frames)]))
        if i + 1 in (20, 60):
            stored[i + 1] = stream.stored()
    # 1 frame, the last memory_window non-conditioning outputs (this one's too), the prompted frame, one frame tracked:
    # after 20 frames as after 60
    assert stored[20] == stored[60] == {
        "processed_frames": 1, "outputs": stream.memory_window, "cond_outputs": 1, "tracked": 1,
        "per_frame_metadata": 0, "inputs": 1,
    }, stored
    for per_object in stream._hf.output_dict_per_obj.values():
        for outputs in per_object.values():
            assert all("high_res_masks" not in out for out in outputs.values())


def test_click_stream_matches_a_session_propagation(engine, frames):
    """Dropping what the model no longer reads changes nothing: frame for frame the stream's masks are the session's
    (the same clicks on frame 0, propagated forward through the same frames)."""
    count = 24
    stream = VideoStream(engine, Config(), CLICK)
    streamed = [stream.push(png(f)) for f in frames[:count]]
    session = VideoSession(engine, [np.array(Image.open(io.BytesIO(png(f)))) for f in frames[:count]], 10.0)
    session.add_clicks(0, 3, [[6.0, 6.0]], [1])
    propagated = list(session.propagate("forward", 0))
    assert [r.frame_index for r in propagated] == [s["frame_index"] for s in streamed] == list(range(count))
    for ours, theirs in zip(streamed, propagated):
        (a,), (b,) = ours["objects"], theirs.objects
        assert a["mask"] == b["rle"] and a["box"] == b["box"] and a["score"] == pytest.approx(b["score"], abs=1e-6)


def test_text_stream_state_is_flat(engine, frames):
    config = Config(video_max_objects=2)
    stream = VideoStream(engine, config, StreamPrompt(texts=("square",)))
    stored = {}
    for i in range(26):
        result = stream.push(png(frames[i]))
        assert result["frame_index"] == i
        if i + 1 in (20, 26):
            stored[i + 1] = stream.stored()
    session = stream._hf
    assert stored[20] == stored[26], stored
    assert stored[26]["processed_frames"] == 1
    assert set(session.obj_id_to_tracker_score_frame_wise) <= {25} and set(session.suppressed_obj_ids) <= {25}
    assert stored[26]["outputs"] <= len(session.obj_ids) * stream.memory_window


def test_old_conditioning_frames_are_dropped(engine, frames):
    """Conditioning frames pile up in text mode (every recondition_every_nth_frame-th frame turns one): the stream
    keeps the latest max_cond_frame_num of them, and what was prompted on the dropped ones."""
    stream = VideoStream(engine, Config(), CLICK)
    for i in range(30):
        stream.push(png(frames[i]))
    per_object = stream._hf.output_dict_per_obj[0]
    cond = per_object["cond_frame_outputs"]
    for index in (1, 2, 3, 4, 5, 6):  # as if reconditioned on those frames
        cond[index] = copy.copy(cond[0])
        stream._hf.point_inputs_per_obj[0][index] = stream._hf.point_inputs_per_obj[0][0]
    stream.push(png(frames[30]))
    keep = int(stream._tracker_config.max_cond_frame_num)
    assert sorted(cond) == list(range(7 - keep, 7))
    assert sorted(stream._hf.point_inputs_per_obj[0]) == sorted(cond)


def test_bad_frames_change_nothing(engine, frames):
    config = Config(video_stream_max_frame_bytes=4096, video_max_frame_pixels=5000, video_max_side=100)
    stream = VideoStream(engine, config, CLICK)
    with pytest.raises(InvalidImage, match="could not decode"):
        stream.push(b"nope")
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_STREAM_MAX_FRAME_BYTES"):
        stream.push(b"x" * 5000)
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_MAX_FRAME_PIXELS"):
        stream.push(png(np.zeros((80, 80, 3), np.uint8)))
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_MAX_SIDE"):
        stream.push(png(np.zeros((10, 120, 3), np.uint8)))
    with pytest.raises(InvalidPrompt):  # the click (6, 6) is outside a 4x4 first frame
        stream.push(png(np.zeros((4, 4, 3), np.uint8)))
    assert stream.next_index == 0 and stream._hf is None
    assert stream.push(png(frames[0]))["frame_index"] == 0
    with pytest.raises(InvalidImage, match="share one size"):
        stream.push(png(moving_frames(1, H, W + 2)[0]))
    assert stream.push(png(frames[1]))["frame_index"] == 1


@pytest.mark.parametrize("prompt,words", [
    (StreamPrompt(), "not both"),
    (StreamPrompt(texts=("a",), objects=CLICK.objects), "not both"),
    (StreamPrompt(texts=(" ",)), "blank"),
    (StreamPrompt(texts=("a",) * 17), "SAM3_MAX_PROMPTS"),
    (StreamPrompt(objects=(StreamObject(1),)), "points, a box"),
    (StreamPrompt(objects=(StreamObject(1, ((1, 1),) * 65, (1,) * 65),)), "SAM3_MAX_POINTS"),
    (StreamPrompt(objects=(StreamObject(1, ((1, 1),), ()),)), "one label per point"),
    (StreamPrompt(objects=(StreamObject(1, ((1, 1),), (2,)),)), "labels must be"),
    (StreamPrompt(objects=(StreamObject(1, ((1, 1),), (1,)),) * 2), "own object_id"),
    (StreamPrompt(objects=tuple(StreamObject(i, ((1, 1),), (1,)) for i in range(33))), "SAM3_VIDEO_MAX_OBJECTS"),
])
def test_bad_prompts(prompt, words):
    with pytest.raises(InvalidPrompt, match=words):
        check_prompt(prompt, Config())
