"""Batcher: a lone request runs at once, requests that arrive together share a batch, failures reach every caller."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serve_app.image.batching import Batcher


class Model:
    """Records the batches it is given; each call takes `seconds` (a stand-in for a forward pass, in a thread)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds, self.batches, self.lock = seconds, [], threading.Lock()

    def __call__(self, items: list) -> list:
        with self.lock:
            self.batches.append(list(items))
        time.sleep(self.seconds)
        return [item * 10 for item in items]


def run(coro):
    return asyncio.run(coro)


def test_a_lone_request_does_not_wait_for_the_window():
    model = Model()
    batcher = Batcher(model, max_batch_size=8, wait_s=5.0)

    async def go():
        started = time.perf_counter()
        result = await batcher.submit(3)  # expected=1: nobody else is coming
        return result, time.perf_counter() - started

    result, elapsed = run(go())
    assert result == 30 and model.batches == [[3]]
    assert elapsed < 1.0, f"a lone request waited {elapsed:.2f} s of a 5 s window"


def test_requests_arriving_while_the_model_runs_form_the_next_batch():
    model = Model(seconds=0.3)
    batcher = Batcher(model, max_batch_size=16, wait_s=0.0)  # no waiting at all: batches come from busy time

    async def go():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first batch is running
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        return await asyncio.gather(first, *rest)

    assert run(go()) == [0, 10, 20, 30, 40, 50]
    assert model.batches == [[0], [1, 2, 3, 4, 5]]


def test_expected_requests_are_waited_for_up_to_the_window():
    model = Model()
    batcher = Batcher(model, max_batch_size=8, wait_s=2.0)

    async def go():
        tasks = []
        for i in range(4):
            tasks.append(asyncio.ensure_future(batcher.submit(i, expected=4)))
            await asyncio.sleep(0.05)  # staggered arrivals, well inside the window
        return await asyncio.gather(*tasks)

    started = time.perf_counter()
    assert run(go()) == [0, 10, 20, 30]
    assert model.batches == [[0, 1, 2, 3]]
    assert time.perf_counter() - started < 1.5, "the batch ran as soon as all four were there"


def test_the_window_bounds_the_wait_for_requests_that_never_come():
    model = Model()
    batcher = Batcher(model, max_batch_size=8, wait_s=0.2)

    async def go():
        started = time.perf_counter()
        result = await batcher.submit(1, expected=5)
        return result, time.perf_counter() - started

    result, elapsed = run(go())
    assert result == 10 and model.batches == [[1]]
    assert 0.15 <= elapsed < 1.5


def test_batches_never_exceed_the_maximum_and_keep_order():
    model = Model(seconds=0.05)
    batcher = Batcher(model, max_batch_size=3, wait_s=0.5)

    async def go():
        return await asyncio.gather(*(batcher.submit(i, expected=7) for i in range(7)))

    assert run(go()) == [i * 10 for i in range(7)]
    assert [len(b) for b in model.batches] == [3, 3, 1]
    assert [i for b in model.batches for i in b] == list(range(7))


def test_a_failing_batch_fails_each_of_its_requests_and_the_next_batch_runs():
    calls = []

    def flaky(items: list) -> list:
        calls.append(list(items))
        if len(calls) == 1:
            raise ValueError("model fell over")
        return items

    batcher = Batcher(flaky, max_batch_size=4, wait_s=0.5)

    async def go():
        first = await asyncio.gather(*(batcher.submit(i, expected=2) for i in range(2)), return_exceptions=True)
        second = await batcher.submit(9)
        return first, second

    first, second = run(go())
    assert [type(e) for e in first] == [ValueError, ValueError] and second == 9


def test_a_wrong_number_of_results_is_an_error_not_a_hang():
    batcher = Batcher(lambda items: items[:-1], max_batch_size=4, wait_s=0.0)
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        run(batcher.submit(1))


def test_a_cancelled_request_is_left_out_of_the_batch():
    model = Model(seconds=0.2)
    batcher = Batcher(model, max_batch_size=8, wait_s=0.0)

    async def go():
        busy = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        return await asyncio.gather(busy, kept)

    assert run(go()) == [0, 20]
    assert model.batches == [[0], [2]]


def test_stats_report_queue_wait_and_run_time():
    model = Model(seconds=0.05)
    batcher = Batcher(model, max_batch_size=4, wait_s=0.0)
    run(batcher.submit(1))
    stats = batcher.stats()
    assert stats["mean_batch_run_ms"] >= 40 and stats["mean_queue_wait_ms"] >= 0


def test_an_items_own_error_reaches_that_request_only():
    def model(items: list) -> list:
        return [ValueError(f"bad {i}") if i == 2 else i * 10 for i in items]

    batcher = Batcher(model, max_batch_size=8, wait_s=0.5)

    async def go():
        return await asyncio.gather(*(batcher.submit(i, expected=3) for i in range(3)), return_exceptions=True)

    first, second, third = run(go())
    assert (first, second) == (0, 10)
    assert isinstance(third, ValueError) and str(third) == "bad 2"


def test_concurrency_runs_that_many_batches_side_by_side():
    active, peak, lock = [0], [0], threading.Lock()

    def model(items: list) -> list:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return items

    async def go(concurrency: int) -> float:
        batcher = Batcher(model, max_batch_size=1, wait_s=0.0, concurrency=concurrency)
        started = time.perf_counter()
        await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        return time.perf_counter() - started

    peak[0] = 0
    serial = run(go(1))
    assert peak[0] == 1 and serial >= 0.8
    peak[0] = 0
    paired = run(go(2))
    assert peak[0] == 2 and paired < 0.7, paired
