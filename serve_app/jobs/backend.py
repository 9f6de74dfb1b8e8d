"""How the HTTP layer reaches the async queue's job store, without knowing about Ray."""

from __future__ import annotations

from typing import Protocol

from serve_app.core.errors import Sam3Error
from serve_app.core.media import MediaItem
from serve_app.core.slots import Slot

MAX_MEDIA_ID = 64  # media ids are 32 characters: longer ones are not worth a round trip


class JobBackend(Protocol):
    """How the HTTP layer reaches the job store, without knowing about Ray."""

    async def submit(
        self, tenant: str, model: str, kind: str, request: dict, media_base: str, count: int,
        idempotency_key: str | None = None,
    ) -> list[dict]: ...

    async def get(self, tenant: str, job_id: str) -> dict: ...

    async def active(self, tenant: str, model: str | None) -> list[dict]: ...

    async def cancel(self, tenant: str, job_id: str) -> dict: ...

    async def events(self, tenant: str, cursor: str | None, wait_s: float) -> dict: ...

    async def media(self, media_id: str) -> MediaItem | None: ...


_slot: Slot[JobBackend] = Slot("the async queue is not available on this server")


def set_job_backend(value: JobBackend | None) -> None:
    _slot.set(value)


def get_job_backend() -> JobBackend:
    """FastAPI dependency: the replica's job backend (a plain function, so Serve pickles it by reference)."""
    return _slot.get()


async def queued_media(media_id: str) -> MediaItem | None:
    """A file a queued job produced (held by the job store), or None (also when there is no queue or it is down)."""
    if _slot.value is None or len(media_id) > MAX_MEDIA_ID:
        return None
    try:
        return await _slot.value.media(media_id)
    except Sam3Error:
        return None
