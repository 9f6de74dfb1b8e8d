"""`sam3-batch`: arguments become the job, --dry-run runs nothing, and the RayJob manifest's entrypoint parses."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from serve_app.batch import cli, pipeline
from serve_app.batch.images import IMAGE_ROW
from serve_app.batch.spec import ImageJob, SpecError, VideoJob
from serve_app.batch.store import OutputStore
from serve_app.core.config import Config
from tests.unit.test_batch_files import write_images

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_image_arguments_become_the_job():
    args = cli.build_parser().parse_args([
        "images", "a/", "b/*.jpg", "-o", "out", "--text", "dog", "--prompt", '{"type": "visual", "points": [[1, 2]]}',
        "--threshold", "0.3", "--nms-iou", "none", "--polygons", "--limit", "5", "--actors", "3", "--num-gpus", "0.5",
        "--batch-size", "8", "--no-coco",
    ])
    job = cli.job_from_args(args)
    assert isinstance(job, ImageJob) and job.inputs == ["a/", "b/*.jpg"] and job.output == "out"
    assert job.prompts == [{"type": "concept", "text": "dog"}, {"type": "visual", "points": [[1, 2]]}]
    assert (job.thresholds.threshold, job.thresholds.nms_iou, job.polygons, job.coco, job.limit) == (0.3, None, True,
                                                                                                      False, 5)
    assert (job.resources.actors, job.resources.num_gpus, job.resources.batch_size) == (3, 0.5, 8)


def test_video_arguments_become_the_job():
    job = cli.job_from_args(cli.build_parser().parse_args(["videos", "clips/", "-o", "t", "--text", "person"]))
    assert isinstance(job, VideoJob) and job.texts == ["person"] and job.jsonl and job.resources.batch_size == 1


def test_a_manifest_excludes_inputs_and_prompts():
    args = cli.build_parser().parse_args(["images", "a/", "--manifest", "m.jsonl", "-o", "out"])
    with pytest.raises(SpecError, match="manifest"):
        cli.job_from_args(args)


@pytest.fixture()
def nothing_runs(monkeypatch):
    """Loading a model or starting Ray fails the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded a model or started Ray")

    monkeypatch.setattr("serve_app.batch.images.load_bundle", refuse)
    monkeypatch.setattr(pipeline, "load_video_model", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(pipeline, "connect", refuse)


def test_dry_run_prints_counts_prompts_and_outputs_and_writes_nothing(tmp_path, capsys, nothing_runs):
    write_images(tmp_path / "in", [1, 2, 3])
    out = tmp_path / "out"
    code = cli.main(["images", str(tmp_path / "in"), "--text", "dog", "--text", "red car", "-o", str(out),
                     "--dry-run", "--limit", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "images: 2 in the inputs, 0 already done, 2 to run" in printed
    assert '"text": "dog"' in printed and '"text": "red car"' in printed
    assert f"{out}/coco/results.json" in printed and f"{out}/parts/" in printed
    assert not out.exists()


def test_dry_run_into_a_started_output_counts_what_is_done(tmp_path, capsys, nothing_runs):
    write_images(tmp_path / "in", [1, 2, 3])
    argv = ["images", str(tmp_path / "in"), "--text", "dog", "-o", str(tmp_path / "out")]
    job = cli.job_from_args(cli.build_parser().parse_args(argv))
    plan = pipeline.plan_images(job, cli.config_from_args(cli.build_parser().parse_args(argv)))
    store = OutputStore(str(tmp_path / "out"))
    store.prepare(plan.run)
    row = {"index": 1, "path": "x", "width": 1, "height": 1, "error_code": None, "error": None, "instances": []}
    store.write_part(pa.Table.from_pylist([row], schema=IMAGE_ROW))
    assert cli.main([*argv, "--dry-run"]) == 0
    assert "images: 3 in the inputs, 1 already done, 2 to run" in capsys.readouterr().out
    assert cli.main([*argv, "--dry-run", "--threshold", "0.2"]) == 2  # another run: refused, not overwritten
    assert "holds another run (thresholds differ)" in capsys.readouterr().err


def test_bad_prompts_are_a_usage_error_before_anything_runs(tmp_path, capsys, nothing_runs):
    write_images(tmp_path / "in", [1])
    code = cli.main(["images", str(tmp_path / "in"), "--prompt", '{"type": "concept"}', "-o", str(tmp_path / "o")])
    assert code == 2 and "a concept prompt needs text" in capsys.readouterr().err


def _rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "rayjob-batch.yaml").read_text())


def test_the_rayjob_manifest_is_a_kuberay_rayjob_with_gpu_workers():
    manifest = _rayjob()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["SAM3_MODEL"] == "facebook/sam3"
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    (workers,) = cluster["workerGroupSpecs"]
    worker = workers["template"]["spec"]["containers"][0]
    assert head["image"] == worker["image"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_rayjob_entrypoint_parses_with_the_cli_and_fits_the_cluster():
    spec = _rayjob()["spec"]
    program, *argv = shlex.split(spec["entrypoint"])
    assert program == "sam3-batch"
    args = cli.build_parser().parse_args(argv)
    job = cli.job_from_args(args)
    assert isinstance(job, ImageJob) and job.output.startswith("s3://") and job.prompts
    assert args.dtype == "bfloat16"
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus = workers["replicas"] * int(limits["nvidia.com/gpu"])
    assert job.resources.actors * float(job.resources.num_gpus) <= gpus, "the actor pool would wait for GPUs forever"


def test_limit_runs_only_the_first_inputs_and_a_later_run_without_it_resumes(tmp_path):
    write_images(tmp_path / "in", [1, 2, 3, 4])
    inputs, output, prompts = [str(tmp_path / "in")], str(tmp_path / "o"), [{"type": "concept", "text": "a"}]
    limited = pipeline.plan_images(ImageJob(inputs, output, prompts, limit=2), Config())
    assert limited.remaining["path"].to_pylist() == [str(tmp_path / "in" / f"img00{i}.png") for i in (1, 2)]
    store = OutputStore(str(tmp_path / "o"))
    store.prepare(limited.run)
    rows = [{"index": i, "path": "x", "width": 1, "height": 1, "error_code": None, "error": None, "instances": []}
            for i in (0, 1)]
    store.write_part(pa.Table.from_pylist(rows, schema=IMAGE_ROW))
    full = pipeline.plan_images(ImageJob(inputs, output, prompts), Config())
    assert full.run == limited.run and full.done.to_pylist() == [0, 1]
    assert full.remaining["index"].to_pylist() == [2, 3]


def test_a_folder_of_videos_with_a_text_and_a_manifest_of_clicks_plan_as_given(tmp_path, capsys, nothing_runs):
    (tmp_path / "clips").mkdir()
    for name in ("b.mp4", "a.webm", "notes.txt.bak"):
        (tmp_path / "clips" / name).write_bytes(b"x")
    argv = ["videos", str(tmp_path / "clips"), "--text", "person", "-o", str(tmp_path / "t"), "--dry-run"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "videos: 2 in the inputs" in printed and f"{tmp_path}/t/tracks.jsonl" in printed
    manifest = tmp_path / "clicks.jsonl"
    clicks = [{"frame_index": 3, "object_id": 1, "points": [[5, 6]], "point_labels": [1]},
              {"object_id": 2, "box": [1, 2, 3, 4]}]
    manifest.write_text(json.dumps({"video": "clips/b.mp4", "prompts": clicks}) + "\n")
    job = VideoJob([], str(tmp_path / "t2"), manifest=str(manifest))
    plan = pipeline.plan_videos(job, Config())
    assert plan.remaining["path"].to_pylist() == [str(tmp_path / "clips" / "b.mp4")]
    assert json.loads(plan.remaining["prompts"][0].as_py())[1] == {"frame_index": 0, "object_id": 2, "points": [],
                                                                  "box": [1.0, 2.0, 3.0, 4.0]}
    manifest.write_text(json.dumps({"video": "b.mp4", "prompts": [{"points": [[5, 6]]}]}) + "\n")
    with pytest.raises(SpecError, match="clicks.jsonl:1: a click or box prompt needs an object_id"):
        pipeline.plan_videos(job, Config())


def test_connect_joins_the_running_ray_or_the_given_address(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    pipeline.connect("ray://head:10001")
    pipeline.connect(None)  # ray.init(address=None) reads RAY_ADDRESS, else starts a local Ray
    assert calls == [{"address": "ray://head:10001"}, {"address": None}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    pipeline.connect("ray://elsewhere:10001")
    assert len(calls) == 2, "a process already in a Ray runs the job there"


def test_model_picks_a_registry_name_when_models_are_listed(tmp_path, monkeypatch):
    monkeypatch.delenv("SAM3_MODELS", raising=False)
    monkeypatch.delenv("SAM3_MODEL", raising=False)
    base = ["images", str(tmp_path), "-o", str(tmp_path / "out")]

    def config(*extra: str) -> Config:
        return cli.config_from_args(cli.build_parser().parse_args([*base, *extra]))

    assert config("--model", "tiny-random:3").model == "tiny-random:3"  # no registry: a source, as SAM3_MODEL
    listed = ("--models", "a=tiny-random,b=tiny-random:1")
    assert config(*listed).model == "tiny-random"  # the default
    assert config(*listed, "--model", "b").model == "tiny-random:1"
    with pytest.raises(SpecError, match="not served here"):
        config(*listed, "--model", "tiny-random:1")  # with a registry, names only
