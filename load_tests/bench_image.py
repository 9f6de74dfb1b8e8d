"""Image benchmark: ImageEngine.segment in-process (the baseline) vs the Serve graph over HTTP, same run, same device.

    python load_tests/bench_image.py [--model tiny-random] [--requests N] [--concurrency 1,16]
        [--image-size 480x640,1080x1920] [--format jpeg|png] [--prompts text|visual|mixed] [--device auto]
        [--max-batch 16] [--batch-wait-ms MS] [--decoder-batch N] [--decoder-threads N] [--decoder exact,batched]
        [--admission N] [--json out.json]

Per image size: the in-process loop at this process' torch thread count and at the Ray workers' (equal threads),
then the HTTP graph at each concurrency. Prints throughput, p50/p99, both ratios, the encoder's batch histogram
(GET /v1/stats), CPU milliseconds per request of every Serve process (proxy, each replica; /proc/<pid>/stat over
the measured requests) and the mean of the responses' `timings_ms`. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from harness import (  # load_tests/ is on sys.path as a script
    cpu_snapshot,
    fmt,
    free_port,
    init_ray,
    jpeg_b64,
    make_image,
    serve_processes,
    start_py_spy,
    stop_py_spy,
    stop_serve,
    worker_torch_threads,
)
from PIL import Image

PHRASES = ("a cat", "the red car", "person", "a wooden chair")
WARMUP = 4  # requests before each phase that are not counted (at least one per HTTP client)
SHOWN_ERRORS = 5  # error messages printed per phase; every error is counted
APP = "bench"


@dataclass
class Phase:
    """One measured phase: latencies (successes only), errors, encoder batches, CPU seconds per process, timings."""

    name: str
    size: str
    concurrency: int
    requests: int
    threads: int | None = None
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    batches: dict | None = None
    decoder_batches: dict | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    timings: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self, baselines: dict[str, float]) -> dict:
        ok = len(self.latencies_ms)
        lat = np.asarray(self.latencies_ms) if ok else None
        return {
            "phase": self.name, "image": self.size, "concurrency": self.concurrency, "threads": self.threads,
            "requests": self.requests, "ok": ok, "errors": len(self.errors), "wall_s": round(self.wall_s, 3),
            "throughput_rps": round(self.rps, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if ok else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if ok else None,
            **{f"vs_{k}": round(self.rps / v, 3) if v else None for k, v in baselines.items()},
            "encoder_batches": self.batches, "decoder_batches": self.decoder_batches,
            "cpu_ms_per_request": {k: round(v * 1000 / ok, 2) for k, v in self.cpu_s.items()} if ok else {},
            "timings_ms_mean": {k: round(float(np.mean(v)), 2) for k, v in self.timings.items()},
        }


# ---- workload --------------------------------------------------------------------------------------------


def encode_image(image: np.ndarray, fmt_name: str) -> str:
    if fmt_name == "jpeg":
        return jpeg_b64(image)
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


def http_bodies(first_seed: int, count: int, size: tuple[int, int], args: argparse.Namespace) -> list[bytes]:
    """Pre-encoded JSON bodies, one distinct image each, built in parallel before the clock starts."""
    height, width = size

    def body(i: int) -> bytes:
        seed = first_seed + i
        payload = {"image": encode_image(make_image(seed, height, width), args.format),
                   "prompts": [wire_prompt(args.prompts, seed, height, width)]}
        return json.dumps(payload).encode()

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(body, range(count)))


# ---- (a) in-process baseline ---------------------------------------------------------------------------


def run_in_process(args: argparse.Namespace, size: tuple[int, int], threads: list[int]) -> tuple[list[Phase], dict]:
    """ImageEngine.segment in a loop on distinct decoded images, once per torch thread count."""
    import torch

    from serve_app.core.config import Config
    from serve_app.core.types import SegmentParams
    from serve_app.image.engine import ImageEngine
    from serve_app.image.models import load_bundle

    engine = ImageEngine(load_bundle(Config(model=args.model, device=args.device)))
    info = {"device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
            "model_input_side": engine.bundle.image_size}
    params, (height, width) = SegmentParams(), size

    def wire(i: int) -> dict:
        return wire_prompt(args.prompts, i, height, width)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # made before the clock starts
        images = list(pool.map(lambda i: make_image(i, height, width), range(args.requests)))
    own, phases = torch.get_num_threads(), []
    for n in threads:
        torch.set_num_threads(n)
        for seed in range(WARMUP):
            engine.segment(make_image(10_000_000 + seed, height, width), [internal_prompt(wire(seed))], params)
        phase = Phase("in-process", f"{height}x{width}", 1, args.requests, threads=n)
        cpu, start = time.process_time(), time.perf_counter()
        for i, image in enumerate(images):
            began = time.perf_counter()
            try:
                engine.segment(image, [internal_prompt(wire(i))], params)
                phase.latencies_ms.append((time.perf_counter() - began) * 1000)
            except Exception as exc:  # noqa: BLE001 - a failure is a figure, not the end of the run
                phase.errors.append(f"{type(exc).__name__}: {exc}")
        phase.wall_s = time.perf_counter() - start
        phase.cpu_s = {"in-process": time.process_time() - cpu}
        phases.append(phase)
        print(f"  in-process {height}x{width} threads={n}: {phase.rps:.1f} req/s", flush=True)
    torch.set_num_threads(own)
    del engine, images
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return phases, info


# ---- (b) the Serve graph over HTTP ---------------------------------------------------------------------


def start_ray(args: argparse.Namespace) -> int | None:
    """Ray with every core; returns torch's thread count in a 0-CPU worker (what the replicas get)."""

    # Ray starts its workers at nice 15; this process (the in-process baseline) runs at 0. On a shared machine that
    # alone would hand the baseline most of the CPU, so both sides run at the same priority.
    os.environ.setdefault("RAY_worker_niceness", str(os.getpriority(os.PRIO_PROCESS, 0)))
    for pair in args.env:  # e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0: every Ray process inherits it
        key, _, value = pair.partition("=")
        os.environ[key] = value
    init_ray()
    return worker_torch_threads()


