"""What both benchmarks share: a free port, Ray's worker thread count, stopping Serve, number formatting."""

from __future__ import annotations

import socket


def fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_serve() -> None:
    try:
        from ray import serve
        import ray

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
