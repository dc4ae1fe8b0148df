"""The allocators' consistency check (``SlabAllocator.check()``, which most slab tests
call after every step) catches the corruptions it exists for.

SLUB: a slab may be one CPU's slab or on one CPU's partial list, never two of
these, and a discarded slab is no CPU's slab.

A check that accepts a broken state would let every test that relies on it pass
over a bug. Each case here breaks one invariant of an otherwise consistent
cache and expects check() to fail. Mutation testing found the list rules
unguarded (docs/TESTING.md): the bugs these tests catch are an empty or a full
slab accepted on SLAB's slabs_partial, and SLUB's slab shared by two CPUs, on
a CPU's partial list while another's slab, or discarded while a CPU's slab
(no other rule notices any of them). An
object twice in the arrays is caught by two rules (the count of cached
objects, or, when another object is lost to balance it, the lost-object
rule), so the explicit duplicate rule is not needed to catch it.
"""

from __future__ import annotations

import pytest
from slab_helpers import ALL, make_kernel

from emulator.flags import GFP_KERNEL


async def slab_cache_with_every_kind_of_slab():
    """kmalloc-256 under SLAB (15 per slab) with full, partial and free slabs and
    objects in CPU 0's array; consistent."""
    k = make_kernel("slab", ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]
    t = k.new_task("a", cpu=0)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t) for _ in range(60)]
    for o in objs[45:]:  # the fourth slab's objects, back to it
        s.kmem_cache_free(cache, o, t)
    s.drain_array(cache, cache.array[0], True)
    for o in objs[30:38]:  # the third slab half free, via the array
        s.kmem_cache_free(cache, o, t)
    s.drain_array(cache, cache.array[0], True)
    s.kmem_cache_free(cache, objs[0], t)  # one object cached in the array
    l3 = cache.nodelist
    assert l3.slabs_full and l3.slabs_partial and l3.slabs_free and cache.array[0].entry
    s.check()
    return s, cache


def move_slab(l3, slabp, to) -> None:
    """Put a slab on another list, its list pointer kept consistent."""
    del slabp.list[slabp]
    to[slabp] = None
    slabp.list = to


@pytest.mark.parametrize("corruption", ["free slab on partial", "full slab on partial",
                                        "object twice, another lost"])
async def test_slab_check_catches(corruption):
    s, cache = await slab_cache_with_every_kind_of_slab()
    l3 = cache.nodelist
    if corruption == "free slab on partial":
        move_slab(l3, next(iter(l3.slabs_free)), l3.slabs_partial)
    elif corruption == "full slab on partial":
        move_slab(l3, next(iter(l3.slabs_full)), l3.slabs_partial)
    else:
        ac = cache.array[0]
        lost = next(iter(l3.slabs_partial)).free.pop()  # no longer free on its slab ...
        lost.slab.inuse += 1
        l3.free_objects -= 1
        ac.entry.append(ac.entry[0])  # ... and in its place, in the count, a duplicate
        assert lost not in ac.entry
    with pytest.raises(AssertionError):
        s.check()


async def slub_cache_with_cpu_slabs():
    """kmalloc-256 under SLUB with a cpu slab on CPU 0 and one on CPU 1's partial list;
    consistent."""
    k = make_kernel("slub", ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]
    t0, t1 = k.new_task("a", cpu=0), k.new_task("b", cpu=1)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t0) for _ in range(20)]
    s.kmem_cache_free(cache, objs[0], t1)  # the full first slab: onto CPU 1's partial list
    c0, c1 = cache.cpu_slab
    assert c0.page is objs[-1].slab and c1.partial == [objs[0].slab] and c1.page is None
    s.check()
    return s, cache


@pytest.mark.parametrize("corruption", ["one cpu slab, two CPUs", "cpu slab and cpu partial",
                                        "discarded cpu slab"])
async def test_slub_check_catches(corruption):
    s, cache = await slub_cache_with_cpu_slabs()
    c0, c1 = cache.cpu_slab
    if corruption == "one cpu slab, two CPUs":
        c1.page = c0.page
    elif corruption == "cpu slab and cpu partial":
        c1.partial.append(c0.page)
    else:
        c0.page.dead = True
    with pytest.raises(AssertionError):
        s.check()
