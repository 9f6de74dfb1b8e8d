"""Memory per replica of the SAM3 graph on `full-random` (facebook/sam3's architecture, random weights), by dtype.

    python load_tests/measure_memory.py [--dtypes float32,bfloat16] [--batch 1] [--backbone-layers N] [--json out.json]

For each dtype, in a fresh subprocess on the CPU: the weights one replica holds (every ImageEncoder, Decoder and
video-session replica loads the whole Sam3VideoModel: parameter + buffer bytes, split by part), the resident
memory after loading, and the peak extra memory of one backbone forward (the encoder's activations, per image
of the batch) and of one concept decode from a cached embedding (the decoder's activations). The weights are
exact; activation peaks are the rise of the process's peak RSS over one step (VmHWM, reset before each step so the
model build's transient peak does not hide it; ru_maxrss where it cannot be reset), an upper bound of what the
same step allocates on a GPU, where the allocator caches less. Figures for docs/cluster.md, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 1024**3


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _trim() -> None:
    """Give the heap's free pages back to the system (glibc `malloc_trim`). Without it a step's tensors can reuse
    pages the model build freed but the allocator kept (converting float32 weights to bfloat16 frees half of
    them), and the step's peak would not show in the RSS at all."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset this process' peak RSS (VmHWM) to its current RSS (Linux: `5` to /proc/self/clear_refs), so a step's
    peak is not hidden under the (higher) transient peak of building the model; False where that is not possible.
    The heap is trimmed first, so the step's allocations raise the RSS instead of reusing kept pages."""
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    """Peak RSS since the last _reset_peak (VmHWM), else since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bytes(module) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measure(dtype: str, batch: int, backbone_layers: int = 0) -> dict:
    import numpy as np
    import torch

    from serve_app.core.config import Config
    from serve_app.core.types import ConceptPrompt, SegmentParams
    from serve_app.image.engine import ImageEngine
    from serve_app.image.models import load_bundle

    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = _rss()
    t0 = time.perf_counter()
    bundle = load_bundle(Config(model="full-random", device="cpu", dtype=dtype))
    load_s = time.perf_counter() - t0
    _trim()
    loaded = _rss()
    engine = ImageEngine(bundle)
    det = bundle.detector
    parts = {
        "whole_model": _bytes(bundle.video),
        "vision_backbone": _bytes(bundle.backbone),
        "detector_rest": _bytes(det) - _bytes(det.vision_encoder.backbone),
        "tracker": _bytes(bundle.video.tracker_model),
    }
    layers = bundle.backbone.layers
    if 0 < backbone_layers < len(layers):  # activations live one layer at a time: the first N (window and global
        del layers[backbone_layers:]       # attention, e.g. 8 = up to the first global layer) peak as all 32 do
    images = [np.random.default_rng(i).integers(0, 255, (480, 640, 3), dtype=np.uint8) for i in range(batch)]
    resettable = _reset_peak()
    before = _peak() if resettable else max(_peak(), _rss())
    t0 = time.perf_counter()
    embeddings = engine.encode(images)
    encode_s = time.perf_counter() - t0
    encode_peak = max(0, _peak() - before)
    embedding_bytes = embeddings[0].numel() * embeddings[0].element_size()
    _reset_peak()
    before = _peak() if resettable else max(_peak(), _rss())
    t0 = time.perf_counter()
    prompt = None
    try:
        prompt = ConceptPrompt(text="a cat")
    except TypeError:
        prompt = None
    decode_peak = None
    decode_s = None
    if prompt is not None:
        engine.decode(embeddings[0], [prompt], SegmentParams(), (480, 640))
        decode_s = time.perf_counter() - t0
        decode_peak = max(0, _peak() - before)
    return {
        "dtype": dtype, "batch": batch, "load_s": round(load_s, 1), "encode_s": round(encode_s, 1),
        "decode_s": None if decode_s is None else round(decode_s, 1),
        "params_gib": {k: round(v / GIB, 3) for k, v in parts.items()},
        "rss_after_load_gib": round((loaded - base) / GIB, 3),
        "encode_activation_peak_gib": round(encode_peak / GIB, 3),
        "decode_activation_peak_gib": None if decode_peak is None else round(decode_peak / GIB, 3),
        "embedding_mib": round(embedding_bytes / 1024**2, 2),
        "peak_method": "VmHWM reset per step" if resettable else "ru_maxrss (not reset: load peak may hide a step)",
        "torch_threads": torch.get_num_threads(), "backbone_layers_run": len(layers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--backbone-layers", type=int, default=0,
                        help="run only the first N backbone layers (same per-layer peak, N/32 of the time; 0: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.backbone_layers)))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", dtype, "--batch", str(args.batch),
                              "--backbone-layers", str(args.backbone_layers)],
                             capture_output=True, text=True, check=False,
                             env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
        if out.returncode != 0:
            print(f"{dtype}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
