"""Autoscaling under load: Locust (headless) ramps users against an autoscaling app; replicas polled from Serve.

    python load_tests/autoscale.py [--max-replicas 2] [--stages '[[20,2],[40,8],[70,16]]'] [--cooldown-s 90]
        [--no-autoscale] [--json out.json]

Starts its own Ray (2 CPUs, deployments ask for 0) and Serve proxy on a free loopback port, deploys the graph on
tiny-random with SAM3_AUTOSCALE on (short delays so one run fits in ~3 minutes), runs Locust against it and polls
`serve.status()` every second for RUNNING replicas of Ingress, ImageEncoder and Decoder; after the load it keeps
polling until they are back at one (or --cooldown-s). Prints replicas over time, req/s and p50/p99 per load stage,
and a verdict: ingress and encoder scaled up under load and back down after, zero 5xx, and any 429 only while a
deployment was at its maximum. Exit status 0 when the verdict holds. --no-autoscale (fixed single replicas) is the
broken case: the verdict must fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WATCHED = ("Ingress", "ImageEncoder", "Decoder")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _replicas(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in status.deployments.items() if name in WATCHED}


def _percentiles(latencies: list[float]) -> tuple[float | None, float | None]:
    if not latencies:
        return None, None
    return round(float(np.percentile(latencies, 50)), 1), round(float(np.percentile(latencies, 99)), 1)


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT))
    from deployments.app import build_app
    from serve_app.core.config import Config

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    state = tempfile.mkdtemp(prefix="sam3-autoscale-")
    # Ray's workers import this checkout; address="local" always starts a cluster of our own (never one that
    # `ray start` left in /tmp/ray/ray_current_cluster), in a short temp dir (unix socket paths must fit 107 chars)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.pop("RAY_ADDRESS", None)
    # Serve's replicas and handles report their load every 10 s by default; on 2 busy cores that put the first
    # decision after the load had ended. Every second here (the Serve processes inherit this environment).
    for name in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ.setdefault(name, "1")
    temp_dir = tempfile.mkdtemp(prefix="s3a-", dir="/tmp")
    for attempt in range(3):  # on a loaded machine Ray can miss a start-up deadline once
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = Config(
            state_dir=state, autoscale=not args.no_autoscale, autoscale_max_replicas=args.max_replicas,
            autoscale_target_ongoing_requests=args.target, autoscale_upscale_delay_s=2.0,
            autoscale_downscale_delay_s=5.0, autoscale_look_back_period_s=args.look_back_s, encoder_batch_wait_timeout_s=0.005, web_ui=False,
            admission_max_wait_s=args.admission_max_wait_s,
        )
        t_deploy = time.monotonic()
        serve.run(build_app(config), name="sam3", route_prefix="/")
        deploy_s = time.monotonic() - t_deploy

        timeline: list[tuple[float, dict[str, int]]] = []
        stop = threading.Event()
        start = time.time()

        def poll() -> None:
            while not stop.is_set():
                try:
                    timeline.append((round(time.time() - start, 1), _replicas("sam3")))
                except Exception:  # noqa: BLE001, S110 - a missed sample is not a failure
                    pass
                stop.wait(1.0)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        record = Path(state) / "locust.json"
        env = {**os.environ, "SAM3_LOCUST_RECORD": str(record), "SAM3_LOCUST_STAGES": args.stages,
               "SAM3_LOCUST_PROMPT": args.prompt, "SAM3_LOCUST_SIZE": args.image_size}
        load_s = json.loads(args.stages)[-1][0]
        locust = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(HERE / "locust_autoscale.py"), "--headless", "--host", url,
             "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=load_s + 120,
        )
        load_end = time.time() - start
        deadline = time.monotonic() + args.cooldown_s
        while time.monotonic() < deadline:
            if timeline and all(n <= 1 for n in timeline[-1][1].values()):
                break
            time.sleep(1.0)
        stop.set()
        poller.join(5)
        data = json.loads(record.read_text()) if record.exists() else {"start": start, "requests": []}
        if locust.returncode != 0 or not data["requests"]:
            print(locust.stdout[-3000:], locust.stderr[-3000:], file=sys.stderr)
        return _report(args, timeline, data, start, load_end, deploy_s)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def _report(args, timeline, data, start, load_end, deploy_s) -> dict:
    offset = data["start"] - start  # locust's clock origin on the driver's
    requests = [(t + offset, code, ms) for t, code, ms in data["requests"]]
    maxed_at = [t for t, reps in timeline if any(n >= args.max_replicas for n in reps.values())]
    first_max = min(maxed_at) if maxed_at else None
    stages, previous = [], 0.0
    for until, users in json.loads(args.stages):
        window = [(t, c, ms) for t, c, ms in requests if previous + offset <= t < until + offset]
        ok = [ms for _, c, ms in window if c == 200]
        p50, p99 = _percentiles(ok)
        stages.append({"until_s": until, "users": users, "requests": len(window),
                       "req_s": round(len(ok) / max(1e-9, until - previous), 2), "p50_ms": p50, "p99_ms": p99,
                       "429": sum(c == 429 for _, c, _ in window), "5xx": sum(c >= 500 for _, c, _ in window)})
        previous = until
    peak = {name: max((reps.get(name, 0) for _, reps in timeline), default=0) for name in WATCHED}
    final = timeline[-1][1] if timeline else {}
    codes: dict[str, int] = {}
    for _, code, _ in requests:
        codes[str(code)] = codes.get(str(code), 0) + 1
    too_early = [t for t, c, _ in requests if c == 429 and (first_max is None or t < first_max - 2.0)]
    p50, p99 = _percentiles([ms for _, c, ms in requests if c == 200])
    under_load = [reps for t, reps in timeline if t <= load_end]  # a replica added while the queue drains is too late
    verdict = {
        "ingress_scaled_up": any(reps.get("Ingress", 0) > 1 for reps in under_load),
        "encoder_scaled_up": any(reps.get("ImageEncoder", 0) > 1 for reps in under_load),
        "scaled_back_down": bool(final) and final.get("Ingress") == 1 and final.get("ImageEncoder") == 1,
        "zero_5xx_or_errors": not any(c >= 500 or c == 0 for _, c, _ in requests) and bool(requests),
        "429_only_at_max": not too_early,
    }
    changes, last = [], None
    for t, reps in timeline:
        if reps != last:
            changes.append((t, reps))
            last = reps
    result = {
        "autoscale": not args.no_autoscale, "max_replicas": args.max_replicas, "prompt": args.prompt,
        "image_size": args.image_size, "deploy_s": round(deploy_s, 1),
        "load_end_s": round(load_end, 1), "total_s": round(timeline[-1][0] if timeline else 0.0, 1),
        "requests": len(requests), "codes": codes, "p50_ms": p50, "p99_ms": p99,
        "req_s": round(sum(c == 200 for _, c, _ in requests) / max(1e-9, load_end), 2),
        "stages": stages, "peak_replicas": peak, "final_replicas": final,
        "replica_changes": changes, "verdict": verdict, "passed": all(verdict.values()),
    }
    print(f"deployed in {result['deploy_s']} s; load until {result['load_end_s']} s; watched until {result['total_s']} s")
    print("replicas over time (t s: Ingress/ImageEncoder/Decoder):")
    for t, reps in changes:
        print(f"  {t:6.1f}  " + "/".join(str(reps.get(n, "-")) for n in WATCHED))
    print("stage  users  requests  req/s   p50 ms  p99 ms  429  5xx")
    for s in stages:
        print(f"  <{s['until_s']:>4}s {s['users']:>5} {s['requests']:>9} {s['req_s']:>6} {s['p50_ms']!s:>8} "
              f"{s['p99_ms']!s:>7} {s['429']:>4} {s['5xx']:>4}")
    print(f"overall: {result['requests']} requests, {result['req_s']} req/s, p50 {p50} ms, p99 {p99} ms, codes {codes}")
    print("verdict:", verdict, "PASSED" if result["passed"] else "FAILED")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--target", type=float, default=2.0, help="SAM3_AUTOSCALE_TARGET_ONGOING_REQUESTS")
    parser.add_argument("--stages", default="[[10, 2], [25, 8], [85, 16]]", help="[[until_s, users], ...]")
    parser.add_argument("--cooldown-s", type=float, default=90.0)
    parser.add_argument("--look-back-s", type=float, default=15.0, help="SAM3_AUTOSCALE_LOOK_BACK_PERIOD_S")
    parser.add_argument("--prompt", choices=("box", "text"), default="box",
                        help="box: encoder-bound, as on a real model; text: tiny-random's decoder is the bottleneck")
    parser.add_argument("--image-size", default="1080x1920", help="HEIGHTxWIDTH of the JPEGs")
    parser.add_argument("--no-autoscale", action="store_true", help="fixed replicas: the verdict must fail")
    parser.add_argument("--admission-max-wait-s", type=float, default=5.0,
                        help="SAM3_ADMISSION_MAX_WAIT_S. This run measures scaling, not shedding: at the default 0.5 s "
                             "a slow or shared machine answers a few of the 16 users' requests 503 before the "
                             "replicas are added (test_overload.py covers the shedding)")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
