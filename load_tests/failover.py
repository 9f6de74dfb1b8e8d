"""Failover under load: SIGKILL one replica of each deployment in turn while closed-loop clients segment images.

    .venv/bin/python load_tests/failover.py                                  # 2 replicas each, every target
    .venv/bin/python load_tests/failover.py --replicas 1 --interval 30       # one replica each: replacement times
    .venv/bin/python load_tests/failover.py --targets ImageEncoder,Decoder --check

It starts Ray and Serve in this process (the proxy with the failover middleware, as `make serve` does) and runs the
graph with `--replicas` replicas of the ingress, the encoder and the decoder (the ImageCache has one). `--clients`
closed-loop clients send `POST /v1/image/segment` (640x480 JPEGs, `--images` distinct ones cycled, so that every
request is encoded; one text prompt) with keep-alive connections.
Every `--interval` seconds one replica of the next target is SIGKILLed (its process, as a crash or the OOM killer
would). Printed per kill: the requests that failed (status, whether in the route's JSON shape), the requests that
were re-sent (`failover` counters of /v1/stats and the proxy's log), the longest answer in the `--interval` after
the kill, and the seconds until Serve had the deployment's replicas RUNNING again. `--check` exits 1 if any
request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from load_tests.bench_overload import Answer, Client, pct  # noqa: E402
from load_tests.harness import jpeg_b64, make_image, serve_processes, start_graph  # noqa: E402

TARGETS = ("ImageEncoder", "Decoder", "ImageCache", "Ingress")
SERVE_TARGETS = ("proxy", "ServeController")  # Serve's own processes: --targets proxy,ServeController


def processes(app: str) -> dict[str, int]:
    """{role: pid} of the proxy, the controller and every replica of `app`."""
    from ray._private import state

    pids = serve_processes(app)
    for actor in state.actors(actor_state_name="ALIVE").values():
        if actor.get("ActorClassName") == "ServeController":
            pids["ServeController"] = int(actor["Pid"])
    return pids


def running(app: str, deployment: str) -> int:
    from ray import serve

    if deployment in SERVE_TARGETS:  # restarted by Ray (the controller) or by the controller (the proxy)
        return 1
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


def start(args: argparse.Namespace) -> str:
    from serve_app.core.config import Config

    config = Config(ingress_replicas=args.replicas, encoder_replicas=args.replicas, decoder_replicas=args.replicas,
                    failover_retries=args.retries, state_dir=args.state_dir, web_ui=False)
    return start_graph(config, args.app)


async def load(client: Client, raws: list[bytes], clients: int, stop: asyncio.Event, answers: list[Answer],
               timeout: float) -> None:
    sent = 0

    async def one() -> None:
        nonlocal sent
        while not stop.is_set():
            sent += 1
            answer = await client.send(raws[sent % len(raws)], timeout)
            answers.append(answer)
            if answer.status == -1:  # nothing listens (the proxy died): try again shortly, as a client would
                await asyncio.sleep(0.1)

    await asyncio.gather(*(one() for _ in range(clients)))


async def run(args: argparse.Namespace, url: str) -> list[dict]:
    client = Client(url)
    # distinct images, so that every request is encoded (a repeated image is an embedding cache hit, and an
    # encoder kill would then find nothing in flight)
    raws = [client.request(json.dumps({"image": jpeg_b64(make_image(seed, 480, 640)), "output": "rle",
                                       "prompts": [{"type": "concept", "text": "a red square"}]}).encode(), None)
            for seed in range(args.images)]
    answers: list[Answer] = []
    stop = asyncio.Event()
    loader = asyncio.create_task(load(client, raws, args.clients, stop, answers, args.client_timeout))
    await asyncio.sleep(args.warmup)
    kills = []
    for target in args.targets:
        pids = await asyncio.to_thread(processes, args.app)
        victims = [pid for role, pid in sorted(pids.items()) if role.split("#")[0] == target]
        if not victims:
            print(f"no {target} replica found; skipped")
            continue
        expected = len(victims)
        pid = victims[0]
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        replaced_s = None
        while time.monotonic() - killed_at < args.interval:
            await asyncio.sleep(0.25)
            if replaced_s is None:  # a new process holds the place and Serve counts the replicas RUNNING again
                new = await asyncio.to_thread(processes, args.app)
                fresh = [p for role, p in new.items() if role.split("#")[0] == target and p not in victims]
                if fresh and await asyncio.to_thread(running, args.app, target) >= expected:
                    replaced_s = time.monotonic() - killed_at
        kills.append({"target": target, "pid": pid, "at": killed_at, "replaced_s": replaced_s})
    stop.set()
    await loader
    client.close()
    for kill in kills:
        window = [a for a in answers if kill["at"] - 1 <= a.sent_at + a.seconds < kill["at"] + args.interval]
        failed = [a for a in window if a.status != 200]
        kill.update({
            "answers": len(window), "failed": len(failed),
            "failed_statuses": sorted({a.status for a in failed}),
            "failed_shape_ok": all(a.shape_ok for a in failed),
            "max_s": max((a.seconds for a in window), default=None),
            "p50_s": statistics.median([a.seconds for a in window if a.status == 200] or [0.0]),
        })
    total_failed = sum(1 for a in answers if a.status != 200)
    kills.append({"target": "all", "answers": len(answers), "failed": total_failed,
                  "p99_s": pct([a.seconds for a in answers if a.status == 200], 99)})
    return kills


def stats(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/stats", timeout=30) as resp:
        return json.loads(resp.read())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2, help="ingress, encoder and decoder replicas")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients")
    parser.add_argument("--targets", type=lambda s: [t for t in s.split(",") if t], default=list(TARGETS))
    parser.add_argument("--interval", type=float, default=25.0, help="seconds between kills")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--images", type=int, default=256, help="distinct images, cycled (each one encoded)")
    parser.add_argument("--retries", type=int, default=3, help="SAM3_FAILOVER_RETRIES (0: no retry)")
    parser.add_argument("--client-timeout", type=float, default=120.0)
    parser.add_argument("--app", default="sam3")
    parser.add_argument("--state-dir", default=os.path.join("tmp", "failover-state"))
    parser.add_argument("--check", action="store_true", help="exit 1 if any request failed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = start(args)
    try:
        kills = asyncio.run(run(args, url))
        counters = stats(url).get("failover")
    finally:
        from load_tests.harness import stop_serve

        stop_serve()
    print(f"{'killed':<14}{'answers':>8}{'failed':>7}  {'statuses':<10}{'json':>5}{'p50 ms':>8}{'max ms':>8}"
          f"{'replaced s':>11}")
    for kill in kills[:-1]:
        replaced = "-" if kill["replaced_s"] is None else f"{kill['replaced_s']:.1f}"
        print(f"{kill['target']:<14}{kill['answers']:>8}{kill['failed']:>7}  "
              f"{','.join(map(str, kill['failed_statuses'])) or '-':<10}{'yes' if kill['failed_shape_ok'] else 'NO':>5}"
              f"{kill['p50_s'] * 1000:>8.0f}{(kill['max_s'] or 0) * 1000:>8.0f}{replaced:>11}")
    total = kills[-1]
    print(f"all: {total['answers']} answers, {total['failed']} failed, p99 {(total['p99_s'] or 0) * 1000:.0f} ms; "
          f"ingress failover counters (one replica's): {counters}")
    return 1 if args.check and total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
