"""Two Ray nodes on this machine: encoder and decoder pinned to the second by a custom resource; that node dies.

The cluster is real and separate from the suite's in-process one: `ray start --head` (offering `service_node`)
and `ray start --address` (offering `model_node`), each with its own free ports, in a short temp dir of this
test's own. A driver subprocess deploys the app with `model_resources={"model_node": 0.01}` (ImageEncoder,
Decoder) and `service_resources={"service_node": 0.01}` (the CPU-side replicas), and reports on which node every
replica runs (from the GCS actor table). Traffic goes over HTTP to 127.0.0.1 only. Both nodes run on one machine,
so the SQLite state file under one state dir is shared by every replica (on real nodes: SAM3_STATE_URL=redis://).

Then the second node's raylet and every process of that node are SIGKILLed (a machine lost) while image requests
and queued jobs are in flight: every request must end 200, 503 or 504 within the request timeout plus slack (none
hangs, none is a 500 or a reset), some must be 503/504, and every job must end `succeeded` or `failed` with a
reason (never stuck `running`); after `ray start` brings a model node back, service returns and the model replicas
are on it. Cleanup kills only the processes whose command line names this test's temp dir (never `ray stop`: the
suite's own cluster may be up in this very process). About 3 minutes on 2 idle cores.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.integration.conftest import API_KEY, image_bytes
from tests.videos import write_video

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
REQUEST_TIMEOUT_S = 15.0  # Config.request_timeout_s: past it the app answers 504
JOBS = 12  # queued at the model node's death
PROXY_TIMEOUT_S = REQUEST_TIMEOUT_S + 20  # Serve's proxy gives up later (408), so the app's own 504 is what comes back
SLACK_S = 10.0  # how long past the request timeout a request may take on 2 busy cores before it counts as hung
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TERMINAL = ("succeeded", "failed", "cancelled")
START_TIMEOUT_S = 180  # one `ray start`; Ray's own waits inside it are 30 s, a failed start is retried

DRIVER = r"""
import json, sys
import ray
from ray import serve
from ray._private import state
mode, address = sys.argv[1], sys.argv[2]
ray.init(address=address, log_to_driver=False)
if mode == "deploy":
    from deployments.app import build_app
    from serve_app.core.config import Config
    port, state_dir, timeout, proxy_timeout = int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), float(sys.argv[6])
    serve.start(proxy_location="HeadOnly",
                http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": proxy_timeout})
    config = Config(api_keys=[API_KEY], url_allowlist=["127.0.0.1"], state_dir=state_dir, request_timeout_s=timeout,
                    model_resources={"model_node": 0.01}, service_resources={"service_node": 0.01},
                    jobs_heartbeat_timeout_s=5.0, encoder_batch_wait_timeout_s=0.01, web_ui=False)
    serve.run(build_app(config), name="sam3", route_prefix="/")
# where each live replica of the app runs: deployment -> the custom resources its node offers
offers = {n["NodeID"]: sorted(k for k in n["Resources"] if k in ("model_node", "service_node"))
          for n in ray.nodes() if n["Alive"]}
placement = {}
for actor in state.actors(actor_state_name="ALIVE").values():
    prefix, _, name = actor["ActorClassName"].partition("ServeReplica:sam3:")
    if name:
        placement.setdefault(name, []).append(offers.get(actor["Address"]["NodeID"], ["?"]))
print("PLACEMENT " + json.dumps(placement))
""".replace("API_KEY", repr(API_KEY))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ports(*names: str) -> list[str]:
    return [f"--{name}={_free_port()}" for name in names]


def _env(temp_dir: str) -> dict[str, str]:
    """Every process of this cluster imports this checkout, connects nowhere else and shares one auth token.

    Ray 2.5x turns token auth on for a head when ~/.ray/auth_token exists, but a joining node only sends a token
    when RAY_AUTH_MODE=token says so: set it explicitly for every process, with a token of this cluster's own."""
    token = Path(temp_dir) / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["RAY_agent_register_timeout_ms"] = "120000"  # agents of a node on busy cores register late
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN_PATH"] = "token", str(token)
    return env


def _ours(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=20)


def _node_procs(temp_dir: str, node_manager_port: int) -> tuple[psutil.Process | None, list[psutil.Process]]:
    """The raylet of the node on `node_manager_port` and every process of that node (raylet, agents, workers)."""
    flags = (f"--node_manager_port={node_manager_port}", f"--node-manager-port={node_manager_port}")
    ours = _ours(temp_dir)
    members, raylet = [], None
    for proc in ours:
        try:
            if any(arg in flags for arg in proc.cmdline()):
                members.append(proc)
                if proc.name() == "raylet":
                    raylet = proc
        except psutil.NoSuchProcess:
            pass
    if raylet is not None:
        try:
            members += raylet.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return raylet, list({p.pid: p for p in members}.values())


def _ray_start(args: list[str], temp_dir: str, log: Path, cleanup) -> None:
    """`ray start ...`, again after `cleanup()` if it fails: on busy cores a node can miss Ray's start-up deadlines
    (GCS "Deadline Exceeded", the 30 s wait for the raylet to register)."""
    for attempt in range(3):
        with log.open("ab") as out:
            out.write(f"\n$ {' '.join(args)} (attempt {attempt + 1})\n".encode())
            out.flush()
            try:
                code = subprocess.run(args, cwd=ROOT, env=_env(temp_dir), stdout=out, stderr=subprocess.STDOUT,
                                      timeout=START_TIMEOUT_S, check=False).returncode
            except subprocess.TimeoutExpired:
                code = -1
        if code == 0:
            return
        cleanup()
    raise AssertionError("ray start failed 3 times:\n" + log.read_text()[-4000:])


def _start_head(temp_dir: str, log: Path) -> str:
    gcs = _free_port()
    _ray_start([str(RAY), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                '--resources={"service_node": 1}', "--object-store-memory=300000000", "--include-dashboard=false",
                f"--temp-dir={temp_dir}", "--disable-usage-stats",
                *_ports("ray-client-server-port", "node-manager-port", "object-manager-port",
                        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                        "runtime-env-agent-port")],
               temp_dir, log, lambda: _kill(_ours(temp_dir)))
    return f"127.0.0.1:{gcs}"


def _start_model_node(head: str, temp_dir: str, log: Path) -> int:
    """A second node offering `model_node`; returns its node-manager port (which names its processes)."""
    port = _free_port()
    _ray_start([str(RAY), "start", f"--address={head}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                '--resources={"model_node": 1}', "--object-store-memory=300000000", f"--node-manager-port={port}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats",
                *_ports("object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                        "metrics-export-port", "runtime-env-agent-port")],
               temp_dir, log, lambda: _kill(_node_procs(temp_dir, port)[1]))
    return port


def _driver(temp_dir: str, *args: str, timeout: float = 420) -> dict[str, list[list[str]]]:
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=_env(temp_dir), capture_output=True,
                          text=True, check=False, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("PLACEMENT ")]
    return json.loads(line.split(" ", 1)[1])


def _assert_pinned(placement: dict[str, list[list[str]]]) -> None:
    """Encoder and decoder only on the model node; every other replica only on the head (service_node)."""
    assert {"Ingress", "ImageEncoder", "Decoder", "ImageCache", "JobStore", "JobRunner", "VideoSessions"} <= set(
        placement), placement
    for name, nodes in placement.items():
        expected = ["model_node"] if name in ("ImageEncoder", "Decoder") else ["service_node"]
        assert nodes and all(offers == expected for offers in nodes), (name, nodes, placement)


def _segment(url: str, image: str, timeout: float) -> requests.Response:
    return requests.post(f"{url}/v1/image/segment", headers=AUTH, timeout=timeout, json={
        "image": image, "prompts": [{"type": "concept", "text": "a cat"}]})


def _wait_serving(url: str, deadline_s: float) -> float:
    start, seed = time.monotonic(), 1000
    while time.monotonic() - start < deadline_s:
        seed += 1
        try:
            if _segment(url, base64.b64encode(image_bytes(seed)).decode(), PROXY_TIMEOUT_S + 5).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"not serving {deadline_s} s after the model node came back")


def _enqueue(url: str, image_server: str, seed: int) -> str:
    body = {"model": "sam-3-image", "input_image": f"{image_server}/img/{seed}.png?h=240&w=320", "prompt": "the ox"}
    response = requests.post(f"{url}/api/ai/queue", headers=AUTH, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["generations"][0]["generation_id"]


def _job(url: str, gen_id: str) -> dict | None:
    try:
        response = requests.get(f"{url}/api/ai/queue/{gen_id}", headers=AUTH, timeout=30)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def _poll(url: str, gen_id: str, timeout_s: float) -> dict:
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        last = _job(url, gen_id) or last
        if last and last["status"] in TERMINAL:
            return last
        time.sleep(0.5)
    raise AssertionError(f"job {gen_id} not finished {timeout_s} s on: {last}")


def _every_front_door(url: str, image_server: str) -> dict[str, int]:
    """One request of each front door, one job through the queue and one video session; name -> status code."""
    image = base64.b64encode(image_bytes(7)).decode()
    img_url = f"{image_server}/img/7.png"
    codes = {}
    native = _segment(url, image, 120)
    codes["native"] = native.status_code if "prompts" in native.json() else -1
    codes["oxen"] = requests.post(f"{url}/api/ai/images/edit", headers=AUTH, timeout=120, json={
        "model": "sam-3-image", "input_image": img_url, "prompt": "a cat"}).status_code
    codes["segmind"] = requests.post(f"{url}/v1/sam3-image", headers={"x-api-key": API_KEY}, timeout=120, json={
        "image": img_url, "text_prompt": "a cat", "return_masks": True}).status_code
    codes["roboflow"] = requests.post(f"{url}/sam3/concept_segment", params={"api_key": API_KEY}, timeout=120, json={
        "image": {"type": "base64", "value": image}, "prompts": [{"type": "text", "text": "a cat"}],
        "format": "rle"}).status_code
    codes["hf_space"] = requests.post(f"{url}/api/sam2_compatible", headers=AUTH, timeout=120, json={
        "inputs": {"image": image, "text_prompts": ["a cat"]}}).status_code
    job = _poll(url, _enqueue(url, image_server, 8), 120)
    codes["oxen_queue"] = 200 if job["status"] == "succeeded" else -1
    start = requests.post(f"{url}/v1/video/sessions", data=write_video(6, 96, 128, fps=10), timeout=180,
                          headers={**AUTH, "Content-Type": "video/mp4"})
    codes["video_start"] = start.status_code
    if start.status_code == 201:
        sid = start.json()["session_id"]
        codes["video_prompt"] = requests.post(f"{url}/v1/video/sessions/{sid}/prompts", headers=AUTH, timeout=120,
                                              json={"frame_index": 0, "text": "a square"}).status_code
        with requests.post(f"{url}/v1/video/sessions/{sid}/propagate", json={}, headers=AUTH, stream=True,
                           timeout=300) as r:
            lines = [json.loads(line) for line in r.iter_lines() if line] if r.status_code == 200 else []
        codes["video_propagate"] = 200 if len(lines) > 1 and lines[-1].get("done") else -1
        codes["video_close"] = requests.delete(f"{url}/v1/video/sessions/{sid}", headers=AUTH, timeout=60).status_code
    return codes


def _load(url: str, first_seed: int, stop: threading.Event, out: list) -> None:
    """Image requests one after another, each a new image (a cache hit would not reach the encoder)."""
    seed = first_seed
    while not stop.is_set():
        seed += 1
        image = base64.b64encode(image_bytes(seed)).decode()
        began = time.monotonic()
        try:
            response = _segment(url, image, PROXY_TIMEOUT_S + 30)
            code, body = response.status_code, response.text[:200]
        except requests.RequestException as exc:
            code, body = type(exc).__name__, str(exc)[:200]
        out.append((began, time.monotonic(), code, body))


@pytest.mark.slow
@pytest.mark.integration
def test_two_nodes_pinned_models_and_a_dead_node(image_server, tmp_path):
    if not RAY.exists():
        pytest.skip(f"no `ray` command next to {sys.executable}: cannot start a multi-node cluster")
    t0 = time.monotonic()
    log = tmp_path / "ray-start.log"
    http = _free_port()
    url = f"http://127.0.0.1:{http}"
    timings: dict[str, float] = {}
    temp_dir = tempfile.mkdtemp(prefix="s3n-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    try:
        head = _start_head(temp_dir, log)
        worker_port = _start_model_node(head, temp_dir, log)
        timings["cluster_up_s"] = time.monotonic() - t0
        placement = _driver(temp_dir, "deploy", head, str(http), str(tmp_path / "state"), str(REQUEST_TIMEOUT_S),
                            str(PROXY_TIMEOUT_S))
        print("placement:", placement)
        _assert_pinned(placement)
        timings["deployed_s"] = time.monotonic() - t0

        codes = _every_front_door(url, image_server)
        print("front doors:", codes)
        assert set(codes.values()) <= {200, 201} and len(codes) == 10, codes
        timings["front_doors_s"] = time.monotonic() - t0

        # --- the model node dies with image requests and queued jobs in flight ---
        stop, results = threading.Event(), []
        clients = [threading.Thread(target=_load, args=(url, 10_000 * (i + 1), stop, results), daemon=True)
                   for i in range(3)]
        try:  # the clients stop whatever happens: left running they would load the rest of the suite
            for client in clients:
                client.start()
            time.sleep(1.0)  # image requests in flight
            raylet, node = _node_procs(temp_dir, worker_port)
            assert raylet is not None, "the model node's raylet is not running"
            # enough jobs that the queue is still busy at the kill, however fast this machine runs them
            jobs = [_enqueue(url, image_server, 20 + i) for i in range(JOBS)]
            killed_at = time.monotonic()
            raylet.send_signal(signal.SIGKILL)
            _kill(node)  # its agents and workers too: the machine is gone
            at_kill = {gen_id: (_job(url, gen_id) or {}).get("status") for gen_id in jobs}
            print(f"killed the model node ({len(node)} processes); jobs then: {sorted(map(str, at_kill.values()))}")
            assert any(s in ("queued", "running") for s in at_kill.values()), at_kill
            time.sleep(REQUEST_TIMEOUT_S + SLACK_S)  # the node stays down past a whole request timeout
        finally:
            stop.set()
            for client in clients:
                client.join(PROXY_TIMEOUT_S + 40)
        assert not any(c.is_alive() for c in clients), "a client is still waiting for an answer"
        after = [(max(began, killed_at), ended, code, body) for began, ended, code, body in results
                 if ended >= killed_at]
        summary = [(round(ended - began, 1), code) for began, ended, code, _ in after]
        print("requests ending after the kill (seconds from max(sent, kill), status):", summary)
        for code in (503, 504):
            print(f"a {code}:", next((body for *_, c, body in after if c == code), None))
        assert after, "no request was in flight while the node was down"
        assert all(code in (200, 503, 504) for *_, code, _ in after), summary  # never a hang, reset or 500
        assert any(code in (503, 504) for *_, code, _ in after), summary
        assert max(ended - began for began, ended, *_ in after) <= REQUEST_TIMEOUT_S + SLACK_S, summary
        timings["node_down_s"] = time.monotonic() - t0

        # --- a model node comes back: service returns, every job ends (succeeded, or failed with a reason) ---
        _start_model_node(head, temp_dir, log)
        timings["serving_again_after_s"] = _wait_serving(url, 240)
        placement = _driver(temp_dir, "placement", head, timeout=120)
        print("placement after the restart:", placement)
        _assert_pinned(placement)
        outcomes = [_poll(url, gen_id, 180) for gen_id in jobs]
        print("jobs:", [(o["status"], o.get("error_code"), o.get("error_message")) for o in outcomes])
        for outcome in outcomes:
            assert outcome["status"] == "succeeded" or (
                outcome["status"] == "failed" and outcome.get("error_message")), outcome
        after_jobs = _poll(url, _enqueue(url, image_server, 40), 120)
        assert after_jobs["status"] == "succeeded", after_jobs
        timings["total_s"] = time.monotonic() - t0
        print("two-node timings:", {k: round(v, 1) for k, v in timings.items()})
    finally:
        _kill(_ours(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
