"""mempool_alloc / mempool_free as mm/mempool.c 3.6."""

from __future__ import annotations

import trio
from slab_helpers import hold_below_min, make_kernel, release

from emulator.flags import GFP, GFP_ATOMIC, GFP_NOIO
from emulator.mm.mempool import Mempool, mempool_alloc, mempool_free


class Backing:
    """A backing allocator that records the masks it is called with and can fail."""

    def __init__(self) -> None:
        self.fail = False
        self.masks: list[int] = []
        self.freed: list = []
        self.n = 0

    async def alloc(self, gfp, task):
        self.masks.append(int(gfp))
        if self.fail:
            return None
        self.n += 1
        return f"elem{self.n}"

    def free(self, elem, task) -> None:
        self.freed.append(elem)


async def test_mempool_masks_and_pool_fallback():
    k = make_kernel("slub", memory_mib=16)
    t = k.new_task()
    b = Backing()
    pool = await Mempool.create(k, "test", 2, b.alloc, b.free, t)
    assert pool.curr_nr == 2
    b.masks.clear()
    e = await mempool_alloc(pool, GFP_NOIO, t)
    assert e == "elem3"
    # First attempt: +NOMEMALLOC|NORETRY|NOWARN, without __GFP_WAIT and __GFP_IO.
    m = b.masks[0]
    assert m & GFP.NOMEMALLOC and m & GFP.NORETRY and m & GFP.NOWARN
    assert not m & GFP.WAIT and not m & GFP.IO
    b.fail = True
    b.masks.clear()
    e1 = await mempool_alloc(pool, GFP_NOIO, t)
    e2 = await mempool_alloc(pool, GFP_NOIO, t)
    assert {e1, e2} == {"elem1", "elem2"} and pool.curr_nr == 0
    # Pool empty, atomic caller: GFP_ATOMIC has no WAIT/IO to strip, so gfp_temp is
    # already the full mask: one attempt, then NULL.
    b.masks.clear()
    assert await mempool_alloc(pool, GFP_ATOMIC, t) is None
    assert len(b.masks) == 1
    assert b.masks[0] & GFP.HIGH and b.masks[0] & GFP.NOMEMALLOC
    # mempool_free refills below min_nr, then frees to the backing allocator.
    mempool_free(pool, e1, t)
    mempool_free(pool, e2, t)
    mempool_free(pool, e, t)
    assert pool.curr_nr == 2 and b.freed == ["elem3"]
    st = pool.statistics()
    assert st.alloc_pool == 2 and st.alloc_fail == 1 and st.free_to_pool == 2


async def test_mempool_waiter_sleeps_until_an_element_returns():
    k = make_kernel("slub", memory_mib=16)
    t = k.new_task("writer", cpu=0)
    t2 = k.new_task("completion", cpu=1)
    b = Backing()
    pool = await Mempool.create(k, "test", 1, b.alloc, b.free, t)
    b.fail = True
    e = await mempool_alloc(pool, GFP_NOIO, t)
    got = []

    async def waiter():
        got.append(await mempool_alloc(pool, GFP_NOIO, t))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.05)
        # Pool empty, NOIO caller: the first round without WAIT/IO, one immediate retry
        # with the full mask, then sleep on the pool's wait queue.
        assert [bool(m & GFP.WAIT) for m in b.masks[-2:]] == [False, True]
        assert not got and t.wchan == "mempool_alloc" and len(pool.wait) == 1
        assert k.vmstat["mempool_wait"] == 1
        mempool_free(pool, e, t2)
    assert got == [e]


async def test_mempool_wait_times_out_after_5_hz_and_retries():
    k = make_kernel("slub", memory_mib=16)
    k.hz_scale = 0.01  # 5*HZ -> 50 ms
    t = k.new_task()
    b = Backing()
    pool = Mempool(k, "empty", 0, b.alloc, b.free)
    b.fail = True

    async def unfail():
        await trio.sleep(0.12)
        b.fail = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unfail)
        start = trio.current_time()
        e = await mempool_alloc(pool, GFP_NOIO, t)
        elapsed = trio.current_time() - start
    assert e is not None and 0.1 <= elapsed < 1.0
    assert k.vmstat["mempool_wait"] >= 2


async def test_slab_pool_serves_when_memory_is_exhausted():
    for kind in ("slab", "slub"):
        k = make_kernel(kind, memory_mib=64)
        t = k.new_task()
        pool = Mempool.create_slab_pool(k, k.slab.bio_cache, 2, name="fs_bio_set")
        await pool.fill(t)
        # Drain the cache's cached objects so the backing allocator must grow.
        held = await hold_below_min(k, t)
        k.slab.shrink_all()
        held += await hold_below_min(k, t)
        got = []
        for _ in range(200):
            e = await mempool_alloc(pool, GFP_ATOMIC, t)
            if e is None:
                break
            got.append(e)
        assert got, "the reserved elements must be handed out"
        assert pool.curr_nr == 0
        for e in got:
            mempool_free(pool, e, t)
        assert pool.curr_nr == 2
        k.slab.check()
        release(k, held)