def start_serve(args: argparse.Namespace, device: str, decoder: str = "batched", port: int | None = None) -> str:
    """Serve's proxy on a free loopback port (or `port`, already started), build_app(Config) as the root app with
    the decoder `exact` (SAM3_DECODER_EXACT=1) or `batched`."""
    from ray import serve

    from deployments.app import build_app
    from serve_app.core.config import Config

    gpu = args.gpu_fraction if device.startswith("cuda") else 0.0
    config = Config(
        model=args.model, device=args.device, num_cpus=0, encoder_num_gpus=gpu, decoder_num_gpus=gpu,
        encoder_max_batch_size=args.max_batch, decoder_exact=decoder == "exact",
        **({} if args.decoder_batch is None else {"decoder_max_batch_size": args.decoder_batch}),
        **({} if args.decoder_threads is None else {"decoder_threads": args.decoder_threads}),
        **({} if args.admission is None else {"admission_running_per_replica": args.admission}),
        **({} if args.batch_wait_ms is None else {"encoder_batch_wait_timeout_s": args.batch_wait_ms / 1000}),
    )
    if port is None:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": config.request_timeout_s})
    else:  # the next mode: the previous app's replicas go first, so that the CPU figures are this app's alone
        serve.delete(APP)
        while set(serve_processes(APP)) - {"proxy"}:
            time.sleep(0.5)
    serve.run(build_app(config), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def graph_stats(client, url: str) -> dict:
    """The encoder's and the decoder's /v1/stats ({} when it does not answer)."""
    try:
        response = client.get(f"{url}/v1/stats", timeout=30)
        return {k: response.json()[k] for k in ("encoder", "decoder")} if response.status_code == 200 else {}
    except Exception:  # noqa: BLE001
        return {}


def batch_delta(before: dict | None, after: dict | None) -> dict | None:
    """Batches one model deployment ran between two /v1/stats snapshots: count, images, mean size, histogram."""
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
                    error, response = f"{type(exc).__name__}: {exc}", None
                elapsed = (time.perf_counter() - start) * 1000
                if phase is None:
                    continue
                timings = response.json().get("timings_ms", {}) if error is None else {}
                with lock:
                    if error:
                        phase.errors.append(error)
                        continue
                    phase.latencies_ms.append(elapsed)
                    for key, value in timings.items():
                        phase.timings.setdefault(key, []).append(value)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def run_http(args: argparse.Namespace, url: str, size: tuple[int, int], seed_base: int, name: str = "http") -> list[Phase]:
    """Each concurrency level in turn: warm-up (not counted), then N requests on images never sent before."""
    import httpx

    label = f"{size[0]}x{size[1]}"
    phases = [Phase(name, label, c, args.requests) for c in args.concurrency]
    pids = serve_processes(APP)
    with httpx.Client() as stats_client:
        for k, phase in enumerate(phases):
            base = seed_base + 1_000_000 * (k + 1)
            fire(url, http_bodies(20_000_000 + base, max(WARMUP, phase.concurrency), size, args), phase.concurrency, None)
            bodies = http_bodies(base, args.requests, size, args)
            spies = start_py_spy(pids, args.py_spy, f"{label}-c{phase.concurrency}") if args.py_spy else []
            if spies:
                time.sleep(2.0)  # py-spy attaches
            before, cpu_before = graph_stats(stats_client, url), cpu_snapshot(pids)
            phase.wall_s = fire(url, bodies, phase.concurrency, phase)
            cpu_after, after = cpu_snapshot(pids), graph_stats(stats_client, url)
            phase.batches = batch_delta(before.get("encoder"), after.get("encoder"))
            phase.decoder_batches = batch_delta(before.get("decoder"), after.get("decoder"))
            stop_py_spy(spies)
            phase.cpu_s = {role: cpu_after[role] - cpu_before[role] for role in cpu_after if role in cpu_before}
            print(f"  http {label} c={phase.concurrency}: {phase.rps:.1f} req/s, {len(phase.errors)} errors", flush=True)
    return phases


# ---- report ----------------------------------------------------------------------------------------------


def print_table(rows: list[dict], header: dict) -> None:
    print("\n" + "  ".join(f"{k}={v}" for k, v in header.items()))
    columns = f"{'phase':<13}{'image':>10}{'thr':>4}{'conc':>5}{'ok':>5}{'errs':>5}{'req/s':>8}{'p50_ms':>8}" \
              f"{'p99_ms':>8}{'vs_own':>8}{'vs_eq':>7}{'enc_b':>7}{'dec_b':>7}  encoder / decoder batch_hist"
    print(columns)
    print("-" * len(columns))
    for r in rows:
        b, d = r["encoder_batches"], r["decoder_batches"]
        hist = " / ".join(" ".join(f"{k}:{v}" for k, v in x["histogram"].items()) if x else "-" for x in (b, d))
        ratios = [fmt(r[k], ".2f") + ("x" if r[k] is not None else "") for k in ("vs_own_threads", "vs_equal_threads")]
        print(f"{r['phase']:<13}{r['image']:>10}{fmt(r['threads']):>4}{r['concurrency']:>5}{r['ok']:>5}{r['errors']:>5}"
              f"{r['throughput_rps']:>8.2f}{fmt(r['p50_ms'], '.1f'):>8}{fmt(r['p99_ms'], '.1f'):>8}"
              f"{ratios[0]:>8}{ratios[1]:>7}{fmt(b and b['mean_batch_size'], '.2f'):>7}"
              f"{fmt(d and d['mean_batch_size'], '.2f'):>7}  {hist}")
    roles = sorted({k for r in rows for k in r["cpu_ms_per_request"] if k != "in-process"})
    print("\nCPU ms per request (process CPU over the measured requests / requests)")
    print(f"{'phase':<13}{'image':>10}{'conc':>5}" + "".join(f"{role:>14}" for role in [*roles, "total"]))
    for r in rows:
        cpu = r["cpu_ms_per_request"]
        cells = [fmt(cpu.get(role), ".1f") for role in roles] + [fmt(sum(cpu.values()) if cpu else None, ".1f")]
        print(f"{r['phase']:<13}{r['image']:>10}{r['concurrency']:>5}" + "".join(f"{c:>14}" for c in cells))
    keys = sorted({k for r in rows for k in r["timings_ms_mean"]})
    if keys:
        print("\nmean timings_ms of the responses")
        print(f"{'phase':<13}{'image':>10}{'conc':>5}" + "".join(f"{k:>16}" for k in keys))
        for r in rows:
            if r["timings_ms_mean"]:
                print(f"{r['phase']:<13}{r['image']:>10}{r['concurrency']:>5}"
                      + "".join(f"{fmt(r['timings_ms_mean'].get(k), '.2f'):>16}" for k in keys))


def print_errors(phases: list[Phase]) -> None:
    for phase in phases:
        if phase.errors:
            print(f"\n{phase.name} {phase.size} c={phase.concurrency}: {len(phase.errors)} errors, first {SHOWN_ERRORS}:")
            for message in phase.errors[:SHOWN_ERRORS]:
                print(f"  {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random", help="SAM3_MODEL: tiny-random, a hub id or a directory")
    p.add_argument("--requests", type=int, default=200, help="measured requests per phase")
    p.add_argument("--concurrency", default="1,16", help="comma-separated HTTP client counts")
    p.add_argument("--image-size", default="480x640,1080x1920", help="comma-separated HEIGHTxWIDTH of the images")
    p.add_argument("--format", choices=("jpeg", "png"), default="jpeg", help="how the images travel (base64)")
    p.add_argument("--prompts", choices=("text", "visual", "mixed"), default="text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--max-batch", type=int, default=16, help="SAM3_ENCODER_MAX_BATCH_SIZE")
    p.add_argument("--batch-wait-ms", type=float, default=None,
                   help="SAM3_ENCODER_BATCH_WAIT_TIMEOUT_S in ms (default: the configuration's)")
    p.add_argument("--decoder-batch", type=int, default=None, help="SAM3_DECODER_MAX_BATCH_SIZE")
    p.add_argument("--decoder-threads", type=int, default=None, help="SAM3_DECODER_THREADS")
    p.add_argument("--decoder", default="batched",
                   help="comma-separated decoder modes, each its own app in turn, same run: batched, exact "
                        "(SAM3_DECODER_EXACT=1)")
    p.add_argument("--admission", type=int, default=None, help="SAM3_ADMISSION_RUNNING_PER_REPLICA")
    p.add_argument("--gpu-fraction", type=float, default=0.5, help="GPU per encoder / decoder replica on CUDA")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for every Ray process (Ray/Serve tuning flags); repeatable")
    p.add_argument("--py-spy", default=None, metavar="DIR",
                   help="record every Serve process with py-spy during each HTTP phase (raw stacks into DIR)")
    args = p.parse_args(argv)
    args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.image_size.split(",") if s.strip()]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.decoder = [m.strip() for m in args.decoder.split(",") if m.strip()]
    if not args.decoder or set(args.decoder) - {"exact", "batched"}:
        p.error("--decoder: exact, batched or both")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    started, load = time.perf_counter(), os.getloadavg()
    own_threads = torch.get_num_threads()
    try:
        worker_threads = start_ray(args)
        info = {"torch_threads_in_process": own_threads, "torch_threads_in_ray_workers": worker_threads}
        baselines: dict[tuple, list[Phase]] = {}
        for size in args.sizes:
            threads = list(dict.fromkeys([own_threads, worker_threads or own_threads]))
            print(f"in-process {size[0]}x{size[1]}: {args.requests} requests at torch threads {threads} ...", flush=True)
            baselines[size], more = run_in_process(args, size, threads)
            info.update(more)
        http: dict[tuple, list[Phase]] = {size: [] for size in args.sizes}
        port = None
        for mode in args.decoder:
            print(f"http (decoder {mode}): starting Ray Serve, then {args.requests} requests at concurrency "
                  f"{args.concurrency} ...", flush=True)
            url = start_serve(args, info["device"], mode, port)
            port = int(url.rsplit(":", 1)[1])
            name = "http" if len(args.decoder) == 1 else f"http-{mode}"
            for k, size in enumerate(args.sizes):
                http[size] += run_http(args, url, size, 100_000_000 * k, name)
    finally:
        stop_serve()
    rows, everything = [], []
    for size in args.sizes:
        by_threads = {p.threads: p.rps for p in baselines[size]}
        ratios = {"own_threads": by_threads.get(own_threads),
                  "equal_threads": by_threads.get(worker_threads or own_threads)}
        for phase in (*baselines[size], *http[size]):
            rows.append(phase.summary(ratios))
            everything.append(phase)
    header = {"model": args.model, **info, "format": args.format, "prompts": args.prompts,
              "cpu_cores": os.cpu_count(), "nice": os.environ.get("RAY_worker_niceness"), **dict(e.partition("=")[::2] for e in args.env),
              "max_batch": args.max_batch, "decoder_batch": args.decoder_batch or "config",
              "decoder_threads": args.decoder_threads or "config", "admission": args.admission or "config",
              "batch_wait_ms": args.batch_wait_ms if args.batch_wait_ms is not None else "config",
              "load_avg_at_start": round(load[0], 2), "load_avg_at_end": round(os.getloadavg()[0], 2),
              "total_s": round(time.perf_counter() - started, 1)}
    print_errors(everything)
    print_table(rows, header)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": header, "results": rows}, handle, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
