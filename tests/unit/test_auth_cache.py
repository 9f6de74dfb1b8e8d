"""API keys, tenant ids, the bounded caches and loopback-only binding without keys."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.core.auth import ANONYMOUS, Authenticator, bearer
from serve_app.core.cache import BoundedLRU, CachedLogits, LogitsCache
from serve_app.core.config import Config
from serve_app.core.errors import Unauthorized
from serve_app.main import bind_host


def test_no_keys_means_anonymous():
    assert Authenticator([]).tenant(None) == ANONYMOUS


def test_keys_required_and_checked():
    auth = Authenticator(["k1", "k2"])
    with pytest.raises(Unauthorized, match="missing API key: send x-api-key"):
        auth.tenant(None, "x-api-key")
    with pytest.raises(Unauthorized, match="invalid API key"):
        auth.tenant("k3")
    assert auth.tenant("k1") != auth.tenant("k2")
    assert "k1" not in auth.tenant("k1")  # the tenant id does not carry the key


def test_bearer_parsing():
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer") is None


def test_lru_bounded_by_entries_and_bytes():
    cache: BoundedLRU[str] = BoundedLRU(max_entries=3, max_bytes=100)
    for i in range(3):
        cache.put(("t", i), f"v{i}", 10)
    cache.get(("t", 0))  # 0 becomes most recent
    cache.put(("t", 3), "v3", 10)
    assert cache.get(("t", 1)) is None and cache.get(("t", 0)) == "v0"
    cache.put(("t", 4), "big", 90)  # forces byte eviction
    stats = cache.stats()
    assert stats["bytes"] <= 100 and stats["entries"] <= 3 and stats["evictions"] >= 2
    cache.put(("t", 5), "too big", 101)
    assert cache.get(("t", 5)) is None


def test_lru_is_per_tenant_key():
    cache: BoundedLRU[str] = BoundedLRU(4, 100)
    cache.put(("alice", "img"), "a", 1)
    assert cache.get(("bob", "img")) is None


def test_logits_history_prefers_longest_click_prefix():
    cache = LogitsCache(10, 10_000_000)
    one, two = np.zeros((4, 4), np.float32), np.ones((4, 4), np.float32)
    cache.remember(("t", "img"), CachedLogits(((1, 1, 1),), None, one))
    cache.remember(("t", "img"), CachedLogits(((1, 1, 1), (2, 2, 0)), None, two))
    assert cache.best_prefix(("t", "img"), ((1, 1, 1), (2, 2, 0), (3, 3, 1)), None) is two
    assert cache.best_prefix(("t", "img"), ((1, 1, 1), (9, 9, 1)), None) is one
    assert cache.best_prefix(("t", "img"), ((5, 5, 1),), None) is None
    assert cache.best_prefix(("t", "img"), ((1, 1, 1),), (0, 0, 5, 5)) is None


@pytest.mark.parametrize(
    "host,keys,expected",
    [("0.0.0.0", [], "127.0.0.1"), ("127.0.0.1", [], "127.0.0.1"), ("0.0.0.0", ["k"], "0.0.0.0")],
)
def test_binds_loopback_without_keys(host, keys, expected):
    assert bind_host(Config(host=host, api_keys=keys)) == expected


def test_a_second_stop_signal_inside_the_first_handler_does_not_hang_the_service():
    """A signal handler runs in the main thread, also inside the previous handler's Event.set (which holds the
    event's lock): a second Ctrl-C there must not take that lock again (seen: the service hung on two quick SIGINTs)."""
    import threading

    from serve_app.main import StopSignal

    stop = StopSignal()
    stop(2, None)
    done = threading.Event()

    def second_signal_while_the_first_holds_the_lock() -> None:
        with stop.event._cond:  # as the interrupted Event.set holds it
            stop(2, None)
        done.set()

    worker = threading.Thread(target=second_signal_while_the_first_holds_the_lock, daemon=True)
    worker.start()
    assert done.wait(5), "the second signal waited on the lock the first handler holds"
    assert stop.wait(0) and stop.received == 2
