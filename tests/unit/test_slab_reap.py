"""SLAB gives memory back: how much, how soon, from which end (emulator/mm/slab.py,
mm/slab.c of 3.5).

cache_reap runs every REAPTIMEOUT_CPUC (2 s) on every CPU. Each time it
drains that CPU's array cache; every REAPTIMEOUT_LIST3 (4 s) per cache it
also drains the shared array and destroys free slabs, unless an allocation
took from the free slabs since the last time (free_touched). An untouched
array gives back (limit + 4) / 5 objects, the oldest first, or half of what
it holds (rounded up) if it holds fewer; a touched one only loses its mark.
The free-slab reap destroys (free_limit + 5·num - 1) / (5·num) slabs, from
the tail of slabs_free (drain_freelist). free_block puts a slab a free
empties at the head of slabs_free, or destroys it when the node would hold
more than free_limit free objects, and a slab it leaves partial at the tail
of slabs_partial. A free into a full CPU array first moves its oldest
batchcount objects to the shared array, as many as it has room for, or with
no room back to their slabs (cache_flusharray).

Mutation testing found the amounts and the pace unguarded (docs/TESTING.md:
the conservation tests only check that reaping frees the right objects and
eventually everything). The bugs these tests catch: another fraction of the
limit, a different rounding of the fallback, a touched array drained or its
mark kept, the newest objects freed instead of the oldest, the node lists
reaped on every call or never, next_reap not moved on, free_touched ignored
or not cleared, another number of free slabs destroyed, or from the other
end; free_limit's boundary; a slab put at the other end of its list; a
flush that overfills the shared array or moves the newest objects.
"""

from __future__ import annotations

import pytest
from slab_helpers import ALL, make_kernel, objects_by_slab

from emulator.flags import GFP_KERNEL
from emulator.mm.slab import REAPTIMEOUT_LIST3


async def slab_cache(nr_objs: int, *, free: bool, size: int = 2048, cpus: int = 2):
    """A SLAB kernel and kmalloc-``size`` (2048: 2 per slab, limit 24, batch 12,
    free_limit (1 + cpus) * 12 + 2), with ``nr_objs`` objects allocated on CPU 0
    and, with ``free``, freed again there (the array, the shared array, then
    slabs)."""
    k = make_kernel("slab", ALL, cpus=cpus, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[size]
    if size == 2048:
        assert (cache.num, cache.limit) == (2, 24)
        assert cache.nodelist.free_limit == (1 + cpus) * 12 + 2
    task = k.new_task("a", cpu=0)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, task) for _ in range(nr_objs)]
    if free:
        for obj in objs:
            s.kmem_cache_free(cache, obj, task)
    s.check()
    return k, s, cache, objs


async def touched_array():
    """kmalloc-2048 with CPU 0's array cache touched (allocated from) and holding the
    objects of 18 frees; returns the kernel, the allocator, the cache and the array."""
    k, s, cache, objs = await slab_cache(30, free=False)
    task = k.new_task("b", cpu=0)
    for obj in objs[:18]:
        s.kmem_cache_free(cache, obj, task)
    return k, s, cache, cache.array[0]


@pytest.mark.parametrize("size, limit, fifth", [(2048, 24, 5), (64, 120, 24)])
async def test_an_untouched_array_gives_back_a_fifth_of_its_limit_oldest_first(size, limit, fifth):
    """(limit + 4) / 5 rounds up: 5 of 24, and 24 (not 25) of 120."""
    k, s, cache, objs = await slab_cache(200, free=False, size=size)
    for obj in objs[:150]:
        s.kmem_cache_free(cache, obj, k.new_task("b", cpu=0))
    ac = cache.array[0]
    assert ac.limit == limit and ac.touched and ac.avail > fifth
    before = list(ac.entry)
    s.drain_array(cache, ac, False)  # touched: only the mark goes
    assert not ac.touched and ac.entry == before
    while ac.entry:
        before, free0 = list(ac.entry), cache.nodelist.free_objects
        tofree = fifth if len(before) >= fifth else (len(before) + 1) // 2
        s.drain_array(cache, ac, False)
        assert ac.entry == before[tofree:]
        assert all(not o.allocated and o.slab.inuse < cache.num for o in before[:tofree])
        # Back in their slabs (those past free_limit free objects are destroyed).
        assert cache.nodelist.free_objects <= free0 + tofree
        s.check()


