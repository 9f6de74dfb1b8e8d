"""The web UI's plain handlers (no Gradio, no Ray): prompts from what a person types and clicks, downloads, keys,
and the video tab's session use with a fake backend."""

from __future__ import annotations

import asyncio
import base64
import json
import zipfile

import numpy as np
import pytest

from serve_app.core.auth import Authenticator
from serve_app.core.config import Config
from serve_app.core.errors import InvalidPrompt, Unauthorized
from serve_app.core.types import ConceptPrompt, VisualPrompt
from serve_app.image import codecs
from serve_app.ui import handlers
from serve_app.ui.handlers import Found, ImageAnswer
from serve_app.video.io import VideoLimits, decode_video
from tests.videos import write_video


def test_texts_split_on_commas_and_lines():
    assert handlers.parse_texts(" cat, dog\nred car ,, ") == ["cat", "dog", "red car"]
    assert handlers.parse_texts(None) == []


def test_clicks_make_points_and_two_corner_clicks_make_a_box():
    clicks, boxes, corner = handlers.add_click("object click", 10.4, 20.6, "[]", "[]", None)
    assert json.loads(clicks) == [[10, 21, 1]] and corner is None
    clicks, boxes, corner = handlers.add_click("background click", 5, 6, clicks, boxes, None)
    assert json.loads(clicks) == [[10, 21, 1], [5, 6, 0]]
    clicks, boxes, corner = handlers.add_click("box corner", 50, 40, clicks, boxes, None)
    assert corner == [50, 40] and json.loads(boxes) == []
    clicks, boxes, corner = handlers.add_click("box corner", 20, 70, clicks, boxes, corner)
    assert json.loads(boxes) == [[20, 40, 50, 70]] and corner is None  # corners in any order


@pytest.mark.parametrize("text", ["[[1, 2]]", "{\"x\": 1}", "[[1, 2, \"a\"]]", "not json"])
def test_bad_click_lists_say_what_they_should_be(text):
    with pytest.raises(InvalidPrompt, match="clicks must be a JSON list such as"):
        handlers.parse_clicks(text)


def test_prompts_follow_what_was_given():
    box = (1.0, 2.0, 30.0, 40.0)
    concepts = handlers.image_prompts(["cat", "dog"], [], [box])
    assert concepts == [ConceptPrompt("cat", (box,), (True,)), ConceptPrompt("dog", (box,), (True,))]
    with_click = handlers.image_prompts(["cat"], [(5.0, 6.0, 1)], [])
    assert with_click[1] == VisualPrompt(((5.0, 6.0),), (1,))
    visual = handlers.image_prompts([], [(5.0, 6.0, 1), (7.0, 8.0, 0)], [box, (0.0, 0.0, 4.0, 4.0)])
    assert visual == [VisualPrompt(((5.0, 6.0), (7.0, 8.0)), (1, 0), box), VisualPrompt(box=(0.0, 0.0, 4.0, 4.0))]
    with pytest.raises(InvalidPrompt, match="nothing to segment"):
        handlers.image_prompts([], [], [])


def test_downloads_hold_every_mask_as_png_and_rle(tmp_path):
    masks = [np.zeros((6, 8), bool), np.ones((6, 8), bool)]
    masks[0][1:3, 2:5] = True
    found = [Found(f"cat #{i + 1}", 0.5, [0, 0, 1, 1], int(m.sum()), codecs.rle_encode(m)) for i, m in enumerate(masks)]
    paths = handlers.write_downloads(ImageAnswer(np.zeros((6, 8, 3), np.uint8), found), tmp_path / "out")
    with zipfile.ZipFile(paths[0]) as zf:
        assert zf.namelist() == ["mask_000.png", "mask_001.png"]
        pngs = [codecs.png_bytes_to_mask(zf.read(name)) for name in zf.namelist()]
    rles = json.loads(open(paths[1]).read())
    for mask, png, row in zip(masks, pngs, rles):
        assert (png == mask).all() and (codecs.rle_decode(row["rle"]) == mask).all()
        assert row["area"] == int(mask.sum())


class _Service:
    def __init__(self, keys: list[str]) -> None:
        self.auth = Authenticator(keys)


def test_the_key_field_then_the_bearer_headers():
    service = _Service(["k1", "k2"])
    assert handlers.tenant(service, "k1", {}) == handlers.tenant(service, None, {"authorization": "Bearer k1"})
    assert handlers.tenant(service, "", {"x-hf-authorization": "Bearer k2"}) == Authenticator(["k2"]).tenant("k2")
    assert handlers.tenant(service, "k1", {"authorization": "Bearer nope"}) == Authenticator(["k1"]).tenant("k1")
    with pytest.raises(Unauthorized, match="key field"):
        handlers.tenant(service, None, {})
    assert handlers.tenant(_Service([]), None, {}) == "anonymous"


class _Videos:
    """A VideoBackend that tracks one square object on every frame."""

    def __init__(self, frames: int, fail: bool = False) -> None:
        self.frames, self.fail, self.calls, self.closed = frames, fail, [], False
        self._left = 0

    async def create(self, owner, data, frames, fps):
        return {"session_id": "s1", "num_frames": self.frames, "width": 128, "height": 96, "fps": 25.0}

    async def call(self, session_id, owner, method, *args):
        self.calls.append(method)
        if method == "add_clicks" and self.fail:
            raise InvalidPrompt("point (500, 500) is outside the 128x96 frame")
        if method == "start_propagation":
            self._left = self.frames
        if method == "next_frames":
            if not self._left:
                return None
            start = self.frames - self._left
            batch = list(range(start, min(self.frames, start + args[0])))
            self._left -= len(batch)
            mask = np.zeros((96, 128), bool)
            mask[10:30, 20:60] = True
            return [{"frame_index": i, "objects": [{"object_id": 1, "rle": codecs.rle_encode(mask)}]} for i in batch]
        return {}

    async def close(self, session_id, owner):
        self.closed = True
        return {}


def test_the_video_tab_tracks_reports_progress_and_closes(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(write_video(6, 96, 128))
    videos, seen = _Videos(6), []
    mp4 = asyncio.run(handlers.track_video(videos, Config(), "t", str(path), "", [(40, 20, 1)], True,
                                           lambda done, total: seen.append((done, total))))
    assert seen == [(4, 6), (6, 6)] and videos.closed
    assert videos.calls[:2] == ["add_clicks", "start_propagation"]
    video = decode_video(mp4, VideoLimits())
    assert video.num_frames == 6 and (video.width, video.height) == (128, 96)


def test_a_failing_video_prompt_still_closes_the_session(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(write_video(3, 96, 128))
    videos = _Videos(3, fail=True)
    with pytest.raises(InvalidPrompt, match="outside"):
        asyncio.run(handlers.track_video(videos, Config(), "t", str(path), None, [(500, 500, 1)], True, print))
    assert videos.closed
    with pytest.raises(InvalidPrompt, match="type what to track"):
        asyncio.run(handlers.track_video(videos, Config(), "t", str(path), " ", [], True, print))


def test_an_uploaded_file_is_sent_as_its_own_bytes(tmp_path):
    path = tmp_path / "x.png"
    data = codecs.encode_image(np.full((4, 4, 3), 7, np.uint8), "png")
    path.write_bytes(data)
    assert base64.b64decode(handlers.image_source(str(path))) == data
    with pytest.raises(InvalidPrompt, match="upload an image"):
        handlers.image_source(None)
