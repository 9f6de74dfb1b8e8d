"""The batch stages without Ray: bad files become error rows, the segmenter answers as the engine does, per image."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.batch.images import ImageReader, ImageSegmenter
from serve_app.batch.spec import Thresholds, canonical
from serve_app.batch.videos import VideoTracker
from serve_app.core.config import Config
from serve_app.core.types import ConceptPrompt, SegmentParams, VisualPrompt
from serve_app.image.engine import ImageEngine
from serve_app.image.models import load_bundle
from tests.integration.conftest import random_image
from tests.unit.test_batch_files import write_bad_files, write_images
from tests.videos import write_video

PROMPTS = [{"type": "concept", "text": "a red car"}, {"type": "visual", "points": [[30, 40]]}]


@pytest.fixture(scope="module")
def engine() -> ImageEngine:
    return ImageEngine(load_bundle(Config()))


def _batch(paths: list[str], prompts: list[str] | None = None) -> dict:
    return {"index": np.arange(len(paths)), "path": np.array(paths, dtype=object),
            "prompts": np.array(prompts or [""] * len(paths), dtype=object)}


def test_the_reader_turns_each_bad_file_into_its_error_and_decodes_the_rest(tmp_path):
    bad = write_bad_files(tmp_path)
    (good,) = write_images(tmp_path, [5])
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * 5000)
    paths = [*bad, str(good), str(tmp_path / "gone.png")]
    out = ImageReader(Config())(_batch(paths))
    codes = dict(zip(paths, out["error_code"]))
    assert {p: codes[p] for p in bad} == bad
    assert codes[str(good)] == "" and np.array_equal(out["pixels"][3], random_image(5))
    assert codes[str(tmp_path / "gone.png")] == "unreadable"
    (code,) = ImageReader(Config(max_image_bytes=4096))(_batch([str(big)]))["error_code"]
    assert code == "payload_too_large"  # refused from its listed size, before it is read
    messages = dict(zip(paths, out["error"]))
    assert "truncated or corrupt" in messages[str(tmp_path / "truncated.png")]
    assert "10000000000 pixels" in messages[str(tmp_path / "bomb.png")]


def test_the_segmenter_gives_what_the_engine_gives_per_image(engine):
    images = [random_image(11), random_image(12, 80, 100)]
    segmenter = ImageSegmenter(Config(), PROMPTS, Thresholds(threshold=0.1), ["a red car", "prompt-1"], engine=engine)
    batch = {**_batch(["a.png", "b.png"]), "pixels": np.array(images + [None], dtype=object)[:2],
             "error_code": np.array(["", ""], dtype=object), "error": np.array(["", ""], dtype=object)}
    rows = segmenter(batch).to_pylist()
    prompts = [ConceptPrompt("a red car"), VisualPrompt(((30.0, 40.0),), (1,))]
    found = 0
    for row, image in zip(rows, images):
        expected = engine.segment(image, prompts, SegmentParams(threshold=0.1))
        want = [(r.prompt_index, i.score, i.rle["counts"], list(i.box)) for r in expected.prompts for i in r.instances]
        got = [(i["prompt_index"], i["score"], i["counts"], i["box"]) for i in row["instances"]]
        assert got == want
        assert (row["height"], row["width"], row["error_code"]) == (*image.shape[:2], None)
        assert {i["category"] for i in row["instances"]} <= {"a red car", "prompt-1"}
        found += len(got)
    assert found > 2


def test_a_prompt_that_does_not_fit_one_image_fails_that_image_only(engine):
    segmenter = ImageSegmenter(Config(), None, Thresholds(), [], engine=engine)
    inside = canonical([{"type": "visual", "points": [[90, 20]]}])
    images = [random_image(1), random_image(2, 40, 60)]  # the point lies outside the second image
    batch = {**_batch(["a.png", "b.png"], [inside, inside]), "pixels": np.array(images + [None], dtype=object)[:2],
             "error_code": np.array(["", ""], dtype=object), "error": np.array(["", ""], dtype=object)}
    rows = segmenter(batch).to_pylist()
    assert rows[0]["error_code"] is None and rows[0]["instances"][0]["category"] == "prompt-0"
    assert rows[1]["error_code"] == "invalid_prompt" and "outside the 60x40 image" in rows[1]["error"]
    assert (rows[1]["height"], rows[1]["width"]) == (40, 60)


def test_a_reader_error_passes_through_the_segmenter_as_the_row_error(engine):
    segmenter = ImageSegmenter(Config(), PROMPTS, Thresholds(), ["a", "b"], engine=engine)
    batch = {**_batch(["x.jpg"]), "pixels": np.array([np.zeros((0, 0, 3), np.uint8), None], dtype=object)[:1],
             "error_code": np.array(["invalid_image"], dtype=object), "error": np.array(["not an image"], dtype=object)}
    (row,) = segmenter(batch).to_pylist()
    assert (row["error_code"], row["error"], row["instances"]) == ("invalid_image", "not an image", [])


def test_the_video_tracker_records_a_broken_video_and_tracks_clicked_objects_on_every_frame(tmp_path, engine):
    (tmp_path / "broken.mp4").write_bytes(write_video(4, 48, 64)[:300])
    (tmp_path / "ok.mp4").write_bytes(write_video(4, 48, 64))
    tracker = VideoTracker(Config(), None, engine=engine)
    clicks = canonical([{"frame_index": 1, "object_id": 3, "points": [[20, 12]]}])
    broken = tracker.one(0, str(tmp_path / "broken.mp4"), clicks)
    assert broken["error_code"] == "invalid_video" and broken["frames"] == []
    row = tracker.one(1, str(tmp_path / "ok.mp4"), clicks)
    assert row["error_code"] is None and (row["num_frames"], row["height"], row["width"]) == (4, 48, 64)
    assert [f["frame_index"] for f in row["frames"]] == [0, 1, 2, 3]  # both ways from the clicked frame
    assert all([o["object_id"] for o in f["objects"]] == [3] for f in row["frames"])
