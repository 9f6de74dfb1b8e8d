"""Image benchmark: ImageEngine.segment in-process (the baseline) vs the Serve graph over HTTP, same run, same device.

    python load_tests/bench_image.py [--model tiny-random] [--requests N] [--concurrency 1,16]
        [--image-size 480x640] [--prompts text|visual|mixed] [--device auto] [--max-batch 16]
        [--batch-wait-ms 10] [--json out.json]

Prints requests, wall seconds, throughput, p50/p99 latency and throughput relative to the in-process baseline,
plus the encoder's batch statistics (from GET /v1/stats) for each HTTP phase. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from harness import (  # load_tests/ is on sys.path as a script
    fmt,
    free_port,
    make_image,
    stop_serve,
    worker_torch_threads,
)
from PIL import Image

PHRASES = ("a cat", "the red car", "person", "a wooden chair")
WARMUP = 4  # requests before each phase that are not counted (at least one per HTTP client)
SHOWN_ERRORS = 5  # error messages printed per phase; every error is counted


@dataclass
class Phase:
    """One measured phase: its latencies (successes only), errors and the encoder's batches during it."""

    name: str
    concurrency: int
    requests: int
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    batches: dict | None = None

    def summary(self, baseline_rps: float | None) -> dict:
        ok = len(self.latencies_ms)
        rps = ok / self.wall_s if self.wall_s > 0 else 0.0
        lat = np.asarray(self.latencies_ms) if ok else None
        return {
            "phase": self.name, "concurrency": self.concurrency, "requests": self.requests, "ok": ok,
            "errors": len(self.errors), "wall_s": round(self.wall_s, 3), "throughput_rps": round(rps, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if ok else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if ok else None,
            "vs_in_process": round(rps / baseline_rps, 3) if baseline_rps else None,
            "encoder_batches": self.batches,
        }


# ---- workload --------------------------------------------------------------------------------------------


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def prompt_kind(mode: str, index: int) -> str:
    """`mixed` alternates text and visual requests; the others are what they say."""
    if mode == "mixed":
        return "text" if index % 2 == 0 else "visual"
    return mode


def wire_prompt(mode: str, index: int, height: int, width: int) -> dict:
    """The native /v1 prompt of request `index`: a phrase, or one positive click somewhere in the image."""
    if prompt_kind(mode, index) == "text":
        return {"type": "concept", "text": PHRASES[index % len(PHRASES)]}
    rng = np.random.default_rng(index)
    return {"type": "visual", "points": [[float(rng.uniform(0, width - 1)), float(rng.uniform(0, height - 1))]]}


def internal_prompt(wire: dict):
    from serve_app.core.types import ConceptPrompt, VisualPrompt

    if wire["type"] == "concept":
        return ConceptPrompt(text=wire["text"])
    return VisualPrompt(points=tuple(tuple(p) for p in wire["points"]), point_labels=(1,) * len(wire["points"]))


def http_bodies(first_seed: int, count: int, args: argparse.Namespace) -> list[bytes]:
    """Pre-encoded JSON bodies, one distinct image each, built in parallel before the clock starts."""
    height, width = args.height, args.width

    def body(i: int) -> bytes:
        seed = first_seed + i
        payload = {"image": png_b64(make_image(seed, height, width)),
                   "prompts": [wire_prompt(args.prompts, seed, height, width)]}
        return json.dumps(payload).encode()

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(body, range(count)))


# ---- (a) in-process baseline ---------------------------------------------------------------------------


