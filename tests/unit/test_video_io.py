"""Video I/O: hostile bytes become frames or actionable 4xx errors; masks become RLE or a rendered MP4."""

from __future__ import annotations

import base64
import io

import av
import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from serve_app.core.config import Config
from serve_app.core.errors import BadRequest, InvalidImage, InvalidVideo, PayloadTooLarge
from serve_app.image.imageio import ImageLoader
from serve_app.video import io as vio
from serve_app.video.io import (
    Video,
    VideoLimits,
    decode_video,
    encode_mp4,
    frames_from_images,
    masks_to_rle,
    object_color,
    render_masks_video,
    video_bytes_from_base64,
)
from tests.videos import encode_frames, moving_frames, pick_codec, write_video

H, W, N, FPS = 64, 96, 20, 10


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return write_video(N, H, W, fps=FPS)


@pytest.fixture(scope="module")
def webm() -> bytes:
    if pick_codec("webm") is None:
        pytest.skip("no VP8/VP9 encoder in this FFmpeg build")
    return write_video(N, H, W, fps=FPS, fmt="webm")


@pytest.fixture
def converted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts frames converted to RGB, to show decoding stops at a limit instead of decoding everything first."""
    calls: list[int] = []
    original = vio._frame_to_rgb

    def counting(frame, size, turns, *rest):
        calls.append(1)
        return original(frame, size, turns, *rest)

    monkeypatch.setattr(vio, "_frame_to_rgb", counting)
    return calls


def square_centroid_x(img: np.ndarray) -> float:
    white = np.all(img > 180, axis=-1)
    assert white.any(), "the white square is not visible"
    return float(np.nonzero(white)[1].mean())


# ------------------------------------------------------------------ decoding


def test_mp4_round_trip_keeps_count_size_rate_and_content(mp4):
    video = decode_video(mp4, VideoLimits())
    assert (video.num_frames, video.height, video.width, video.fps) == (N, H, W, FPS)
    assert video.duration_s == pytest.approx(N / FPS)
    assert all(f.shape == (H, W, 3) and f.dtype == np.uint8 and f.flags.c_contiguous for f in video.frames)
    reference = moving_frames(N, H, W)
    error = np.mean([np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(video.frames, reference)])
    assert error < 6
    xs = [square_centroid_x(f) for f in video.frames]
    assert xs[0] < 20 < W - 20 < xs[-1] and all(b >= a - 1 for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("fmt", ["mov", "mkv", "webm", "avi"])
def test_other_containers_decode(fmt):
    if pick_codec(fmt) is None:
        pytest.skip(f"no encoder for {fmt} in this FFmpeg build")
    video = decode_video(write_video(12, 48, 80, fps=8, fmt=fmt), VideoLimits())
    assert (video.num_frames, video.height, video.width, video.fps) == (12, 48, 80, 8)
    assert square_centroid_x(video.frames[-1]) > square_centroid_x(video.frames[0]) + 30


def test_display_rotation_is_applied():
    frames = moving_frames(3, H, W)
    video = decode_video(encode_frames(frames, rotation=90), VideoLimits())
    assert (video.height, video.width) == (W, H)
    assert np.abs(video.frames[0].astype(int) - np.rot90(frames[0]).astype(int)).mean() < 6


# -------------------------------------------------------------------- limits


def test_bytes_over_the_limit_are_refused_before_opening(mp4, monkeypatch):
    monkeypatch.setattr(vio.av, "open", lambda *a, **k: pytest.fail("opened a video over the byte limit"))
    with pytest.raises(PayloadTooLarge, match=f"{len(mp4)} bytes.*SAM3_VIDEO_MAX_BYTES"):
        decode_video(mp4, VideoLimits(max_bytes=len(mp4) - 1))


def test_declared_frame_count_over_the_limit_fails_before_decoding(mp4, converted):
    with pytest.raises(PayloadTooLarge, match="20 frames, more than the limit of 5 frames"):
        decode_video(mp4, VideoLimits(max_frames=5))
    assert converted == []


def test_frame_limit_stops_decoding_at_the_first_frame_over_it(webm, converted):
    with pytest.raises(PayloadTooLarge, match="more than the limit of 5 frames.*SAM3_VIDEO_MAX_FRAMES"):
        decode_video(webm, VideoLimits(), max_frames=5)  # WebM declares no frame count: counted while decoding
    assert len(converted) == 5


def test_max_frames_argument_only_tightens_the_limit(mp4):
    assert decode_video(mp4, VideoLimits(max_frames=N)).num_frames == N
    with pytest.raises(PayloadTooLarge, match="limit of 5 frames"):
        decode_video(mp4, VideoLimits(max_frames=5), max_frames=1000)
    with pytest.raises(BadRequest, match="max_frames"):
        decode_video(mp4, VideoLimits(), max_frames=0)


@pytest.mark.parametrize(
    "limits,match",
    [
        (VideoLimits(max_pixels_per_frame=H * W - 1), "96x64 \\(6144 pixels\\).*SAM3_VIDEO_MAX_FRAME_PIXELS"),
        (VideoLimits(max_side=W - 1), "SAM3_VIDEO_MAX_SIDE"),
    ],
)
def test_resolution_over_the_limit_fails_before_decoding(mp4, webm, converted, limits, match):
    for data in (mp4, webm):
        with pytest.raises(PayloadTooLarge, match=match):
            decode_video(data, limits)
    assert converted == []


def test_declared_duration_over_the_limit_fails_before_decoding(mp4, webm, converted):
    for data in (mp4, webm):
        with pytest.raises(PayloadTooLarge, match="lasts 2.0 s.*limit of 1.5 s.*SAM3_VIDEO_MAX_DURATION_S"):
            decode_video(data, VideoLimits(max_duration_s=1.5))
    assert converted == []


def test_duration_is_also_checked_from_frame_timestamps(mp4, converted, monkeypatch):
    monkeypatch.setattr(vio, "_declared_duration", lambda container, stream: None)  # a container that lies
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_MAX_DURATION_S"):
        decode_video(mp4, VideoLimits(max_duration_s=0.95))
    assert len(converted) == 10  # frame 10 starts at 1.0 s: refused before conversion


def test_a_video_over_the_decoded_budget_is_re_read_from_its_container(mp4, webm, converted):
    """Over SAM3_VIDEO_MAX_DECODED_BYTES a video is served from its container bytes, not refused, not held whole."""
    held = decode_video(mp4, VideoLimits())
    assert isinstance(held.frames, list) and len(converted) == N
    converted.clear()
    limits = VideoLimits(max_decoded_bytes=5 * H * W * 3, frame_cache_bytes=4 * H * W * 3)
    lazy = decode_video(mp4, limits)
    assert isinstance(lazy.frames, vio.ContainerFrames)
    assert converted == []  # the header declares 20 frames: none converted while checking them
    assert (lazy.num_frames, lazy.width, lazy.height, lazy.fps) == (N, held.width, held.height, held.fps)
    order = [*range(N), *range(N - 1, -1, -1), 7, 3, 19, 0]  # forward, backward, jumps
    assert all(np.array_equal(lazy.frames[i], held.frames[i]) for i in order)
    assert len(lazy.frames._cache) <= 4
    converted.clear()
    stream = decode_video(webm, limits)  # webm declares no frame count: 5 frames converted, then not any more
    assert isinstance(stream.frames, vio.ContainerFrames) and len(converted) == 5
    assert np.array_equal(stream.frames[N - 1], decode_video(webm, VideoLimits()).frames[N - 1])


def test_image_frames_over_the_decoded_budget_are_refused():
    images = [np.zeros((H, W, 3), np.uint8)] * 6
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_MAX_DECODED_BYTES"):
        frames_from_images(images, limits=VideoLimits(max_decoded_bytes=5 * H * W * 3))


def test_limits_from_config():
    limits = VideoLimits.from_config(Config(video_max_frames=7, video_max_frame_pixels=1000))
    assert (limits.max_frames, limits.max_pixels_per_frame) == (7, 1000)
    assert (limits.max_bytes, limits.max_duration_s) == (Config().video_max_bytes, Config().video_max_duration_s)


# ------------------------------------------------------------- hostile bytes


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(moving_frames(1, 32, 32)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 4096,
        np.random.default_rng(0).bytes(20_000),
        b"Dear server, this is a text file, not a video.\n" * 50,
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        b"ffconcat version 1.0\nfile /etc/passwd\n",
        _png(),
    ],
    ids=["zeros", "random", "text", "hls-playlist", "concat-list", "png-image"],
)
def test_not_a_video_is_invalid_video(data):
    with pytest.raises(InvalidVideo, match="could not open video: not an mp4, mov, mkv, webm or avi file") as info:
        decode_video(data, VideoLimits())
    assert (info.value.status_code, info.value.code) == (400, "invalid_video")


def test_empty_bytes_are_invalid_video():
    with pytest.raises(InvalidVideo, match="video is empty"):
        decode_video(b"", VideoLimits())


def test_mp4_cut_in_half_is_reported():
    data = write_video(40, H, W)
    with pytest.raises(InvalidVideo, match="truncated or corrupt"):
        decode_video(data[: len(data) // 2], VideoLimits())


def test_faststart_mp4_cut_mid_stream_names_the_last_good_frame():
    data = encode_frames(moving_frames(40, H, W), options={"movflags": "faststart"})
    with pytest.raises(InvalidVideo, match=r"truncated or corrupt after frame \d+"):
        decode_video(data[: int(len(data) * 0.7)], VideoLimits())


def test_cut_mp4_with_an_audio_track_is_reported(tmp_path):
    if "aac" not in av.codecs_available:
        pytest.skip("no AAC encoder")
    path = tmp_path / "with_audio.mp4"
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        video = container.add_stream(pick_codec("mp4"), rate=10)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        audio = container.add_stream("aac", rate=8000)
        for i, img in enumerate(moving_frames(40, H, W)):
            container.mux(video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            sound = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.float32), format="fltp", layout="mono")
            sound.sample_rate, sound.pts = 8000, i * 800
            container.mux(audio.encode(sound))
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    data = path.read_bytes()
    assert decode_video(data, VideoLimits()).num_frames == 40
    with pytest.raises(InvalidVideo, match="truncated or corrupt after frame"):
        decode_video(data[: int(len(data) * 0.7)], VideoLimits())


def test_webm_cut_short_is_reported(webm):
    data = write_video(40, H, W, fmt="webm")
    with pytest.raises(InvalidVideo, match="truncated or corrupt after frame .*declares 4.0 s"):
        decode_video(data[: len(data) // 2], VideoLimits())


def test_mp4_with_zero_frames_is_invalid():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(pick_codec("mp4"), rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    with pytest.raises(InvalidVideo, match="no video stream|no decodable frames"):
        decode_video(buffer.getvalue(), VideoLimits())


def test_audio_only_file_has_no_video_stream():
    if "aac" not in av.codecs_available:
        pytest.skip("no AAC encoder")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="matroska") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InvalidVideo, match=r"no video stream \(streams found: audio\)"):
        decode_video(buffer.getvalue(), VideoLimits())


def test_base64_and_data_uri_videos(mp4):
    encoded = base64.b64encode(mp4).decode()
    assert video_bytes_from_base64(encoded, VideoLimits()) == mp4
    assert video_bytes_from_base64("data:video/mp4;base64," + encoded, VideoLimits()) == mp4
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_MAX_BYTES"):
        video_bytes_from_base64(encoded, VideoLimits(max_bytes=len(mp4) // 2))
    with pytest.raises(InvalidVideo, match="^video is not valid base64"):
        video_bytes_from_base64("@@@not base64@@@", VideoLimits())


# ------------------------------------------------------------ image frames


def test_frames_from_images():
    images = moving_frames(4, 30, 40)
    video = frames_from_images(images, fps=5)
    assert (video.num_frames, video.height, video.width, video.fps, video.duration_s) == (4, 30, 40, 5.0, 0.8)
    assert np.array_equal(video.frames[3], images[3])


def test_frames_from_images_rejects_mismatched_sizes_naming_the_frame():
    images = moving_frames(2, 30, 40) + moving_frames(1, 30, 42)
    with pytest.raises(InvalidVideo, match=r"frame 2 is uint8 \(30, 42, 3\) but frame 0 is uint8 \(30, 40, 3\)"):
        frames_from_images(images)
    with pytest.raises(InvalidVideo, match="at least one frame"):
        frames_from_images([])
    with pytest.raises(PayloadTooLarge, match="limit of 1 frames"):
        frames_from_images(images[:2], limits=VideoLimits(max_frames=1))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_encoded_frames_over_the_decoded_budget_stay_encoded_and_read_back_exactly():
    """Client frames (PNG/JPEG bytes) past SAM3_VIDEO_MAX_DECODED_BYTES are kept as the client's bytes and decoded
    again when read, in any order, to the pixels the first decode gave; under it they are held decoded."""
    images = moving_frames(12, 30, 40)
    blobs = [_png(i) for i in images]
    loader = ImageLoader(10**7, 10**8, 1, None)
    held = frames_from_images(blobs, fps=5, decode=loader.decode, limits=VideoLimits())
    assert isinstance(held.frames, list) and all(np.array_equal(a, b) for a, b in zip(held.frames, images))
    limits = VideoLimits(max_decoded_bytes=5 * 30 * 40 * 3, frame_cache_bytes=3 * 30 * 40 * 3)
    lazy = frames_from_images(blobs, fps=5, decode=loader.decode, limits=limits)
    assert isinstance(lazy.frames, vio.EncodedFrames)
    assert (lazy.num_frames, lazy.height, lazy.width, lazy.fps) == (12, 30, 40, 5.0)
    order = [*range(12), *range(11, -1, -1), 7, 3, 0]
    assert all(np.array_equal(lazy.frames[i], images[i]) for i in order)
    assert len(lazy.frames._cache) <= 3
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_MAX_BYTES"):
        frames_from_images(blobs, decode=loader.decode, limits=VideoLimits(max_bytes=sum(map(len, blobs)) - 1))
    other = _png(moving_frames(1, 30, 42)[0])
    with pytest.raises(InvalidVideo, match="frame 2 is uint8"):
        frames_from_images([*blobs[:2], other], decode=loader.decode, limits=limits)
    with pytest.raises(InvalidImage, match="could not decode image"):
        frames_from_images([*blobs[:2], b"not an image"], decode=loader.decode, limits=limits)
    with pytest.raises(PayloadTooLarge, match="SAM3_VIDEO_MAX_FRAME_PIXELS"):
        frames_from_images(blobs, decode=loader.decode, limits=VideoLimits(max_pixels_per_frame=1000))


# ------------------------------------------------------------------ encoding


def _decode_with_pyav(data: bytes) -> tuple[str, float, list[np.ndarray]]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return stream.codec_context.name, float(stream.average_rate), frames


def test_encode_mp4_decodes_back_as_h264_with_same_frames_and_even_size():
    frames = moving_frames(7, 33, 47)
    name, fps, decoded = _decode_with_pyav(encode_mp4(frames, fps=12))
    assert name == ("h264" if vio.mp4_codec() == "libx264" else "mpeg4")
    assert (len(decoded), decoded[0].shape, fps) == (7, (34, 48, 3), 12.0)
    error = np.mean([np.abs(d[:33, :47].astype(int) - f.astype(int)).mean() for d, f in zip(decoded, frames)])
    assert error < 6


def test_encode_mp4_rejects_mixed_sizes():
    with pytest.raises(ValueError, match="frame 1"):
        encode_mp4(moving_frames(1, 32, 32) + moving_frames(1, 32, 34), fps=10)


# ------------------------------------------------------------------- masks


def _flat_video(frames: int = 4) -> Video:
    return frames_from_images([np.full((64, 96, 3), 100, np.uint8) for _ in range(frames)], fps=10)


def _boxes() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((64, 96), bool)
    a[8:40, 8:40] = True
    b = np.zeros((64, 96), bool)
    b[24:56, 56:88] = True
    return a, b


def test_render_masks_colours_each_object_inside_its_mask_only():
    video, (a, b) = _flat_video(), _boxes()
    per_frame = [[(0, a), (3, b)] for _ in range(video.num_frames)]
    per_frame[-1] = []  # a frame without objects stays as it was
    _, _, out = _decode_with_pyav(render_masks_video(video, per_frame, apply_mask=True))
    assert len(out) == video.num_frames and out[0].shape == (64, 96, 3)
    interior_a, interior_b = np.zeros_like(a), np.zeros_like(b)
    interior_a[12:36, 12:36], interior_b[28:52, 60:84] = True, True
    background = ~cv2.dilate((a | b).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    for frame in out[:-1]:
        for interior, object_id in ((interior_a, 0), (interior_b, 3)):
            expected = 0.5 * np.array([100, 100, 100]) + 0.5 * np.array(object_color(object_id))
            assert np.abs(frame[interior].mean(axis=0) - expected).max() < 8
        assert np.abs(frame[background].mean(axis=0) - 100).max() < 4
    assert np.abs(out[-1].astype(int) - 100).mean() < 2
    assert object_color(0) != object_color(3)


def test_render_masks_without_apply_mask_outlines_only():
    video, (a, _) = _flat_video(2), _boxes()
    _, _, out = _decode_with_pyav(render_masks_video(video, [[(5, a)], [(5, a)]], apply_mask=False))
    interior = np.zeros_like(a)
    interior[14:34, 14:34] = True
    edge = a & ~cv2.erode(a.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    for frame in out:
        assert np.abs(frame[interior].mean(axis=0) - 100).max() < 4  # inside left alone
        assert np.abs(frame[edge].mean(axis=0) - np.array(object_color(5))).max() < 40  # outline in colour
    with pytest.raises(ValueError, match="masks for 1 frames"):
        render_masks_video(video, [[(5, a)]], apply_mask=True)


def test_masks_to_rle_round_trip():
    a, b = _boxes()
    encoded = masks_to_rle([[(7, a), (2, b)], []])
    assert [[o["object_id"] for o in frame] for frame in encoded] == [[7, 2], []]
    for (_, mask), item in zip([(7, a), (2, b)], encoded[0]):
        assert item["rle"]["size"] == [64, 96] and isinstance(item["rle"]["counts"], str)
        rle = {"size": item["rle"]["size"], "counts": item["rle"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
