"""How the WebSocket route reaches live streams, without knowing about Ray (deployments/handles.py has the Ray one)."""

from __future__ import annotations

from typing import Protocol

from serve_app.core.slots import Slot


class StreamBackend(Protocol):
    async def open(self, owner: str, prompt) -> dict:
        """A new stream for `owner` tracking `prompt` (a StreamPrompt): {"stream_id", ...}; 429 over the cap."""

    async def push(self, stream_id: str, number: int, seq: int, data: bytes) -> dict:
        """Frame `number` (0, 1, ... of the frames sent on; `seq` is the client's count): {frame_index, objects}."""

    async def attach(self, stream_id: str, owner: str) -> str:
        """A watch id on an open stream of `owner`'s; NotFound (as 404) for another key's or an unknown id."""

    async def watch(self, watch_id: str, after: int, wait_s: float) -> dict:
        """{"messages": results with seq > after, "closed": bool}; waits up to wait_s for one."""

    async def detach(self, watch_id: str) -> None:
        """The viewer left."""

    async def close(self, stream_id: str, owner: str) -> None:
        """Free the stream's actor and its place under the cap (closing twice is fine)."""


_slot: Slot[StreamBackend] = Slot("live video streams are not available on this server")


def set_stream_backend(value: StreamBackend | None) -> None:
    _slot.set(value)


def get_stream_backend() -> StreamBackend:
    return _slot.get()
