"""Soak: hours of mixed traffic at ~0.7x capacity, with a model replica SIGKILLed every few minutes.

    .venv/bin/python load_tests/soak.py --minutes 30 --kill-every 120          # the documented run
    .venv/bin/python load_tests/soak.py --minutes 3 --kill-every 40 --window 60 --rss-every 15 --check  # make test's

It starts Ray and Serve in this process, as `make serve` does (the proxy with its failover middleware), with API
keys on and `--replicas` replicas of the ingress, the encoder and the decoder. First `--capacity-s` seconds of
closed-loop `POST /v1/image/segment` measure capacity; then, for `--minutes`, Poisson arrivals at `--load` x that
rate are spread over every image front door:

- native `/v1/image/segment`, Oxen `/api/ai/images/edit`, Segmind `/v1/sam3-image`, Roboflow `concept_segment`,
  the HF Space `/api/sam2_compatible`;
- Roboflow `embed_image` with an `image_id`, then `visual_segment` by that `image_id` alone (a follow-up);
- Oxen queue jobs (`/api/ai/queue`), whose completion is read from one `/api/events` SSE connection;

while two video sessions propagate in turn (a prompt, then the whole clip) and one live stream
(`/v1/video/streams`) pushes `--stream-fps` frames a second. Every `--kill-every` seconds one replica of the next
`--kill-targets` deployment is SIGKILLed. Printed: per `--window` seconds, the errors and p50/p99 per route; every
`--rss-every` seconds, the RSS of every Serve process (proxy, controller, replicas, session and stream actors); at
the end, each process' RSS slope in MiB/hour after `--warmup-min` minutes (least squares over its samples). An
error is any answer but the route's success, a job that did not succeed, a stream reply that is an error or lost.
`--check` exits 1 on any error (and, with `--check-trends`, on a last-window p99 over 1.5x the first, or a slope
over 20 MiB/h).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from load_tests.bench_overload import pct  # noqa: E402
from load_tests.harness import make_image, start_graph  # noqa: E402

KEY = "soak-key"
TEXT = "a red square"
MODEL_TARGETS = ("ImageEncoder", "Decoder")
SIZE = (240, 320)  # image height, width: smaller than the overload benchmark's, so the video work fits beside it


@dataclass
class Sample:
    route: str
    at: float  # monotonic, when it finished
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class Record:
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, route: str, started: float, ok: bool, detail: str = "") -> None:
        now = time.monotonic()
        with self.lock:
            self.samples.append(Sample(route, now, now - started, ok, detail))
        if not ok:
            print(f"  error {route}: {detail[:160]}", flush=True)


def jpeg(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(make_image(seed, *SIZE)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Traffic:
    """The image front doors' requests, each a function of (session, image seed) -> (ok, detail)."""

    def __init__(self, url: str, record: Record, images: list[bytes]) -> None:
        import requests

        self.url, self.record, self.images = url, record, images
        self.b64 = [base64.b64encode(i).decode() for i in images]
        self.local = threading.local()
        self.requests = requests
        self.followups = 0

    def http(self):
        if not hasattr(self.local, "session"):
            self.local.session = self.requests.Session()
        return self.local.session

    def _post(self, path: str, body: dict, headers: dict | None = None, params: dict | None = None):
        return self.http().post(f"{self.url}{path}", json=body, headers=headers, params=params, timeout=120)

    def native(self, i: int):
        r = self._post("/v1/image/segment", {"image": self.b64[i], "prompts": [{"type": "concept", "text": TEXT}],
                                             "output": "rle"}, {"Authorization": f"Bearer {KEY}"})
        return r.status_code == 200, f"{r.status_code} {r.text[:120]}"

    def oxen(self, i: int):
        r = self._post("/api/ai/images/edit", {"model": "sam-3-image", "prompt": TEXT,
                                               "input_image": f"data:image/jpeg;base64,{self.b64[i]}"},
                       {"Authorization": f"Bearer {KEY}"})
        return r.status_code == 200, f"{r.status_code} {r.text[:120]}"

    def segmind(self, i: int):
        r = self._post("/v1/sam3-image", {"image": self.b64[i], "text_prompt": TEXT, "return_masks": True},
                       {"x-api-key": KEY})
        return r.status_code == 200, f"{r.status_code} {r.text[:120]}"

    def roboflow(self, i: int):
        r = self._post("/sam3/concept_segment", {"image": {"type": "base64", "value": self.b64[i]},
                                                 "prompts": [{"type": "text", "text": TEXT}], "format": "rle"},
                       params={"api_key": KEY})
        return r.status_code == 200, f"{r.status_code} {r.text[:120]}"

    def hf_space(self, i: int):
        r = self._post("/api/sam2_compatible", {"inputs": {"image": self.b64[i], "text_prompts": [TEXT],
                                                           "confidence_threshold": 0.5}},
                       {"Authorization": f"Bearer {KEY}"})
        return r.status_code == 200, f"{r.status_code} {r.text[:120]}"

    def roboflow_followup(self, i: int):
        """embed_image with a fresh image_id, then a visual_segment of the same image and image_id (Roboflow's
        follow-up: the embedding comes from the cache, only the decoder runs)."""
        self.followups += 1
        image_id = f"soak-{i}-{self.followups}"
        r = self._post("/sam3/embed_image", {"image": {"type": "base64", "value": self.b64[i]}, "image_id": image_id},
                       params={"api_key": KEY})
        if r.status_code != 200:
            return False, f"embed {r.status_code} {r.text[:120]}"
        r = self._post("/sam3/visual_segment", {"image": {"type": "base64", "value": self.b64[i]},
                                                "image_id": image_id, "prompts": [
            {"points": [{"x": SIZE[1] // 3, "y": SIZE[0] // 3, "positive": True}]}]}, params={"api_key": KEY})
        return r.status_code == 200, f"follow-up {r.status_code} {r.text[:120]}"


IMAGE_ROUTES = ("native", "oxen", "segmind", "roboflow", "hf_space", "roboflow_followup")


class Jobs:
    """Oxen queue jobs: submitted at a steady pace, completions read from one /api/events connection."""

    def __init__(self, url: str, record: Record, image: bytes, every_s: float, stop: threading.Event) -> None:
        self.url, self.record, self.every_s, self.stop = url, record, every_s, stop
        self.body = {"model": "sam-3-image", "prompt": TEXT,
                     "input_image": f"data:image/jpeg;base64,{base64.b64encode(image).decode()}"}
        self.pending: dict[str, float] = {}
        self.lock = threading.Lock()
        self.connected = threading.Event()

    def listen(self) -> None:
        import requests

        headers = {"Authorization": f"Bearer {KEY}"}
        while not self.stop.is_set():
            try:
                with requests.get(f"{self.url}/api/events", headers=headers, stream=True, timeout=(10, 60)) as r:
                    if r.status_code != 200:
                        self.record.add("oxen_queue_events", time.monotonic(), False, f"events {r.status_code}")
                        time.sleep(1)
                        continue
                    self.connected.set()
                    event = None
                    for raw in r.iter_lines(decode_unicode=True):
                        if self.stop.is_set():
                            return
                        if raw.startswith("event: "):
                            event = raw[7:]
                        elif raw.startswith("data: ") and event:
                            data = json.loads(raw[6:])
                            with self.lock:
                                started = self.pending.pop(data.get("generation_id"), None)
                            if started is not None:
                                ok = event == "media_generation_completed"
                                self.record.add("oxen_queue", started, ok, f"{event} {raw[:120]}")
            except Exception as exc:  # noqa: BLE001 - the events connection broke: reconnect (replayed events)
                if not self.stop.is_set():
                    print(f"  events connection lost ({type(exc).__name__}); reconnecting", flush=True)
                    time.sleep(0.5)

    def submit_loop(self) -> None:
        import requests

        session = requests.Session()
        while not self.stop.wait(self.every_s):
            started = time.monotonic()
            key = f"soak-{started:.6f}"
            try:
                r = session.post(f"{self.url}/api/ai/queue", json=self.body, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}", "Idempotency-Key": key})
            except Exception as exc:  # noqa: BLE001
                self.record.add("oxen_queue", started, False, f"submit {exc}")
                continue
            if r.status_code != 200:
                self.record.add("oxen_queue", started, False, f"submit {r.status_code} {r.text[:120]}")
                continue
            with self.lock:
                self.pending[r.json()["generations"][0]["generation_id"]] = started

    def lost(self, older_than_s: float) -> int:
        """Jobs submitted over `older_than_s` ago whose completion never came."""
        now = time.monotonic()
        with self.lock:
            return sum(1 for started in self.pending.values() if now - started > older_than_s)


def video_loop(url: str, record: Record, clip: bytes, stop: threading.Event, opened: threading.Event) -> None:
    """Two sessions on the same clip; in turn each gets a text prompt and propagates the whole clip."""
    import requests

    headers = {"Authorization": f"Bearer {KEY}"}
    session = requests.Session()
    ids = []
    for _ in range(2):
        started = time.monotonic()
        r = session.post(f"{url}/v1/video/sessions", data=clip, headers={**headers, "Content-Type": "video/mp4"},
                         timeout=120)
        record.add("video_open", started, r.status_code == 201, f"{r.status_code} {r.text[:120]}")
        if r.status_code == 201:
            ids.append(r.json()["session_id"])
    opened.set()
    turn = 0
    while ids and not stop.is_set():
        sid = ids[turn % len(ids)]
        turn += 1
        started = time.monotonic()
        try:
            r = session.post(f"{url}/v1/video/sessions/{sid}/prompts", json={"frame_index": 0, "text": TEXT},
                             headers=headers, timeout=120)
            if r.status_code != 200:
                record.add("video_prompt", started, False, f"{r.status_code} {r.text[:120]}")
                continue
            record.add("video_prompt", started, True)
            started = time.monotonic()
            lines = []
            with session.post(f"{url}/v1/video/sessions/{sid}/propagate", json={}, headers=headers, stream=True,
                              timeout=300) as r:
                if r.status_code != 200:
                    record.add("video_propagate", started, False, f"{r.status_code} {r.text[:120]}")
                    continue
                lines = [json.loads(line) for line in r.iter_lines() if line]
            done = lines[-1] if lines else {}
            record.add("video_propagate", started, done.get("done") is True and done.get("frames") == len(lines) - 1,
                       f"last line {str(done)[:120]}")
        except Exception as exc:  # noqa: BLE001
            record.add("video_propagate", started, False, repr(exc)[:160])
        stop.wait(1.0)
    for sid in ids:
        session.delete(f"{url}/v1/video/sessions/{sid}", headers=headers, timeout=60)


def stream_loop(url: str, record: Record, frames: list[bytes], fps: float, stop: threading.Event,
                started_event: threading.Event) -> None:
    """One live stream: a frame every 1/fps s, each reply awaited (the stream's own latency per frame)."""
    from websockets.sync.client import connect

    ws_url = url.replace("http://", "ws://") + "/v1/video/streams"
    side = max(2, min(SIZE) // 5)
    start = {"type": "start", "objects": [{"object_id": 1, "points": [[side // 2, SIZE[0] // 4]], "point_labels": [1]}]}
    while not stop.is_set():
        started = time.monotonic()
        try:
            with connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}, open_timeout=60,
                         max_size=2**24) as ws:
                ws.send(json.dumps(start))
                reply = json.loads(ws.recv(timeout=120))
                if reply.get("type") != "started":
                    record.add("stream", started, False, f"start: {str(reply)[:120]}")
                    stop.wait(1)
                    continue
                started_event.set()
                sent = 0
                while not stop.is_set():
                    started = time.monotonic()
                    ws.send(frames[sent % len(frames)])
                    sent += 1
                    reply = json.loads(ws.recv(timeout=120))
                    record.add("stream", started, reply.get("type") not in ("error",) and "error" not in reply,
                               str(reply)[:120])
                    stop.wait(max(0.0, 1.0 / fps - (time.monotonic() - started)))
                ws.send(json.dumps({"type": "close"}))
        except Exception as exc:  # noqa: BLE001 - the connection broke: an error, then a new stream
            if not stop.is_set():
                record.add("stream", started, False, repr(exc)[:160])
                stop.wait(1)


def process_table() -> dict[int, str]:
    """{pid: role} of every live Serve process: the proxy, the controller, each replica, session and stream actors."""
    from ray._private import state

    out = {}
    for actor in state.actors(actor_state_name="ALIVE").values():
        name = actor.get("ActorClassName") or ""
        if name.startswith("ServeReplica:"):
            name = name.split(":", 2)[2]
        out[int(actor["Pid"])] = name
    return out


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid` in clock ticks (/proc/<pid>/stat), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def wait_busy(pid: int, timeout_s: float, poll_s: float = 0.02) -> bool:
    """Until `pid` burns CPU within one `poll_s` (it is serving), at most `timeout_s`: True if it was seen busy."""
    last, until = cpu_ticks(pid), time.monotonic() + timeout_s
    while last is not None and time.monotonic() < until:
        time.sleep(poll_s)
        now = cpu_ticks(pid)
        if now is not None and now > last:
            return True
        last = now
    return False


def rss_mib(pid: int) -> float | None:
    from serve_app.core.stats import status_bytes

    try:
        return status_bytes("VmRSS", pid) / 2**20
    except (OSError, KeyError):
        return None


def slope_mib_per_h(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 3600


def start(args: argparse.Namespace) -> str:
    from serve_app.core.config import Config

    config = Config(api_keys=[KEY], ingress_replicas=args.replicas, encoder_replicas=args.replicas,
                    decoder_replicas=args.replicas, state_dir=args.state_dir, web_ui=False, url_allowlist=[],
                    failover_retries=args.retries, admission_max_wait_s=args.admission_max_wait_s,
                    **({} if args.cache_entries is None else {"embedding_cache_entries": args.cache_entries}))
    return start_graph(config, request_timeout_s=120)


def capacity(traffic: Traffic, seconds: float, clients: int = 6) -> float:
    """Closed-loop requests/s of the soak's own mix of image routes, measured while the video and stream work runs."""
    stop_at, count, lock = time.monotonic() + seconds, [0], threading.Lock()

    def one() -> None:
        rng = random.Random()
        while time.monotonic() < stop_at:
            ok, _ = getattr(traffic, rng.choice(IMAGE_ROUTES))(rng.randrange(len(traffic.images)))
            if ok:
                with lock:
                    count[0] += 1

    threads = [threading.Thread(target=one) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return count[0] / (time.monotonic() - started)


def windows_table(samples: list[Sample], t0: float, window_s: float) -> list[dict]:
    rows = []
    for index in range(int(max((s.at - t0 for s in samples), default=0) // window_s) + 1):
        group = [s for s in samples if index * window_s <= s.at - t0 < (index + 1) * window_s]
        routes = sorted({s.route for s in group})
        row = {"window": index, "errors": sum(not s.ok for s in group), "routes": {}}
        for route in routes:
            ok = [s.seconds for s in group if s.route == route and s.ok]
            row["routes"][route] = {"n": sum(s.route == route for s in group),
                                    "errors": sum(s.route == route and not s.ok for s in group),
                                    "p50": pct(ok, 50), "p99": pct(ok, 99)}
        images = [s.seconds for s in group if s.route in IMAGE_ROUTES and s.ok]
        row["image_p99"] = pct(images, 99)
        rows.append(row)
    return rows


def error_summary(samples: list[Sample], t0: float, limit: int = 12) -> list[str]:
    """One line per failed answer (the first `limit`), with when it finished and why."""
    failed = [s for s in samples if not s.ok]
    lines = [f"  error at {(s.at - t0) / 60:5.2f} min, {s.route} after {s.seconds * 1000:.0f} ms: {s.detail[:200]}"
             for s in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"  ... and {len(failed) - limit} more")
    return lines


def print_window(row: dict, window_s: float) -> None:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    print(f"window {row['window']} ({row['window'] * window_s / 60:.0f}-{(row['window'] + 1) * window_s / 60:.0f} "
          f"min): {row['errors']} errors, image p99 {ms(row['image_p99'])} ms", flush=True)
    for route, fig in row["routes"].items():
        print(f"    {route:<18} n={fig['n']:<5} errors={fig['errors']:<3} p50 {ms(fig['p50']):>6} ms  "
              f"p99 {ms(fig['p99']):>6} ms", flush=True)


def run(args: argparse.Namespace, url: str) -> int:
    from tests.videos import moving_frames, write_video

    record = Record()
    images = [jpeg(seed) for seed in range(args.images)]
    traffic = Traffic(url, record, images)
    stop = threading.Event()
    clip = write_video(args.video_frames, *SIZE, fps=10)
    from PIL import Image

    stream_frames = []
    for frame in moving_frames(20, *SIZE):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
        stream_frames.append(buffer.getvalue())
    jobs = Jobs(url, record, images[0], args.job_every, stop)
    opened, streaming = threading.Event(), threading.Event()
    threads = [threading.Thread(target=jobs.listen, daemon=True),
               threading.Thread(target=video_loop, args=(url, record, clip, stop, opened), daemon=True),
               threading.Thread(target=stream_loop, args=(url, record, stream_frames, args.stream_fps, stop,
                                                          streaming), daemon=True)]
    for t in threads:
        t.start()
    # capacity is measured beside the steady video work, not beside the sessions' and the stream's start-up
    for ready in (jobs.connected, opened, streaming):
        ready.wait(120)
    submitter = threading.Thread(target=jobs.submit_loop, daemon=True)
    submitter.start()
    cap = capacity(traffic, args.capacity_s) if args.rate is None else args.rate / args.load
    rate = args.rate or cap * args.load
    print(f"capacity {cap:.1f} req/s (the image routes' mix, closed loop, beside the video work); soak at "
          f"{rate:.1f} image req/s over {len(IMAGE_ROUTES)} routes, {args.minutes:g} min, a kill every "
          f"{args.kill_every:g} s", flush=True)
    with record.lock:
        record.samples.clear()
    pool = ThreadPoolExecutor(max_workers=args.max_in_flight)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    next_kill = t0 + args.kill_every
    next_rss = t0
    kill_index = 0
    rss: dict[int, list[tuple[float, float]]] = {}
    roles: dict[int, str] = {}
    printed_windows = 0
    in_flight = threading.Semaphore(args.max_in_flight)

    def fire(route: str, i: int) -> None:
        started = time.monotonic()
        try:
            ok, detail = getattr(traffic, route)(i)
        except Exception as exc:  # noqa: BLE001 - a connection error is an error like any other
            ok, detail = False, repr(exc)[:160]
        finally:
            in_flight.release()
        record.add(route, started, ok, detail)

    next_at = t0 + rng.expovariate(rate)
    while (now := time.monotonic()) < end:
        if now >= next_rss:
            table = process_table()
            roles.update(table)
            line = []
            for pid, role in sorted(table.items(), key=lambda kv: kv[1]):
                value = rss_mib(pid)
                if value is not None:
                    rss.setdefault(pid, []).append((now - t0, value))
                    line.append(f"{role}:{value:.0f}")
            print(f"[{(now - t0) / 60:5.1f} min] RSS MiB " + " ".join(line), flush=True)
            next_rss += args.rss_every
        if now >= next_kill and args.kill_targets:
            target = args.kill_targets[kill_index % len(args.kill_targets)]
            kill_index += 1
            victims = sorted(pid for pid, role in process_table().items() if role == target)
            if victims:
                # a burst first, and the kill once the victim is seen working: it dies with requests in flight
                for _ in range(args.kill_burst):
                    if in_flight.acquire(blocking=False):  # fire() releases it
                        pool.submit(fire, rng.choice(IMAGE_ROUTES), rng.randrange(len(images)))
                busy = wait_busy(victims[0], 2.0) if args.kill_burst else False
                os.kill(victims[0], signal.SIGKILL)
                print(f"[{(now - t0) / 60:5.1f} min] SIGKILL {target} pid {victims[0]}"
                      + (" (busy)" if busy else " (not seen busy)" if args.kill_burst else ""), flush=True)
            next_kill += args.kill_every
        done_windows = int((now - t0) // args.window)
        if printed_windows < done_windows:
            with record.lock:
                finished = list(record.samples)
            rows = windows_table(finished, t0, args.window)
            while printed_windows < done_windows:
                print_window(rows[printed_windows], args.window)
                printed_windows += 1
        if now < next_at:
            time.sleep(min(next_at - now, 0.25))
            continue
        if not in_flight.acquire(timeout=0.25):  # every client thread busy: the next arrival waits for one
            continue
        pool.submit(fire, rng.choice(IMAGE_ROUTES), rng.randrange(len(images)))
        next_at += rng.expovariate(rate)
    stop.set()
    pool.shutdown(wait=True)
    for t in threads + [submitter]:
        t.join(timeout=150)
    time.sleep(0.1)
    lost = jobs.lost(older_than_s=60)
    samples = [s for s in record.samples if s.at < end + 120]
    rows = windows_table([s for s in samples if s.at < end], t0, args.window)
    while printed_windows < len(rows):
        print_window(rows[printed_windows], args.window)
        printed_windows += 1
    errors = sum(not s.ok for s in samples) + lost
    print(f"total: {len(samples)} answers, {errors} errors ({lost} queue jobs never completed)", flush=True)
    for line in error_summary(samples, t0):  # again at the end, where a truncated log still shows them
        print(line, flush=True)
    first, last = rows[0]["image_p99"], rows[-1]["image_p99"] if len(rows) > 1 else None
    ratio = None if not first or last is None else last / first
    print(f"image p99: first window {first * 1000 if first else 0:.0f} ms, last "
          f"{(last or 0) * 1000:.0f} ms, ratio {'-' if ratio is None else f'{ratio:.2f}'}", flush=True)
    print(f"RSS slope after {args.warmup_min:g} min warm-up (MiB/h, least squares per process):", flush=True)
    worst = 0.0
    for pid, points in sorted(rss.items(), key=lambda kv: roles.get(kv[0], "")):
        # after the run's warm-up, and the process' own (a replacement replica loads its model first)
        later = [p for p in points if p[0] >= max(args.warmup_min * 60, points[0][0] + args.warmup_min * 60)]
        slope = slope_mib_per_h(later)
        if slope is None:
            continue
        worst = max(worst, slope)
        print(f"    {roles.get(pid, '?'):<22} pid {pid:<8} {later[0][1]:7.0f} -> {later[-1][1]:7.0f} MiB over "
              f"{(later[-1][0] - later[0][0]) / 60:5.1f} min: {slope:+7.1f} MiB/h", flush=True)
    failed = errors > 0
    if args.check_trends:
        failed = failed or ratio is None or ratio > 1.5 or worst > 20
    print("verdict:", "FAILED" if failed else "PASSED", flush=True)
    return 1 if (args.check and failed) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    p.add_argument("--rate", type=float, default=None, help="image requests/s (skips the capacity phase)")
    p.add_argument("--capacity-s", type=float, default=15.0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--kill-every", type=float, default=120.0, help="seconds between SIGKILLs (0: none)")
    p.add_argument("--kill-targets", type=lambda s: [t for t in s.split(",") if t], default=list(MODEL_TARGETS))
    p.add_argument("--window", type=float, default=300.0, help="seconds per reported window")
    p.add_argument("--rss-every", type=float, default=60.0)
    p.add_argument("--warmup-min", type=float, default=5.0)
    p.add_argument("--job-every", type=float, default=5.0, help="seconds between Oxen queue submissions")
    p.add_argument("--stream-fps", type=float, default=2.0)
    p.add_argument("--video-frames", type=int, default=12)
    p.add_argument("--max-in-flight", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--retries", type=int, default=3, help="SAM3_FAILOVER_RETRIES (0: a replica death fails its requests)")
    p.add_argument("--images", type=int, default=8, help="distinct JPEGs the image routes send")
    p.add_argument("--cache-entries", type=int, default=None,
                   help="SAM3_EMBEDDING_CACHE_ENTRIES (default: the service's); fewer than --images keeps the "
                   "encoder working after warm-up")
    p.add_argument("--kill-burst", type=int, default=4,
                   help="requests sent right before each kill, which waits (up to 2 s) to see the victim working")
    p.add_argument("--admission-max-wait-s", type=float, default=0.5,
                   help="SAM3_ADMISSION_MAX_WAIT_S: past it admission sheds (a 503 counts as an error here)")
    p.add_argument("--state-dir", default=os.path.join(ROOT, "tmp", "soak-state"))
    p.add_argument("--check", action="store_true", help="exit 1 on any error")
    p.add_argument("--check-trends", action="store_true", help="--check also fails on the p99 ratio and RSS slopes")
    args = p.parse_args(argv)
    if args.kill_every <= 0:
        args.kill_targets, args.kill_every = [], float("inf")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = start(args)
    try:
        return run(args, url)
    finally:
        from load_tests.harness import stop_serve

        stop_serve()


if __name__ == "__main__":
    sys.exit(main())
