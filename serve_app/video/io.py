"""Video I/O with PyAV: hostile bytes to validated RGB frames, and masks to RLE or a rendered H.264 MP4."""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from serve_app.core.errors import BadRequest, InvalidImage, InvalidVideo, PayloadTooLarge
from serve_app.image.codecs import PALETTE, overlay, rle_encode_many
from serve_app.image.imageio import decode_base64_payload

if TYPE_CHECKING:
    from serve_app.core.config import Config

# Demuxers FFmpeg may use on client bytes (mp4/mov/m4v/3gp, mkv/webm, avi). Everything else (playlists such as
# HLS or concat that open further files or URLs, raw streams, images) is refused before its header is parsed.
ACCEPTED_DEMUXERS = ("mov", "matroska", "avi")
DEFAULT_FPS = 25.0
_MAX_FPS = 1000.0
_OPEN_OPTIONS = {"format_whitelist": ",".join(ACCEPTED_DEMUXERS), "protocol_whitelist": "none"}
# Errors PyAV/FFmpeg raise on bad input (av.FFmpegError subclasses OSError/ValueError; some paths raise others).
_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError, UnicodeError, IndexError)
# A single-stream container whose decodable frames cover this much less than its declared duration is truncated.
_TRUNCATION_SLACK_S = 1.0
_TRUNCATION_SLACK_FRACTION = 0.25


@dataclass
class VideoLimits:
    """Bounds applied to every client video; the header is checked before any frame is decoded."""

    max_bytes: int = 200 * 1024 * 1024
    max_frames: int = 2000
    max_duration_s: float = 600.0
    max_pixels_per_frame: int = 4_000_000
    max_side: int = 4096
    max_decoded_bytes: int = 512 * 1024**2  # frames held decoded; a longer video is re-read from its container
    frame_cache_bytes: int = 256 * 1024**2  # decoded frames a re-read video keeps around the one last read

    @classmethod
    def from_config(cls, config: Config) -> VideoLimits:
        return cls(
            max_bytes=config.video_max_bytes,
            max_frames=config.video_max_frames,
            max_duration_s=config.video_max_duration_s,
            max_pixels_per_frame=config.video_max_frame_pixels,
            max_side=config.video_max_side,
            max_decoded_bytes=config.video_max_decoded_bytes,
            frame_cache_bytes=config.video_frame_cache_bytes,
        )


@dataclass
class Video:
    """Frames, each (H, W, 3) uint8 RGB on the CPU when read, all of one size, with their frame rate.

    `frames` is a list (decoded, held in memory) or ContainerFrames (re-read from the container on demand, for a
    video whose decoded frames would take more than VideoLimits.max_decoded_bytes)."""

    frames: Sequence[np.ndarray]
    fps: float
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


# ------------------------------------------------------------------ decoding


def video_bytes_from_base64(value: str, limits: VideoLimits) -> bytes:
    """Raw or URL-safe base64, or a base64 data URI, to video bytes within limits.max_bytes."""
    try:
        return decode_base64_payload(value, limits.max_bytes)
    except PayloadTooLarge:
        raise _too_many_bytes(None, limits.max_bytes) from None
    except InvalidImage as exc:
        message = exc.message
        raise InvalidVideo("video" + message[5:] if message.startswith("image") else message) from None


def decode_video(data: bytes, limits: VideoLimits, *, max_frames: int | None = None) -> Video:
    """Decode the first video stream of an mp4 / mov / mkv / webm / avi held in memory.

    Raises PayloadTooLarge for bytes, resolution, duration, frame count or decoded size over the limits (header
    values first, then every decoded frame, stopping at the first frame over the limit) and InvalidVideo for bytes
    that are not an accepted container, hold no video stream or no decodable frame, or are truncated/corrupt.
    `max_frames` tightens limits.max_frames for one call; it never raises it. The display rotation (multiples of
    90 degrees, phone videos) is applied. A mid-stream resolution change is scaled to the first frame's size.
    """
    if not data:
        raise InvalidVideo("video is empty")
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(len(data), limits.max_bytes)
    if max_frames is not None and max_frames < 1:
        raise BadRequest(f"max_frames must be at least 1, got {max_frames}")
    cap = limits.max_frames if max_frames is None else min(limits.max_frames, max_frames)
    container = _open(data)
    try:
        stream = _video_stream(container)
        _check_header(container, stream, limits, cap)
        return _decode_frames(container, stream, limits, cap, data)
    finally:
        container.close()


