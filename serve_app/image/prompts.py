"""Prompt checks shared by every provider: counts, labels, and coordinates against the actual image."""

from __future__ import annotations

from dataclasses import replace

from serve_app.core.config import Config
from serve_app.core.errors import InvalidPrompt
from serve_app.core.types import AutoPrompt, ConceptPrompt, Prompt, VisualPrompt
from serve_app.image.geometry import validate_box_xyxy, validate_point

MAX_TEXT_CHARS = 256
MAX_POINTS_PER_SIDE = 128
_CONTROL = frozenset(chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F))


def check_text(value: str, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    """A client string the model or a key store will see: no NUL or other control characters, no lone surrogates
    (valid JSON, not Unicode), at most `limit` characters. Raises InvalidPrompt (400) naming the field."""
    if len(value) > limit:
        raise InvalidPrompt(f"{what} has {len(value)} characters; the limit is {limit}")
    bad = next((ch for ch in value if ch in _CONTROL or "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        kind = "a lone surrogate" if "\ud800" <= bad <= "\udfff" else "a control character"
        raise InvalidPrompt(f"{what} contains {kind} (U+{ord(bad):04X}); send printable text")
    return value


def _concept(prompt: ConceptPrompt, size: tuple[int, int], config: Config) -> ConceptPrompt:
    height, width = size
    if prompt.text is None and not prompt.boxes:
        raise InvalidPrompt("a concept prompt needs text, exemplar boxes, or both")
    if prompt.text is not None and not prompt.text.strip():
        raise InvalidPrompt("the text prompt is blank")
    if prompt.text is not None:
        check_text(prompt.text, "the text prompt")
    if len(prompt.boxes) > config.max_boxes:
        raise InvalidPrompt(f"{len(prompt.boxes)} boxes in one prompt; the limit is {config.max_boxes}")
    if len(prompt.box_labels) != len(prompt.boxes):
        raise InvalidPrompt(f"{len(prompt.boxes)} boxes but {len(prompt.box_labels)} box labels: give one label per box")
    boxes = tuple(validate_box_xyxy(b, width, height) for b in prompt.boxes)
    return replace(prompt, boxes=boxes, box_labels=tuple(bool(v) for v in prompt.box_labels))


def _visual(prompt: VisualPrompt, size: tuple[int, int], config: Config) -> VisualPrompt:
    height, width = size
    if not prompt.points and prompt.box is None:
        raise InvalidPrompt("a visual prompt needs points, a box, or both")
    if len(prompt.points) > config.max_points:
        raise InvalidPrompt(f"{len(prompt.points)} points in one prompt; the limit is {config.max_points}")
    if len(prompt.point_labels) != len(prompt.points):
        raise InvalidPrompt(
            f"{len(prompt.points)} points but {len(prompt.point_labels)} point labels: give one label per point"
        )
    if any(label not in (0, 1) for label in prompt.point_labels):
        raise InvalidPrompt("point labels must be 1 (on the object) or 0 (background)")
    points = tuple(validate_point(x, y, width, height) for x, y in prompt.points)
    box = validate_box_xyxy(prompt.box, width, height) if prompt.box is not None else None
    return replace(prompt, points=points, point_labels=tuple(int(v) for v in prompt.point_labels), box=box)


def _auto(prompt: AutoPrompt) -> AutoPrompt:
    if not 1 <= prompt.points_per_side <= MAX_POINTS_PER_SIDE:
        raise InvalidPrompt(f"points_per_side must be between 1 and {MAX_POINTS_PER_SIDE}, got {prompt.points_per_side}")
    return prompt


def validate_prompts(prompts: list[Prompt], size: tuple[int, int], config: Config) -> list[Prompt]:
    """Check prompts against the image (height, width) and the limits; clip boxes that overhang the image."""
    if not prompts:
        raise InvalidPrompt("give at least one prompt")
    if len(prompts) > config.max_prompts:
        raise InvalidPrompt(f"{len(prompts)} prompts; the limit is {config.max_prompts} (SAM3_MAX_PROMPTS)")
    checked: list[Prompt] = []
    for prompt in prompts:
        if isinstance(prompt, ConceptPrompt):
            checked.append(_concept(prompt, size, config))
        elif isinstance(prompt, VisualPrompt):
            checked.append(_visual(prompt, size, config))
        else:
            checked.append(_auto(prompt))
    return checked
