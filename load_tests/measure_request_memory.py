"""Peak memory of the decoder's steps on the full-size SAM3 architecture, for docs/memory.md.

    python load_tests/measure_request_memory.py [--dtype float32] [--batch 4] [--json out.json]

facebook/sam3's architecture (Sam3VideoConfig defaults) is built on the meta device and its weights are zero-filled
(no download, no minutes of random init: activation shapes and sizes do not depend on the values). Each step runs
on the CPU from a random backbone embedding (72 x 72 tokens x 1024), the encoder is not run. For each step the
peak RSS over the RSS before it is measured (VmHWM reset through /proc/self/clear_refs): an upper bound of what
the same step allocates on a GPU, where bfloat16 halves every activation.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from serve_app.core.stats import status_bytes

MIB = 1024**2


def _measure(step):
    gc.collect()
    base = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    started = time.perf_counter()
    out = step()
    seconds = time.perf_counter() - started
    return out, {"extra_mib": round((status_bytes("VmHWM") - base) / MIB, 1), "seconds": round(seconds, 1)}


def _zero_bundle(dtype):
    import torch
    from transformers import Sam3VideoConfig, Sam3VideoModel

    from serve_app.core.config import Config
    from serve_app.image.models import load_bundle

    with torch.device("meta"):
        video = Sam3VideoModel(Sam3VideoConfig())
    video = video.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for tensor in [*video.parameters(), *video.buffers()]:
            tensor.zero_()
    return load_bundle(Config(model="full-random", device="cpu", dtype=str(dtype).removeprefix("torch.")), video)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--height", type=int, default=1008)
    parser.add_argument("--width", type=int, default=1008)
    parser.add_argument("--batch", type=int, default=4,
                        help="also decode a batch of this many one-prompt requests, all in one DETR forward")
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from serve_app.core.types import ConceptPrompt, SegmentParams
    from serve_app.image.engine import AUTO_POINT_BATCH, ImageEngine, _auto_grid

    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    bundle = _zero_bundle(dtype)
    engine = ImageEngine(bundle)
    grid = bundle.image_size // bundle.patch_size
    hidden = bundle.detector.config.vision_config.backbone_config.hidden_size
    embedding = torch.randn(grid * grid, hidden).to(dtype)
    size = (args.height, args.width)
    rows = {"model": "facebook/sam3 architecture (zero weights)", "dtype": args.dtype, "size": list(size)}

    features, rows["tracker_features"] = _measure(lambda: engine.tracker_embeddings(embedding))
    chunk = _auto_grid(8, bundle.image_size)[:AUTO_POINT_BATCH]
    logits, rows["auto_chunk_forward"] = _measure(lambda: engine._auto_forward(features, chunk))
    rows["auto_chunk_forward"]["low_res"] = list(logits[0].shape[-2:])
    del logits
    del features
    params = SegmentParams(threshold=0.0, nms_iou=None, max_instances=100)
    result, rows["concept_decode_1_prompt"] = _measure(
        lambda: engine.decode(embedding, [ConceptPrompt(text="a cat")], params, size)
    )
    rows["concept_decode_1_prompt"]["instances"] = len(result.prompts[0].instances)
    del result
    if args.batch > 1:
        from serve_app.image.decoding import DecodeJob, decode_jobs

        jobs = [DecodeJob(embedding, [ConceptPrompt(text="a cat")], params, size) for _ in range(args.batch)]
        results, rows[f"concept_decode_batch_{args.batch}"] = _measure(
            lambda: decode_jobs(engine, jobs, args.batch, args.batch))
        rows[f"concept_decode_batch_{args.batch}"]["instances"] = sum(len(r.prompts[0].instances) for r in results)
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
