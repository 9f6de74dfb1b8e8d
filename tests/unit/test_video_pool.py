"""WarmPool without Ray: actors are plain objects whose model 'loads' when the test says so."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.video.pool import Warm, WarmPool


class FakeActor:
    def __init__(self, n: int) -> None:
        self.n, self.alive, self.killed, self.hangs = n, True, False, False
        self.loaded = asyncio.Event()


class Fakes:
    def __init__(self, load_at_once: bool = True, fail_loads: int = 0) -> None:
        self.actors: list[FakeActor] = []
        self.load_at_once, self.fail_loads = load_at_once, fail_loads

    def launch(self) -> tuple[str, FakeActor]:
        actor = FakeActor(len(self.actors))
        if self.fail_loads:
            self.fail_loads -= 1
            actor.alive = False
        if self.load_at_once:
            actor.loaded.set()
        self.actors.append(actor)
        return f"warm-{actor.n}", actor

    async def wait_loaded(self, actor: FakeActor) -> None:
        await actor.loaded.wait()
        if actor.hangs:
            await asyncio.sleep(3600)
        if not actor.alive:
            raise RuntimeError(f"actor {actor.n} died")

    def kill(self, actor: FakeActor) -> None:
        actor.alive, actor.killed = False, True


def make_pool(fakes: Fakes, size: int = 2, **kwargs) -> WarmPool[FakeActor]:
    return WarmPool(size, fakes.launch, fakes.wait_loaded, fakes.kill, ping_timeout_s=0.2, **kwargs)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_fill_starts_up_to_the_size_and_never_more_than_the_free_places():
    async def run():
        fakes = Fakes()
        pool = make_pool(fakes, size=2)
        pool.fill(free=8)
        pool.fill(free=8)
        assert len(fakes.actors) == 2 and len(pool.entries) == 2
        pool.fill(free=1)  # the cap is near: the newest goes, no GPU slice is held for a session that cannot open
        assert len(pool.entries) == 1 and fakes.actors[1].killed and not fakes.actors[0].killed
        pool.fill(free=0)
        assert pool.entries == [] and fakes.actors[0].killed
        make_pool(fakes, size=0).fill(free=8)
        assert len(fakes.actors) == 2, "size 0 starts nothing"

    asyncio.run(run())


def test_take_hands_out_a_loaded_actor_and_the_caller_refills():
    async def run():
        fakes = Fakes()
        pool = make_pool(fakes, size=1)
        pool.fill(free=4)
        await settle()
        assert pool.ready() == 1
        taken = await pool.take()
        assert taken is not None and taken.handle is fakes.actors[0] and not taken.handle.killed
        assert pool.entries == [] and await pool.take() is None
        pool.fill(free=3)
        assert len(fakes.actors) == 2 and pool.entries[0].handle is fakes.actors[1]

    asyncio.run(run())


def test_a_dead_pooled_actor_is_never_handed_out():
    async def run():
        fakes = Fakes()
        pool = make_pool(fakes, size=2)
        pool.fill(free=4)
        await settle()
        fakes.actors[0].alive = False  # killed behind the pool's back
        taken = await pool.take()
        assert taken.handle is fakes.actors[1], "the live one"
        assert fakes.actors[0].killed and pool.replaced == 1 and pool.entries == []
        fakes.actors[1].alive = False
        pool.fill(free=4)
        await settle()
        fakes.actors[2].hangs = True  # alive but not answering: not handed out either
        taken = await pool.take()
        assert taken.handle is fakes.actors[3] and fakes.actors[2].killed

    asyncio.run(run())


def test_check_replaces_dead_actors_in_the_background():
    async def run():
        fakes = Fakes()
        pool = make_pool(fakes, size=2)
        pool.fill(free=4)
        await settle()
        fakes.actors[1].alive = False
        assert await pool.check() == 1
        assert [e.handle for e in pool.entries] == [fakes.actors[0]]
        pool.fill(free=4)
        assert len(pool.entries) == 2 and pool.entries[1].handle is fakes.actors[2]

    asyncio.run(run())


def test_take_waits_for_the_actor_loading_longest_rather_than_none():
    async def run():
        fakes = Fakes(load_at_once=False)
        pool = make_pool(fakes, size=2)
        pool.fill(free=4)
        taking = asyncio.ensure_future(pool.take())
        await settle()
        assert not taking.done()
        fakes.actors[1].loaded.set()  # the second finishes first, but the first was taken: it started earlier
        fakes.actors[0].loaded.set()
        assert (await taking).handle is fakes.actors[0]

    asyncio.run(run())


def test_a_cancelled_take_kills_the_actor_it_held():
    async def run():
        fakes = Fakes(load_at_once=False)
        pool = make_pool(fakes, size=1)
        pool.fill(free=4)
        taking = asyncio.ensure_future(pool.take())
        await settle()
        taking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taking
        assert fakes.actors[0].killed and pool.entries == []

    asyncio.run(run())


def test_failed_starts_back_off():
    async def run():
        now = [0.0]
        fakes = Fakes(fail_loads=2)
        pool = make_pool(fakes, size=1, clock=lambda: now[0])
        pool.fill(free=4)
        await settle()
        assert await pool.check() == 1 and pool.failed == 1
        pool.fill(free=4)
        assert len(fakes.actors) == 1, "no new start inside the back-off"
        now[0] = 1.5
        pool.fill(free=4)
        await settle()
        assert len(fakes.actors) == 2 and await pool.check() == 1
        now[0] = 2.0
        pool.fill(free=4)
        assert len(fakes.actors) == 2, "the second failure doubles the wait"
        now[0] = 4.0
        pool.fill(free=4)
        await settle()
        assert len(fakes.actors) == 3 and pool.ready() == 1

    asyncio.run(run())


def test_give_back_prefers_a_loaded_actor_to_one_still_loading():
    async def run():
        fakes = Fakes(load_at_once=False)
        pool = make_pool(fakes, size=1)
        pool.fill(free=4)
        _, returned = Fakes().launch()
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        assert pool.give_back(Warm("back", returned, done), free=4)
        assert [e.name for e in pool.entries] == ["back"] and fakes.actors[0].killed
        assert not pool.give_back(Warm("again", FakeActor(9), done), free=4), "full of loaded actors"
        assert not pool.give_back(Warm("again", FakeActor(9), done), free=0)

    asyncio.run(run())


def test_close_kills_everything_and_starts_nothing_after():
    async def run():
        fakes = Fakes(load_at_once=False)
        pool = make_pool(fakes, size=2)
        pool.fill(free=4)
        pool.close()
        assert all(a.killed for a in fakes.actors) and pool.entries == []
        pool.fill(free=4)
        assert len(fakes.actors) == 2 and await pool.take() is None

    asyncio.run(run())
