"""Session bookkeeping: owners, the cap, idempotent close and the idle TTL (busy sessions are not idle)."""

from __future__ import annotations

import pytest

from serve_app.core.errors import NotFound, TooManyRequests
from serve_app.video.registry import SessionRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _open(registry: SessionRegistry, owner: str = "alice") -> str:
    sid = registry.reserve()
    registry.add(sid, owner, object())
    return sid


def test_owner_sees_own_session_only():
    registry = SessionRegistry(4, 60)
    sid = _open(registry)
    assert registry.get(sid, "alice").owner == "alice"
    with pytest.raises(NotFound):
        registry.get(sid, "bob")
    with pytest.raises(NotFound):
        registry.remove(sid, "bob")


def test_cap_counts_reservations_and_frees_on_close():
    registry = SessionRegistry(2, 60)
    first = _open(registry)
    registry.reserve()  # a session being started holds its place
    with pytest.raises(TooManyRequests, match="SAM3_VIDEO_MAX_SESSIONS"):
        registry.reserve()
    registry.release()
    registry.remove(first, "alice")
    assert registry.reserve()


def test_free_places_count_open_and_reserved_sessions():
    registry = SessionRegistry(3, 60)
    assert registry.free() == 3
    first = _open(registry)
    registry.reserve()
    assert registry.free() == 1  # the warm pool may hold one actor, no more
    registry.release()
    registry.remove(first, "alice")
    assert registry.free() == 3


def test_close_is_idempotent_for_the_owner():
    registry = SessionRegistry(2, 60)
    sid = _open(registry)
    assert registry.remove(sid, "alice") is not None
    assert registry.remove(sid, "alice") is None
    with pytest.raises(NotFound):
        registry.remove(sid, "bob")


def test_idle_sessions_expire_but_busy_ones_do_not():
    clock = Clock()
    registry = SessionRegistry(4, 10, clock=clock)
    idle, busy = _open(registry), _open(registry)
    registry.get(busy, "alice", begin=True)  # a long render starts
    clock.now = 11
    assert [r.session_id for r in registry.expired()] == [idle]
    clock.now = 30
    assert registry.expired() == []
    registry.end(busy)
    clock.now = 41
    assert [r.session_id for r in registry.expired()] == [busy]


def test_a_call_that_never_ends_expires_after_four_ttls():
    clock = Clock()
    registry = SessionRegistry(4, 10, clock=clock)
    sid = _open(registry)
    registry.get(sid, "alice", begin=True)
    clock.now = 39
    assert registry.expired() == []
    clock.now = 41
    assert [r.session_id for r in registry.expired()] == [sid]


def test_a_session_bounds_its_calls_and_a_finished_call_frees_its_place():
    registry = SessionRegistry(4, 60, max_calls=2)
    sid, other = _open(registry), _open(registry, "bob")
    registry.get(sid, "alice", begin=True)
    registry.get(sid, "alice", begin=True)
    with pytest.raises(TooManyRequests, match="SAM3_VIDEO_SESSION_MAX_CALLS") as refused:
        registry.get(sid, "alice", begin=True)
    assert refused.value.retry_after_s >= 1
    registry.get(sid, "alice")  # a look without a call is not bounded
    registry.get(other, "bob", begin=True)  # another session has its own bound
    registry.end(sid)
    registry.get(sid, "alice", begin=True)