async def test_a_forced_drain_empties_the_array_touched_or_not():
    k, s, cache, ac = await touched_array()
    assert ac.touched and ac.entry
    s.drain_array(cache, ac, True)
    assert not ac.entry
    s.check()


async def test_the_cpu_array_is_drained_on_every_call():
    k, s, cache, ac = await touched_array()
    nr = ac.avail
    s.cache_reap(0, 100.0)  # starts the node's clock; the array only loses its mark
    assert not ac.touched and ac.avail == nr
    next_reap = cache.nodelist.next_reap
    s.cache_reap(0, 101.0)
    s.cache_reap(0, 102.0)
    assert ac.avail == nr - 10 and cache.nodelist.next_reap == next_reap
    s.check()


@pytest.mark.parametrize("size, cpus, per_reap", [(2048, 2, 4), (2048, 3, 5), (4096, 4, 13)])
async def test_the_free_slabs_are_reaped_every_4_seconds_unless_touched(size, cpus, per_reap):
    """(free_limit + 5·num - 1) / (5·num) rounds up: 4 slabs for free_limit 38, 5 (not
    6) for 50 (kmalloc-2048, 2 per slab), and 13 (not 12) for 61 (kmalloc-4096, one per
    slab, 4 CPUs)."""
    k, s, cache, _ = await slab_cache(200, free=True, size=size, cpus=cpus)
    l3 = cache.nodelist
    s.drain_array(cache, l3.shared, True)  # so that only the free slabs change
    nr_free = len(l3.slabs_free)
    assert nr_free >= 10 and l3.free_touched  # the allocations took free slabs
    every = k.hz(REAPTIMEOUT_LIST3)
    # CPU 1's array is empty: each call does only what is due on the node.
    destroyed = []
    for t in range(100, 114, 2):
        before = len(l3.slabs_free)
        s.cache_reap(1, float(t))
        destroyed.append(before - len(l3.slabs_free))
    # 100 starts the clock; 104 only clears free_touched; 108 and 112 destroy.
    assert destroyed == [0, 0, 0, 0, per_reap, 0, per_reap]
    assert l3.next_reap == 112.0 + every and not l3.free_touched
    s.check()


async def test_the_shared_array_is_drained_when_the_node_is_due():
    k, s, cache, _ = await slab_cache(200, free=True)
    shared = cache.nodelist.shared
    before = list(shared.entry)
    assert before and not shared.touched
    s.cache_reap(1, 100.0)
    s.cache_reap(1, 102.0)
    assert shared.entry == before
    s.cache_reap(1, 100.0 + k.hz(REAPTIMEOUT_LIST3))
    tofree = (shared.limit + 4) // 5
    if tofree > len(before):
        tofree = (len(before) + 1) // 2
    assert shared.entry == before[tofree:]
    s.check()


async def test_an_allocation_from_the_free_slabs_spares_them_one_reap():
    k, s, cache, _ = await slab_cache(200, free=True)
    l3 = cache.nodelist
    every = k.hz(REAPTIMEOUT_LIST3)
    s.drain_array(cache, l3.shared, True)
    s.cache_reap(1, 0.0)
    s.cache_reap(1, every)  # clears free_touched
    assert not l3.free_touched
    nr_free = len(l3.slabs_free)
    # CPU 1's array and the shared array are empty: an allocation on CPU 1
    # refills from the slabs (batchcount 12: more than the partial slabs hold).
    obj = await s.kmem_cache_alloc(cache, GFP_KERNEL, k.new_task("c", cpu=1))
    assert l3.free_touched and len(l3.slabs_free) < nr_free
    s.drain_array(cache, cache.array[1], True)  # the rest of the refill, back
    spared = len(l3.slabs_free)
    s.cache_reap(1, 2 * every)
    assert not l3.free_touched and len(l3.slabs_free) == spared
    s.cache_reap(1, 3 * every)
    assert len(l3.slabs_free) == spared - 4
    s.kfree(obj, k.new_task("d", cpu=1))
    s.check()


