"""What the load tests share: test images, a free port, Ray's worker thread count, stopping Serve, formatting,
the CPU time of Serve's processes and py-spy recordings of them."""

from __future__ import annotations

import socket

import numpy as np


def make_image(seed: int, height: int, width: int) -> np.ndarray:
    """A distinct photo-like image per seed: a colour gradient, a few flat shapes, mild noise."""
    rng = np.random.default_rng(seed)
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    c0, c1, c2 = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
    image = c0 * (1 - ys) * (1 - xs) + c1 * ys + c2 * xs * (1 - ys)
    for _ in range(int(rng.integers(3, 7))):
        h, w = int(rng.integers(height // 8, height // 2)), int(rng.integers(width // 8, width // 2))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        image[y : y + h, x : x + w] = rng.uniform(0, 255, 3)
    image += rng.integers(-6, 7, image.shape, dtype=np.int8)
    return np.clip(image, 0, 255).astype(np.uint8)


def fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_serve() -> None:
    import contextlib

    with contextlib.suppress(Exception):  # nothing to stop, or already stopping: either way done
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def worker_torch_threads() -> int | None:
    """torch threads in a Ray worker that asks for 0 CPUs, as deployments and session actors do (Ray sets OMP_NUM_THREADS)."""
    import ray

    @ray.remote(num_cpus=0)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    try:
        return ray.get(threads.remote(), timeout=60)
    except Exception:  # noqa: BLE001
        return None


def jpeg_b64(image: np.ndarray, quality: int = 90) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


CLOCK_TICKS = 100  # replaced by the kernel's value on first use


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc/<pid>/stat); None if it is gone."""
    import os

    global CLOCK_TICKS
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def serve_processes(app: str) -> dict[str, int]:
    """{role: pid} of the Serve proxy and of every replica of `app`, from the connected cluster's actor table."""
    from ray._private import state

    pids: dict[str, int] = {}
    for actor in state.actors(actor_state_name="ALIVE").values():
        name = actor.get("ActorClassName") or ""
        if name == "ProxyActor":
            role = "proxy"
        elif name.startswith(f"ServeReplica:{app}:"):
            role = name.rsplit(":", 1)[1]
        else:
            continue
        key, n = role, 1
        while key in pids:  # several replicas of one deployment: Ingress, Ingress#2 ...
            n += 1
            key = f"{role}#{n}"
        pids[key] = int(actor["Pid"])
    return pids


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {role: cpu for role, pid in pids.items() if (cpu := process_cpu_s(pid)) is not None}


SPIED = ("proxy", "Ingress", "ImageCache", "ImageEncoder", "Decoder")  # py-spy costs ~6% of a core per process


def start_py_spy(pids: dict[str, int], folder: str, label: str) -> list:
    """py-spy on the request path's processes at 100 Hz (raw collapsed stacks of the threads on a CPU)."""
    import os
    import subprocess
    import sys

    os.makedirs(folder, exist_ok=True)
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "100", "--format", "raw",
                              "--nonblocking", "--output", os.path.join(folder, f"{label}-{role}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for role, pid in pids.items() if role.split("#")[0] in SPIED]


def stop_py_spy(spies: list) -> None:
    import signal

    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for spy in spies:
        spy.wait(timeout=60)


def init_ray(tries: int = 3) -> None:
    """ray.init with every core; on a loaded machine the raylet may miss Ray's 30 s start-up window, so retry."""
    import logging
    import os

    import ray

    for attempt in range(tries):
        try:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
            return
        except Exception:
            ray.shutdown()
            if attempt == tries - 1:
                raise


def start_graph(config, app: str = "sam3", request_timeout_s: float | None = None) -> str:
    """Ray and Serve in this process as `make serve` starts them (allocator settings, the proxy's failover
    middleware with `config`'s retries), then `build_app(config)` at `/`; returns the base URL."""
    import logging
    import os

    import ray
    from ray import serve

    from deployments.app import build_app
    from serve_app.core.failover import enable_proxy_failover
    from serve_app.core.stats import apply_allocator_env

    apply_allocator_env()
    os.environ["SAM3_FAILOVER_RETRIES"] = str(config.failover_retries)  # the proxy's middleware reads it
    enable_proxy_failover()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    port = free_port()
    http = {"host": "127.0.0.1", "port": port}
    if request_timeout_s is not None:
        http["request_timeout_s"] = request_timeout_s
    serve.start(http_options=http)
    serve.run(build_app(config), name=app, route_prefix="/")
    return f"http://127.0.0.1:{port}"
