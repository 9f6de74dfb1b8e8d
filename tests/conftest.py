"""Suite-wide fixtures: skip `gpu` tests without CUDA and `maxima` tests unless asked; a real redis-server for the
Redis state backend."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_maxima = pytest.mark.skip(reason="many minutes of CPU: make test-maxima (SAM3_TEST_MAXIMA=1) runs it")
    _order_by_ray_use(items)
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "maxima" in item.keywords and os.environ.get("SAM3_TEST_MAXIMA") != "1":
            item.add_marker(skip_maxima)


def _order_by_ray_use(items: list[pytest.Item]) -> None:
    """Modules that need no shared Ray cluster first (unit tests, tests that start their own clusters or services),
    then those on the session's Serve instance, then those on its default app (which stays up to the end).

    The session's cluster idles at about a third of a core per deployed app; started only once it is needed, it
    no longer slows everything that ran after it. The order inside a module is kept, so module fixtures are built
    once."""
    rank: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        names = set(getattr(item, "fixturenames", ()))
        level = 3 if "app_url" in names else 2 if "providers_url" in names else 1 if "serve_instance" in names else 0
        rank[module] = max(rank.get(module, 0), level)
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])


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
