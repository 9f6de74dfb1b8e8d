"""How the HTTP layer reaches video sessions, without knowing about Ray."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from serve_app.errors import ServiceUnavailable


class VideoBackend(Protocol):
    async def create(self, owner: str, data: bytes | None, frames: list[np.ndarray] | None, fps: float | None) -> dict: ...

    async def call(self, session_id: str, owner: str, method: str, *args: Any) -> Any: ...

    async def close(self, session_id: str, owner: str) -> dict: ...


_current: VideoBackend | None = None


def set_video_backend(backend: VideoBackend) -> None:
    global _current
    _current = backend


def get_video_backend() -> VideoBackend:
    """FastAPI dependency: the replica's video backend."""
    if _current is None:
        raise ServiceUnavailable("video sessions are not available on this server")
    return _current
