"""The image batch job on Ray Data: the served /v1 answers, bad files recorded, COCO loadable, resume after a kill."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from serve_app.batch import assemble
from serve_app.batch.pipeline import run_images
from serve_app.batch.spec import ImageJob, Resources, Thresholds
from serve_app.batch.store import OutputStore
from serve_app.image.codecs import rle_decode
from tests.integration.conftest import segment
from tests.unit.test_batch_files import write_bad_files, write_images

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [1, 2, 3, 4, 5, 6]
THRESHOLD = 0.1
PROMPTS = [
    {"type": "concept", "text": "a red car"},
    {"type": "concept", "boxes": [[10, 12, 50, 60]], "box_labels": [True]},
    {"type": "visual", "points": [[30, 40], [90, 70]], "point_labels": [1, 0]},
]
RESOURCES = Resources(actors=1, batch_size=2, rows_per_block=3, num_gpus=0, actor_cpus=1, torch_threads=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("batch_images")
    write_images(root, SEEDS)
    return root, write_bad_files(root)


def _job(folder: Path, output: Path, **kwargs) -> ImageJob:
    return ImageJob([str(folder)], str(output), PROMPTS, thresholds=Thresholds(threshold=THRESHOLD),
                    resources=RESOURCES, **kwargs)


@pytest.fixture(scope="module")
def image_run(serve_instance, folder, tmp_path_factory):
    """One run inside the integration tests' Ray (serve_instance started it; the job joins it)."""
    output = tmp_path_factory.mktemp("batch_out") / "run"
    summary = run_images(_job(folder[0], output, polygons=True))
    rows = sorted(pq.read_table(output / "parts").to_pylist(), key=lambda r: r["index"])
    return summary, output, rows


def _v1(app_url: str, path: str, **extra) -> list[dict]:
    body = {"image": base64.b64encode(Path(path).read_bytes()).decode(), "prompts": PROMPTS, "threshold": THRESHOLD,
            **extra}
    response = segment(app_url, body)
    assert response.status_code == 200, response.text
    return response.json()["prompts"]


def test_batch_output_equals_v1_image_segment(app_url, image_run):
    _, _, rows = image_run
    good = [r for r in rows if r["error_code"] is None]
    assert len(good) == len(SEEDS)
    compared = 0
    for row in good:
        served, polygons = _v1(app_url, row["path"]), _v1(app_url, row["path"], output="polygon")
        for prompt_index, (result, drawn) in enumerate(zip(served, polygons)):
            ours = [i for i in row["instances"] if i["prompt_index"] == prompt_index]
            assert len(ours) == len(result["instances"]), f"{row['path']} prompt {prompt_index}"
            for mine, theirs, outline in zip(ours, result["instances"], drawn["instances"]):
                assert abs(mine["score"] - theirs["score"]) < 1e-4
                np.testing.assert_allclose(mine["box"], theirs["box"], atol=1e-4)
                size = [row["height"], row["width"]]
                assert np.array_equal(rle_decode({"size": size, "counts": mine["counts"]}), rle_decode(theirs["mask"]))
                assert mine["area"] == theirs["area"]
                assert json.loads(mine["polygons"]) == outline["mask"]  # --polygons: as /v1 output=polygon
                compared += 1
    assert compared >= len(SEEDS) * 2, "the run must find instances, or it proves nothing"


def test_bad_files_are_recorded_as_errors_and_the_good_ones_segmented(image_run, folder):
    summary, output, rows = image_run
    _, bad = folder
    assert {r["path"]: r["error_code"] for r in rows if r["error_code"]} == bad
    assert all(r["instances"] for r in rows if not r["error_code"])
    errors = [json.loads(line) for line in (output / assemble.ERRORS).read_text().splitlines()]
    assert {e["path"]: e["error_code"] for e in errors} == bad
    assert "10000000000 pixels" in next(e["error"] for e in errors if e["path"].endswith("bomb.png"))
    assert (summary.processed, summary.errors, summary.skipped) == (len(SEEDS) + 3, 3, 0)
    assert summary.instances == sum(len(r["instances"]) for r in rows) > 0


def test_coco_results_load_against_the_generated_images(image_run):
    summary, output, rows = image_run
    gt = COCO(str(output / assemble.COCO_IMAGES))
    assert len(gt.getImgIds()) == len(SEEDS)
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == ["a red car", "prompt-1", "prompt-2"]
    results = gt.loadRes(str(output / assemble.COCO_RESULTS))
    assert len(results.getAnnIds()) == summary.instances
    row = next(r for r in rows if r["error_code"] is None)
    anns = results.loadAnns(results.getAnnIds(imgIds=[row["index"] + 1]))
    assert len(anns) == len(row["instances"])
    for ann, inst in zip(anns, row["instances"]):  # --polygons: COCO polygons, the exteriors of the /v1 polygons
        exteriors = [[c for point in p["exterior"] for c in point] for p in json.loads(inst["polygons"])]
        assert ann["segmentation"] == exteriors and ann["score"] == inst["score"]
        assert ann["category_id"] == inst["prompt_index"] + 1
        assert results.annToMask(ann).shape == (row["height"], row["width"])


def _cli(output: Path, folder: Path, address: str) -> list[str]:
    argv = [sys.executable, "-m", "serve_app.batch", "images", str(folder), "-o", str(output), "--address", address,
            "--threshold", str(THRESHOLD), "--rows-per-block", "1", "--batch-size", "1", "--num-gpus", "0",
            "--torch-threads", "1", "--polygons"]
    for prompt in PROMPTS:
        argv += ["--prompt", json.dumps(prompt)]
    return argv


def test_a_killed_run_resumes_to_the_output_of_one_clean_run(image_run, folder, tmp_path):
    import ray

    _, clean, clean_rows = image_run
    output, address = tmp_path / "resumed", ray.get_runtime_context().gcs_address
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_cli(output, folder[0], address), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not list((output / "parts").glob("part-*.parquet")) and first.poll() is None:
                assert time.monotonic() < deadline, "no part file within 4 minutes"
                time.sleep(0.05)
        finally:
            first.kill()  # SIGKILL, as a crash would: no clean-up in the job
            first.wait()
    done = len(pq.read_table(output / "parts").to_pylist())
    log_tail = (tmp_path / "first.log").read_text()[-2000:]
    assert 0 < done < len(clean_rows), f"the kill came at {done} of {len(clean_rows)}: {log_tail}"
    assert not (output / "summary.json").exists() and not (output / assemble.COCO_RESULTS).exists()

    second = subprocess.run(_cli(output, folder[0], address), cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    skipped = json.loads((output / "summary.json").read_text())["skipped"]
    assert skipped >= done and f"{skipped} already done (skipped)" in second.stdout
    assert "images/s" in second.stdout and "3 errors" in second.stdout
    assert "MapBatches(ImageSegmenter)" in second.stderr  # Ray Data's progress
    for name in (assemble.COCO_IMAGES, assemble.COCO_RESULTS, assemble.ERRORS):
        assert (output / name).read_bytes() == (clean / name).read_bytes(), name
    assert list(OutputStore(str(output)).rows()) == clean_rows  # every image, once, with the clean run's result