def run_in_process(args: argparse.Namespace) -> tuple[Phase, dict]:
    """ImageEngine.segment in a loop on distinct images; returns the phase and what ran where."""
    import torch

    from serve_app.core.config import Config
    from serve_app.core.types import SegmentParams
    from serve_app.image.engine import ImageEngine
    from serve_app.image.models import load_bundle

    engine = ImageEngine(load_bundle(Config(model=args.model, device=args.device)))
    info = {"device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
            "model_input_side": engine.bundle.image_size, "torch_threads_in_process": torch.get_num_threads()}
    params = SegmentParams()
    wire = lambda i: wire_prompt(args.prompts, i, args.height, args.width)  # noqa: E731

    def one(image: np.ndarray, prompt) -> float:
        start = time.perf_counter()
        engine.segment(image, [prompt], params)
        return (time.perf_counter() - start) * 1000

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # made before the clock starts
        images = list(pool.map(lambda i: make_image(i, args.height, args.width), range(args.requests)))
    for seed in range(WARMUP):
        one(make_image(10_000_000 + seed, args.height, args.width), internal_prompt(wire(seed)))
    phase = Phase("in-process", 1, args.requests)
    start = time.perf_counter()
    for i, image in enumerate(images):
        try:
            phase.latencies_ms.append(one(image, internal_prompt(wire(i))))
        except Exception as exc:  # noqa: BLE001 - a failure is a figure, not the end of the run
            phase.errors.append(f"{type(exc).__name__}: {exc}")
    phase.wall_s = time.perf_counter() - start
    del engine, images
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return phase, info


# ---- (b) the Serve graph over HTTP ---------------------------------------------------------------------


def start_serve(args: argparse.Namespace, device: str) -> tuple[str, int | None]:
    """Ray with every core, Serve's proxy on a free loopback port, build_app(Config) as the root app."""
    import ray
    from ray import serve

    from deployments.app import build_app
    from serve_app.core.config import Config

    gpu = args.gpu_fraction if device.startswith("cuda") else 0.0
    config = Config(
        model=args.model, device=args.device, num_cpus=0, encoder_num_gpus=gpu, decoder_num_gpus=gpu,
        encoder_max_batch_size=args.max_batch, encoder_batch_wait_timeout_s=args.batch_wait_ms / 1000,
    )
    port = free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": config.request_timeout_s})
    serve.run(build_app(config), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}", worker_torch_threads()


def encoder_stats(client, url: str) -> dict | None:
    try:
        response = client.get(f"{url}/v1/stats", timeout=30)
        return response.json()["encoder"] if response.status_code == 200 else None
    except Exception:  # noqa: BLE001
        return None


def batch_delta(before: dict | None, after: dict | None) -> dict | None:
    """Encoder batches run between two /v1/stats snapshots: count, images, mean size, histogram."""
    if after is None:
        return None
    old = (before or {}).get("batch_size_histogram", {})
    hist = {k: v - old.get(k, 0) for k, v in after["batch_size_histogram"].items() if v - old.get(k, 0) > 0}
    batches = sum(hist.values())
    images = sum(int(k) * v for k, v in hist.items())
    return {"batches": batches, "images": images, "mean_batch_size": round(images / batches, 2) if batches else 0.0,
            "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0])))}


def fire(url: str, bodies: list[bytes], concurrency: int, phase: Phase | None) -> float:
    """POST every body with `concurrency` client threads (one keep-alive client each); returns wall seconds."""
    import httpx

    lock, cursor = threading.Lock(), iter(range(len(bodies)))

    def client_loop() -> None:
        with httpx.Client(timeout=300, headers={"content-type": "application/json"}) as client:
            while True:
                with lock:
                    index = next(cursor, None)
                if index is None:
                    return
                start = time.perf_counter()
                try:
                    response = client.post(f"{url}/v1/image/segment", content=bodies[index])
                    error = None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:200]}"
                except Exception as exc:  # noqa: BLE001 - counted, never fatal
                    error = f"{type(exc).__name__}: {exc}"
                elapsed = (time.perf_counter() - start) * 1000
                if phase is None:
                    continue
                with lock:
                    if error:
                        phase.errors.append(error)
                    else:
                        phase.latencies_ms.append(elapsed)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def run_http(args: argparse.Namespace, info: dict) -> list[Phase]:
    """Each concurrency level in turn: warm-up (not counted), then N requests on images never sent before."""
    import httpx

    phases = [Phase("http", c, args.requests) for c in args.concurrency]
    try:
        url, info["torch_threads_in_ray_workers"] = start_serve(args, info["device"])
    except Exception as exc:  # noqa: BLE001
        for phase in phases:
            phase.errors.append(f"Serve did not start: {type(exc).__name__}: {exc}")
        return phases
    with httpx.Client() as stats_client:
        for k, phase in enumerate(phases):
            base = 1_000_000 * (k + 1)
            warm = http_bodies(20_000_000 + base, max(WARMUP, phase.concurrency), args)
            fire(url, warm, phase.concurrency, None)
            bodies = http_bodies(base, args.requests, args)
            before = encoder_stats(stats_client, url)
            phase.wall_s = fire(url, bodies, phase.concurrency, phase)
            phase.batches = batch_delta(before, encoder_stats(stats_client, url))
            print(f"  http c={phase.concurrency}: {len(phase.latencies_ms)} ok, {len(phase.errors)} errors "
                  f"in {phase.wall_s:.1f} s", flush=True)
    return phases


