"""Overload benchmark: capacity, then open-loop floods at multiples of it, a second key alongside, then recovery.

    .venv/bin/python load_tests/bench_overload.py                     # starts `make serve`'s service itself
    .venv/bin/python load_tests/bench_overload.py --levels 3 --duration 10 --check   # the short version
    .venv/bin/python load_tests/bench_overload.py --url http://127.0.0.1:8000 --key K --other-key K2

Phases, all against `POST /v1/image/segment` (a 640x480 JPEG, one text prompt):

1. capacity: `--clients` closed-loop clients for `--capacity-s` seconds: requests/s and p50/p99;
2. per level: open-loop arrivals (Poisson) at level x capacity for `--duration` s from the first key, each with a
   `--client-timeout` s timeout, while the second key sends `--other-rate` requests/s; then the recovery: the same
   closed-loop clients, whose p50 per second is compared with the capacity phase's;
3. RSS of every Serve process (the proxy and each replica, found by their process titles) before and after.

The client is raw asyncio HTTP/1.1 over keep-alive connections with the request bytes built once, so that on a
2-core machine the load generator takes as little as possible of the CPU the service needs. Printed per level:
goodput (200s per second of the flood, against capacity), status counts, p50/p99 of admitted requests and of
refusals, whether every refusal had Retry-After and the front door's JSON error shape, the other key's answers,
the time to recover, and RSS per process. `--check` exits 1 when an acceptance figure is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from load_tests.harness import free_port, jpeg_b64, make_image  # noqa: E402
from serve_app.core.stats import status_bytes  # noqa: E402

PATH = "/v1/image/segment"


@dataclass
class Answer:
    status: int  # 0: the client's timeout passed; -1: the connection failed
    seconds: float
    retry_after: str | None = None
    shape_ok: bool = True  # a non-200 body is the native error shape {"error": {"code", "message"}}
    sent_at: float = 0.0
    reason: str = ""  # a non-200's error code and the start of its message


@dataclass
class Tally:
    answers: list[Answer] = field(default_factory=list)

    def of(self, status: int) -> list[Answer]:
        return [a for a in self.answers if a.status == status]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.answers:
            name = {0: "timeout", -1: "conn_error"}.get(a.status, str(a.status))
            out[name] = out.get(name, 0) + 1
        return dict(sorted(out.items()))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


class Client:
    """Keep-alive HTTP/1.1 connections to one host; a connection is reused once its answer is read whole."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.prefix = parsed.path.rstrip("/")
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def request(self, body: bytes, key: str | None) -> bytes:
        head = [f"POST {self.prefix}{PATH} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", f"Content-Length: {len(body)}"]
        if key:
            head.append(f"Authorization: Bearer {key}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    async def send(self, raw: bytes, timeout: float) -> Answer:
        started = time.monotonic()
        conn = None
        try:
            conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
            answer = await asyncio.wait_for(self._exchange(conn, raw), timeout)
        except asyncio.TimeoutError:
            self._close(conn)
            return Answer(0, time.monotonic() - started, sent_at=started)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self._close(conn)
            return Answer(-1, time.monotonic() - started, sent_at=started)
        answer.seconds, answer.sent_at = time.monotonic() - started, started
        return answer

    async def _exchange(self, conn, raw: bytes) -> Answer:
        reader, writer = conn
        writer.write(raw)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"not an HTTP status line: {lines[0]!r}")
        status = int(parts[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")  # the last chunk's empty trailer
        else:
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
        if headers.get("connection", "").lower() == "close":
            self._close(conn)
        else:
            self.idle.append(conn)
        shape_ok = True
        if status != 200:
            try:
                error = json.loads(body)["error"]
                shape_ok = isinstance(error.get("code"), str) and isinstance(error.get("message"), str)
                reason = f"{error.get('code')}: {str(error.get('message'))[:60]}"
            except (ValueError, KeyError, TypeError, AttributeError):
                shape_ok, reason = False, body[:60].decode("latin-1")
            return Answer(status, 0.0, headers.get("retry-after"), shape_ok, reason=reason)
        return Answer(status, 0.0, headers.get("retry-after"), shape_ok)

    @staticmethod
    def _close(conn) -> None:
        if conn is not None:
            conn[1].close()

    def close(self) -> None:
        for conn in self.idle:
            conn[1].close()
        self.idle.clear()


async def closed_loop(client: Client, raw: bytes, clients: int, seconds: float, timeout: float) -> Tally:
    tally, stop_at = Tally(), time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < stop_at:
            tally.answers.append(await client.send(raw, timeout))

    await asyncio.gather(*(one() for _ in range(clients)))
    return tally


async def open_loop(client: Client, raw: bytes, rate: float, seconds: float, timeout: float, seed: int) -> Tally:
    """Poisson arrivals at `rate`/s for `seconds`, each on its own (never waiting for an answer to send the next)."""
    tally, rng, tasks = Tally(), random.Random(seed), []
    start = time.monotonic()
    next_at = start

    async def one() -> None:
        tally.answers.append(await client.send(raw, timeout))

    while True:
        next_at += rng.expovariate(rate)
        if next_at - start >= seconds:
            break
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return tally


def serve_pids() -> dict[str, int]:
    """{role: pid} of Serve's proxy and replicas on this machine, from the process titles Ray gives its workers."""
    pids: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                title = handle.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::ProxyActor"):
            role = "proxy"
        elif title.startswith("ray::ServeReplica:"):
            role = title.split(":")[-1].split(".")[0].split()[0]
        else:
            continue
        key, n = role, 1
        while key in pids:
            n += 1
            key = f"{role}#{n}"
        pids[key] = int(entry)
    return pids


def rss_mib(pid: int) -> float | None:
    try:
        return status_bytes("VmRSS", pid) / 2**20
    except (OSError, KeyError):  # the process is gone, or a kernel thread
        return None


def rss_all(pids: dict[str, int]) -> dict[str, float]:
    return {role: value for role, pid in pids.items() if (value := rss_mib(pid)) is not None}


def recovery_s(tally: Tally, started: float, baseline_p50: float, window_s: float = 1.0) -> float | None:
    """Seconds from `started` to the end of the first window whose answers are all 200 with p50 within 1.5x."""
    windows: dict[int, list[Answer]] = {}
    for a in tally.answers:
        windows.setdefault(int((a.sent_at + a.seconds - started) // window_s), []).append(a)
    for index in sorted(windows):
        group = windows[index]
        if all(a.status == 200 for a in group) and statistics.median(a.seconds for a in group) <= 1.5 * baseline_p50:
            return (index + 1) * window_s
    return None


@dataclass
class Level:
    factor: float
    flood: Tally
    other: Tally
    recovery: float | None
    rss_before: dict[str, float]
    rss_after: dict[str, float]
    duration: float

    def figures(self, capacity: float, capacity_p99: float, timeout: float) -> dict:
        ok = self.flood.of(200)
        refused = [a for a in self.flood.answers if a.status in (429, 503)]
        non200 = [a for a in self.flood.answers if a.status != 200]
        other_ok = self.other.of(200)
        goodput = len(ok) / self.duration
        return {
            "factor": self.factor, "sent": len(self.flood.answers), "counts": self.flood.counts(),
            "goodput_rps": goodput, "goodput_ratio": goodput / capacity if capacity else None,
            "admitted_p50": pct([a.seconds for a in ok], 50), "admitted_p99": pct([a.seconds for a in ok], 99),
            "refused_p50": pct([a.seconds for a in refused], 50), "refused_p99": pct([a.seconds for a in refused], 99),
            "clean_refusals": all(a.status in (429, 503) and a.retry_after and a.shape_ok for a in non200),
            "timeouts": len(self.flood.of(0)) + len(self.other.of(0)),
            "over_timeout": sum(a.seconds >= timeout for a in self.flood.answers + self.other.answers),
            "other_sent": len(self.other.answers), "other_ok": len(other_ok), "other_counts": self.other.counts(),
            "other_p99": pct([a.seconds for a in self.other.answers], 99),
            "other_refusals": sorted({a.reason for a in self.other.answers if a.status != 200})[:5],
            "recovery_s": self.recovery, "rss_before": self.rss_before, "rss_after": self.rss_after,
        }


def verdicts(fig: dict, capacity_p99: float, args: argparse.Namespace) -> list[tuple[str, bool]]:
    rss_ok = all(abs(fig["rss_after"].get(r, b) - b) <= max(0.10 * b, args.rss_slack_mib)
                 for r, b in fig["rss_before"].items())
    return [
        (f"goodput >= {args.min_goodput:.0%} of capacity", (fig["goodput_ratio"] or 0) >= args.min_goodput),
        ("no request past the client timeout", fig["over_timeout"] == 0),
        ("every non-200 is a 503/429 with Retry-After in the front door's shape", fig["clean_refusals"]),
        (f"refusals p99 <= {args.max_refusal_p99_ms:.0f} ms",
         fig["refused_p99"] is None or fig["refused_p99"] * 1000 <= args.max_refusal_p99_ms),
        ("admitted p99 <= 2x the p99 at capacity",
         fig["admitted_p99"] is not None and fig["admitted_p99"] <= 2 * capacity_p99),
        ("the other key: all 200", fig["other_sent"] > 0 and fig["other_ok"] == fig["other_sent"]),
        (f"the other key: p99 <= {args.max_other_p99_s:g} s",
         fig["other_p99"] is not None and fig["other_p99"] <= args.max_other_p99_s),
        (f"recovered within {args.max_recovery_s:g} s", fig["recovery_s"] is not None
         and fig["recovery_s"] <= args.max_recovery_s),
        ("RSS of every Serve process within 10 % of its start", rss_ok),
    ]


def start_service(args: argparse.Namespace) -> tuple[str, subprocess.Popen]:
    """`make serve`'s command with two API keys on a free port; returns the URL once it answers."""
    import urllib.request

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "SAM3_PORT": str(port), "SAM3_API_KEYS": f"{args.key},{args.other_key}",
           "SAM3_STATE_DIR": args.state_dir, **dict(kv.split("=", 1) for kv in args.env)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "serve_app.main"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL if not args.verbose else None, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return url, proc
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    stop_service(proc)
    raise SystemExit("the service did not become ready")


def stop_service(proc: subprocess.Popen) -> None:
    """SIGTERM as an operator would: serve_app.main shuts Serve down and its Ray with it (never `ray stop`, which
    would stop every Ray on the machine); the process group is killed only if that takes over two minutes."""
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


async def run(args: argparse.Namespace, url: str) -> tuple[dict, list[dict]]:
    body = json.dumps({"image": jpeg_b64(make_image(7, 480, 640)),
                       "prompts": [{"type": "concept", "text": "a red square"}], "output": "rle"}).encode()
    client, other = Client(url), Client(url)
    raw, raw_other = client.request(body, args.key), other.request(body, args.other_key)
    await closed_loop(client, raw, args.clients, args.warmup_s, args.client_timeout)  # warm-up: caches, batching
    cap = await closed_loop(client, raw, args.clients, args.capacity_s, args.client_timeout)
    ok = cap.of(200)
    capacity = len(ok) / args.capacity_s
    cap_fig = {"capacity_rps": capacity, "p50": pct([a.seconds for a in ok], 50),
               "p99": pct([a.seconds for a in ok], 99), "counts": cap.counts()}
    print(f"capacity: {capacity:.1f} requests/s with {args.clients} closed-loop clients, "
          f"p50 {ms(cap_fig['p50'])} ms, p99 {ms(cap_fig['p99'])} ms, {cap.counts()}", flush=True)
    if not ok:
        raise SystemExit("no request succeeded at capacity")
    # the second key's demand: a fixed rate, or (--other-share) a share of the measured capacity, so that it asks
    # for the same fraction of the service on a slow machine as on a fast one
    other_rate = args.other_share * capacity if args.other_share else args.other_rate
    print(f"the other key sends {other_rate:.2f} requests/s during each flood", flush=True)
    levels = []
    for n, factor in enumerate(args.levels):
        await asyncio.sleep(args.settle_s)
        pids = serve_pids()
        rss_before = rss_all(pids)
        flood, side = await asyncio.gather(
            open_loop(client, raw, factor * capacity, args.duration, args.client_timeout, seed=n),
            open_loop(other, raw_other, other_rate, args.duration, args.client_timeout, seed=100 + n),
        )
        ended = time.monotonic()
        rec = await closed_loop(client, raw, args.clients, args.recovery_s, args.client_timeout)
        level = Level(factor, flood, side, recovery_s(rec, ended, cap_fig["p50"]), rss_before,
                      rss_all(pids), args.duration)
        fig = level.figures(capacity, cap_fig["p99"], args.client_timeout)
        levels.append(fig)
        print_level(fig, cap_fig, args)
    client.close()
    other.close()
    return cap_fig, levels


def print_level(fig: dict, cap: dict, args: argparse.Namespace) -> None:
    print(f"\n{fig['factor']:g}x capacity ({fig['factor'] * cap['capacity_rps']:.1f} arrivals/s for "
          f"{args.duration:g} s, {fig['sent']} requests): {fig['counts']}")
    print(f"  goodput {fig['goodput_rps']:.1f} requests/s = {fig['goodput_ratio']:.0%} of capacity")
    print(f"  admitted p50/p99 {ms(fig['admitted_p50'])}/{ms(fig['admitted_p99'])} ms (capacity p99 "
          f"{ms(cap['p99'])} ms); refusals p50/p99 {ms(fig['refused_p50'])}/{ms(fig['refused_p99'])} ms; "
          f"clean refusals: {fig['clean_refusals']}; past the client timeout: {fig['over_timeout']}")
    print(f"  other key: {fig['other_ok']}/{fig['other_sent']} answered 200 {fig['other_counts']}, "
          f"p99 {ms(fig['other_p99'])} ms" + (f"; its refusals: {fig['other_refusals']}" if fig["other_refusals"] else ""))
    print(f"  recovered (p50 within 1.5x of {ms(cap['p50'])} ms) after {fig['recovery_s']} s")
    rss = ", ".join(f"{r} {b:.0f}->{fig['rss_after'].get(r, float('nan')):.0f}" for r, b in fig["rss_before"].items())
    print(f"  RSS MiB: {rss}")
    for name, passed in verdicts(fig, cap["p99"], args):
        print(f"  [{'ok' if passed else 'MISS'}] {name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service; default: start one as `make serve` does")
    p.add_argument("--key", default="flood-key", help="the flooding client's API key")
    p.add_argument("--other-key", default="other-key", help="the second client's API key")
    p.add_argument("--levels", type=float, nargs="+", default=[3.0, 10.0], help="floods, as multiples of capacity")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of each flood")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients of the capacity phase")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--capacity-s", type=float, default=15.0)
    p.add_argument("--recovery-s", type=float, default=10.0, help="closed-loop seconds after each flood")
    p.add_argument("--settle-s", type=float, default=3.0, help="pause before each flood")
    p.add_argument("--other-rate", type=float, default=2.0, help="requests/s of the second key during a flood")
    p.add_argument("--other-share", type=float, default=0.0,
                   help="instead of --other-rate: the second key's rate as a fraction of the measured capacity")
    p.add_argument("--client-timeout", type=float, default=60.0)
    p.add_argument("--min-goodput", type=float, default=0.9)
    p.add_argument("--max-refusal-p99-ms", type=float, default=100.0)
    p.add_argument("--max-other-p99-s", type=float, default=1.0)
    p.add_argument("--max-recovery-s", type=float, default=5.0)
    p.add_argument("--rss-slack-mib", type=float, default=0.0, help="absolute RSS slack besides the 10 %%")
    p.add_argument("--env", nargs="*", default=[], help="extra NAME=value for the service it starts")
    p.add_argument("--state-dir", default="/tmp/sam3-bench-overload-state")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--check", action="store_true", help="exit 1 when an acceptance figure is missed")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--verbose", action="store_true", help="show the service's output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        url, proc = start_service(args)
    try:
        print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores; {url}", flush=True)
        cap, levels = asyncio.run(run(args, url))
    finally:
        if proc is not None:
            stop_service(proc)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"capacity": cap, "levels": levels}, handle, indent=1)
    missed = [name for fig in levels for name, ok in verdicts(fig, cap["p99"], args) if not ok]
    if args.check and missed:
        print(f"\nmissed: {missed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
