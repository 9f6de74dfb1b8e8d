"""Admission control and deadlines (serve_app/core/admission.py): bounded, fair, refusing at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_app.core.admission import Admission, Overloaded, parse_timeout, remaining_s, set_deadline, reset_deadline
from serve_app.core.errors import BadRequest, GatewayTimeout, TooManyRequests
from serve_app.image.batching import Batcher


def run(coro):
    return asyncio.run(coro)


def test_timeout_header_shortens_never_lengthens():
    assert parse_timeout(None, 120.0) == 120.0
    assert parse_timeout("2.5", 120.0) == 2.5
    assert parse_timeout(" 500 ", 120.0) == 120.0
    for bad in ("0", "-1", "nan", "inf", "soon", "", "1e999"):
        with pytest.raises(BadRequest):
            parse_timeout(bad, 120.0)


def test_remaining_follows_the_current_deadline():
    assert remaining_s(30.0) == 30.0
    token = set_deadline(time.time() + 2.0)
    try:
        assert 1.5 < remaining_s(30.0) <= 2.0
    finally:
        reset_deadline(token)


def test_runs_at_once_below_the_limit_then_refuses_a_long_wait():
    async def main():
        adm = Admission(limit=2, max_wait_s=0.5, per_key_limit=100, initial_service_s=1.0)
        a = await adm.enter("k", None)
        b = await adm.enter("k", None)
        assert adm.running == 2
        # the line: each waiter's estimate is (ahead + 1) * 1.0 / 2 -> the first waits 0.5 s (allowed)
        waiter = asyncio.ensure_future(adm.enter("k", None))
        await asyncio.sleep(0)
        assert adm.waiting() == 1
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:  # second in line: 1.0 s > 0.5 s
            await adm.enter("k", None)
        assert time.perf_counter() - started < 0.05  # at once, not after waiting
        assert refused.value.status_code == 503 and refused.value.retry_after_s >= 1
        a.release()
        ticket = await asyncio.wait_for(waiter, 1.0)
        assert adm.running == 2 and adm.waiting() == 0
        ticket.release()
        b.release()
        assert adm.running == 0
        assert adm.counts["refused_overload"] == 1 and adm.counts["admitted"] == 3

    run(main())


def test_per_key_limit_is_429_and_other_keys_still_get_in():
    async def main():
        adm = Admission(limit=8, max_wait_s=5.0, per_key_limit=2, initial_service_s=0.1)
        tickets = [await adm.enter("flood", None) for _ in range(2)]
        with pytest.raises(TooManyRequests) as limited:
            await adm.enter("flood", None)
        assert limited.value.status_code == 429 and limited.value.retry_after_s >= 1
        other = await adm.enter("other", None)
        for t in tickets + [other]:
            t.release()
        assert adm.running == 0 and not adm._per_key

    run(main())


def test_fair_turns_between_keys():
    """One key with a long line cannot starve another: the free slots alternate between the keys' lines."""

    async def main():
        adm = Admission(limit=1, max_wait_s=100.0, per_key_limit=100, initial_service_s=0.01)
        holder = await adm.enter("flood", None)
        order: list[str] = []

        async def one(key):
            ticket = await adm.enter(key, None)
            order.append(key)
            await asyncio.sleep(0)
            ticket.release()

        tasks = [asyncio.ensure_future(one("flood")) for _ in range(6)]
        await asyncio.sleep(0)
        tasks += [asyncio.ensure_future(one("other")) for _ in range(2)]
        await asyncio.sleep(0)
        holder.release()
        await asyncio.gather(*tasks)
        # the other key's two requests, queued behind six of the flood's, are served 2nd and 4th
        assert order[:4] == ["flood", "other", "flood", "other"], order

    run(main())


