"""The queue's store process, free of Ray: a JobBook plus long-polls for work and events, and finished jobs' files."""

from __future__ import annotations

import asyncio
import time

from serve_app.core.errors import Sam3Error
from serve_app.core.media import MediaStore
from serve_app.jobs.store import JobBook, Outcome


class JobStoreCore:
    """A JobBook plus what its process needs: long-polls for work and events, and finished jobs' files."""

    def __init__(self, book: JobBook, media: MediaStore) -> None:
        self.book, self.media = book, media
        self._changed = asyncio.Event()
        book.on_change = self._wake

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, seconds: float) -> None:
        changed = self._changed  # taken before awaiting: no change can slip in between (one event loop)
        try:
            await asyncio.wait_for(changed.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            pass

    async def claim(self, worker: str, wait_s: float) -> dict | None:
        """The next job for `worker`, waiting up to wait_s seconds for one."""
        deadline = time.monotonic() + wait_s
        while (work := self.book.claim(worker)) is None and time.monotonic() < deadline:
            await self._wait(deadline - time.monotonic())
        return work

    def finish(self, job_id: str, worker: str, outcome: Outcome) -> bool:
        """Store the outcome's files under the ids its URLs already name, then record it."""
        tenant = self.book.running_tenant(job_id, worker)
        if tenant is None:
            return False
        try:
            for media_id, data, content_type in outcome.files:
                self.media.put(data, content_type, tenant, media_id=media_id)
        except Sam3Error as exc:
            outcome = Outcome.failure(exc.code, exc.message)
        return self.book.finish(job_id, worker, outcome)

    async def events(self, tenant: str, cursor: str | None, wait_s: float) -> dict:
        """The key's events after `cursor` ("<epoch>-<seq>"; none or another epoch's: the replay window),
        waiting up to wait_s seconds for one. Returns {"cursor", "events": [{"id", "event", "data"}]}."""
        after = self.parse_cursor(cursor)
        deadline = time.monotonic() + wait_s
        while not (found := self.book.events_after(tenant, after)) and time.monotonic() < deadline:
            await self._wait(deadline - time.monotonic())
        last = found[-1].seq if found else (self.book.last_seq if after is None else after)
        epoch = self.book.epoch
        return {"cursor": f"{epoch}-{last}",
                "events": [{"id": f"{epoch}-{e.seq}", "event": e.name, "data": e.data} for e in found]}

    def parse_cursor(self, cursor: str | None) -> int | None:
        epoch, _, seq = (cursor or "").strip().partition("-")
        if epoch != self.book.epoch or not seq.isdigit():
            return None
        return min(int(seq), self.book.last_seq)

    def get_media(self, media_id: str) -> tuple[bytes, str, str, float] | None:
        item = self.media.get(media_id)
        return None if item is None else (item.data, item.content_type, item.owner, self.media.remaining_s(item))
