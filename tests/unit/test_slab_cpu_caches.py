"""Both allocators' per-CPU caches (emulator/mm/slab.py and slub.py, mm/slab.c and
mm/slub.c of 3.5): which CPU's cache a free lands in, and in which order a
fresh slab hands out its objects.

A free goes to the cache of the CPU the freeing task runs on: SLAB's array
(__cache_free), SLUB's per-CPU freelist when the object belongs to that CPU's
slab (slab_free). The model's ``task=None``, a free from no task's context,
counts as CPU 0. A fresh slab's free objects are chained 0, 1, 2, ...
(SLAB's cache_init_objs, SLUB's new_slab). SLUB's allocations follow the
chain; SLAB's refill takes them in that order (slab_get_obj) and pushes each
onto the array, so the first allocation gets the last object pushed.

SLAB's refill (cache_alloc_refill) of an empty array: batchcount objects, at
most BATCHREFILL_LIMIT (16) while the array is untouched; first the newest
of the shared array, as many as it holds up to that batch (transfer_objects),
marking it touched; else from the slabs, partial ones first. Only an array
the refill could not fill goes to cache_grow. The refilled array is marked
touched, so the next reap spares it.

Mutation testing found these unguarded (docs/TESTING.md): the bugs these tests
catch are a free into another CPU's cache, a slab that hands out its
objects from the other end, a refill of another size (the limit of 16 for an
untouched array dropped, applied always, or one object short; the whole
shared array taken), a refill that never takes from the shared array or
ignores a shared array of one object, a cache grown although the slabs had
free objects, and an array or shared array left unmarked by a refill.
"""

from __future__ import annotations

import pytest
from slab_helpers import ALL, make_kernel

from emulator.flags import GFP_KERNEL
from emulator.mm.slab import BATCHREFILL_LIMIT, REAPTIMEOUT_LIST3


async def one_object(kind: str):
    """kmalloc-256 with one object allocated on CPU 0; SLAB's arrays then emptied, so
    only a free can put something there."""
    k = make_kernel(kind, ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]
    obj = await s.kmem_cache_alloc(cache, GFP_KERNEL, k.new_task("a", cpu=0))
    if kind == "slab":
        for ac in cache.array:
            ac.entry.clear()
    return k, s, cache, obj


@pytest.mark.parametrize(("cpu", "array"), [(0, 0), (1, 1), (None, 0)])
async def test_slab_a_free_goes_to_the_freeing_cpus_array(cpu, array):
    k, s, cache, obj = await one_object("slab")
    s.kmem_cache_free(cache, obj, None if cpu is None else k.new_task("f", cpu=cpu))
    assert [ac.entry for ac in cache.array] == [[obj] if i == array else []
                                                for i in range(len(cache.array))]
    assert not obj.allocated


@pytest.mark.parametrize(("cpu", "per_cpu"), [(0, True), (1, False), (None, True)])
async def test_slub_a_free_takes_the_fast_path_only_on_the_slabs_own_cpu(cpu, per_cpu):
    k, s, cache, obj = await one_object("slub")
    c0 = cache.cpu_slab[0]
    assert c0.page is obj.slab
    s.kmem_cache_free(cache, obj, None if cpu is None else k.new_task("f", cpu=cpu))
    assert (obj in c0.freelist) == per_cpu  # else __slab_free: the slab's own freelist
    assert (obj in obj.slab.freelist) != per_cpu
    s.check()


async def test_slab_a_refill_stacks_a_fresh_slabs_objects_in_index_order():
    k = make_kernel("slab", ALL, cpus=1, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]  # 15 objects per slab; a first refill takes them all
    first = await s.kmem_cache_alloc(cache, GFP_KERNEL, k.new_task("a", cpu=0))
    assert first.slab.inuse == cache.num == 15
    stacked = cache.array[0].entry
    assert [o.idx for o in stacked] == list(range(cache.num - 1))
    assert all(o.slab is first.slab for o in stacked)
    assert first.idx == cache.num - 1


async def test_slub_a_fresh_slab_hands_out_its_objects_in_index_order():
    k = make_kernel("slub", ALL, cpus=1, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]
    task = k.new_task("a", cpu=0)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, task) for _ in range(4)]
    assert [o.idx for o in objs] == [0, 1, 2, 3]
    assert all(o.slab is objs[0].slab for o in objs)


async def slab_with_free_objects(nr: int):
    """kmalloc-256 under SLAB (15 per slab, limit 120, batch 60) on 2 CPUs with ``nr``
    free objects on its slabs and nothing in any array: CPU 1 allocated and freed
    them, and its array and the shared array were drained."""
    k = make_kernel("slab", ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]
    assert (cache.num, cache.limit, cache.batchcount) == (15, 120, 60)
    t1 = k.new_task("b", cpu=1)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t1) for _ in range(nr)]
    for o in objs:
        s.kmem_cache_free(cache, o, t1)
    s.drain_array(cache, cache.array[1], True)
    s.drain_array(cache, cache.nodelist.shared, True)
    assert not any(ac.entry for ac in cache.array) and not cache.nodelist.shared.entry
    assert cache.nodelist.free_objects == nr
    return k, s, cache