def test_estimate_puts_a_new_key_near_the_front():
    async def main():
        adm = Admission(limit=1, max_wait_s=0.35, per_key_limit=100, initial_service_s=0.1)
        holder = await adm.enter("flood", None)
        flood = [asyncio.ensure_future(adm.enter("flood", None)) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # the flood's 4th waiter: 0.4 s > 0.35 s
            await adm.enter("flood", None)
        other = asyncio.ensure_future(adm.enter("other", None))  # 1 ahead of it under round robin: 0.2 s
        await asyncio.sleep(0)
        assert not other.done() and adm.waiting() == 4
        holder.release()
        for _ in range(4):
            await asyncio.sleep(0)
        for task in flood + [other]:
            task.cancel()
        await asyncio.gather(*flood, other, return_exceptions=True)

    run(main())


def test_a_key_below_its_fair_share_waits_its_turn_while_the_flood_is_refused():
    async def main():
        adm = Admission(limit=4, max_wait_s=0.1, per_key_limit=100, initial_service_s=1.0)
        flood = [await adm.enter("flood", None) for _ in range(4)]
        queued = asyncio.ensure_future(adm.enter("flood", None))  # a key's first waiter is always let in line
        await asyncio.sleep(0)
        assert not queued.done() and adm.waiting() == 1
        with pytest.raises(Overloaded):  # its next: 0.5 s estimated > 0.1 s, it runs all 4 slots, it has a waiter
            await adm.enter("flood", None)
        quiet = [asyncio.ensure_future(adm.enter("quiet", None)) for _ in range(3)]  # it runs none of its 2
        await asyncio.sleep(0)
        assert not any(q.done() for q in quiet) and adm.waiting() == 4
        for ticket in flood[:2]:  # two slots free: one to each key in turn
            ticket.release()
        for _ in range(4):
            await asyncio.sleep(0)
        assert queued.done() and quiet[0].done() and not quiet[1].done()
        flood[2].release()  # the flood has nothing waiting: the quiet key's next is served
        for _ in range(4):
            await asyncio.sleep(0)
        assert quiet[1].done() and not quiet[2].done()
        with pytest.raises(Overloaded):  # now it runs its share (2 of 4) and has a waiter: the line's length counts
            await adm.enter("quiet", None)
        for ticket in [flood[3], await queued, await quiet[0], await quiet[1]]:
            ticket.release()
        (await quiet[2]).release()
        assert adm.running == 0 and adm.waiting() == 0

    run(main())


def test_cancelled_waiter_leaves_the_line_and_never_takes_a_slot():
    async def main():
        adm = Admission(limit=1, max_wait_s=10.0, per_key_limit=100, initial_service_s=0.1)
        holder = await adm.enter("k", None)
        waiters = [asyncio.ensure_future(adm.enter("k", None)) for _ in range(5)]
        await asyncio.sleep(0)
        for w in waiters[:4]:
            w.cancel()
        await asyncio.gather(*waiters[:4], return_exceptions=True)
        assert adm.waiting() == 1 and adm.counts["cancelled_waiting"] == 4
        holder.release()
        last = await asyncio.wait_for(waiters[4], 1.0)
        assert adm.running == 1
        last.release()
        assert adm.running == 0 and not adm._per_key

    run(main())


def test_deadline_too_close_is_refused_and_a_waiter_gives_up_at_its_deadline():
    async def main():
        adm = Admission(limit=1, max_wait_s=10.0, per_key_limit=100, initial_service_s=0.5)
        holder = await adm.enter("k", None)
        with pytest.raises(Overloaded):  # 0.5 s of wait + 0.5 s of service do not fit in 0.3 s
            await adm.enter("k", time.time() + 0.3)
        adm.service_s = 0.01  # the estimate says it fits, but the slot never frees: it leaves at its deadline
        started = time.perf_counter()
        with pytest.raises(Overloaded):
            await adm.enter("k", time.time() + 0.2)
        assert 0.15 < time.perf_counter() - started < 0.5
        assert adm.counts["expired_waiting"] == 1 and adm.waiting() == 0
        holder.release()
        assert adm.running == 0

    run(main())


def test_resize_hands_new_slots_to_the_line():
    async def main():
        adm = Admission(limit=1, max_wait_s=10.0, per_key_limit=100, initial_service_s=0.1)
        holder = await adm.enter("k", None)
        waiter = asyncio.ensure_future(adm.enter("k", None))
        await asyncio.sleep(0)
        adm.resize(2)
        ticket = await asyncio.wait_for(waiter, 1.0)
        assert adm.running == 2
        ticket.release()
        holder.release()

    run(main())


def test_batcher_drops_expired_and_cancelled_entries_unrun():
    ran: list[int] = []

    def model(items):
        time.sleep(0.2)
        ran.extend(items)
        return items

    async def main():
        batcher = Batcher(model, max_batch_size=4, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the model runs item 0; the rest queue behind it
        expired = asyncio.ensure_future(batcher.submit(1, deadline=time.time() + 0.05))
        cancelled = asyncio.ensure_future(batcher.submit(2))
        live = asyncio.ensure_future(batcher.submit(3, deadline=time.time() + 5.0))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        assert await first == 0 and await live == 3
        with pytest.raises(GatewayTimeout):
            await expired
        stats = batcher.stats()
        assert stats["dropped_expired"] == 1 and stats["dropped_cancelled"] == 1

    run(main())
    assert ran == [0, 3]


def test_the_bound_follows_the_model_replicas_and_leaves_the_autoscaler_a_replica_of_demand():
    from deployments.ingress import admission_limit
    from serve_app.core.config import Config

    fixed = Config(admission_running_per_replica=8)
    assert admission_limit(fixed, 1, 1, 1) == 8
    assert admission_limit(fixed, 3, 2, 1) == 16  # the fewer of encoder and decoder replicas
    assert admission_limit(fixed, 2, 2, 3) == 6  # split over the ingress replicas, rounded up
    scaling = Config(admission_running_per_replica=8, autoscale=True, autoscale_max_replicas=3)
    assert admission_limit(scaling, 1, 1, 1) == 16  # one replica's worth queues where the autoscaler counts it
    assert admission_limit(scaling, 2, 3, 2) == 12
    assert admission_limit(scaling, 3, 3, 1) == 24  # at the maximum: what runs
