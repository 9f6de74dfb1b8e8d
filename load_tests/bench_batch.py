"""Batch benchmark: the Ray Data job (1 and 2 actors) against an in-process loop, same run, same torch threads.

    python load_tests/bench_batch.py [--model tiny-random] [--images 48] [--image-size 480x640] [--actors 1,2]
        [--batch-size 4] [--threads 1] [--device auto] [--dtype auto] [--texts 2] [--json out.json]

The in-process loop decodes each file as the job's reader does and runs ImageEngine.segment on it (timed after
its model load and a warm-up). The job runs `run_images` (read -> actor pool -> part files -> COCO assembly) in
one local Ray, on all images and on the first quarter (--limit). It prints images/s end to end (the job's
includes starting its actors, their model loads and the assembly), the steady rate (the job's: the extra images
of the full run over its extra seconds, so start-up cancels out) and each one's ratio to the loop.
Figures, not assertions.

GPU (full-random has facebook/sam3's architecture with random weights: no download):
    python load_tests/bench_batch.py --model full-random --dtype bfloat16 --device cuda --images 512 \\
        --image-size 1024x1024 --actors 1,2 --batch-size 8 --threads 4
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import fmt, make_image  # load_tests/ is on sys.path as a script
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.batch.pipeline import run_images, shipped_model
from serve_app.batch.spec import ImageJob, Resources
from serve_app.core.config import Config

PHRASES = ("a cat", "the red car", "person", "a wooden chair")
WARMUP = 2  # images through the in-process loop before it is timed


def write_images(folder: Path, count: int, height: int, width: int) -> None:
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(make_image(i, height, width)).save(buffer, format="JPEG", quality=90)
        (folder / f"img{i:06d}.jpg").write_bytes(buffer.getvalue())


def in_process(folder: Path, config: Config, texts: list[str], threads: int) -> dict:
    """The baseline: one process, one engine, file by file (read, decode, segment)."""
    import torch

    from serve_app.batch.images import ImageReader
    from serve_app.core.types import ConceptPrompt, SegmentParams
    from serve_app.image.engine import ImageEngine
    from serve_app.image.models import load_bundle

    torch.set_num_threads(threads)
    started = time.perf_counter()
    engine = ImageEngine(load_bundle(config), prompt_batch=config.decoder_batches()[1],
                         visual_batch=config.decoder_batches()[2])
    load_s = time.perf_counter() - started
    reader, prompts, params = ImageReader(config), [ConceptPrompt(t) for t in texts], SegmentParams()
    paths = sorted(folder.iterdir())
    for path in paths[:WARMUP]:
        engine.segment(reader.decode(str(path)), prompts, params)
    instances, started = 0, time.perf_counter()
    for path in paths:
        result = engine.segment(reader.decode(str(path)), prompts, params)
        instances += sum(len(p.instances) for p in result.prompts)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    del engine  # the actors load their own copies
    return {"phase": "in-process loop", "actors": "-", "images": len(paths), "instances": instances,
            "wall_s": round(wall, 2), "model_load_s": round(load_s, 2), "images_per_s": round(len(paths) / wall, 2),
            "steady_images_per_s": round(len(paths) / wall, 2)}


def warm_up(folder: Path, work: Path, config: Config, texts: list[str]) -> None:
    """One image through a job first: Ray Data starts its own helpers on its first job, not on later ones."""
    job = ImageJob([str(folder)], str(work / "warm-up"), [{"type": "concept", "text": texts[0]}], limit=1,
                   resources=Resources(num_gpus="auto" if config.device != "cpu" else 0))
    run_images(job, config)


def batch_job(folder: Path, work: Path, config: Config, texts: list[str], actors: int, args) -> dict:
    """The whole job on all images, and on the first quarter: the difference is the steady rate (start-up,
    model loads and assembly cost both runs the same)."""
    gpus = "auto" if config.device != "cpu" else 0
    resources = Resources(actors=actors, batch_size=args.batch_size, num_gpus=gpus, actor_cpus=1,
                          torch_threads=args.threads, rows_per_block=args.batch_size * 2)
    prompts = [{"type": "concept", "text": t} for t in texts]
    timed = []
    for limit in (max(1, args.images // 4), None):
        job = ImageJob([str(folder)], str(work / f"out-{actors}-{limit}"), prompts, limit=limit, resources=resources)
        started = time.perf_counter()
        summary = run_images(job, config)
        timed.append((summary, time.perf_counter() - started))
    (small, small_s), (full, full_s) = timed
    steady = (full.processed - small.processed) / (full_s - small_s) if full_s > small_s else None
    return {"phase": "batch job", "actors": actors, "images": full.processed, "instances": full.instances,
            "errors": full.errors, "wall_s": round(full_s, 2), "images_per_s": round(full.processed / full_s, 2),
            "steady_images_per_s": round(steady, 2) if steady else None, "small_run_s": round(small_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-size", default="480x640", help="HxW of the generated images")
    parser.add_argument("--actors", default="1,2", help="pool sizes to run, comma-separated")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in the loop and in each actor")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--texts", type=int, default=2, help="text prompts per image")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    height, width = (int(v) for v in args.image_size.split("x"))
    config = Config.from_env(model=args.model, device=args.device, dtype=args.dtype)
    texts = list(PHRASES[: args.texts])
    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        folder = work / "images"
        folder.mkdir()
        write_images(folder, args.images, height, width)
        rows = [in_process(folder, config, texts, args.threads)]  # before Ray starts: nothing else running
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        shipped_model(config)  # built once here for every run (tiny-random, full-random), outside the timings
        warm_up(folder, work, config, texts)
        for actors in (int(a) for a in args.actors.split(",")):
            rows.append(batch_job(folder, work, config, texts, actors, args))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, args, config)


def report(rows: list[dict], args, config: Config) -> None:
    base = rows[0]["images_per_s"]
    print(f"\nmodel {config.model}, device {config.device}, dtype {config.dtype}, {args.images} images "
          f"{args.image_size}, {args.texts} text prompts, batch {args.batch_size}, torch threads {args.threads}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'phase':<16} {'actors':>6} {'images':>6} {'inst':>6} {'wall_s':>7} {'img/s':>7} {'x loop':>7} "
          f"{'steady':>7} {'x loop':>7} {'1/4 run s':>9}")
    for row in rows:
        steady = row["steady_images_per_s"]
        ratio = row["images_per_s"] / base if base else None
        steady_ratio = steady / base if base and steady else None
        print(f"{row['phase']:<16} {row['actors']!s:>6} {row['images']:>6} {row['instances']:>6} {row['wall_s']:>7} "
              f"{row['images_per_s']:>7} {fmt(ratio, '.2f'):>7} {fmt(steady):>7} {fmt(steady_ratio, '.2f'):>7} "
              f"{fmt(row.get('small_run_s')):>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
