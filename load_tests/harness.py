"""What the load tests share: test images, a free port, Ray's worker thread count, stopping Serve, formatting."""

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
    try:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    except Exception:  # noqa: BLE001
        pass


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
