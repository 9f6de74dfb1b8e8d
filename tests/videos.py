"""Synthetic test videos: a bright square moving right and a circle moving down, encoded in memory with PyAV."""

from __future__ import annotations

import io
import os
import tempfile

import av
import cv2
import numpy as np

# container format -> (PyAV muxer name, codec preference order)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mp4": ("mp4", ("libx264", "h264", "mpeg4")),
    "mov": ("mov", ("libx264", "h264", "mpeg4")),
    "mkv": ("matroska", ("libx264", "h264", "mpeg4")),
    "webm": ("webm", ("libvpx", "libvpx-vp9")),
    "avi": ("avi", ("mpeg4", "mjpeg")),
}
SQUARE_COLOR = (255, 255, 255)
CIRCLE_COLOR = (40, 200, 255)
BACKGROUND = (16, 16, 24)


def moving_frames(frames: int, height: int, width: int) -> list[np.ndarray]:
    """`frames` RGB uint8 frames: a white square sliding left to right, a cyan circle sliding top to bottom."""
    return list(iter_moving_frames(frames, height, width))


def iter_moving_frames(frames: int, height: int, width: int):
    """moving_frames one at a time (a long 1080p clip would not fit in memory as a list)."""
    side = max(2, min(height, width) // 5)
    radius = max(2, min(height, width) // 8)
    for i in range(frames):
        t = i / max(1, frames - 1)
        img = np.empty((height, width, 3), dtype=np.uint8)
        img[:] = BACKGROUND
        x0 = int(round(t * (width - side)))
        y0 = height // 4 - side // 2
        img[max(0, y0) : y0 + side, x0 : x0 + side] = SQUARE_COLOR
        cy = int(round(radius + t * (height - 2 * radius - 1)))
        cv2.circle(img, (3 * width // 4, cy), radius, CIRCLE_COLOR, -1)
        yield img


def write_long_video(frames: int, height: int, width: int, fps: int = 30) -> bytes:
    """An mp4 of iter_moving_frames, encoded as the frames are drawn: memory is one frame, not the clip."""
    codec = pick_codec("mp4")
    if codec is None:
        raise RuntimeError("no encoder available for mp4")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        for img in iter_moving_frames(frames, height, width):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def write_noisy_video(max_bytes: int, height: int, width: int, fps: int = 30) -> bytes:
    """An mp4 as close under `max_bytes` as whole frames allow: moving shapes under per-frame noise, encoded near
    losslessly (libx264 qp 0, or MPEG-4 Part 2 at qscale 1), so the file is as large as a client's video can be."""
    codec = pick_codec("mp4")
    if codec is None:
        raise RuntimeError("no encoder available for mp4")
    rng = np.random.default_rng(0)
    frames: list[np.ndarray] = []  # each frame's noise

    def encode(count: int) -> bytes:
        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec == "libx264":
                stream.options = {"preset": "ultrafast", "qp": "0"}
            else:
                stream.codec_context.qscale = 1
                stream.codec_context.flags |= "QSCALE"
            for img, noise in zip(iter_moving_frames(count, height, width), frames):
                pixels = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode(None))
        return buffer.getvalue()

    frames.append(rng.integers(-40, 40, (height, width, 3), dtype=np.int16))
    one = len(encode(1))
    count = max(1, int(max_bytes * 0.97) // one)
    frames.extend(rng.integers(-40, 40, (height, width, 3), dtype=np.int16) for _ in range(count - 1))
    data = encode(count)
    while len(data) > max_bytes and count > 1:
        count -= max(1, count // 20)
        data = encode(count)
    return data


def pick_codec(fmt: str) -> str | None:
    """The first encoder available for the container format, or None (tests skip on None)."""
    for name in FORMATS[fmt][1]:
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
            except Exception:  # noqa: BLE001 - listed but not usable as an encoder
                continue
            return name
    return None


def encode_frames(
    frames: list[np.ndarray],
    fps: int = 10,
    fmt: str = "mp4",
    *,
    codec: str | None = None,
    options: dict[str, str] | None = None,
    rotation: int | None = None,
) -> bytes:
    """Encode RGB frames into a container held in memory; `options` go to the muxer (e.g. movflags)."""
    muxer, _ = FORMATS[fmt]
    codec = codec or pick_codec(fmt)
    if codec is None:
        raise RuntimeError(f"no encoder available for {fmt}")
    height, width = frames[0].shape[:2] if frames else (16, 16)
    if options and "faststart" in options.get("movflags", ""):
        return _via_file(frames, fps, fmt, codec, options)  # faststart rewrites the file, BytesIO cannot
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=muxer, options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def write_video(frames: int, height: int, width: int, fps: int = 10, fmt: str = "mp4") -> bytes:
    """Moving-shapes video of `frames` frames at `fps` in the container `fmt` (mp4, mov, mkv, webm, avi)."""
    return encode_frames(moving_frames(frames, height, width), fps=fps, fmt=fmt)


def _via_file(frames: list[np.ndarray], fps: int, fmt: str, codec: str, options: dict[str, str]) -> bytes:
    handle, path = tempfile.mkstemp(suffix="." + fmt)
    os.close(handle)
    try:
        with av.open(path, mode="w", format=FORMATS[fmt][0], options=options) as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
            stream.pix_fmt = "yuv420p"
            for img in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
            container.mux(stream.encode(None))
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)
