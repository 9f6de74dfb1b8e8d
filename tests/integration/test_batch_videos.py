"""The video batch job on Ray Data: a folder and a text, one session per video, tracks equal to a VideoSession's."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from serve_app.batch import assemble
from serve_app.batch.pipeline import run_videos, shipped_model
from serve_app.batch.spec import Resources, VideoJob
from serve_app.core.config import Config
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle
from serve_app.video.io import VideoLimits, decode_video
from serve_app.video.session import VideoSession
from tests.videos import write_video

FRAMES, H, W = 3, 48, 64
RESOURCES = Resources(actors=1, batch_size=1, rows_per_block=1, num_gpus=0, actor_cpus=1, torch_threads=1)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch_videos")
    (root / "a.mp4").write_bytes(write_video(FRAMES, H, W))
    (root / "b.mp4").write_bytes(write_video(FRAMES, H, W, fps=5))
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    return root


@pytest.fixture(scope="module")
def engine() -> ImageEngine:
    """On the copy of tiny-random the job ships to its actors (built once per process)."""
    return ImageEngine(load_bundle(Config(), shipped_model(Config())))


def _reference(engine: ImageEngine, path: Path, text: str) -> list[dict]:
    """Track lines as a fresh VideoSession gives them, driven through its own API."""
    video = decode_video(path.read_bytes(), VideoLimits())
    session = VideoSession(engine, video.frames, video.fps)
    session.add_text(text)
    frames = sorted(session.propagate("both"), key=lambda r: r.frame_index)
    session.close()
    return [
        {"video": str(path), "frame_index": r.frame_index, "object_id": o["object_id"], "score": o["score"],
         "box": [float(v) for v in o["box"]], "area": o["area"], "rle": o["rle"]}
        for r in frames for o in r.objects
    ]


def _lines(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / assemble.TRACKS).read_text().splitlines()]


def test_a_folder_of_videos_with_a_text_prompt(serve_instance, videos, engine, tmp_path):
    summary = run_videos(VideoJob([str(videos)], str(tmp_path / "out"), texts=["square"], resources=RESOURCES))
    rows = sorted(pq.read_table(tmp_path / "out" / "parts").to_pylist(), key=lambda r: r["index"])
    assert [(Path(r["path"]).name, r["error_code"]) for r in rows] == [("a.mp4", None), ("b.mp4", None),
                                                                       ("broken.mp4", "invalid_video")]
    assert [(r["num_frames"], r["height"], r["width"]) for r in rows[:2]] == [(FRAMES, H, W)] * 2
    assert rows[1]["fps"] == 5.0
    expected = [line for name in ("a.mp4", "b.mp4") for line in _reference(engine, videos / name, "square")]
    assert expected, "tiny-random must track something here, or the comparison proves nothing"
    assert _lines(tmp_path / "out") == expected  # b.mp4 as a fresh session sees it: one session per video
    assert summary.instances == len(expected) and summary.errors == 1