async def slabs_full_and_free_now(nr_slabs: int):
    """kmalloc-2048 with ``nr_slabs`` full slabs and nothing cached, and ``free_now``:
    objects freed straight to their slabs (free_block), in the order given."""
    assert nr_slabs % 6 == 0  # whole refills of batchcount 12: the array ends empty
    k, s, cache, objs = await slab_cache(2 * nr_slabs, free=False)
    ac, task = cache.array[0], k.new_task("b", cpu=0)
    assert not ac.entry and not cache.nodelist.slabs_partial

    def free_now(objs: list) -> None:
        for obj in objs:
            s.kmem_cache_free(cache, obj, task)
        s.drain_array(cache, ac, True)  # free_block(ac.entry), oldest first

    return s, cache, list(objects_by_slab(objs).values()), free_now


async def test_free_block_puts_an_emptied_slab_at_the_head_of_slabs_free():
    """A slab a free leaves partial goes to the tail of slabs_partial, one it empties
    to the head of slabs_free; drain_freelist destroys from the tail."""
    s, cache, slabs, free_now = await slabs_full_and_free_now(24)
    l3 = cache.nodelist
    (a0, a1), (b0, b1), (c0, c1) = slabs[:3]
    a, b, c = a0.slab, b0.slab, c0.slab
    free_now([a0])
    free_now([b0])
    assert list(l3.slabs_partial) == [a, b]
    free_now([a1])
    assert list(l3.slabs_free) == [a] and list(l3.slabs_partial) == [b]
    free_now([c0, c1])
    free_now([b1])
    assert list(l3.slabs_free) == [b, c, a] and not l3.slabs_partial
    assert s.drain_freelist(cache, 2) == 2
    assert list(l3.slabs_free) == [b] and a.list is None and c.list is None
    assert s.drain_freelist(cache, 5) == 1 and not l3.slabs_free
    s.check()


async def test_free_block_keeps_free_slabs_up_to_free_limit_objects():
    """free_limit 38: the 19th slab emptied leaves exactly 38 free objects and is kept;
    the 20th would make 40 and is destroyed at once."""
    s, cache, slabs, free_now = await slabs_full_and_free_now(24)
    l3 = cache.nodelist
    for i, pair in enumerate(slabs[:19], start=1):
        free_now(pair)
        assert len(l3.slabs_free) == i and l3.free_objects == 2 * i
    free_now(slabs[19])
    assert len(l3.slabs_free) == 19 and l3.free_objects == 38
    assert slabs[19][0].slab.list is None  # destroyed
    s.check()


async def test_a_full_array_flushes_its_oldest_batch_to_the_shared_array_while_it_has_room():
    """cache_flusharray: a free into a full CPU array (24) first moves the oldest
    batchcount (12) objects to the end of the shared array, or as many as it has
    room for; with no room, back to their slabs (free_block)."""
    k, s, cache, objs = await slab_cache(200, free=False)
    ac, shared = cache.array[0], cache.nodelist.shared
    s.drain_array(cache, ac, True)
    assert not shared.entry and shared.limit == 96 and ac.limit == 24
    task = k.new_task("b", cpu=0)
    moved = []

    def free_one(obj) -> None:
        old_ac, old_shared = list(ac.entry), list(shared.entry)
        s.kmem_cache_free(cache, obj, task)
        n = len(shared.entry) - len(old_shared)
        assert shared.entry[:len(old_shared)] == old_shared
        if len(old_ac) < ac.limit:
            assert n == 0 and ac.entry == [*old_ac, obj]
            return
        assert n == min(12, shared.limit - len(old_shared))
        gone = 12 if n == 0 else n
        assert shared.entry[len(old_shared):] == old_ac[:n]
        assert ac.entry == [*old_ac[gone:], obj]
        moved.append(n)
        if n == 0:  # back in their slabs
            assert all(o.slab.inuse < cache.num for o in old_ac[:12])

    live = iter(objs)
    while len(shared.entry) < shared.limit:
        free_one(next(live))
    assert moved == [12] * 8
    s.drain_array(cache, shared, False)  # untouched: (96 + 4) / 5 = 20 of them
    assert len(shared.entry) == 76
    for obj in live:
        free_one(obj)
        if len(moved) == 12:
            break
    assert moved == [12] * 8 + [12, 8, 0, 0]
    s.check()
