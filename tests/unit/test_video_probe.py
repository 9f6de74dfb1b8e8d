"""probe_video: what the ingress checks of an upload before any session actor starts (no full decode)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.core.errors import InvalidVideo, PayloadTooLarge
from serve_app.video import io as vio
from serve_app.video.io import VideoLimits, probe_video
from tests.videos import write_video


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return write_video(30, 64, 96, fps=10)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_good_video_passes_converting_no_frame(mp4, monkeypatch):
    converted = []
    monkeypatch.setattr(vio, "_frame_to_rgb", lambda *a: converted.append(1))
    probe_video(mp4, VideoLimits())
    assert converted == []


@pytest.mark.parametrize("data, error, words", [
    (b"", InvalidVideo, "empty"),
    (b"\x00" * 4096, InvalidVideo, "could not open video"),
    (b"just text, not a video\n" * 40, InvalidVideo, "could not open video"),
])
def test_not_a_video(data, error, words):
    with pytest.raises(error, match=words):
        probe_video(data, VideoLimits())


def test_an_image_is_not_a_video():
    with pytest.raises(InvalidVideo):
        probe_video(_png(), VideoLimits())


def test_limits_from_the_header(mp4):
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_MAX_BYTES"):
        probe_video(mp4, VideoLimits(max_bytes=len(mp4) - 1))
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_MAX_FRAMES"):
        probe_video(mp4, VideoLimits(max_frames=10))
    with pytest.raises(PayloadTooLarge):
        probe_video(mp4, VideoLimits(max_pixels_per_frame=1000))


def test_a_truncated_header_is_refused(mp4):
    with pytest.raises(InvalidVideo):
        probe_video(mp4[:200], VideoLimits())
