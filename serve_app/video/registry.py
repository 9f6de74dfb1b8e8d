"""Which sessions exist, who owns them, when they expire: the bookkeeping of VideoSessions, free of Ray."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from serve_app.core.errors import NotFound, TooManyRequests

H = TypeVar("H")
CLOSED_MEMORY = 1024  # closed ids remembered, so a second close still answers 200


@dataclass
class SessionRecord(Generic[H]):
    session_id: str
    owner: str
    handle: H
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    inflight: int = 0  # calls running on the session: it is not idle while one runs


class SessionRegistry(Generic[H]):
    """Owner-checked lookup (another key's session is 404, so ids do not leak), a global cap and an idle TTL."""

    def __init__(self, max_sessions: int, ttl_s: float, clock=time.monotonic, max_calls: int | None = None) -> None:
        self.max_sessions, self.ttl_s, self.clock = max_sessions, ttl_s, clock
        self.max_calls = max_calls  # calls one session runs or queues at once (None: no bound)
        self._open: dict[str, SessionRecord[H]] = {}
        self._reserved = 0
        self._closed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def reserve(self) -> str:
        """A new session id and a place under the cap (released by `add` or `release`)."""
        with self._lock:
            if len(self._open) + self._reserved >= self.max_sessions:
                raise TooManyRequests(
                    f"{self.max_sessions} video sessions are open, the most this server allows "
                    "(SAM3_VIDEO_MAX_SESSIONS); close one or retry later"
                )
            self._reserved += 1
        return secrets.token_urlsafe(12)

    def free(self) -> int:
        """Places left under the cap (open and reserved sessions take one each)."""
        with self._lock:
            return max(0, self.max_sessions - len(self._open) - self._reserved)

    def release(self) -> None:
        with self._lock:
            self._reserved -= 1

    def add(self, session_id: str, owner: str, handle: H) -> SessionRecord[H]:
        record = SessionRecord(session_id, owner, handle, self.clock(), self.clock())
        with self._lock:
            self._reserved -= 1
            self._open[session_id] = record
        return record

    def adopt(self, session_id: str, owner: str, handle: H) -> SessionRecord[H]:
        """A session that outlived the registry's last process (its actor is detached): open again, under the cap."""
        self.reserve()
        return self.add(session_id, owner, handle)

    def get(self, session_id: str, owner: str, begin: bool = False) -> SessionRecord[H]:
        """The owner's session (touched); with begin, a call on it starts and must be `end`ed."""
        with self._lock:
            record = self._open.get(session_id)
            if record is None or record.owner != owner:
                raise NotFound(f"no video session {session_id!r}")
            if begin and self.max_calls is not None and record.inflight >= self.max_calls:
                raise TooManyRequests(
                    f"video session {session_id!r} has {record.inflight} calls running or queued, the most one "
                    f"session may have (SAM3_VIDEO_SESSION_MAX_CALLS): wait for an answer before sending more",
                    retry_after_s=1)
            record.last_used = self.clock()
            record.inflight += int(begin)
            return record

    def end(self, session_id: str) -> None:
        """A call on the session finished: it is idle from now on."""
        with self._lock:
            record = self._open.get(session_id)
            if record is not None:
                record.inflight = max(0, record.inflight - 1)
                record.last_used = self.clock()

    def remove(self, session_id: str, owner: str) -> SessionRecord[H] | None:
        """Forget a session; None when it was already closed by this owner; NotFound when it never was theirs."""
        with self._lock:
            record = self._open.get(session_id)
            if record is not None and record.owner == owner:
                del self._open[session_id]
                self._remember_closed(session_id, owner)
                return record
            if (session_id, owner) in self._closed:
                return None
        raise NotFound(f"no video session {session_id!r}")

    def expired(self, everything: bool = False) -> list[SessionRecord[H]]:
        """Remove and return every session idle longer than the TTL (a running call keeps it alive, up to 4 TTLs,
        in case the caller died without ending it); with `everything`, every open session (shutdown)."""
        now = self.clock()
        with self._lock:
            stale = [
                r for r in self._open.values()
                if everything or now - r.last_used > (4 * self.ttl_s if r.inflight else self.ttl_s)
            ]
            for record in stale:
                del self._open[record.session_id]
                self._remember_closed(record.session_id, record.owner)
        return stale

    def _remember_closed(self, session_id: str, owner: str) -> None:
        self._closed[(session_id, owner)] = None
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def __len__(self) -> int:
        return len(self._open)
