"""How the HTTP layer reaches video sessions, without knowing about Ray."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from serve_app.core.slots import Slot


class VideoBackend(Protocol):
    async def create(
        self, owner: str, data: bytes | None, frames: list[bytes] | list[np.ndarray] | None, fps: float | None,
        model: str | None = None,
    ) -> dict: ...

    async def call(self, session_id: str, owner: str, method: str, *args: Any) -> Any: ...

    async def close(self, session_id: str, owner: str) -> dict: ...


_slot: Slot[VideoBackend] = Slot("video sessions are not available on this server")


def set_video_backend(value: VideoBackend | None) -> None:
    _slot.set(value)


def get_video_backend() -> VideoBackend:
    """FastAPI dependency: the replica's video backend (a plain function, so Serve pickles it by reference)."""
    return _slot.get()
