"""What a live stream tracks, and the checks made on it before any actor starts (no torch: the ingress runs them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from serve_app.core.config import Config
from serve_app.core.errors import InvalidPrompt

Mode = Literal["text", "click"]


@dataclass(frozen=True)
class StreamObject:
    """Clicks and/or a box that start one object on the stream's first frame."""

    object_id: int
    points: tuple = ()
    labels: tuple = ()
    box: tuple | None = None


@dataclass(frozen=True)
class StreamPrompt:
    """What a stream tracks: every instance of some noun phrases, or clicked objects."""

    texts: tuple[str, ...] = ()
    objects: tuple[StreamObject, ...] = ()

    @property
    def mode(self) -> Mode:
        return "text" if self.texts else "click"


def check_prompt(prompt: StreamPrompt, config: Config) -> None:
    """The checks that need no frame (the image and session routes' caps), made before any actor starts."""
    if bool(prompt.texts) == bool(prompt.objects):
        raise InvalidPrompt("start a stream with `text` (one phrase or a list) or with `objects` (clicks/boxes), not both")
    if len(prompt.texts) > config.max_prompts:
        raise InvalidPrompt(f"{len(prompt.texts)} text prompts; the limit is {config.max_prompts} (SAM3_MAX_PROMPTS)")
    for text in prompt.texts:
        if not text.strip():
            raise InvalidPrompt("a text prompt is blank")
    if len(prompt.objects) > config.video_max_objects:
        raise InvalidPrompt(
            f"{len(prompt.objects)} objects; a stream tracks at most {config.video_max_objects} (SAM3_VIDEO_MAX_OBJECTS)"
        )
    if len({o.object_id for o in prompt.objects}) != len(prompt.objects):
        raise InvalidPrompt("each object needs its own object_id")
    for obj in prompt.objects:
        if not obj.points and obj.box is None:
            raise InvalidPrompt(f"object {obj.object_id}: give points, a box, or both")
        if len(obj.points) > config.max_points:
            raise InvalidPrompt(
                f"{len(obj.points)} points in one prompt; the limit is {config.max_points} (SAM3_MAX_POINTS)"
            )
        if len(obj.labels) != len(obj.points):
            raise InvalidPrompt(f"{len(obj.labels)} point_labels for {len(obj.points)} points: give one label per point")
        if any(label not in (0, 1) for label in obj.labels):
            raise InvalidPrompt("point labels must be 1 (on the object) or 0 (background)")