def nr_slabs(cache) -> int:
    l3 = cache.nodelist
    return len(l3.slabs_full) + len(l3.slabs_partial) + len(l3.slabs_free)


async def test_slab_an_untouched_array_refills_16_a_touched_one_a_whole_batch():
    k, s, cache = await slab_with_free_objects(150)
    slabs = nr_slabs(cache)
    ac = cache.array[0]
    t0 = k.new_task("a", cpu=0)
    await s.kmem_cache_alloc(cache, GFP_KERNEL, t0)
    assert len(ac.entry) == BATCHREFILL_LIMIT - 1 and ac.touched
    s.cache_reap(0, 100.0)  # a touched array only loses its mark
    assert len(ac.entry) == BATCHREFILL_LIMIT - 1
    for _ in range(BATCHREFILL_LIMIT - 1):
        await s.kmem_cache_alloc(cache, GFP_KERNEL, t0)
    assert not ac.entry and ac.touched
    await s.kmem_cache_alloc(cache, GFP_KERNEL, t0)
    assert len(ac.entry) == cache.batchcount - 1
    assert nr_slabs(cache) == slabs  # all of it from the slabs: no cache_grow
    s.check()


async def test_slab_a_refill_takes_the_newest_of_the_shared_array_and_marks_it():
    k = make_kernel("slab", ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]
    t0 = k.new_task("a", cpu=0)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t0) for _ in range(150)]
    for o in objs:  # the 121st free flushes CPU 0's oldest 60 to the shared array
        s.kmem_cache_free(cache, o, t0)
    shared = cache.nodelist.shared
    before = list(shared.entry)
    assert len(before) == cache.batchcount and not shared.touched
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, k.new_task("b", cpu=1))
    assert cache.array[1].entry + [got] == before[-BATCHREFILL_LIMIT:]
    assert shared.entry == before[:-BATCHREFILL_LIMIT] and shared.touched
    s.cache_reap(1, 100.0)
    s.cache_reap(1, 100.0 + k.hz(REAPTIMEOUT_LIST3))  # due: the shared array only loses its mark
    assert shared.entry == before[:-BATCHREFILL_LIMIT] and not shared.touched
    s.check()


async def test_slab_a_refill_takes_a_shared_array_of_one_object():
    k = make_kernel("slab", ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]
    t0 = k.new_task("a", cpu=0)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t0) for _ in range(150)]
    for o in objs:
        s.kmem_cache_free(cache, o, t0)
    shared = cache.nodelist.shared
    while len(shared.entry) > 1:  # 60 -> 30 -> 15 -> 7 -> 3 -> 1: half, rounded up, each time
        s.drain_array(cache, shared, False)
    last = shared.entry[0]
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, k.new_task("b", cpu=1))
    assert got is last and not shared.entry and not cache.array[1].entry
    s.check()


async def test_slab_a_refill_leaves_the_slab_it_took_from_at_the_head_of_slabs_partial():
    k = make_kernel("slab", ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[64]
    l3 = cache.nodelist
    t1 = k.new_task("b", cpu=1)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t1) for _ in range(3 * cache.num)]
    for o in objs[::2]:
        s.kmem_cache_free(cache, o, t1)
    s.drain_array(cache, cache.array[1], True)
    s.drain_array(cache, l3.shared, True)
    partial = list(l3.slabs_partial)
    assert len(partial) >= 2 and all(len(p.free) > BATCHREFILL_LIMIT for p in partial)
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, k.new_task("a", cpu=0))
    assert got.slab is partial[0]  # the head, still partial: list_add puts it back first
    assert list(l3.slabs_partial) == partial
    s.check()


async def test_slub_a_cpu_slab_that_ran_out_takes_back_its_remote_frees_first():
    """__slab_alloc's redo: the cpu slab matches the caller (an ordinary slab, an
    ordinary caller), so its own freelist, which another CPU freed objects to, is
    loaded (get_freelist) before a partial or new slab is looked for. Catches the
    cpu slab deactivated on every slow path (the pfmemalloc test's `and` -> `or`)."""
    k = make_kernel("slub", ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]
    t0 = k.new_task("a", cpu=0)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t0) for _ in range(16)]
    c0 = cache.cpu_slab[0]
    assert all(o.slab is c0.page for o in objs) and not c0.freelist
    s.kmem_cache_free(cache, objs[3], k.new_task("b", cpu=1))  # onto the slab's freelist
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, t0)
    assert got is objs[3] and c0.page is objs[0].slab
    assert k.vmstat["slab_pfmemalloc_refused"] == 0
    s.check()
