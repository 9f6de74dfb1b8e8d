"""`make serve` stopped and started again on the same SQLite state: the queue and the results survive.

Its own module (it starts two whole services of its own, no shared cluster), so it runs before the session's Serve
instance is up (tests/conftest.py orders modules by the Ray they need)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import API_KEY
from tests.integration.test_shared_state import _enqueue, _poll

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_service(port: int, state_dir: Path, log: Path, under_a_parent: bool = False) -> subprocess.Popen:
    """`make serve`'s command, the `sam3-serve` console script, in a session of its own: the port, model and state
    directory as flags, the rest from the environment (a flag and the environment together, as users mix them).
    `under_a_parent`: as `make serve` runs it, a child of another process (here `sh`) in that process' group, not the
    group's leader: Ctrl-C goes to the group."""
    env = {**os.environ, "SAM3_PORT": "1", "SAM3_API_KEYS": API_KEY, "SAM3_URL_ALLOWLIST": "127.0.0.1",
           "SAM3_NUM_CPUS": "0", "RAY_ADDRESS": ""}  # SAM3_PORT=1: the --port flag must win over it
    env.pop("RAY_ADDRESS")
    script = Path(sys.executable).with_name("sam3-serve")
    assert script.exists(), f"{script} is missing: `pip install -e .` (make install) installs the console script"
    command = [str(script), "--port", str(port), "--model", "tiny-random", "--state-dir", str(state_dir)]
    if under_a_parent:  # "; true": the shell waits for the service rather than exec-ing it, as make does
        command = ["sh", "-c", " ".join(f"'{part}'" for part in command) + "; true"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError("the service did not become ready:\n" + log.read_text()[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _session_processes(sid: int) -> list[str]:
    """Processes of the session the service was started in (Ray's daemons, workers and replicas stay in it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
            found.append(f"{entry} {stat.split('(', 1)[1].split(')')[0]}")
    return found


def _stop_under_load(url: str, proc: subprocess.Popen, how: str, image: str) -> tuple[float, list[int], list[str]]:
    """Stop the service as `how` says (`ctrl-c`: SIGINT to its process group, as a terminal sends; `sigterm`: to the
    process, as an orchestrator does) while 4 clients segment images. Returns the seconds it took to exit, the
    statuses of the requests in flight at the signal, and the processes of its session left after 60 s."""
    import threading

    body = {"image": image, "prompts": [{"type": "concept", "text": "a square"}]}
    signalled, statuses, stop = threading.Event(), [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            before = signalled.is_set()
            try:
                status = requests.post(f"{url}/v1/image/segment", json=body, headers=AUTH, timeout=60).status_code
            except requests.RequestException:
                status = -1
            if not before:  # sent before the signal: it must be answered (200, or 503 in the JSON shape)
                statuses.append(status)
            if before:
                return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    started = time.monotonic()
    signalled.set()
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    try:  # stopped: the process it started as has exited and none of the session's processes is left
        while time.monotonic() - started < 60 and (proc.poll() is None or _session_processes(proc.pid)):
            time.sleep(0.2)
    finally:
        seconds = time.monotonic() - started
        stop.set()
        for t in threads:
            t.join(60)
        left = _session_processes(proc.pid)
        if proc.poll() is None or left:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return seconds, statuses, left


STOP_WITHIN_S = 10.0


def _assert_clean_stop(url: str, proc: subprocess.Popen, how: str, image: str, log: Path) -> None:
    seconds, statuses, left = _stop_under_load(url, proc, how, image)
    print(f"{how}: exited in {seconds:.1f} s, in flight {statuses}, left {left}")
    assert seconds <= STOP_WITHIN_S, f"{how} took {seconds:.1f} s:\n" + log.read_text()[-3000:]
    assert statuses and set(statuses) <= {200, 503}, statuses
    assert not left, left


@pytest.mark.slow
def test_queue_survives_stopping_and_starting_the_service(tmp_path, image_server):
    """`make serve`, stopped and started again on the same SQLite state: a finished result and jobs still queued
    (or running) at the stop are there afterwards, and the queued ones run.

    Both stops are clean and measured: Ctrl-C (SIGINT to the process group of a parent, as a terminal sends it to
    `make serve`) and SIGTERM each end the service within 10 s under load, every request in flight at the signal is
    answered (200, or 503), and no process is left."""
    import base64

    from tests.integration.conftest import image_bytes

    image = base64.b64encode(image_bytes(5)).decode()
    port, state = _free_port(), tmp_path / "state"
    url = f"http://127.0.0.1:{port}"
    proc = _start_service(port, state, tmp_path / "first.log", under_a_parent=True)
    stopped = False
    try:
        _wait_ready(url, proc, tmp_path / "first.log")
        done = _enqueue(url, image_server, 330)
        finished = _poll(url, done)
        assert finished["status"] == "succeeded", finished
        pending = [_enqueue(url, image_server, 331 + i) for i in range(4)]
        stopped = True
        _assert_clean_stop(url, proc, "ctrl-c", image, tmp_path / "first.log")
    finally:
        if not stopped:
            _stop(proc)
    proc = _start_service(port, state, tmp_path / "second.log")
    stopped = False
    try:
        _wait_ready(url, proc, tmp_path / "second.log")
        again = _poll(url, done)
        assert again["status"] == "succeeded" and again["result"] == finished["result"]
        assert requests.get(again["result"]["images"][0]["url"], timeout=30).status_code == 200
        outcomes = [_poll(url, gen_id, timeout_s=240) for gen_id in pending]
        assert [o["status"] for o in outcomes] == ["succeeded"] * 4, outcomes
        stopped = True
        _assert_clean_stop(url, proc, "sigterm", image, tmp_path / "second.log")
    finally:
        if not stopped:
            _stop(proc)
