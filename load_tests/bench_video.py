"""Video benchmark: text-prompt tracking frames/s, VideoSession.propagate in-process (the baseline) vs the Serve graph.

    python load_tests/bench_video.py [--model tiny-random|full-random|DIR] [--device auto|cpu|cuda] [--frames 32]
        [--size 240x320] [--concurrency 1,4] [--video-gpus 0.2] [--threads 1] [--skip-http] [--json out.json]

One generated moving-shapes mp4 (tests/videos.py), decoded once with decode_video and tracked from frame 0 with one
text prompt. Each HTTP session is its own tracker actor: POST /v1/video/sessions (raw mp4), POST .../prompts, POST
.../propagate (NDJSON, one line per frame), DELETE. Sessions of one level are created and prompted, then propagate
together. Prints frames, wall seconds, aggregate and per-session frames/s, p50/p99 of the gap between consecutive
frames, time to first frame, session start time and frames/s relative to the in-process baseline. Figures only.

Session open latency (upload -> 201) is measured on its own video (--open-frames, --open-size: by default the
1,200-frame 128x96 mp4 of issue #12), in one run with the warm pool off (SAM3_VIDEO_WARM_SESSIONS=0, every open
starts an actor and loads the model) and on (--warm-sessions, each open after the pool has refilled): p50/p99 over
--opens opens, with the server's own split of each open (`timings_ms`: waiting for an actor, decode, VideoSession,
the whole create) and what is left for HTTP and the ingress' probe. decode_video's frames/s on that video is
measured in-process, apart. --open-only skips the tracking phases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from harness import fmt, free_port, stop_serve, worker_torch_threads  # load_tests/ is on sys.path as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # tests.videos, when run as `python load_tests/bench_video.py`

WARMUP_FRAMES = 4  # frames propagated by the warm-up session (in-process and over HTTP), not counted
SHOWN_ERRORS = 5  # error messages printed per phase; every error is counted
ENCODER_DECODER_GPUS = 0.05  # the image path idles here; on CUDA its replicas still need a slice to load the model


@dataclass
class SessionRun:
    """One session's timings (seconds unless named _ms); error is the first thing that went wrong, if anything."""

    start_s: float | None = None  # create: actor + model load + decode (HTTP); decode + VideoSession (in-process)
    prompt_s: float | None = None
    ttff_s: float | None = None  # propagate request sent -> first frame line
    propagate_s: float | None = None  # propagate request sent -> last frame line
    close_s: float | None = None
    frames: int = 0
    objects: int = 0
    gaps_ms: list[float] = field(default_factory=list)  # between consecutive frame lines
    rss_bytes: int | None = None
    error: str | None = None
    t_propagate_end: float | None = None