def probe_video(data: bytes, limits: VideoLimits) -> None:
    """The checks that need no full decode: size, container, a video stream, declared size, length and frame count,
    and one decodable frame. Run where the upload arrives, so that a refused video never starts a session actor."""
    if not data:
        raise InvalidVideo("video is empty")
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(len(data), limits.max_bytes)
    container = _open(data)
    try:
        stream = _video_stream(container)
        _check_header(container, stream, limits, limits.max_frames)
        try:
            first = next(iter(container.decode(stream)), None)
        except _DECODE_ERRORS as exc:
            raise InvalidVideo(f"video has no decodable frame ({_reason(exc)})") from None
        if first is None:
            raise InvalidVideo("video has no decodable frames (empty, truncated or corrupt)")
        check_resolution(first.width, first.height, limits)
    finally:
        container.close()


def _open(data: bytes) -> Any:
    try:
        return av.open(io.BytesIO(data), mode="r", container_options=_OPEN_OPTIONS)
    except _DECODE_ERRORS as exc:
        raise InvalidVideo(
            "could not open video: not an mp4, mov, mkv, webm or avi file, or the file is truncated or corrupt "
            f"({_reason(exc)})"
        ) from None


def _video_stream(container: Any) -> Any:
    streams = container.streams.video
    if not streams:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
        raise InvalidVideo(f"the file holds no video stream (streams found: {kinds})")
    stream = streams[0]
    stream.thread_type = "AUTO"
    return stream


def _check_header(container: Any, stream: Any, limits: VideoLimits, cap: int) -> None:
    """Reject on declared values alone: nothing has been decoded yet."""
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width and height:
        check_resolution(width, height, limits)
    declared_s = _declared_duration(container, stream)
    if declared_s is not None and declared_s > limits.max_duration_s:
        raise _too_long(declared_s, limits.max_duration_s)
    declared_frames = int(stream.frames or 0)
    if declared_frames > cap:
        raise _too_many_frames(f"{declared_frames} frames", cap)


def _decode_frames(container: Any, stream: Any, limits: VideoLimits, cap: int, data: bytes) -> Video:
    """Every frame is decoded once, to check it; its pixels are kept only while all of them fit max_decoded_bytes.

    A longer video keeps the container bytes and each frame's timestamp instead (ContainerFrames), and frames are
    decoded again when the model reads them: memory is the upload plus a small cache, whatever the length.
    """
    fps = _fps(stream)
    held: list[np.ndarray] | None = []
    stamps: list[int | None] = []
    keys: list[bool] = []
    size: tuple[int, int] | None = None  # (width, height) every frame is brought to, before rotation
    turns, first_t, last_t = 0, None, None
    declared = int(stream.frames or 0)
    # One reformatter (one SwsContext) for every frame: VideoFrame.to_ndarray(format=...) builds a new one per
    # frame, about 90 % of the decode's time on small frames (1,370 -> 4,289 frames/s at 128x96, same bits).
    reformatter = av.video.reformatter.VideoReformatter()
    try:
        for frame in container.decode(stream):
            if len(stamps) >= cap:
                raise _too_many_frames(f"more than {cap} frames", cap)
            check_resolution(frame.width, frame.height, limits)
            if size is None:
                size, turns = (frame.width, frame.height), _quarter_turns(frame)
                if declared * size[0] * size[1] * 3 > limits.max_decoded_bytes:
                    held = None  # the header already says the frames will not fit: do not convert any
            t = frame.time
            if t is not None:
                first_t = t if first_t is None else first_t
                last_t = t
            elapsed = (last_t - first_t) if last_t is not None else len(stamps) / fps
            if elapsed > limits.max_duration_s:
                raise _too_long(elapsed, limits.max_duration_s)
            stamps.append(frame.pts)
            keys.append(bool(frame.key_frame))
            if held is not None:
                if (len(held) + 1) * size[0] * size[1] * 3 > limits.max_decoded_bytes:
                    held = None  # over the budget: from here on, frames are re-read from the container
                else:
                    held.append(_frame_to_rgb(frame, size, turns, reformatter))
    except _DECODE_ERRORS as exc:
        raise InvalidVideo(f"video is truncated or corrupt after frame {len(stamps)} ({_reason(exc)})") from None
    if not stamps:
        raise InvalidVideo("video has no decodable frames (empty, truncated or corrupt)")
    covered = (last_t - first_t + 1.0 / fps) if last_t is not None else len(stamps) / fps
    _check_not_truncated(container, stream, len(stamps), covered)
    width, height = size if turns % 2 == 0 else (size[1], size[0])
    if held is not None:
        return Video(frames=held, fps=fps, width=width, height=height)
    frames = ContainerFrames(data, stream.index, stamps, keys, size, turns, limits.frame_cache_bytes)
    return Video(frames=frames, fps=fps, width=width, height=height)


