"""The batch output folder: parts appear whole, resume sees what is done, assembly is ordered, bounded, COCO-valid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from serve_app.batch import assemble
from serve_app.batch import store as store_module
from serve_app.batch.images import IMAGE_ROW, PolygonStage, error_row
from serve_app.batch.spec import SpecError
from serve_app.batch.store import OutputStore
from serve_app.image import codecs

H, W = 24, 32
RUN = {"version": 1, "kind": "images", "digest": "abc", "categories": ["dog", "cat"]}


def _mask(index: int, k: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[2 + k : 10 + k + index % 5, 3 + 2 * k : 12 + index % 7] = True
    if k == 1:
        mask[5:7, 6:8] = False  # a hole
    return mask


def _row(index: int, instances: int = 2) -> dict:
    insts = []
    for k in range(instances):
        mask = _mask(index, k)
        ys, xs = np.nonzero(mask)
        insts.append({
            "prompt_index": k % 2, "category": ["dog", "cat"][k % 2], "score": 0.9 - 0.1 * k,
            "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
            "area": int(mask.sum()), "counts": codecs.rle_encode(mask)["counts"], "polygons": None,
        })
    return {"index": index, "path": f"/data/img{index}.png", "width": W, "height": H, "error_code": None,
            "error": None, "instances": insts}


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=IMAGE_ROW)


@pytest.fixture()
def out(tmp_path) -> OutputStore:
    store = OutputStore(str(tmp_path / "out"))
    store.prepare(RUN)
    return store


def test_parts_are_named_by_their_index_range_and_hold_sorted_rows(out):
    out.write_part(_table([_row(7), _row(3), _row(5)]))
    ((first, last, path),) = out.parts()
    assert (first, last) == (3, 7)
    assert pq.read_table(path)["index"].to_pylist() == [3, 5, 7]
    assert out.write_part(_table([])) is None and len(out.parts()) == 1


def test_a_writer_that_fails_leaves_no_part_and_no_temporary_file(out):
    with pytest.raises(RuntimeError), out.atomic("parts/part-0000000001-0000000001-0123456789ab.parquet") as stream:
        stream.write(b"half a file")
        raise RuntimeError("killed")
    assert out.parts() == []
    assert list((Path(out.root) / "parts").iterdir()) == []


def test_resume_sees_done_indices_and_drops_dead_writers_temporary_files(out):
    out.write_part(_table([_row(0), _row(1)]))
    out.write_part(_table([_row(4)]))
    (Path(out.root) / "parts" / ".tmp-deadbeef0000-part.parquet").write_bytes(b"half")
    again = OutputStore(out.location)
    assert again.prepare(RUN).to_pylist() == [0, 1, 4]
    assert not (Path(out.root) / "parts" / ".tmp-deadbeef0000-part.parquet").exists()


def test_another_run_in_the_same_folder_is_refused_with_what_differs(out):
    with pytest.raises(SpecError, match=r"another run \(digest differ\)"):
        OutputStore(out.location).prepare({**RUN, "digest": "other"})
    assert OutputStore(out.location).done_for(RUN).to_pylist() == []


def test_rows_come_once_in_index_order_across_overlapping_and_repeated_parts(out):
    out.write_part(_table([_row(i) for i in (4, 6, 8)]))
    out.write_part(_table([_row(i) for i in (0, 1, 2)]))
    out.write_part(_table([_row(i) for i in (3, 5, 7)]))
    out.write_part(_table([_row(i) for i in (5, 9)]))  # a retried write stored row 5 twice
    assert [r["index"] for r in out.rows()] == list(range(10))


def test_the_merge_holds_only_the_parts_overlapping_the_current_index(out, monkeypatch):
    for start in range(0, 40, 4):  # ten parts of four rows each, disjoint
        out.write_part(_table([_row(i, instances=0) for i in range(start, start + 4)]))
    opened = []
    real = store_module.pq.read_table
    monkeypatch.setattr(store_module.pq, "read_table", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    for row in out.rows():
        assert len(opened) <= row["index"] // 4 + 1, "a part was opened before the merge reached it"
    assert len(opened) == 10


def test_coco_results_load_with_pycocotools_against_the_generated_images(out):
    out.write_part(_table([_row(2), _row(0), error_row(1, "/data/bad.jpg", "invalid_image", "not an image")]))
    totals = assemble.assemble_images(out, ["dog", "cat"], coco=True, polygons=False)
    assert (totals.items, totals.errors, totals.instances) == (3, 1, 4)
    gt = COCO(str(Path(out.root) / assemble.COCO_IMAGES))
    assert sorted(gt.getImgIds()) == [1, 3] and [c["name"] for c in gt.loadCats(gt.getCatIds())] == ["dog", "cat"]
    results = gt.loadRes(str(Path(out.root) / assemble.COCO_RESULTS))
    anns = results.loadAnns(results.getAnnIds(imgIds=[3]))
    assert [a["category_id"] for a in anns] == [1, 2]
    written = [a for a in json.loads((Path(out.root) / assemble.COCO_RESULTS).read_text()) if a["image_id"] == 3]
    for k, (ann, raw) in enumerate(zip(anns, written)):
        mask = _mask(2, k)
        assert np.array_equal(results.annToMask(ann).astype(bool), mask)
        assert raw["area"] == mask.sum()  # (loadRes itself replaces area by the box's, as for any result with a bbox)
        assert ann["bbox"] == list(mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))))
    errors = [json.loads(line) for line in (Path(out.root) / assemble.ERRORS).read_text().splitlines()]
    assert errors == [{"index": 1, "path": "/data/bad.jpg", "error_code": "invalid_image", "error": "not an image"}]


def test_polygons_go_to_parquet_with_holes_and_to_coco_as_flat_exteriors(out):
    table = PolygonStage()(_table([_row(0)]))
    polygons = json.loads(table.to_pylist()[0]["instances"][1]["polygons"])
    assert len(polygons) == 1 and len(polygons[0]["holes"]) == 1
    assert np.array_equal(codecs.polygons_to_mask(polygons, H, W), _mask(0, 1))
    out.write_part(table)
    assemble.assemble_images(out, ["dog", "cat"], coco=True, polygons=True)
    gt = COCO(str(Path(out.root) / assemble.COCO_IMAGES))
    results = gt.loadRes(str(Path(out.root) / assemble.COCO_RESULTS))
    ann = results.loadAnns(results.getAnnIds())[1]
    assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) == 2 * len(polygons[0]["exterior"])


def test_without_coco_only_errors_are_assembled(out):
    out.write_part(_table([_row(0)]))
    assert assemble.assemble_images(out, ["dog", "cat"], coco=False, polygons=False).instances == 2
    assert not out.exists(assemble.COCO_RESULTS) and out.exists(assemble.ERRORS)
