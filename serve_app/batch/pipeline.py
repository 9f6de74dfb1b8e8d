"""The Ray Data jobs: read -> decode (tasks) -> segment (actor pool) -> [polygons] -> part files; then assemble."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from serve_app.batch import assemble
from serve_app.batch.images import ImageReader, ImageSegmenter, PolygonStage
from serve_app.batch.inputs import IMAGE_SUFFIXES, VIDEO_SUFFIXES, Listing, files_listing, manifest_listing
from serve_app.batch.spec import (
    SPEC_VERSION,
    ImageJob,
    Resources,
    VideoJob,
    check_image_prompts,
    check_video_prompts,
    global_categories,
)
from serve_app.batch.store import PARTS, SUMMARY_FILE, OutputStore
from serve_app.batch.videos import VideoTracker
from serve_app.core.config import Config
from serve_app.image.models import built_in_code, load_video_model


@dataclass
class Plan:
    """What a job would do, worked out without Ray or a model (`--dry-run` prints it)."""

    kind: str
    listing: Listing
    run: dict
    done: pa.Array  # sorted indices already in the output
    outputs: list[str]
    resources: Resources
    prompts: list[dict] | None

    @property
    def remaining(self) -> pa.Table:
        table = self.listing.table
        if not len(self.done):
            return table
        return table.filter(pc.invert(pc.is_in(table["index"], value_set=self.done)))

    def describe(self) -> str:
        noun = self.kind
        todo = self.remaining.num_rows
        prompts = "per item, from the manifest" if self.prompts is None else json.dumps(self.prompts)
        lines = [
            f"{noun}: {self.listing.count} in the inputs, {self.listing.count - todo} already done, {todo} to run",
            f"prompts: {prompts}",
            f"categories: {', '.join(self.listing.categories) or '-'}",
            (f"actors: {self.resources.actors} x (batch {self.resources.batch_size}, GPUs {self.resources.num_gpus}, "
             f"CPUs {self.resources.actor_cpus})"),
            "outputs:",
            *(f"  {path}" for path in self.outputs),
        ]
        first = self.remaining.slice(0, 3)["path"].to_pylist()
        if first:
            lines.append("first inputs to run: " + ", ".join(first))
        return "\n".join(lines)


@dataclass
class Summary:
    """The end of a run: this run's items, errors and instances, its wall time, and what the whole output holds."""

    kind: str
    output: str
    inputs: int
    skipped: int
    processed: int = 0
    errors: int = 0
    instances: int = 0
    wall_s: float = 0.0
    total: dict = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> str:
        noun = self.kind
        unit = "instances" if noun == "images" else "track entries"
        return "\n".join([
            (f"{noun}: {self.processed} run, {self.skipped} already done (skipped), {self.errors} errors; "
             f"{unit}: {self.instances}; {self.wall_s:.1f} s, {self.per_second:.2f} {noun}/s"),
            (f"output holds {self.total.get('items', 0)} {noun}, {self.total.get('errors', 0)} errors, "
             f"{self.total.get('instances', 0)} {unit}: {self.output}"),
        ])


# ---- planning (no Ray, no model) -----------------------------------------------------------------------


def plan_images(job: ImageJob, config: Config) -> Plan:
    if job.manifest:
        check = partial(check_image_prompts, thresholds=job.thresholds, config=config)
        found = manifest_listing(job.manifest, "image", check, job.limit)
        prompts = None
    else:
        prompts = check_image_prompts(job.prompts, job.thresholds, config)
        found = files_listing(job.inputs, IMAGE_SUFFIXES, global_categories(prompts), job.limit)
    run = {"version": SPEC_VERSION, "kind": "images", "digest": found.digest, "prompts": prompts,
           "thresholds": asdict(job.thresholds), "categories": found.categories, "polygons": job.polygons,
           "model": config.model, "dtype": config.dtype}
    store = OutputStore(job.output)
    names = [PARTS + "/", assemble.ERRORS, SUMMARY_FILE]
    if job.coco:
        names[1:1] = [assemble.COCO_IMAGES, assemble.COCO_RESULTS]
    return Plan("images", found, run, store.done_for(run), [store.uri(n) for n in names], job.resources, prompts)


def plan_videos(job: VideoJob, config: Config) -> Plan:
    if job.manifest:
        found = manifest_listing(job.manifest, "video", check_video_prompts, job.limit)
        prompts = None
    else:
        prompts = check_video_prompts([{"text": t} for t in job.texts])
        found = files_listing(job.inputs, VIDEO_SUFFIXES, list(job.texts), job.limit)
    run = {"version": SPEC_VERSION, "kind": "videos", "digest": found.digest, "prompts": prompts,
           "model": config.model, "dtype": config.dtype}
    store = OutputStore(job.output)
    names = [PARTS + "/", *([assemble.TRACKS] if job.jsonl else []), assemble.ERRORS, SUMMARY_FILE]
    return Plan("videos", found, run, store.done_for(run), [store.uri(n) for n in names], job.resources, prompts)


# ---- Ray -------------------------------------------------------------------------------------------------