class _FramesOnDemand(Sequence):
    """Frames decoded when read, the last `capacity` read kept decoded: indexing (slices, negative indices, range
    checks) and the cache; a subclass decodes a frame that is not cached (`_miss`)."""

    capacity: int
    _cache: OrderedDict[int, np.ndarray]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} of a {len(self)}-frame video")
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        return self._miss(index)

    def _miss(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def _keep(self, index: int, frame: np.ndarray) -> None:
        self._cache[index] = frame
        self._cache.move_to_end(index)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)


class ContainerFrames(_FramesOnDemand):
    """A video's frames read back from its container bytes when asked for, a bounded number kept decoded.

    Reading in order (forward propagation, rendering) decodes each frame once. Any other read seeks to the last
    keyframe at or before the frame (by the timestamps of the first decode) and decodes from there, keeping the
    frames up to it in the cache, so reading backwards decodes each group of pictures about once per cache's worth
    of frames. Frames are bit for bit those of the first decode (same decoder, same conversion). Not thread-safe:
    one session actor reads it.
    """

    def __init__(
        self, data: bytes, stream_index: int, stamps: list[int | None], keys: list[bool], size: tuple[int, int],
        turns: int, cache_bytes: int,
    ) -> None:
        self.data, self.stream_index, self.size, self.turns = data, stream_index, size, turns
        self.stamps, self.keys = stamps, keys
        self.seekable = all(p is not None for p in stamps) and len(set(stamps)) == len(stamps)
        self.index_of = {p: i for i, p in enumerate(stamps)} if self.seekable else {}
        self.capacity = max(2, cache_bytes // (size[0] * size[1] * 3))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._container: Any = None
        self._frames: Iterator[Any] | None = None
        self._next: int | None = None  # index of the frame self._frames yields next, when known
        self._reformatter = av.video.reformatter.VideoReformatter()
        self.decoded = 0  # frames decoded since the first decode (for tests and the benchmark)

    def __len__(self) -> int:
        return len(self.stamps)

    def _miss(self, index: int) -> np.ndarray:
        if self._frames is None or self._next is None or not 0 <= index - self._next < self.capacity:
            self._restart(index)
        frame = self._read_to(index)
        if frame is None:  # the seek landed past it (unreliable keyframe flags or timestamps): from the start
            self._restart(index, from_start=True)
            frame = self._read_to(index)
        if frame is None:
            raise InvalidVideo(f"frame {index} could not be decoded again")
        return frame

    def _restart(self, index: int, *, from_start: bool = False) -> None:
        """Position the decoder before `index`: seek to its keyframe, or decode the container from the start."""
        key = next((i for i in range(index, -1, -1) if self.keys[i]), 0)
        if from_start or not self.seekable or key == 0:
            if self._container is not None:
                self._container.close()
            self._container = _open(self.data)
            self._next = 0 if not self.seekable else None
        else:
            self._container.seek(self.stamps[key], stream=self._stream(), backward=True, any_frame=False)
            self._next = None  # known from the first frame's timestamp
        self._frames = iter(self._container.decode(self._stream()))

    def _stream(self) -> Any:
        stream = self._container.streams[self.stream_index]
        if not stream.codec_context.is_open:
            stream.thread_type = "AUTO"
        return stream

    def _read_to(self, index: int) -> np.ndarray | None:
        assert self._frames is not None
        keep_from = index - self.capacity + 1
        try:
            for frame in self._frames:
                current = self.index_of.get(frame.pts) if self.seekable else self._next
                if current is None:
                    continue  # before the first timestamp the first decode saw: not a frame of ours
                self.decoded += 1
                self._next = current + 1
                if current > index:
                    return None
                if current >= keep_from:
                    self._keep(current, _frame_to_rgb(frame, self.size, self.turns, self._reformatter))
                if current == index:
                    return self._cache[index]
        except _DECODE_ERRORS as exc:
            raise InvalidVideo(f"frame {index} could not be decoded again ({_reason(exc)})") from None
        self._frames = None
        return None

    def close(self) -> None:
        self._cache.clear()
        self._frames = None
        if self._container is not None:
            self._container.close()
            self._container = None

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reformatter = av.video.reformatter.VideoReformatter()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_cache=OrderedDict(), _container=None, _frames=None, _next=None, _reformatter=None)
        return state


