"""Live stream benchmark: per-frame latency p50/p99 and frames/s over the WebSocket (/v1/video/streams), against
VideoStream.push in-process (the baseline).

    python load_tests/bench_stream.py [--model tiny-random|full-random|DIR] [--device auto|cpu|cuda] [--frames 300]
        [--size 240x320] [--windows 1,2] [--text "a square"] [--video-gpus 0.5] [--threads 1] [--skip-ws]
        [--json out.json]

    # on a GPU (facebook/sam3's architecture, random weights; no hub access needed):
    python load_tests/bench_stream.py --model full-random --device cuda --frames 300 --size 480x640 --windows 1,2

One generated moving-shapes clip (tests/videos.py), each frame PNG-encoded once. A stream is opened with one click
on the square (or with --text), then every frame is pushed as a binary message; `window` frames are kept in flight
(1: lock-step, the latency of one frame; the server's SAM3_VIDEO_STREAM_MAX_IN_FLIGHT: what the server pipelines).
Latency is from a frame's send to its reply; frames/s is replies over the time from the first send to the last reply;
open_ms is the start message to `started` (the stream's actor and model load). Figures only, not a test.
`stream_figures(ws_url, frames, ...)` is the one measurement, for other scripts (bench_video.py) to call.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time

import numpy as np
from harness import fmt, free_port, stop_serve, worker_torch_threads  # load_tests/ is on sys.path as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests.videos, when run as `python load_tests/bench_stream.py`

WARMUP_FRAMES = 4  # frames pushed on a first stream, not counted (the proxy, the ingress, a worker's first calls)


def clip_frames(count: int, height: int, width: int) -> list[bytes]:
    """`count` PNG frames of the moving-shapes clip (repeating every 40 frames, as a camera loop would)."""
    from PIL import Image

    from tests.videos import moving_frames

    loop = moving_frames(min(count, 40), height, width)
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(loop[i % len(loop)]).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def start_message(height: int, width: int, text: str | None) -> dict:
    if text:
        return {"type": "start", "text": text}
    side = max(2, min(height, width) // 5)  # the square of tests/videos.py starts at the top left
    return {"type": "start", "objects": [{"object_id": 1, "points": [[side // 2, height // 4]], "point_labels": [1]}]}


def summarise(latencies_ms: list[float], frames: int, seconds: float) -> dict:
    lat = np.asarray(latencies_ms)
    return {
        "frames": frames, "seconds": round(seconds, 3), "fps": round(frames / seconds, 3) if seconds > 0 else None,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "mean_ms": round(float(lat.mean()), 2) if lat.size else None,
    }


def stream_figures(ws_url: str, frames: list[bytes], start: dict, window: int = 1, key: str | None = None,
                   timeout_s: float = 300.0) -> dict:
    """Open one stream at `ws_url` (ws://host:port/v1/video/streams), push `frames` keeping `window` in flight,
    return {frames, seconds, fps, p50_ms, p99_ms, mean_ms, open_ms, dropped, errors, objects_per_frame}."""
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {key}"} if key else None
    sent_at: dict[int, float] = {}
    latencies, dropped, errors, objects = [], 0, [], 0
    with connect(ws_url, additional_headers=headers, open_timeout=timeout_s, max_size=2**26) as ws:
        t0 = time.perf_counter()
        ws.send(json.dumps(start))
        started = json.loads(ws.recv(timeout=timeout_s))
        if started.get("type") != "started":
            raise RuntimeError(f"the stream did not start: {started}")
        open_ms = (time.perf_counter() - t0) * 1000
        sent = answered = 0
        first = time.perf_counter()
        while answered < len(frames):
            while sent < len(frames) and sent - answered < window:
                sent_at[sent] = time.perf_counter()
                ws.send(frames[sent])
                sent += 1
            reply = json.loads(ws.recv(timeout=timeout_s))
            now = time.perf_counter()
            answered += 1
            if reply["type"] == "frame":
                latencies.append((now - sent_at[reply["seq"]]) * 1000)
                objects += len(reply["objects"])
            elif reply["type"] == "dropped":
                dropped += 1
            else:
                errors.append(reply.get("error"))
        seconds = time.perf_counter() - first
        ws.send(json.dumps({"type": "close"}))
    return {**summarise(latencies, len(latencies), seconds), "open_ms": round(open_ms, 1), "dropped": dropped,
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "objects_per_frame": round(objects / len(latencies), 2) if latencies else None}


def in_process(args: argparse.Namespace, frames: list[bytes]) -> tuple[dict, dict]:
    """VideoStream.push on this process, frame by frame: decode + track + RLE, as the stream's actor runs it."""
    import torch

    from serve_app.core.config import Config
    from serve_app.image.engine import ImageEngine
    from serve_app.image.models import load_bundle
    from serve_app.video.stream import StreamObject, StreamPrompt, VideoStream

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = Config(model=args.model, device=args.device)
    t0 = time.perf_counter()
    engine = ImageEngine(load_bundle(config))
    info = {"device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
            "model_load_s": round(time.perf_counter() - t0, 1), "torch_threads_in_process": torch.get_num_threads()}
    start = start_message(args.height, args.width, args.text)
    if args.text:
        prompt = StreamPrompt(texts=(args.text,))
    else:
        (obj,) = start["objects"]
        prompt = StreamPrompt(objects=(StreamObject(1, tuple(tuple(p) for p in obj["points"]), (1,)),))
    warm = VideoStream(engine, config, prompt)
    for data in frames[:WARMUP_FRAMES]:
        warm.push(data)
    warm.close()
    stream = VideoStream(engine, config, prompt)
    latencies = []
    first = time.perf_counter()
    for data in frames:
        t = time.perf_counter()
        stream.push(data)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        latencies.append((time.perf_counter() - t) * 1000)
    seconds = time.perf_counter() - first
    info["stored_after_last_frame"] = stream.stored()
    stream.close()
    return {**summarise(latencies, len(latencies), seconds), "open_ms": None, "dropped": 0, "errors": 0}, info


def start_serve(args: argparse.Namespace, info: dict) -> str:
    """Ray with every core and visible GPU, Serve's proxy on a free port, build_app(Config) as the root app."""
    import ray
    import torch
    from ray import serve

    from deployments.app import build_app
    from serve_app.core.config import Config

    cuda = info["device"].startswith("cuda")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info["video_gpus"] = args.video_gpus if args.video_gpus is not None else (0.5 if cuda else 0.0)
    side = 0.05 if cuda else 0.0  # the image path idles here; on CUDA its replicas still need a slice to load
    config = Config(model=args.model, device=args.device, num_cpus=0, video_num_gpus=info["video_gpus"],
                    encoder_num_gpus=side, decoder_num_gpus=side, web_ui=False)
    info["max_in_flight"] = config.video_stream_max_in_flight
    port = free_port()
    ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="bench-stream", route_prefix="/")
    info["torch_threads_in_ray_workers"] = worker_torch_threads()
    return f"ws://127.0.0.1:{port}/v1/video/streams"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random", help="tiny-random, full-random, a hub id or a directory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--frames", type=int, default=300, help="frames pushed per stream")
    p.add_argument("--size", default="240x320", help="HEIGHTxWIDTH of the frames")
    p.add_argument("--windows", default="1,2", help="comma-separated frames kept in flight by the client")
    p.add_argument("--text", default=None, help="track this phrase instead of one click on the square")
    p.add_argument("--video-gpus", type=float, default=None, help="GPU fraction of the stream actor (CUDA: 0.5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in-process (default 1: what Ray gives 0-CPU actors; 0: torch's own)")
    p.add_argument("--skip-ws", action="store_true", help="only the in-process baseline")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    args.windows = [int(w) for w in args.windows.split(",") if w.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    frames = clip_frames(args.frames, args.height, args.width)
    print(f"in-process: {args.frames} frames at {args.size}, model {args.model} ...", flush=True)
    baseline, info = in_process(args, frames)
    rows = [{"phase": "in-process", "window": 1, **baseline}]
    if not args.skip_ws:
        print("websocket: starting Ray Serve ...", flush=True)
        try:
            url = start_serve(args, info)
            start = start_message(args.height, args.width, args.text)
            stream_figures(url, frames[:WARMUP_FRAMES], start)
            for window in args.windows:
                rows.append({"phase": "websocket", "window": window, **stream_figures(url, frames, start, window)})
        finally:
            stop_serve()
    header = {"model": args.model, **info, "frames": f"{args.frames}x{args.size}",
              "prompt": args.text or "one click", "cpu_cores": os.cpu_count()}
    print("\n" + "  ".join(f"{k}={v}" for k, v in header.items()))
    columns = (f"{'phase':<11}{'window':>7}{'frames':>7}{'fps':>8}{'p50_ms':>9}{'p99_ms':>9}{'open_ms':>9}"
               f"{'dropped':>8}{'errors':>7}")
    print(columns + "\n" + "-" * len(columns))
    for r in rows:
        print(f"{r['phase']:<11}{r['window']:>7}{r['frames']:>7}{fmt(r['fps'], '.2f'):>8}{fmt(r['p50_ms'], '.1f'):>9}"
              f"{fmt(r['p99_ms'], '.1f'):>9}{fmt(r['open_ms'], '.0f'):>9}{r['dropped']:>8}{r['errors']:>7}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "rows": rows}, handle, indent=2)
    return 0 if all(r["errors"] == 0 and r["frames"] == args.frames for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
