"""Deadlines and admission: what the ingress lets into the model graph, and when a request's time is up.

Deadline. Every request has one: now + SAM3_REQUEST_TIMEOUT_S, which the client may shorten (never lengthen)
with the header `X-Request-Timeout: <seconds>`. The gate sets it, as wall-clock seconds (time.time(): the
replicas of one cluster share a clock), in a context variable that the graph calls read: each hop waits at most
until it, the encoder's batcher drops an entry whose deadline passed, the decoder drops one before it starts and
stops a running one at its next chunk.

Admission. One `Admission` per ingress replica lets at most `limit` model requests run at once. A request past
that waits in a line, fair between API keys (one waiting line per key, served round robin), unless its estimated
wait (its place in the line x the recent mean service time / limit) is longer than `max_wait_s` or would leave it
no time to be served before its deadline: then it is refused at once with 503 and Retry-After, before a byte of
its body is parsed, so a refusal never reaches a model. A key running fewer than its fair share of the slots
(the limit over the keys in flight), or with nothing in the line yet, is not refused for the line's length: a
quiet key's request waits its turn while a flooding key's are refused. A key with `per_key_limit` requests in
flight (running or waiting) gets 429 and Retry-After: that limit is its own. With auth off every request is one
tenant.
A waiter whose client leaves is cancelled and leaves the line; it never takes a slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app.core.errors import BadRequest, GatewayTimeout, ServiceUnavailable, TooManyRequests

TIMEOUT_HEADER = "x-request-timeout"  # seconds, a decimal number > 0; shortens SAM3_REQUEST_TIMEOUT_S

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("sam3_deadline", default=None)


class Overloaded(ServiceUnavailable):
    """The graph cannot start this request within its deadline (or the admission line's bound): come back later."""

    code = "overloaded"


def parse_timeout(value: str | None, default_s: float) -> float:
    """The request's time budget: the header's value when given (at most the default), else the default."""
    if value is None:
        return default_s
    try:
        seconds = float(value.strip())
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadRequest(f"X-Request-Timeout must be a number of seconds greater than 0, not {value[:40]!r}")
    return min(seconds, default_s)


def set_deadline(deadline: float | None) -> contextvars.Token:
    return _deadline.set(deadline)


def reset_deadline(token: contextvars.Token) -> None:
    _deadline.reset(token)


def current_deadline() -> float | None:
    """The wall-clock deadline of the request this task serves, if the gate set one."""
    return _deadline.get()


def remaining_s(default_s: float, deadline: float | None = None) -> float:
    """Seconds left to the deadline (the current request's when none is given), at most `default_s`."""
    deadline = current_deadline() if deadline is None else deadline
    if deadline is None:
        return default_s
    return min(default_s, deadline - time.time())


def check_deadline(deadline: float | None, where: str) -> None:
    """504 when `deadline` (wall clock) has passed: the work is dropped before it starts."""
    if deadline is not None and time.time() >= deadline:
        raise GatewayTimeout(f"the request's deadline passed {where}; it was dropped (SAM3_REQUEST_TIMEOUT_S, "
                             "X-Request-Timeout)")


def retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


@dataclass
class _Waiter:
    tenant: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Ticket:
    """An admitted request's slot: `release()` (idempotent) frees it and feeds the service-time estimate."""

    __slots__ = ("_admission", "_tenant", "_started", "_done")

    def __init__(self, admission: Admission, tenant: str) -> None:
        self._admission, self._tenant, self._started, self._done = admission, tenant, time.monotonic(), False

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._admission._release(self._tenant, time.monotonic() - self._started)


class Admission:
    """At most `limit` running requests; a bounded, per-key fair line behind them; refusals at once (see module)."""

    def __init__(self, limit: int, max_wait_s: float, per_key_limit: int, initial_service_s: float = 0.5,
                 on_count: Callable[[str], None] | None = None) -> None:
        self.limit = max(1, int(limit))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.per_key_limit = max(1, int(per_key_limit))
        self.running = 0
        self.service_s = float(initial_service_s)  # EWMA of how long an admitted request holds its slot
        self._lines: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # tenant -> its waiters; order = turn
        self._per_key: dict[str, int] = {}  # running + waiting, per tenant
        self.counts = {"admitted": 0, "waited": 0, "refused_overload": 0, "refused_key_limit": 0,
                       "refused_deadline": 0, "cancelled_waiting": 0, "expired_waiting": 0}
        self.on_count = on_count or (lambda name: None)  # the ingress feeds Ray metrics from it

    def _count(self, name: str) -> None:
        self.counts[name] += 1
        self.on_count(name)

    def resize(self, limit: int) -> None:
        """A new bound on running requests (the model replicas scaled): free slots go to the line at once."""
        self.limit = max(1, int(limit))
        self._dispatch()

    # --------------------------------------------------------------------------------------------- estimates

    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    def _ahead(self, tenant: str) -> int:
        """Waiters served before a new one of `tenant` under round robin: min(line, own line + 1) per key."""
        own = len(self._lines.get(tenant, ()))
        return sum(min(len(line), own + 1) for key, line in self._lines.items() if key != tenant) + own

    def fair_share(self, tenant: str) -> int:
        """Slots per key when the keys in flight (and `tenant`) share the limit evenly. A key running fewer is not
        refused for the line's length, only for its deadline (and its own in-flight limit): round robin gives it
        the next free slots until it runs its share, so its wait is short, and the line stays bounded by the
        per-key limit."""
        keys = len(self._per_key) + (tenant not in self._per_key)
        return max(1, self.limit // keys)

    def estimated_wait_s(self, tenant: str) -> float:
        if self.running < self.limit and not self._lines:
            return 0.0
        return (self._ahead(tenant) + 1) * self.service_s / self.limit

    # --------------------------------------------------------------------------------------------- enter / leave

    async def enter(self, tenant: str, deadline: float | None) -> Ticket:
        """A slot for a request of `tenant` with wall-clock `deadline`, or TooManyRequests / Overloaded at once."""
        held = self._per_key.get(tenant, 0)
        if held >= self.per_key_limit:
            self._count("refused_key_limit")
            raise TooManyRequests(
                f"this API key has {held} requests in flight; the limit is {self.per_key_limit} "
                "(SAM3_MAX_INFLIGHT_PER_KEY): wait for an answer before sending more",
                retry_after_s=retry_after(self.service_s))
        wait = self.estimated_wait_s(tenant)
        left = math.inf if deadline is None else deadline - time.time()
        waiting_own = len(self._lines.get(tenant, ()))
        if (wait > 0 and wait > self.max_wait_s and waiting_own  # a key may always have one request in line
                and held - waiting_own >= self.fair_share(tenant)):
            self._count("refused_overload")
            raise Overloaded(
                f"the service is at capacity: the estimated wait ({wait:.2f} s) is over its bound of "
                f"{self.max_wait_s:g} s (SAM3_ADMISSION_MAX_WAIT_S); retry later", retry_after_s=retry_after(wait))
        if wait > 0 and wait + self.service_s > left:
            self._count("refused_deadline")
            raise Overloaded(
                f"the service cannot serve this request within its deadline ({max(left, 0):.2f} s left, "
                f"about {wait + self.service_s:.2f} s needed); retry later or allow more time",
                retry_after_s=retry_after(wait))
        self._per_key[tenant] = held + 1
        if wait == 0.0:
            self.running += 1
            self._count("admitted")
            return Ticket(self, tenant)
        waiter = _Waiter(tenant, asyncio.get_running_loop().create_future())
        self._lines.setdefault(tenant, deque()).append(waiter)
        self._count("waited")
        try:
            # the line is bounded by max_wait_s; a waiter whose estimate was short gives up at its deadline
            await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, left))
        except asyncio.TimeoutError:
            self._forget(waiter, "expired_waiting")
            raise Overloaded("the request's deadline passed while it waited for the model; retry later",
                             retry_after_s=retry_after(self.service_s)) from None
        except asyncio.CancelledError:
            self._forget(waiter, "cancelled_waiting")
            raise
        self._count("admitted")
        return Ticket(self, tenant)

    def _unhold(self, tenant: str) -> None:
        self._per_key[tenant] -= 1
        if not self._per_key[tenant]:
            del self._per_key[tenant]

    def _forget(self, waiter: _Waiter, reason: str) -> None:
        """A waiter leaves without running: out of the line, or (if it was handed a slot meanwhile) the slot back."""
        self._unhold(waiter.tenant)
        self._count(reason)
        if waiter.future.done():  # it had been handed the slot in the same turn of the loop
            self.running -= 1
            self._dispatch()
            return
        waiter.future.cancel()
        line = self._lines.get(waiter.tenant)
        if line is not None:
            try:
                line.remove(waiter)
            except ValueError:
                pass
            if not line:
                del self._lines[waiter.tenant]

    def _release(self, tenant: str, held_s: float) -> None:
        """An admitted request is done (answered, failed or cancelled): its slot goes to the next in turn."""
        self.service_s = 0.8 * self.service_s + 0.2 * held_s
        self._unhold(tenant)
        self.running -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiters, one key at a time in turn."""
        while self.running < self.limit and self._lines:
            tenant, line = next(iter(self._lines.items()))
            waiter = line.popleft()
            if line:
                self._lines.move_to_end(tenant)
            else:
                del self._lines[tenant]
            if waiter.future.done():
                continue
            self.running += 1
            waiter.future.set_result(None)

    def stats(self) -> dict:
        return {"limit": self.limit, "running": self.running, "waiting": self.waiting(),
                "mean_service_ms": round(self.service_s * 1000, 1), "max_wait_s": self.max_wait_s,
                "per_key_limit": self.per_key_limit, **self.counts}