@dataclass
class Phase:
    """Sessions at one concurrency level; track_s runs from their common propagate start to the last frame line."""

    name: str
    concurrency: int
    expected_frames: int
    wall_s: float = 0.0
    track_s: float = 0.0
    runs: list[SessionRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # errors outside any session (Serve did not start...)

    def all_errors(self) -> list[str]:
        return self.errors + [r.error for r in self.runs if r.error]

    def fps(self) -> float:
        frames = sum(r.frames for r in self.runs)
        return frames / self.track_s if self.track_s > 0 else 0.0

    def summary(self, baseline_fps: float | None) -> dict:
        frames = sum(r.frames for r in self.runs)
        gaps = np.asarray([g for r in self.runs for g in r.gaps_ms])
        per_session = [r.frames / r.propagate_s for r in self.runs if r.frames and r.propagate_s]
        mean = lambda xs, k=1.0: round(float(np.mean(xs)) * k, 3) if xs else None
        pick = lambda name: [getattr(r, name) for r in self.runs if getattr(r, name) is not None]
        fps = self.fps()
        return {
            "phase": self.name, "concurrency": self.concurrency, "sessions": len(self.runs),
            "ok": sum(1 for r in self.runs if r.error is None and r.frames == self.expected_frames),
            "errors": len(self.all_errors()), "frames": frames, "wall_s": round(self.wall_s, 3),
            "track_s": round(self.track_s, 3), "aggregate_fps": round(fps, 3),
            "per_session_fps": mean(per_session), "per_session_fps_each": [round(v, 3) for v in per_session],
            "p50_frame_ms": round(float(np.percentile(gaps, 50)), 2) if gaps.size else None,
            "p99_frame_ms": round(float(np.percentile(gaps, 99)), 2) if gaps.size else None,
            "ttff_ms": mean(pick("ttff_s"), 1000), "ttff_ms_each": [round(v * 1000, 1) for v in pick("ttff_s")],
            "session_start_ms": mean(pick("start_s"), 1000),
            "session_start_ms_each": [round(v * 1000, 1) for v in pick("start_s")],
            "prompt_ms": mean(pick("prompt_s"), 1000), "close_ms": mean(pick("close_s"), 1000),
            "objects_per_frame": round(sum(r.objects for r in self.runs) / frames, 2) if frames else None,
            "session_rss_mb": mean(pick("rss_bytes"), 1 / 2**20),
            "vs_in_process": round(fps / baseline_fps, 3) if baseline_fps else None,
        }


def make_video(args: argparse.Namespace) -> bytes:
    from tests.videos import write_video

    return write_video(args.frames, args.height, args.width, fps=args.fps, fmt="mp4")


# ---- (a) in-process baseline ---------------------------------------------------------------------------


def track_in_process(engine, frames: list[np.ndarray], fps: float, phrase: str, max_frames: int | None,
                     run: SessionRun) -> None:
    """One VideoSession from construction to close, timed as the HTTP client times its session."""
    from serve_app.video.session import VideoSession

    t0 = time.perf_counter()
    session = VideoSession(engine, frames, fps)
    t1 = time.perf_counter()
    session.add_text(phrase)
    t2 = time.perf_counter()
    run.prompt_s, last = t2 - t1, t2
    run.start_s = (run.start_s or 0.0) + (t1 - t0)
    for result in session.propagate("forward", 0, max_frames):
        now = time.perf_counter()
        if run.frames == 0:
            run.ttff_s = now - t2
        else:
            run.gaps_ms.append((now - last) * 1000)
        run.frames, run.objects, last = run.frames + 1, run.objects + len(result.objects), now
    run.propagate_s, run.t_propagate_end = last - t2, last
    t3 = time.perf_counter()
    session.close()
    run.close_s = time.perf_counter() - t3


def run_in_process(args: argparse.Namespace, video: bytes) -> tuple[Phase, dict]:
    """Decode the same mp4 the server gets, warm up on a few frames, then track every frame once."""
    import torch

    from serve_app.core.config import Config
    from serve_app.image.engine import ImageEngine
    from serve_app.image.models import load_bundle
    from serve_app.video.io import VideoLimits, decode_video

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info: dict = {"device": args.device, "torch_threads_in_process": torch.get_num_threads()}
    phase, engine = Phase("in-process", 1, args.frames), None
    try:
        t0 = time.perf_counter()
        engine = ImageEngine(load_bundle(Config(model=args.model, device=args.device)))
        info.update(device=str(engine.device), dtype=str(engine.dtype).replace("torch.", ""),
                    model_input_side=engine.bundle.image_size, model_load_s=round(time.perf_counter() - t0, 1))
        decoded = decode_video(video, VideoLimits())
        phase.expected_frames = decoded.num_frames
        track_in_process(engine, decoded.frames, decoded.fps, args.phrase, WARMUP_FRAMES, SessionRun())
        run = SessionRun()
        phase.runs.append(run)
        start = time.perf_counter()  # a session start decodes the upload: so does this one
        decoded = decode_video(video, VideoLimits())
        run.start_s = time.perf_counter() - start
        track_in_process(engine, decoded.frames, decoded.fps, args.phrase, None, run)
        phase.wall_s = time.perf_counter() - start
        phase.track_s = run.propagate_s or 0.0
        if run.frames != phase.expected_frames:
            run.error = f"short propagation: {run.frames} of {phase.expected_frames} frames"
    except Exception as exc:  # noqa: BLE001 - a failure is a figure, not the end of the run
        phase.errors.append(f"{type(exc).__name__}: {exc}")
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return phase, info


# ---- (b) the Serve graph over HTTP ---------------------------------------------------------------------


def start_serve(args: argparse.Namespace, info: dict) -> str:
    """Ray with every core and visible GPU and Serve's proxy on a free loopback port; returns its URL."""
    import ray
    import torch
    from ray import serve

    cuda = info["device"].startswith("cuda") or (info["device"] == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info["video_gpus"] = args.video_gpus if args.video_gpus is not None else (0.2 if cuda else 0.0)
    side = ENCODER_DECODER_GPUS if cuda else 0.0
    wanted = info["video_gpus"] * max(args.concurrency) + 2 * side
    if cuda and wanted > gpus:
        print(f"  warning: {max(args.concurrency)} sessions x {info['video_gpus']} GPU + {2 * side} for the image path "
              f"= {wanted:.2f} GPUs, {gpus} visible: sessions beyond that wait for a GPU slice", flush=True)
    info["side_gpus"] = side
    port = free_port()
    ray.init(num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": args.request_timeout_s})
    info["torch_threads_in_ray_workers"] = worker_torch_threads()
    return f"http://127.0.0.1:{port}"


def deploy_tracking(args: argparse.Namespace, info: dict) -> None:
    """build_app(Config) as the root app, its warm pool as --warm-sessions."""
    from ray import serve

    from deployments.app import build_app
    from serve_app.core.config import Config

    config = Config(
        model=args.model, device=args.device, num_cpus=0, video_num_gpus=info["video_gpus"],
        encoder_num_gpus=info["side_gpus"], decoder_num_gpus=info["side_gpus"],
        video_max_sessions=max(8, max(args.concurrency) + 1), video_warm_sessions=args.warm_sessions,
        request_timeout_s=args.request_timeout_s,
    )
    serve.run(build_app(config), name="bench-video", route_prefix="/")


def _http_error(response) -> str:
    return f"HTTP {response.status_code}: {response.text[:200]}"


def stream_frames(client, url: str, session_id: str, max_frames: int | None, run: SessionRun) -> None:
    """POST propagate and time each NDJSON frame line as it arrives; an in-band error or a short stream is an error."""
    body = {"direction": "forward", "start_frame": 0, "max_frames": max_frames}
    t0 = last = time.perf_counter()
    done = False
    with client.stream("POST", f"{url}/v1/video/sessions/{session_id}/propagate", json=body) as response:
        if response.status_code != 200:
            response.read()
            run.error = _http_error(response)
            return
        for line in response.iter_lines():
            if not line.strip():
                continue
            now, message = time.perf_counter(), json.loads(line)
            if "error" in message:
                run.error = f"in-band error after {run.frames} frames: {message['error']}"
                return
            if message.get("done"):
                done = True
                break
            if run.frames == 0:
                run.ttff_s = now - t0
            else:
                run.gaps_ms.append((now - last) * 1000)
            run.frames, run.objects, last = run.frames + 1, run.objects + len(message.get("objects", [])), now
    run.propagate_s, run.t_propagate_end = last - t0, last
    if not done:
        run.error = f"the stream ended after {run.frames} frames without its done line"


def http_session(url: str, video: bytes, phrase: str, max_frames: int | None, expected: int | None, run: SessionRun,
                 barrier: threading.Barrier | None, timeout_s: float) -> None:
    """Create, prompt, (wait for the others), propagate, close; every failure lands in run.error, never raised."""
    import httpx

    session_id, arrived = None, False
    with httpx.Client(timeout=timeout_s) as client:
        try:
            t0 = time.perf_counter()
            response = client.post(f"{url}/v1/video/sessions", content=video, headers={"content-type": "video/mp4"})
            run.start_s = time.perf_counter() - t0
            if response.status_code != 201:
                raise RuntimeError(f"create: {_http_error(response)}")
            created = response.json()
            session_id, run.rss_bytes = created["session_id"], created.get("rss_bytes")
            t0 = time.perf_counter()
            prompt = {"frame_index": 0, "text": phrase}
            response = client.post(f"{url}/v1/video/sessions/{session_id}/prompts", json=prompt)
            run.prompt_s = time.perf_counter() - t0
            if response.status_code != 200:
                raise RuntimeError(f"prompt: {_http_error(response)}")
            arrived = _arrive(barrier)
            stream_frames(client, url, session_id, max_frames, run)
            if run.error is None and expected is not None and run.frames != expected:
                run.error = f"short stream: {run.frames} of {expected} frames"
        except Exception as exc:  # noqa: BLE001 - counted, never fatal
            run.error = run.error or f"{type(exc).__name__}: {exc}"
        finally:
            if not arrived:
                _arrive(barrier)  # a failed session must not hold the others back
            if session_id is not None:
                _close(client, url, session_id, run)


def _arrive(barrier: threading.Barrier | None) -> bool:
    if barrier is not None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
    return True


def _close(client, url: str, session_id: str, run: SessionRun) -> None:
    try:
        t0 = time.perf_counter()
        response = client.delete(f"{url}/v1/video/sessions/{session_id}")
        run.close_s = time.perf_counter() - t0
        if response.status_code != 200:
            run.error = run.error or f"close: {_http_error(response)}"
    except Exception as exc:  # noqa: BLE001
        run.error = run.error or f"close: {type(exc).__name__}: {exc}"


def run_level(url: str, video: bytes, phase: Phase, args: argparse.Namespace, max_frames: int | None = None) -> None:
    """`concurrency` sessions at once, one client thread each; propagation starts when all are prompted."""
    marks: dict[str, float] = {}
    barrier = threading.Barrier(phase.concurrency, action=lambda: marks.setdefault("go", time.perf_counter()),
                                timeout=args.request_timeout_s)
    expected = None if max_frames else phase.expected_frames  # warm-up: the count is not checked
    phase.runs = [SessionRun() for _ in range(phase.concurrency)]
    threads = [threading.Thread(target=http_session, daemon=True, args=(
        url, video, args.phrase, max_frames, expected, run, barrier, args.request_timeout_s)) for run in phase.runs]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.wall_s = time.perf_counter() - start
    ends = [r.t_propagate_end for r in phase.runs if r.t_propagate_end is not None]
    phase.track_s = max(ends) - marks.get("go", start) if ends else 0.0


def run_http(args: argparse.Namespace, video: bytes, info: dict, expected: int, url: str) -> list[Phase]:
    """Warm-up session (not counted), then each concurrency level in turn on fresh sessions."""
    phases = [Phase("http", c, expected) for c in args.concurrency]
    try:
        deploy_tracking(args, info)
    except Exception as exc:  # noqa: BLE001
        for phase in phases:
            phase.errors.append(f"Serve did not start: {type(exc).__name__}: {exc}")
        return phases
    warm = Phase("warm-up", 1, expected)
    run_level(url, video, warm, args, max_frames=WARMUP_FRAMES)
    if warm.all_errors():
        print(f"  warm-up session failed: {warm.all_errors()[0]}", flush=True)
    for phase in phases:
        run_level(url, video, phase, args)
        print(f"  http c={phase.concurrency}: {sum(r.frames for r in phase.runs)} frames, {len(phase.all_errors())} "
              f"errors in {phase.wall_s:.1f} s", flush=True)
    return phases


# ---- (c) session open latency, warm pool off and on ------------------------------------------------------


def decode_rate(video: bytes, repeats: int = 5) -> dict:
    """decode_video (what a session actor runs) and probe_video (the ingress' check) on the open video, in-process."""
    from serve_app.video.io import VideoLimits, decode_video, probe_video

    limits = VideoLimits(max_frames=10**6)
    decode_s, probe_s, frames = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        probe_video(video, limits)
        t1 = time.perf_counter()
        frames = decode_video(video, limits).num_frames
        decode_s.append(time.perf_counter() - t1)
        probe_s.append(t1 - t0)
    best, median = min(decode_s), float(np.median(decode_s))
    return {"frames": frames, "decode_ms_p50": round(median * 1000, 1), "decode_fps_p50": round(frames / median, 1),
            "decode_fps_best": round(frames / best, 1), "probe_ms_p50": round(float(np.median(probe_s)) * 1000, 1)}


def _wait_warm(url: str, wanted: int, timeout_s: float) -> float:
    """Seconds until the app's warm pool holds `wanted` loaded actors (from /v1/stats)."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
        if (stats.get("video") or {}).get("warm", {}).get("ready", 0) >= wanted:
            break
        time.sleep(0.2)
    return time.perf_counter() - t0


def open_latency(base: str, video: bytes, args: argparse.Namespace, info: dict, warm: int) -> dict:
    """Deploy the graph with `warm` warm actors, open and close --opens sessions one at a time, delete the app."""
    import httpx
    from ray import serve

    from deployments.app import build_app
    from serve_app.core.config import Config

    name = f"open-warm{warm}"
    config = Config(model=args.model, device=args.device, num_cpus=0, web_ui=False, video_warm_sessions=warm,
                    video_num_gpus=info["video_gpus"], encoder_num_gpus=info["side_gpus"],
                    decoder_num_gpus=info["side_gpus"],
                    video_max_frames=max(2000, args.open_frames), request_timeout_s=args.request_timeout_s)
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    url, rows, refill_s = f"{base}/{name}", [], []
    try:
        with httpx.Client(timeout=args.request_timeout_s) as client:
            for _ in range(args.opens):
                if warm:
                    refill_s.append(_wait_warm(url, min(warm, 1), args.request_timeout_s))
                t0 = time.perf_counter()
                response = client.post(f"{url}/v1/video/sessions", content=video, headers={"content-type": "video/mp4"})
                client_ms = (time.perf_counter() - t0) * 1000
                if response.status_code != 201:
                    rows.append({"error": _http_error(response)})
                    continue
                body = response.json()
                timings = body.get("timings_ms", {})
                rows.append({"client": client_ms, "warm_start": body.get("warm_start"), **timings,
                             "http_and_ingress": client_ms - timings.get("create", 0.0)})
                client.delete(f"{url}/v1/video/sessions/{body['session_id']}")
    finally:
        serve.delete(name)
    ok = [r for r in rows if "error" not in r]
    pct = lambda key, q: round(float(np.percentile([r[key] for r in ok if key in r], q)), 1) if ok else None
    out = {"warm_sessions": warm, "opens": len(rows), "ok": len(ok), "warm_starts": sum(bool(r["warm_start"]) for r in ok),
           "errors": [r["error"] for r in rows if "error" in r][:SHOWN_ERRORS]}
    for key in ("client", "actor", "load", "decode", "session", "create", "http_and_ingress"):
        out[f"{key}_ms_p50"], out[f"{key}_ms_p99"] = pct(key, 50), pct(key, 99)
    out["client_ms_each"] = [round(r["client"], 1) for r in ok]
    if refill_s:
        out["refill_wait_s_max"] = round(max(refill_s[1:] or [0.0]), 2)  # the first wait is the app's start
    return out


def run_open_latency(args: argparse.Namespace, info: dict, base: str) -> list[dict]:
    from tests.videos import write_video

    video = write_video(args.open_frames, args.open_height, args.open_width, fps=25, fmt="mp4")
    print(f"open latency: {args.open_frames} frames at {args.open_size} ({len(video)} bytes), {args.opens} opens, "
          f"warm pool 0 then {args.warm_sessions} ...", flush=True)
    rows = []
    for warm in (0, args.warm_sessions):
        try:
            rows.append(open_latency(base, video, args, info, warm))
        except Exception as exc:  # noqa: BLE001 - a figure, not the end of the run
            rows.append({"warm_sessions": warm, "errors": [f"{type(exc).__name__}: {exc}"]})
        print(f"  warm={warm}: {rows[-1].get('client_ms_each')}", flush=True)
    rows.append({"decode_in_process": decode_rate(video), "mp4_bytes": len(video)})
    return rows


def print_open_table(rows: list[dict]) -> None:
    decode = rows[-1]["decode_in_process"]
    print(f"\nsession open (upload -> 201), {decode['frames']} frames, {rows[-1]['mp4_bytes']} bytes; "
          f"in-process decode_video p50 {decode['decode_ms_p50']} ms = {decode['decode_fps_p50']} frames/s "
          f"(best {decode['decode_fps_best']}), probe_video {decode['probe_ms_p50']} ms")
    columns = (f"{'warm':>5}{'opens':>6}{'warm_st':>8}{'p50_ms':>9}{'p99_ms':>9}{'actor':>9}{'load':>9}{'decode':>9}"
               f"{'session':>9}{'create':>9}{'http+ingr':>10}")
    print(columns + "   (server-side columns: p50 ms)")
    print("-" * len(columns))
    for r in rows[:-1]:
        if "opens" not in r:
            print(f"{r['warm_sessions']:>5}  failed: {r['errors']}")
            continue
        print(f"{r['warm_sessions']:>5}{r['opens']:>6}{r['warm_starts']:>8}{fmt(r['client_ms_p50'], '.0f'):>9}"
              f"{fmt(r['client_ms_p99'], '.0f'):>9}{fmt(r['actor_ms_p50'], '.0f'):>9}{fmt(r['load_ms_p50'], '.0f'):>9}"
              f"{fmt(r['decode_ms_p50'], '.0f'):>9}"
              f"{fmt(r['session_ms_p50'], '.1f'):>9}{fmt(r['create_ms_p50'], '.0f'):>9}"
              f"{fmt(r['http_and_ingress_ms_p50'], '.0f'):>10}")
        for message in r["errors"]:
            print(f"  error: {message}")


# ---- report ----------------------------------------------------------------------------------------------


def print_table(rows: list[dict], header: dict) -> None:
    print("\n" + "  ".join(f"{k}={v}" for k, v in header.items()))
    columns = (f"{'phase':<11}{'conc':>5}{'sess':>5}{'ok':>4}{'errs':>5}{'frames':>7}{'wall_s':>8}{'agg_fps':>9}"
               f"{'sess_fps':>9}{'p50_ms':>9}{'p99_ms':>9}{'ttff_ms':>9}{'start_ms':>9}{'obj/fr':>7}{'rss_MB':>7}"
               f"{'vs_inproc':>10}")
    print(columns)
    print("-" * len(columns))
    for r in rows:
        ratio = fmt(r["vs_in_process"], ".2f") + ("x" if r["vs_in_process"] is not None else "")
        print(f"{r['phase']:<11}{r['concurrency']:>5}{r['sessions']:>5}{r['ok']:>4}{r['errors']:>5}{r['frames']:>7}"
              f"{r['wall_s']:>8.2f}{r['aggregate_fps']:>9.2f}{fmt(r['per_session_fps'], '.2f'):>9}"
              f"{fmt(r['p50_frame_ms'], '.1f'):>9}{fmt(r['p99_frame_ms'], '.1f'):>9}{fmt(r['ttff_ms'], '.0f'):>9}"
              f"{fmt(r['session_start_ms'], '.0f'):>9}{fmt(r['objects_per_frame'], '.1f'):>7}"
              f"{fmt(r['session_rss_mb'], '.0f'):>7}{ratio:>10}")


def print_errors(phases: list[Phase]) -> None:
    for phase in phases:
        errors = phase.all_errors()
        if errors:
            print(f"\n{phase.name} c={phase.concurrency}: {len(errors)} errors, first {SHOWN_ERRORS}:")
            for message in errors[:SHOWN_ERRORS]:
                print(f"  {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random", help="tiny-random, full-random, a hub id or a directory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--frames", type=int, default=32, help="frames in the generated video")
    p.add_argument("--size", default="240x320", help="HEIGHTxWIDTH of the generated video")
    p.add_argument("--fps", type=int, default=10, help="frame rate written into the mp4")
    p.add_argument("--concurrency", default="1,4", help="comma-separated concurrent session counts")
    p.add_argument("--video-gpus", type=float, default=None,
                   help="GPU fraction per session actor (default 0.2 on CUDA, else 0)")
    p.add_argument("--phrase", default="a square", help="the text prompt tracked")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in-process (default 1: what Ray gives 0-CPU session actors; 0: torch's own)")
    p.add_argument("--request-timeout-s", type=float, default=300.0, help="SAM3_REQUEST_TIMEOUT_S and client timeout")
    p.add_argument("--skip-http", action="store_true", help="only the in-process baseline (and no open latency)")
    p.add_argument("--opens", type=int, default=5, help="sessions opened per warm-pool setting (0: skip that part)")
    p.add_argument("--open-frames", type=int, default=1200, help="frames of the open-latency video")
    p.add_argument("--open-size", default="96x128", help="HEIGHTxWIDTH of the open-latency video")
    p.add_argument("--warm-sessions", type=int, default=1, help="SAM3_VIDEO_WARM_SESSIONS of the pool-on app")
    p.add_argument("--open-only", action="store_true", help="only the open latency (no tracking phases)")
    p.add_argument("--stream-frames", type=int, default=100,
                   help="frames pushed over one live stream (WebSocket, one click, load_tests/bench_stream.py; 0: skip)")
    p.add_argument("--stream-windows", default="1,2", help="comma-separated frames in flight for the stream phase")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    args.open_height, args.open_width = (int(v) for v in args.open_size.lower().split("x"))
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return args


def run_streams(args: argparse.Namespace, url: str) -> list[dict]:
    """Live streams against the same app: per-frame latency p50/p99 and frames/s (load_tests/bench_stream.py)."""
    from bench_stream import clip_frames, start_message, stream_figures

    height, width = (int(v) for v in args.size.split("x"))
    frames = clip_frames(args.stream_frames, height, width)
    ws_url = url.replace("http://", "ws://", 1) + "/v1/video/streams"
    rows = []
    for window in (int(w) for w in args.stream_windows.split(",") if w):
        print(f"http: live stream, {len(frames)} frames, {window} in flight ...", flush=True)
        try:
            figures = stream_figures(ws_url, frames, start_message(height, width, None), window=window,
                                     timeout_s=args.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a figure is missing, the rest of the benchmark stands
            figures = {"frames": len(frames), "errors": [f"{type(exc).__name__}: {exc}"]}
        rows.append({"window": window, **figures})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    video = make_video(args)
    baseline, info, phases, opens = Phase("in-process", 1, args.frames), {"device": args.device}, [], []
    streams: list[dict] = []
    if not args.open_only:
        print(f"in-process: {args.frames} frames at {args.size}, model {args.model} ...", flush=True)
        baseline, info = run_in_process(args, video)
        print(f"  in-process: {baseline.runs[0].frames if baseline.runs else 0} frames in {baseline.track_s:.1f} s",
              flush=True)
    if not args.skip_http:
        print("http: starting Ray Serve ...", flush=True)
        try:
            url = start_serve(args, info)
            if args.opens > 0:
                opens = run_open_latency(args, info, url)
            if not args.open_only:
                print(f"http: tracking at concurrency {args.concurrency} ...", flush=True)
                phases = run_http(args, video, info, baseline.expected_frames, url)
            if args.stream_frames > 0 and not args.open_only:
                streams = run_streams(args, url)
        except Exception as exc:  # noqa: BLE001
            baseline.errors.append(f"Serve did not start: {type(exc).__name__}: {exc}")
        finally:
            stop_serve()
    header = {"model": args.model, **info, "video": f"{args.frames}x{args.size}", "mp4_bytes": len(video),
              "phrase": args.phrase, "cpu_cores": os.cpu_count(), "total_s": round(time.perf_counter() - started, 1)}
    rows = []
    if not args.open_only:
        rows = [p.summary(baseline.fps() or None) for p in (baseline, *phases)]
        print_errors([baseline, *phases])
        print_table(rows, header)
    else:
        print("\n" + "  ".join(f"{k}={v}" for k, v in header.items()))
    if opens:
        print_open_table(opens)
    for row in streams:
        print(f"stream ({row['window']} in flight, {row['frames']} frames of {args.size}): {row.get('fps')} frames/s, "
              f"p50 {row.get('p50_ms')} ms, p99 {row.get('p99_ms')} ms, open {row.get('open_ms')} ms, "
              f"dropped {row.get('dropped')}, errors {row.get('errors')}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": header, "results": rows, "open_latency": opens, "streams": streams}, handle, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
