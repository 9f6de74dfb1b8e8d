"""Decoder benchmark: what batching requests saves per request, stage by stage, in-process (no Serve), same run.

    python load_tests/bench_decoder.py [--model tiny-random] [--requests 32] [--batches 1,2,4,8,16]
        [--image-size 480x640] [--prompts text|visual|mixed] [--device auto] [--threads 1] [--json out.json]

The same distinct images and prompts are decoded in batches of each size (`serve_app.image.decoding.decode_jobs`, as
the Decoder deployment runs them); batch 1 with one prompt per forward is the exact path (SAM3_DECODER_EXACT). Per
batch size it prints CPU milliseconds per request (process CPU; on CUDA the wall clock after a synchronize), split
into the stages: necks (detector and tracker), DETR forwards, mask-decoder forwards, post-processing (threshold,
NMS, upsampling to the original size, RLE), and the rest; each as a ratio to batch 1. It also prints how far the
batched answers are from the exact ones: the worst mask IoU and score difference, and whether every prompt kept
the same instances. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np

STAGES = ("necks", "detr", "tracker", "post")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--requests", type=int, default=32, help="distinct images, one request each")
    p.add_argument("--batches", default="1,2,4,8,16", help="comma-separated requests per batch")
    p.add_argument("--image-size", default="480x640", help="HEIGHTxWIDTH")
    p.add_argument("--prompts", choices=("text", "visual", "mixed"), default="text")
    p.add_argument("--rounds", type=int, default=2, help="passes over the requests per batch size (best is kept)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a Decoder replica on 0 CPUs runs 1)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.size = tuple(int(v) for v in args.image_size.lower().split("x"))
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from serve_app.core.config import Config
    from serve_app.core.types import ConceptPrompt, SegmentParams, VisualPrompt
    from serve_app.image.codecs import rle_decode
    from serve_app.image.decoding import DecodeJob, decode_jobs
    from serve_app.image.engine import ImageEngine
    from serve_app.image.models import load_bundle

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and args.device != "cpu"

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    class Timed(ImageEngine):
        """The engine with each stage's time added to `spent` (the stages are its methods; nothing else changes)."""

        spent: dict[str, float] = defaultdict(float)

        def _timed(self, stage: str, call, *a):
            started = now()
            try:
                return call(*a)
            finally:
                self.spent[stage] += now() - started

        def detector_levels(self, embeddings):
            return self._timed("necks", super().detector_levels, embeddings)

        def tracker_levels(self, embeddings):
            return self._timed("necks", super().tracker_levels, embeddings)

        def detr(self, vision, prompts):
            return self._timed("detr", super().detr, vision, prompts)

        def track(self, features, prompts):
            return self._timed("tracker", super().track, features, prompts)

        def concept_result(self, *a):
            return self._timed("post", super().concept_result, *a)

        def visual_result(self, *a):
            return self._timed("post", super().visual_result, *a)

    engine = Timed(load_bundle(Config(model=args.model, device=args.device)))
    height, width = args.size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(args.requests)]
    embeddings = [engine.encode([image])[0] for image in images]
    phrases = ("a cat", "the red car", "person", "a wooden chair")

    def prompts(i: int) -> list:
        text = [ConceptPrompt(text=phrases[i % len(phrases)])]
        click = [VisualPrompt(points=((width * (i % 5 + 1) / 6, height / 2),), point_labels=(1,))]
        return {"text": text, "visual": click, "mixed": text + click}[args.prompts]

    params = SegmentParams()

    def jobs() -> list:
        return [DecodeJob(embeddings[i], prompts(i), params, (height, width)) for i in range(args.requests)]

    def run(batch: int) -> tuple[float, dict, list]:
        engine.spent.clear()
        todo, results = jobs(), []
        started = now()
        for k in range(0, len(todo), batch):
            pair = 1 if batch == 1 else batch
            results += decode_jobs(engine, todo[k : k + batch], pair, pair)
        return now() - started, dict(engine.spent), results

    run(1)  # warm-up: text cache, allocator
    rows, exact = [], None
    for batch in args.batches:
        best = min((run(batch) for _ in range(args.rounds)), key=lambda r: r[0])
        total, spent, results = best
        if exact is None:
            exact = results
        worst_iou, worst_score, same = 1.0, 0.0, True
        for got, ref in zip(results, exact):
            for g, r in zip(got.prompts, ref.prompts):
                same &= len(g.instances) == len(r.instances)
                for x, y in zip(g.instances, r.instances):
                    mx, my = rle_decode(x.rle), rle_decode(y.rle)
                    union = np.logical_or(mx, my).sum()
                    worst_iou = min(worst_iou, np.logical_and(mx, my).sum() / union if union else 1.0)
                    worst_score = max(worst_score, abs(x.score - y.score))
        per = {stage: spent.get(stage, 0.0) * 1000 / args.requests for stage in STAGES}
        per["other"] = total * 1000 / args.requests - sum(per.values())
        rows.append({"batch": batch, "ms_per_request": round(total * 1000 / args.requests, 2),
                     **{f"{k}_ms": round(v, 2) for k, v in per.items()},
                     "instances": sum(len(p.instances) for r in results for p in r.prompts),
                     "same_instances": same, "worst_mask_iou": round(float(worst_iou), 6),
                     "worst_score_diff": float(f"{worst_score:.3g}")})
    base = rows[0]
    unit = "wall ms (CUDA)" if cuda else "CPU ms"
    print(f"model={args.model} device={engine.device} dtype={str(engine.dtype).replace('torch.', '')} "
          f"image={height}x{width} prompts={args.prompts} requests={args.requests} torch_threads="
          f"{torch.get_num_threads()} cpu_cores={os.cpu_count()} load_avg={os.getloadavg()[0]:.2f}")
    print(f"\n{unit} per request by batch size (ratio to batch 1 in brackets)")
    cols = ["ms_per_request", *[f"{s}_ms" for s in (*STAGES, "other")]]
    print(f"{'batch':>5}" + "".join(f"{c:>20}" for c in cols) + f"{'same':>6}{'worst IoU':>11}{'worst dscore':>13}")
    for r in rows:
        cells = [f"{r[c]:.2f} ({r[c] / base[c]:.2f}x)" if base[c] else f"{r[c]:.2f}" for c in cols]
        print(f"{r['batch']:>5}" + "".join(f"{c:>20}" for c in cells)
              + f"{str(r['same_instances']):>6}{r['worst_mask_iou']:>11.6f}{r['worst_score_diff']:>13.2e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "size"}, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
