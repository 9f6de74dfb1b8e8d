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


def _start_service(port: int, state_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "SAM3_PORT": str(port), "SAM3_STATE_DIR": str(state_dir), "SAM3_API_KEYS": API_KEY,
           "SAM3_URL_ALLOWLIST": "127.0.0.1", "SAM3_NUM_CPUS": "0", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    return subprocess.Popen([sys.executable, "-m", "serve_app.main"], cwd=ROOT, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


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


@pytest.mark.slow
def test_queue_survives_stopping_and_starting_the_service(tmp_path, image_server):
    """`make serve`, stopped and started again on the same SQLite state: a finished result and jobs still queued
    (or running) at the stop are there afterwards, and the queued ones run."""
    port, state = _free_port(), tmp_path / "state"
    url = f"http://127.0.0.1:{port}"
    proc = _start_service(port, state, tmp_path / "first.log")
    try:
        _wait_ready(url, proc, tmp_path / "first.log")
        done = _enqueue(url, image_server, 330)
        finished = _poll(url, done)
        assert finished["status"] == "succeeded", finished
        pending = [_enqueue(url, image_server, 331 + i) for i in range(4)]
    finally:
        _stop(proc)
    proc = _start_service(port, state, tmp_path / "second.log")
    try:
        _wait_ready(url, proc, tmp_path / "second.log")
        again = _poll(url, done)
        assert again["status"] == "succeeded" and again["result"] == finished["result"]
        assert requests.get(again["result"]["images"][0]["url"], timeout=30).status_code == 200
        outcomes = [_poll(url, gen_id, timeout_s=240) for gen_id in pending]
        assert [o["status"] for o in outcomes] == ["succeeded"] * 4, outcomes
    finally:
        _stop(proc)