def _frame_to_rgb(frame: Any, size: tuple[int, int], turns: int, reformatter: Any = None) -> np.ndarray:
    """One decoded frame to (H, W, 3) uint8 RGB at `size`, rotated by `turns` quarter turns counterclockwise."""
    reformatter = reformatter or av.video.reformatter.VideoReformatter()
    if (frame.width, frame.height) != size:
        rgb = reformatter.reformat(frame, width=size[0], height=size[1], format="rgb24").to_ndarray()
    else:
        rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
    if turns:
        rgb = np.rot90(rgb, k=turns)
    return np.ascontiguousarray(rgb)


def _quarter_turns(frame: Any) -> int:
    """Counterclockwise quarter turns from the display matrix (0 when absent or not a multiple of 90 degrees)."""
    angle = getattr(frame, "rotation", 0) or 0  # VideoFrame.rotation exists from PyAV 14
    if not math.isfinite(angle) or round(angle) % 90:
        return 0
    return (round(angle) // 90) % 4


def _fps(stream: Any) -> float:
    for rate in (stream.average_rate, stream.guessed_rate):
        value = float(rate) if rate else 0.0
        if math.isfinite(value) and 0.0 < value <= _MAX_FPS:
            return value
    return DEFAULT_FPS


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _check_not_truncated(container: Any, stream: Any, decoded: int, covered_s: float) -> None:
    """Demuxers may stop silently at a cut: compare the decoded span with the duration the file declares.

    The video stream's own duration is used (mp4/mov/avi); else the container's, only when it holds no other
    stream (mkv/webm declare one duration for all tracks, and an audio track may legitimately outlast the video).
    """
    if stream.duration and stream.time_base:
        declared = float(stream.duration * stream.time_base)
    elif len(container.streams) == 1 and container.duration:
        declared = container.duration / av.time_base
    else:
        return
    if declared - covered_s > max(_TRUNCATION_SLACK_S, _TRUNCATION_SLACK_FRACTION * declared):
        raise InvalidVideo(
            f"video is truncated or corrupt after frame {decoded}: the file declares {declared:.1f} s "
            f"but only {covered_s:.1f} s could be decoded"
        )


def check_resolution(width: int, height: int, limits: VideoLimits) -> None:
    if width < 1 or height < 1:
        raise InvalidVideo(f"video frames are {width}x{height} pixels")
    if width * height > limits.max_pixels_per_frame:
        raise PayloadTooLarge(
            f"video frames are {width}x{height} ({width * height} pixels), more than the limit of "
            f"{limits.max_pixels_per_frame} pixels per frame; downscale it or raise SAM3_VIDEO_MAX_FRAME_PIXELS"
        )
    if max(width, height) > limits.max_side:
        raise PayloadTooLarge(
            f"video frames are {width}x{height}, a side longer than the limit of {limits.max_side} pixels "
            "(SAM3_VIDEO_MAX_SIDE)"
        )


def _check_decoded_bytes(frames: int, width: int, height: int, limits: VideoLimits) -> None:
    total = frames * width * height * 3
    if total > limits.max_decoded_bytes:
        raise PayloadTooLarge(
            f"video decodes to more than {limits.max_decoded_bytes} bytes of RGB frames ({frames} frames of "
            f"{width}x{height}); send fewer frames or a lower resolution, or raise SAM3_VIDEO_MAX_DECODED_BYTES"
        )


def _too_many_bytes(size: int | None, max_bytes: int) -> PayloadTooLarge:
    what = f"video is {size} bytes," if size is not None else "video is"
    return PayloadTooLarge(f"{what} more than the limit of {max_bytes} bytes (SAM3_VIDEO_MAX_BYTES)")


def _too_long(seconds: float, limit: float) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"video lasts {seconds:.1f} s, more than the limit of {limit:g} s; trim it or raise SAM3_VIDEO_MAX_DURATION_S"
    )


