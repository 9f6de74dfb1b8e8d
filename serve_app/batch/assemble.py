"""The final outputs, assembled from the part files in index order, streaming: COCO JSON, tracks JSONL, errors."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field

from serve_app.batch.store import OutputStore

COCO_IMAGES = "coco/images.json"
COCO_RESULTS = "coco/results.json"
TRACKS = "tracks.jsonl"
ERRORS = "errors.jsonl"


@dataclass
class Totals:
    """What the output holds: items, errors, instances (images) or track entries (videos)."""

    items: int = 0
    errors: int = 0
    instances: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)

    def add_error(self, code: str) -> None:
        self.errors += 1
        self.error_codes[code] = self.error_codes.get(code, 0) + 1


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def xywh(box: list[float]) -> list[float]:
    """xyxy -> COCO's top-left [x, y, width, height]."""
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def coco_polygons(polygons_json: str | None) -> list[list[float]]:
    """/v1 polygons ({exterior, holes}) as COCO polygons: flat [x0, y0, x1, y1, ...] exteriors (COCO has no holes)."""
    return [[c for point in p["exterior"] for c in point] for p in json.loads(polygons_json or "[]")]


def annotation(image_id: int, category_id: int, inst: dict, size: list[int], polygons: bool) -> dict:
    """One COCO result: segmentation (RLE, or polygons with --polygons), bbox, score, area."""
    if polygons:
        segmentation: dict | list = coco_polygons(inst["polygons"])
    else:
        segmentation = {"size": size, "counts": inst["counts"]}
    return {"image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "bbox": xywh(inst["box"]), "score": inst["score"], "area": inst["area"]}


def _error_line(row: dict) -> str:
    return _dumps({"index": row["index"], "path": row["path"], "error_code": row["error_code"], "error": row["error"]})


def assemble_images(store: OutputStore, categories: list[str], coco: bool, polygons: bool) -> Totals:
    """COCO `images.json` (images + categories, image id = index + 1) and `results.json`, and `errors.jsonl`."""
    ids = {name: i + 1 for i, name in enumerate(categories)}
    totals = Totals()
    with ExitStack() as stack:
        errors = stack.enter_context(store.text_writer(ERRORS))
        images = stack.enter_context(store.text_writer(COCO_IMAGES)) if coco else None
        results = stack.enter_context(store.text_writer(COCO_RESULTS)) if coco else None
        separator = {"images": "", "results": "\n"}
        if coco:
            images.write('{"images":[')
            results.write("[")
        for row in store.rows():
            totals.items += 1
            if row["error_code"] is not None:
                totals.add_error(row["error_code"])
                errors.write(_error_line(row) + "\n")
                continue
            totals.instances += len(row["instances"])
            if not coco:
                continue
            entry = {"id": row["index"] + 1, "file_name": row["path"], "width": row["width"], "height": row["height"]}
            images.write(separator["images"] + _dumps(entry))
            separator["images"] = ",\n"
            size = [row["height"], row["width"]]
            for inst in row["instances"]:
                results.write(separator["results"] + _dumps(annotation(row["index"] + 1, ids[inst["category"]], inst,
                                                                       size, polygons)))
                separator["results"] = ",\n"
        if coco:
            table = _dumps([{"id": i, "name": name, "supercategory": "sam3"} for name, i in ids.items()])
            images.write(f'],\n"categories":{table}}}\n')
            results.write("\n]\n")
    return totals


def assemble_videos(store: OutputStore, jsonl: bool) -> Totals:
    """`tracks.jsonl`: one line per video, frame and object (video order, then frame, then object id), and errors."""
    totals = Totals()
    with ExitStack() as stack:
        errors = stack.enter_context(store.text_writer(ERRORS))
        tracks = stack.enter_context(store.text_writer(TRACKS)) if jsonl else None
        for row in store.rows():
            totals.items += 1
            if row["error_code"] is not None:
                totals.add_error(row["error_code"])
                errors.write(_error_line(row) + "\n")
                continue
            size = [row["height"], row["width"]]
            for frame in row["frames"]:
                totals.instances += len(frame["objects"])
                for obj in frame["objects"] if tracks else ():
                    tracks.write(_dumps(track_line(row, frame["frame_index"], obj, size)) + "\n")
    return totals


def track_line(row: dict, frame_index: int, obj: dict, size: list[int]) -> dict:
    """One track entry: video, frame index, object id, score, xyxy box, area and the COCO RLE mask."""
    return {"video": row["path"], "frame_index": frame_index, "object_id": obj["object_id"], "score": obj["score"],
            "box": obj["box"], "area": obj["area"], "rle": {"size": size, "counts": obj["counts"]}}
