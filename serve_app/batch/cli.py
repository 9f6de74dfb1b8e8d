"""`sam3-batch images|videos`: the command line over `run_images` / `run_videos` (`python -m serve_app.batch`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serve_app.batch.spec import ImageJob, Resources, SpecError, Thresholds, VideoJob
from serve_app.core.config import Config
from serve_app.core.registry import Registry, UnknownModel

EXAMPLES = """examples:
  sam3-batch images ./photos --text dog --text "red car" -o ./out
  sam3-batch images 's3://bucket/shots/**/*.jpg' --prompt '{"type": "visual", "points": [[40, 60]]}' -o s3://bucket/sam3
  sam3-batch images --manifest prompts.jsonl -o ./out --polygons --limit 1000 --dry-run
  sam3-batch videos ./clips --text person -o ./tracks --address ray://head:10001
"""


def _optional_float(value: str) -> float | None:
    return None if value.lower() in ("none", "null", "off") else float(value)


def _gpus(value: str) -> float | str:
    return "auto" if value == "auto" else float(value)


def _common(parser: argparse.ArgumentParser, batch_size: int, rows_per_block: int) -> None:
    parser.add_argument("inputs", nargs="*", help="folders, globs, list files (.txt: one path or URI a line) or files")
    parser.add_argument("-o", "--output", required=True, help="output folder, local or a pyarrow URI (s3://...)")
    parser.add_argument("--text", action="append", default=[], help="a text prompt (repeat for several)")
    parser.add_argument("--manifest", help="JSONL with per-item prompts (see docs/batch.md)")
    parser.add_argument("--limit", type=int, help="only the first N inputs (a later run without it resumes)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run; load no model, start no Ray")
    parser.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--model", help="SAM3_MODEL: tiny-random, full-random, a hub id or a directory; with "
                        "--models (or SAM3_MODELS), one of its names")
    parser.add_argument("--models", help="SAM3_MODELS: name=source pairs (docs/models.md); --model picks one")
    parser.add_argument("--device", help="SAM3_DEVICE: auto, cpu, cuda")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="SAM3_DTYPE")
    group = parser.add_argument_group("resources")
    group.add_argument("--actors", type=int, default=1, help="model actors in the pool (default 1)")
    group.add_argument("--batch-size", type=int, default=batch_size,
                       help=f"items per actor call, one encoder forward (default {batch_size})")
    group.add_argument("--num-gpus", type=_gpus, default="auto", help="GPU (fraction) per actor; auto: the "
                       "cluster's GPUs shared by the actors, at most 1 each (0 without GPUs)")
    group.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs reserved per actor (default 1)")
    group.add_argument("--torch-threads", type=int, help="torch threads per actor (default: Ray's, = actor CPUs)")
    group.add_argument("--read-cpus", type=float, default=1.0, help="CPUs per image decoding task (default 1)")
    group.add_argument("--rows-per-block", type=int, default=rows_per_block,
                       help=f"items per block and part file at most (default {rows_per_block})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam3-batch", description="Offline SAM3 segmentation of images and videos with Ray Data.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    images = sub.add_parser("images", help="segment images: COCO results JSON and Parquet rows with RLE masks",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(images, batch_size=4, rows_per_block=64)
    images.add_argument("--prompt", action="append", default=[], help="a /v1 prompt object as JSON (repeatable)")
    images.add_argument("--prompts-file", help="a JSON list of /v1 prompt objects")
    images.add_argument("--threshold", type=float, default=0.5, help="minimum concept score")
    images.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability cut")
    images.add_argument("--nms-iou", type=_optional_float, default=0.5, help="per-prompt box NMS IoU; none disables")
    images.add_argument("--cross-prompt-nms-iou", type=_optional_float, default=None, help="NMS across prompts")
    images.add_argument("--max-instances", type=int, default=100, help="most instances per prompt")
    images.add_argument("--polygons", action="store_true", help="also polygons: Parquet column, COCO segmentation")
    images.add_argument("--polygon-epsilon", type=float, help="Douglas-Peucker tolerance of polygons, pixels")
    images.add_argument("--no-coco", dest="coco", action="store_false", help="skip the COCO JSON files")
    videos = sub.add_parser("videos", help="track objects through videos: per-video tracks in Parquet and JSONL",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(videos, batch_size=1, rows_per_block=1)
    videos.add_argument("--no-jsonl", dest="jsonl", action="store_false", help="skip tracks.jsonl")
    return parser


def _resources(args: argparse.Namespace) -> Resources:
    return Resources(
        actors=args.actors, batch_size=args.batch_size, num_gpus=args.num_gpus, actor_cpus=args.actor_cpus,
        torch_threads=args.torch_threads, read_cpus=args.read_cpus, rows_per_block=args.rows_per_block,
    )


def _image_prompts(args: argparse.Namespace) -> list[dict]:
    prompts: list[dict] = [{"type": "concept", "text": t} for t in args.text]
    for raw in args.prompt:
        try:
            prompts.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise SpecError(f"--prompt {raw!r} is not JSON: {exc.msg}") from None
    if args.prompts_file:
        loaded = json.loads(Path(args.prompts_file).read_text())
        if not isinstance(loaded, list):
            raise SpecError(f"{args.prompts_file} must hold a JSON list of /v1 prompt objects")
        prompts.extend(loaded)
    return prompts


def job_from_args(args: argparse.Namespace) -> ImageJob | VideoJob:
    if args.manifest and (args.inputs or args.text or getattr(args, "prompt", None)):
        raise SpecError("a manifest names the inputs and their prompts: give no inputs or prompts with it")
    if args.kind == "videos":
        return VideoJob(args.inputs, args.output, list(args.text), args.manifest, args.jsonl, args.limit,
                        _resources(args))
    thresholds = Thresholds(args.threshold, args.mask_threshold, args.nms_iou, args.cross_prompt_nms_iou,
                            args.max_instances, args.polygon_epsilon)
    return ImageJob(args.inputs, args.output, _image_prompts(args) if not args.manifest else [], args.manifest,
                    thresholds, args.polygons, args.coco, args.limit, _resources(args))


def config_from_args(args: argparse.Namespace) -> Config:
    """The batch's Config. With a registry (SAM3_MODELS or --models), `--model` names one of its models (unset: the
    default) and the run loads that model's source; without one, `--model` is a source, as SAM3_MODEL."""
    overrides = {k: getattr(args, k) for k in ("models", "device", "dtype") if getattr(args, k) is not None}
    try:
        config = Config.from_env(**overrides)
        registry = Registry.from_config(config)
        if registry.listed:
            try:
                return registry.config_for(config, registry.resolve(args.model).name)
            except UnknownModel as exc:
                raise SpecError(exc.message) from None
        return config.model_copy(update={"model": args.model}) if args.model else config
    except ValueError as exc:
        raise SpecError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from serve_app.batch import pipeline

    try:
        job, config = job_from_args(args), config_from_args(args)
        if args.dry_run:
            plan = pipeline.plan_images(job, config) if args.kind == "images" else pipeline.plan_videos(job, config)
            print(plan.describe())
            return 0
        run = pipeline.run_images if args.kind == "images" else pipeline.run_videos
        summary = run(job, config, args.address)
    except SpecError as exc:
        print(f"sam3-batch: error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