def _too_many_frames(what: str, cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"video has {what}, more than the limit of {cap} frames; trim it, lower its frame rate "
        "or raise SAM3_VIDEO_MAX_FRAMES"
    )


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).replace(": '<none>'", "")


# ------------------------------------------------------------ image frames


def frames_from_images(
    images: Sequence[np.ndarray] | Sequence[bytes], fps: float = DEFAULT_FPS, *, limits: VideoLimits | None = None,
    decode: Callable[[bytes], np.ndarray] | None = None,
) -> Video:
    """A Video from client frames, all of the first frame's size: decoded RGB arrays, or encoded images with the
    `decode` that turns one into an (H, W, 3) uint8 array (ImageLoader.decode: the image routes' checks).

    Encoded frames are decoded one at a time, each once, to check it; their pixels are kept while all of them fit
    limits.max_decoded_bytes. More frames than that stay encoded (EncodedFrames, the client's own bytes, at most
    limits.max_bytes in all) and are decoded again when the model reads them. Arrays over the budget are refused:
    they are already decoded, in the caller's memory.
    """
    if not images:
        raise InvalidVideo("a video needs at least one frame")
    if not (math.isfinite(fps) and 0.0 < fps <= _MAX_FPS):
        raise InvalidVideo(f"fps must be in (0, {_MAX_FPS:g}], got {fps}")
    if limits is not None and len(images) > limits.max_frames:
        raise _too_many_frames(f"{len(images)} frames", limits.max_frames)
    if isinstance(images[0], (bytes, bytearray, memoryview)):
        if decode is None:
            raise TypeError("encoded frames need the decode function that reads them")
        return _frames_from_encoded([bytes(b) for b in images], float(fps), limits or VideoLimits(), decode)
    first = np.asarray(images[0])
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise InvalidVideo(f"frame 0 must be an RGB uint8 image (H, W, 3), got {first.dtype} {first.shape}")
    height, width = first.shape[:2]
    if limits is not None:
        check_resolution(width, height, limits)
        _check_decoded_bytes(len(images), width, height, limits)
    frames = []
    for i, image in enumerate(images):
        arr = np.asarray(image)
        _check_same_shape(i, arr, first.shape)
        frames.append(np.ascontiguousarray(arr))
    return Video(frames=frames, fps=float(fps), width=int(width), height=int(height))


def _check_same_shape(index: int, arr: np.ndarray, shape: tuple) -> None:
    if arr.shape != shape or arr.dtype != np.uint8:
        raise InvalidVideo(
            f"frame {index} is {arr.dtype} {tuple(arr.shape)} but frame 0 is uint8 {tuple(shape)}: "
            "all frames of a video must share one size"
        )