# ---- report ----------------------------------------------------------------------------------------------


def print_table(rows: list[dict], header: dict) -> None:
    print("\n" + "  ".join(f"{k}={v}" for k, v in header.items()))
    columns = f"{'phase':<11}{'conc':>5}{'reqs':>6}{'ok':>6}{'errs':>6}{'wall_s':>8}{'req/s':>9}" \
              f"{'p50_ms':>9}{'p99_ms':>9}{'vs_inproc':>10}{'mean_batch':>11}  batch_hist"
    print(columns)
    print("-" * len(columns))
    for r in rows:
        b = r["encoder_batches"]
        hist = " ".join(f"{k}:{v}" for k, v in b["histogram"].items()) if b else "-"
        ratio = fmt(r["vs_in_process"], ".2f") + ("x" if r["vs_in_process"] is not None else "")
        print(f"{r['phase']:<11}{r['concurrency']:>5}{r['requests']:>6}{r['ok']:>6}{r['errors']:>6}"
              f"{r['wall_s']:>8.2f}{r['throughput_rps']:>9.2f}{fmt(r['p50_ms'], '.1f'):>9}"
              f"{fmt(r['p99_ms'], '.1f'):>9}{ratio:>10}{fmt(b and b['mean_batch_size'], '.2f'):>11}  {hist}")


def print_errors(phases: list[Phase]) -> None:
    for phase in phases:
        if phase.errors:
            print(f"\n{phase.name} c={phase.concurrency}: {len(phase.errors)} errors, first {SHOWN_ERRORS}:")
            for message in phase.errors[:SHOWN_ERRORS]:
                print(f"  {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random", help="SAM3_MODEL: tiny-random, a hub id or a directory")
    p.add_argument("--requests", type=int, default=200, help="measured requests per phase")
    p.add_argument("--concurrency", default="1,16", help="comma-separated HTTP client counts")
    p.add_argument("--image-size", default="480x640", help="HEIGHTxWIDTH of the generated images")
    p.add_argument("--prompts", choices=("text", "visual", "mixed"), default="text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--max-batch", type=int, default=16, help="encoder @serve.batch max_batch_size")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="encoder @serve.batch wait timeout")
    p.add_argument("--gpu-fraction", type=float, default=0.5, help="GPU per encoder / decoder replica on CUDA")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.height, args.width = (int(v) for v in args.image_size.lower().split("x"))
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    print(f"in-process: {args.requests} requests ...", flush=True)
    baseline, info = run_in_process(args)
    print(f"  in-process: {len(baseline.latencies_ms)} ok in {baseline.wall_s:.1f} s", flush=True)
    print(f"http: starting Ray Serve, then {args.requests} requests at concurrency {args.concurrency} ...", flush=True)
    try:
        phases = run_http(args, info)
    finally:
        stop_serve()
    base_rps = len(baseline.latencies_ms) / baseline.wall_s if baseline.wall_s > 0 else None
    rows = [p.summary(base_rps) for p in (baseline, *phases)]
    header = {"model": args.model, **info, "image": args.image_size, "prompts": args.prompts,
              "cpu_cores": os.cpu_count(), "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
              "total_s": round(time.perf_counter() - started, 1)}
    print_errors([baseline, *phases])
    print_table(rows, header)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": header, "results": rows}, handle, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
