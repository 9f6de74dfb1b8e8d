"""The video stage: one tracking session per video, text or clicks, every frame's objects as RLE tracks."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from serve_app.batch.images import error_fields, make_engine, read_bytes
from serve_app.core.config import Config
from serve_app.core.errors import BadRequest
from serve_app.image.engine import ImageEngine
from serve_app.video.io import VideoLimits, decode_video
from serve_app.video.session import FrameResult, VideoSession

logger = logging.getLogger(__name__)

OBJECT = pa.struct([
    ("object_id", pa.int32()), ("score", pa.float64()), ("box", pa.list_(pa.float64())), ("area", pa.int64()),
    ("counts", pa.string()),  # COCO compressed RLE counts at the video's [height, width]
])
FRAME = pa.struct([("frame_index", pa.int32()), ("objects", pa.list_(OBJECT))])
VIDEO_ROW = pa.schema([
    ("index", pa.int64()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("num_frames", pa.int32()), ("fps", pa.float64()), ("error_code", pa.string()), ("error", pa.string()),
    ("frames", pa.list_(FRAME)),
])


def _frame(result: FrameResult) -> dict:
    return {
        "frame_index": result.frame_index,
        "objects": [
            {"object_id": o["object_id"], "score": o["score"], "box": [float(v) for v in o["box"]], "area": o["area"],
             "counts": o["rle"]["counts"]}
            for o in result.objects
        ],
    }


def track(session: VideoSession, prompts: list[dict]) -> list[dict]:
    """Apply /v1 video prompts (texts, or clicks/boxes per object) and propagate both ways from the first prompt."""
    for prompt in prompts:
        if prompt.get("text") is not None:
            session.add_text(prompt["text"])
        else:
            labels = prompt.get("point_labels")
            points = prompt.get("points", [])
            session.add_clicks(
                prompt.get("frame_index", 0), prompt["object_id"], points,
                labels if labels is not None else [1] * len(points), prompt.get("box"),
            )
    frames = {r.frame_index: _frame(r) for r in session.propagate("both")}
    return [frames[i] for i in sorted(frames)]


class VideoTracker:
    """The actor pool's callable: for each video, decode it within the limits, one session, all its tracks."""

    def __init__(
        self, config: Config, texts: list[str] | None, torch_threads: int | None = None,
        engine: ImageEngine | None = None, video_model=None,
    ) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.config = config
        self.limits = VideoLimits.from_config(config)
        self.engine = engine or make_engine(config, video_model)
        self.global_prompts = [{"text": t} for t in texts or []]

    def one(self, index: int, path: str, prompts_json: str) -> dict:
        row = {"index": int(index), "path": path, "width": 0, "height": 0, "num_frames": 0, "fps": 0.0,
               "error_code": None, "error": None, "frames": []}
        session = None
        try:
            video = decode_video(read_bytes(path, self.limits.max_bytes, "SAM3_VIDEO_MAX_BYTES"), self.limits)
            row.update(width=video.width, height=video.height, num_frames=video.num_frames, fps=float(video.fps))
            prompts = json.loads(prompts_json) if prompts_json else self.global_prompts
            if not prompts:
                raise BadRequest("no prompts for this video")
            session = VideoSession(self.engine, video.frames, video.fps, self.config.video_max_objects)
            row["frames"] = track(session, prompts)
        except Exception as exc:  # noqa: BLE001 - one bad video must not end the job
            logger.warning("video %s failed: %s", path, exc)
            row["error_code"], row["error"] = error_fields(exc)
            row["frames"] = []
        finally:
            if session is not None:
                session.close()
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [self.one(i, str(p), q) for i, p, q in zip(batch["index"], batch["path"], batch["prompts"])]
        return pa.Table.from_pylist(rows, schema=VIDEO_ROW)