def _frames_from_encoded(
    blobs: list[bytes], fps: float, limits: VideoLimits, decode: Callable[[bytes], np.ndarray]
) -> Video:
    total = sum(len(b) for b in blobs)
    if total > limits.max_bytes:
        raise PayloadTooLarge(
            f"frames are {total} bytes encoded, more than the limit of {limits.max_bytes} bytes for a video "
            "(SAM3_VIDEO_MAX_BYTES)"
        )
    held: list[np.ndarray] | None = []
    shape: tuple | None = None
    for i, blob in enumerate(blobs):
        arr = decode(blob)
        if shape is None:
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise InvalidVideo(f"frame 0 must decode to RGB uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
            shape = arr.shape
            check_resolution(shape[1], shape[0], limits)
        _check_same_shape(i, arr, shape)
        if held is not None:
            if (len(held) + 1) * arr.nbytes > limits.max_decoded_bytes:
                held = None  # over the budget: from here on every frame is decoded again when it is read
            else:
                held.append(np.ascontiguousarray(arr))
        del arr
    assert shape is not None
    height, width = int(shape[0]), int(shape[1])
    if held is not None:
        return Video(frames=held, fps=fps, width=width, height=height)
    return Video(frames=EncodedFrames(blobs, shape, decode, limits.frame_cache_bytes), fps=fps, width=width,
                 height=height)


class EncodedFrames(_FramesOnDemand):
    """A video's frames kept as the encoded images the client sent, decoded when read; the most recently read ones
    (up to cache_bytes of pixels) stay decoded. Each read gives the pixels the first decode gave (same decoder)."""

    def __init__(self, blobs: list[bytes], shape: tuple, decode: Callable[[bytes], np.ndarray], cache_bytes: int):
        self.blobs, self.shape, self.decode = blobs, tuple(shape), decode
        self.capacity = max(2, cache_bytes // int(np.prod(self.shape)))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.decoded = 0  # frames decoded again after the first check (for tests and the benchmark)

    def __len__(self) -> int:
        return len(self.blobs)

    def _miss(self, index: int) -> np.ndarray:
        frame = np.ascontiguousarray(self.decode(self.blobs[index]))
        if frame.shape != self.shape:
            raise InvalidVideo(f"frame {index} decoded to {frame.shape}, not {self.shape}")
        self.decoded += 1
        self._keep(index, frame)
        return frame

    def close(self) -> None:
        self._cache.clear()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}


# ------------------------------------------------------------------ encoding


@functools.lru_cache(maxsize=1)
def mp4_codec() -> str:
    """libx264 when this FFmpeg build has it, else the native 'mpeg4' (MPEG-4 Part 2) encoder."""
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - any failure means "not usable here"
            continue
        return name
    raise RuntimeError("this FFmpeg build has neither libx264 nor mpeg4 encoders")


class Mp4Writer:
    """An MP4 written one frame at a time: H.264 yuv420p, or MPEG-4 Part 2 where libx264 is missing.

    Memory is the encoder's few frames of look-ahead plus the compressed bytes, never the whole video decoded.
    yuv420p needs even sides: an odd width or height is padded by one replicated edge row/column.
    The moov atom is written at the end (no faststart: that needs a second pass over a file).
    """

    def __init__(self, width: int, height: int, fps: float) -> None:
        self.width, self.height, self.frames = int(width), int(height), 0
        self._pad = ((0, self.height % 2), (0, self.width % 2), (0, 0))
        rate = Fraction(fps if math.isfinite(fps) and 0 < fps <= _MAX_FPS else DEFAULT_FPS).limit_denominator(1001)
        codec = mp4_codec()
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.width, self._stream.height = self.width + self.width % 2, self.height + self.height % 2
        self._stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self._stream.options = {"preset": "veryfast", "crf": "23"}
        else:
            self._stream.bit_rate = max(1_000_000, self._stream.width * self._stream.height * 4)

    def write(self, image: np.ndarray) -> None:
        arr = np.asarray(image)
        if arr.shape != (self.height, self.width, 3) or arr.dtype != np.uint8:
            raise ValueError(
                f"frame {self.frames} is {arr.dtype} {arr.shape}, frame 0 is {(self.height, self.width, 3)}"
            )
        if self._pad[0][1] or self._pad[1][1]:
            arr = np.pad(arr, self._pad, mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def finish(self) -> bytes:
        """Flush the encoder, close the container and return the MP4's bytes."""
        self._container.mux(self._stream.encode(None))
        self._container.close()
        return self._buffer.getvalue()

    def abort(self) -> None:
        """Close without flushing (after an error: the error is the one to report)."""
        with contextlib.suppress(Exception):
            self._container.close()


def encode_mp4(frames: Iterable[np.ndarray], fps: float) -> bytes:
    """RGB frames (one size) to MP4 bytes (see Mp4Writer); `frames` is read once, one frame at a time."""
    writer = None
    for img in frames:
        arr = np.asarray(img)
        if writer is None:
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise ValueError(f"expected RGB uint8 frames (H, W, 3), got {arr.dtype} {arr.shape}")
            writer = Mp4Writer(arr.shape[1], arr.shape[0], fps)
        try:
            writer.write(arr)
        except BaseException:
            writer.abort()
            raise
    if writer is None:
        raise ValueError("encode_mp4 needs at least one frame")
    return writer.finish()


# ------------------------------------------------------------------ masks


FrameMasks = Sequence[Sequence[tuple[int, np.ndarray]]]


def object_color(object_id: int) -> tuple[int, int, int]:
    """The colour an object keeps on every frame (and across requests): PALETTE[object_id % len(PALETTE)]."""
    return PALETTE[int(object_id) % len(PALETTE)]


def render_masks_video(
    video: Video, frame_masks: Iterable[Sequence[tuple[int, np.ndarray]]], *, apply_mask: bool
) -> bytes:
    """MP4 of the video with each object's mask drawn in its own stable colour, rendered frame by frame.

    apply_mask=True fills masks at 50 % opacity and outlines them; apply_mask=False only outlines them (the
    frames stay readable and the tracked objects are still visible). frame_masks yields one (possibly empty)
    list of (object_id, bool (H, W) mask) per frame, in order; it may be a generator, so only one frame's masks
    and one rendered frame are alive at a time (docs/memory.md).
    """
    if isinstance(frame_masks, Sized) and len(frame_masks) != video.num_frames:
        raise ValueError(f"got masks for {len(frame_masks)} frames, the video has {video.num_frames}")
    alpha = 0.5 if apply_mask else 0.0
    writer = Mp4Writer(video.width, video.height, video.fps)
    count = 0
    try:
        for objects in frame_masks:
            if count >= video.num_frames:
                raise ValueError(f"got masks for more than {video.num_frames} frames, the video has {video.num_frames}")
            frame = video.frames[count]
            if objects:
                colors = [object_color(object_id) for object_id, _ in objects]
                frame = overlay(frame, [mask for _, mask in objects], alpha=alpha, colors=colors)
            writer.write(frame)
            count += 1
            del frame, objects  # this frame's masks and pixels go before the next frame's are made
        if count != video.num_frames:
            raise ValueError(f"got masks for {count} frames, the video has {video.num_frames}")
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def masks_to_rle(frame_masks: FrameMasks) -> list[list[dict[str, Any]]]:
    """Per frame, [{"object_id": int, "rle": COCO compressed RLE}] in the order given."""
    out: list[list[dict[str, Any]]] = []
    for objects in frame_masks:
        if not objects:
            out.append([])
            continue
        rles = rle_encode_many(np.stack([np.asarray(mask, dtype=bool) for _, mask in objects]))
        out.append([{"object_id": int(object_id), "rle": rle} for (object_id, _), rle in zip(objects, rles)])
    return out
