"""The floor under the image path: what Ray Serve itself costs per request on this machine, with no model at all.

    python load_tests/bench_hop.py [--requests 300] [--body-kb 60] [--env KEY=VALUE ...]

Deploys a FastAPI ingress with two routes, `POST /empty` (reads the JSON body, answers) and `POST /hop` (the same
plus one DeploymentHandle call to a second deployment that returns at once), sends `--requests` sequential requests
to each with a body of `--body-kb` (about a base64 JPEG's size), and prints latency and CPU milliseconds per request
of the proxy, the ingress and the second deployment (/proc/<pid>/stat). `hop - empty` is the cost of one handle
call; `empty` is the cost of getting a request through the proxy into a replica and back.
"""


import argparse
import json
import os
import sys
import time

from fastapi import FastAPI, Request
from harness import cpu_snapshot, free_port, init_ray, serve_processes, stop_serve
from ray import serve

APP = "hop"
api = FastAPI()


@serve.deployment(name="Leaf", logging_config={"enable_access_log": False})
class Leaf:
    async def ping(self, size: int) -> int:
        return size


@serve.deployment(name="Front", logging_config={"enable_access_log": False})
@serve.ingress(api)
class Front:
    def __init__(self, leaf) -> None:
        self.leaf = leaf

    @api.post("/empty")
    async def empty(self, request: Request) -> dict:
        return {"n": len(await request.body())}

    @api.post("/hop")
    async def hop(self, request: Request) -> dict:
        return {"n": await self.leaf.ping.remote(len(await request.body()))}


def run(url: str, route: str, body: bytes, requests: int, pids: dict[str, int]) -> dict:
    import httpx

    with httpx.Client(timeout=60, headers={"content-type": "application/json"}) as client:
        for _ in range(20):
            client.post(f"{url}/{route}", content=body)
        before, started, latencies = cpu_snapshot(pids), time.perf_counter(), []
        for _ in range(requests):
            began = time.perf_counter()
            client.post(f"{url}/{route}", content=body).raise_for_status()
            latencies.append((time.perf_counter() - began) * 1000)
        wall, after = time.perf_counter() - started, cpu_snapshot(pids)
    latencies.sort()
    return {"route": route, "req_s": round(requests / wall, 1), "p50_ms": round(latencies[len(latencies) // 2], 2),
            **{f"{role}_cpu_ms": round((after[role] - before[role]) * 1000 / requests, 2) for role in after}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--body-kb", type=int, default=60)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_worker_niceness", str(os.getpriority(os.PRIO_PROCESS, 0)))
    for pair in args.env:
        key, _, value = pair.partition("=")
        os.environ[key] = value

    body = json.dumps({"image": "A" * (args.body_kb * 1024)}).encode()
    try:
        init_ray()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Front.bind(Leaf.bind()), name=APP, route_prefix="/")
        pids = serve_processes(APP)
        rows = [run(f"http://127.0.0.1:{port}", route, body, args.requests, pids) for route in ("empty", "hop")]
    finally:
        stop_serve()
    print(f"load average {os.getloadavg()[0]:.2f}, body {len(body)} bytes, env {args.env or '-'}")
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