def connect(address: str | None) -> None:
    """Use the Ray this process already runs in, else `address` (or RAY_ADDRESS), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address)


def _gpus(resources: Resources) -> float:
    """`auto`: the cluster's GPUs shared by the pool's actors, at most one each; none on a CPU cluster."""
    if resources.num_gpus != "auto":
        return float(resources.num_gpus)
    import ray

    return min(1.0, ray.cluster_resources().get("GPU", 0) / resources.actors)


_BUILT: dict[tuple, object] = {}


def shipped_model(config: Config):
    """A built-in model (tiny-random, full-random) built once in this process and shipped to every actor with
    its constructor arguments (building one is slower than copying it); None where actors load from files."""
    if not built_in_code(config.model):
        return None
    key = (config.model, config.dtype, config.device)
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = load_video_model(config)
    return _BUILT[key]


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """Input blocks of `rows` rows, each its own copy (a slice would ship its parent's buffers)."""
    return [table.take(pa.array(np.arange(start, min(start + rows, table.num_rows))))
            for start in range(0, table.num_rows, rows)]


def read_images(batch: dict, config: Config) -> dict:
    return ImageReader(config)(batch)


def polygonize(batch: pa.Table, epsilon: float | None) -> pa.Table:
    return PolygonStage(epsilon)(batch)


def _part_sink(location: str, count_column: str):
    from ray.data.block import BlockAccessor
    from ray.data.datasource.datasink import Datasink

    class PartSink(Datasink):
        """Each write task's blocks as one part file (moved into place whole); returns its row counts."""

        def __init__(self) -> None:
            self.returns: list[dict] = []

        def write(self, blocks, ctx) -> dict:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"rows": 0, "errors": 0, "instances": 0}
            table = pa.concat_tables(tables)
            OutputStore(location).write_part(table)
            return {"rows": table.num_rows, "errors": table.num_rows - table["error_code"].null_count,
                    "instances": _count(table, count_column)}

        def on_write_complete(self, write_result) -> None:
            self.returns = list(write_result.write_returns)

    return PartSink()


def _count(table: pa.Table, column: str) -> int:
    """Instances in a block of image rows, or track entries (frames x objects) in a block of video rows."""
    values = table[column].combine_chunks()
    if column == "frames":
        values = pc.struct_field(pc.list_flatten(values), "objects")
    return int(pc.sum(pc.list_value_length(values)).as_py() or 0)


def _execute(ds, sink, started: float, summary: Summary) -> None:
    ds.write_datasink(sink)
    summary.wall_s = time.perf_counter() - started
    for item in sink.returns:
        summary.processed += item["rows"]
        summary.errors += item["errors"]
        summary.instances += item["instances"]


def _finish(store: OutputStore, plan: Plan, summary: Summary, totals: assemble.Totals) -> Summary:
    summary.total = asdict(totals)
    summary.outputs = plan.outputs
    record = {**asdict(summary), "per_second": summary.per_second}
    store.write_bytes(SUMMARY_FILE, json.dumps(record, indent=2).encode())
    return summary


def _start(plan: Plan, job, kind: str, address: str | None):
    """The output store (checked against this run), the summary so far, and a dataset of what is left (or None)."""
    store = OutputStore(job.output)
    plan.done = store.prepare(plan.run)
    todo = plan.remaining
    summary = Summary(kind, job.output, plan.listing.count, plan.listing.count - todo.num_rows)
    if not todo.num_rows:
        return store, summary, None
    connect(address)
    import ray.data

    return store, summary, ray.data.from_arrow(_blocks(todo, job.resources.rows_per_block))


def run_images(job: ImageJob, config: Config | None = None, address: str | None = None) -> Summary:
    """Segment the job's images; resumes a run already in `job.output`. Returns what it did."""
    config = config or Config.from_env()
    plan = plan_images(job, config)
    store, summary, ds = _start(plan, job, "images", address)
    if ds is not None:
        from ray.data import ActorPoolStrategy

        started, res = time.perf_counter(), job.resources
        ds = ds.map_batches(read_images, fn_kwargs={"config": config}, batch_size=res.batch_size,
                            num_cpus=res.read_cpus, batch_format="numpy")
        ds = ds.map_batches(
            ImageSegmenter, batch_size=res.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(size=res.actors), num_gpus=_gpus(res), num_cpus=res.actor_cpus,
            fn_constructor_kwargs={"config": config, "prompts": plan.prompts, "thresholds": job.thresholds,
                                   "categories": plan.listing.categories, "torch_threads": res.torch_threads,
                                   "video_model": shipped_model(config)},
        )
        if job.polygons:
            ds = ds.map_batches(polygonize, fn_kwargs={"epsilon": job.thresholds.polygon_epsilon},
                                batch_format="pyarrow", num_cpus=res.read_cpus)
        _execute(ds, _part_sink(job.output, "instances"), started, summary)
    totals = assemble.assemble_images(store, plan.listing.categories, job.coco, job.polygons)
    return _finish(store, plan, summary, totals)


def run_videos(job: VideoJob, config: Config | None = None, address: str | None = None) -> Summary:
    """Track objects through the job's videos, one session per video; resumes a run already in `job.output`."""
    config = config or Config.from_env()
    plan = plan_videos(job, config)
    store, summary, ds = _start(plan, job, "videos", address)  # one row per block by default: a part per video
    if ds is not None:
        from ray.data import ActorPoolStrategy

        started, res = time.perf_counter(), job.resources
        ds = ds.map_batches(
            VideoTracker, batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=res.actors),
            num_gpus=_gpus(res), num_cpus=res.actor_cpus,
            fn_constructor_kwargs={"config": config, "texts": job.texts if plan.prompts is not None else None,
                                   "torch_threads": res.torch_threads, "video_model": shipped_model(config)},
        )
        _execute(ds, _part_sink(job.output, "frames"), started, summary)
    totals = assemble.assemble_videos(store, job.jsonl)
    return _finish(store, plan, summary, totals)
