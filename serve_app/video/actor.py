"""The state one session actor holds: decoded frames, a VideoSession, and a propagation cursor the caller pulls."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np

from serve_app.core.config import Config
from serve_app.core.errors import BadRequest
from serve_app.core.stats import rss_bytes
from serve_app.image.codecs import rle_decode
from serve_app.image.engine import ImageEngine
from serve_app.image.imageio import ImageLoader
from serve_app.image.models import load_bundle
from serve_app.video.io import Video, VideoLimits, decode_video, frames_from_images, render_masks_video
from serve_app.video.session import FrameResult, VideoSession


class SessionState:
    """Everything behind one session id. Pull-based propagation: nothing runs ahead of the reader."""

    def __init__(self, config: Config, engine: ImageEngine | None = None, video_model=None) -> None:
        self.config = config
        self.engine = engine or ImageEngine(load_bundle(config, video_model))
        self.session: VideoSession | None = None
        self.video: Video | None = None
        self._cursor: Iterator[FrameResult] | None = None
        self.frames_propagated = 0
        self.objects_rendered = 0  # most objects on one frame of the last render
        self.last_used = time.monotonic()

    def load(self, data: bytes | None, frames: list[np.ndarray] | list[bytes] | None, fps: float | None) -> dict:
        """The session's video: container bytes, or frames (encoded images as the client sent them, or arrays)."""
        limits = VideoLimits.from_config(self.config)
        started = time.perf_counter()
        if data is not None:
            self.video = decode_video(data, limits)
        elif frames:
            decode = ImageLoader.from_config(self.config, None).decode  # the image routes' decode and checks
            self.video = frames_from_images(frames, fps or 25.0, limits=limits, decode=decode)
        else:
            raise BadRequest("give a video (bytes, base64 or URL) or a list of frames")
        decoded = time.perf_counter()
        self.session = VideoSession(self.engine, self.video.frames, self.video.fps, self.config.video_max_objects)
        done = time.perf_counter()
        timings = {"decode": round((decoded - started) * 1000, 1), "session": round((done - decoded) * 1000, 1)}
        return {**self.info(), "timings_ms": timings}

    def info(self) -> dict:
        session = self._session()
        return {
            "num_frames": session.num_frames, "fps": session.fps, "width": session.width, "height": session.height,
            "mode": session.mode, "texts": list(session.texts), "frames_propagated": self.frames_propagated,
            "rss_bytes": rss_bytes(), "pid": os.getpid(),
        }

    def _session(self) -> VideoSession:
        if self.session is None:
            raise BadRequest("the session has no video")
        self.last_used = time.monotonic()
        return self.session

    def add_text(self, frame_index: int, text: str) -> dict:
        session = self._session()
        session.check_frame(frame_index)
        return {"prompt_id": session.add_text(text), "frame_index": frame_index, "objects": []}

    def add_clicks(self, frame_index: int, object_id: int, points: list, labels: list, box: list | None) -> dict:
        return asdict(self._session().add_clicks(frame_index, object_id, points, labels, box))

    def remove_object(self, object_id: int) -> None:
        self._session().remove_object(object_id)
        self._cursor = None

    def reset(self) -> None:
        self._session().reset()
        self._cursor = None

    def start_propagation(self, direction: str, start_frame: int | None, max_frames: int | None) -> None:
        generator = self._session().propagate(direction, start_frame, max_frames)
        first = next(generator, None)  # surfaces bad arguments now, as a 4xx, not mid-stream
        self._cursor = _prepend(first, generator) if first is not None else iter(())

    def next_frames(self, count: int = 1) -> list[dict] | None:
        """Up to `count` more frames of the current propagation; None once it is finished."""
        self._session()
        if self._cursor is None:
            return None
        out = []
        for result in self._cursor:
            self.frames_propagated += 1
            out.append(asdict(result))
            if len(out) >= count:
                return out
        self._cursor = None
        return out or None

    def render(self, text: str, apply_mask: bool) -> bytes:
        """Track every instance of `text` through the whole video and return it as H.264 mp4 with masks.

        Frame by frame into the encoder: each frame's masks are decoded from RLE, drawn and encoded as the
        propagation yields it, then dropped; the tracking state keeps only the frames the model still reads
        (VideoSession.propagate one_pass) and is reset afterwards. Memory does not grow with frames x objects x
        pixels (docs/memory.md).
        """
        session = self._session()
        session.reset()
        session.add_text(text)
        self.objects_rendered = 0
        try:
            return render_masks_video(self.video, self._frames_in_order(session), apply_mask=apply_mask)
        finally:
            session.reset()  # one_pass dropped the frames behind the window: nothing may build on that state
            self._cursor = None

    def _frames_in_order(self, session: VideoSession) -> Iterator[list[tuple[int, np.ndarray]]]:
        """One list of (object_id, mask) per frame, 0..n-1, as the forward propagation produces them.

        Results that arrive ahead of their turn wait as RLE (kilobytes); a frame the model never reports is empty.
        """
        waiting: dict[int, list[dict]] = {}
        turn = 0
        for result in session.propagate("forward", 0, None, one_pass=True):
            self.frames_propagated += 1
            waiting[result.frame_index] = result.objects
            self.objects_rendered = max(self.objects_rendered, len(result.objects))
            while turn in waiting:
                yield [(o["object_id"], rle_decode(o["rle"])) for o in waiting.pop(turn)]
                turn += 1
        for index in range(turn, session.num_frames):
            yield [(o["object_id"], rle_decode(o["rle"])) for o in waiting.pop(index, [])]

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session, self.video, self._cursor = None, None, None


def _prepend(first: FrameResult, rest: Iterator[FrameResult]) -> Iterator[FrameResult]:
    yield first
    yield from rest
