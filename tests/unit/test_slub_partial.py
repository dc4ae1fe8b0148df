"""SLUB keeps min_partial partial slabs (emulator/mm/slub.py).

A slab on the node's partial list that a free empties (__slab_free), or a
CPU's slab that is empty when the CPU lets it go (deactivate_slab), is given
back to the page allocator only while the node has more than ``min_partial``
partial slabs; otherwise it stays, empty, for the next allocation. Mutation
testing found nothing guarding this (docs/TESTING.md): the tests kill
SlabAllocatorSLUB.__slab_free 22-24 and deactivate_slab 9-12 (an empty slab
discarded while objects remain in it, kept when it should go, or discarded at
min_partial instead of above it).
"""

from __future__ import annotations

import pytest
from slab_helpers import make_kernel

from emulator.flags import GFP_KERNEL


def flush_cpus(sl, s, *cpus: int) -> None:
    """flush_all() for the given CPUs only: their slab and partial slabs to the node."""
    for cpu in cpus:
        c = s.cpu_slab[cpu]
        if c.page is not None:
            sl.flush_slab(s, c)
        sl.unfreeze_partials(s, c)


async def node_partial_slabs(k, s, nr_slabs: int):
    """``nr_slabs`` slabs on the node's partial list, each with one free object;
    returns them with their allocated objects."""
    sl = k.slab
    alloc_task, free_task = k.new_task("alloc", cpu=0), k.new_task("free", cpu=1)
    objs = [await sl.kmem_cache_alloc(s, GFP_KERNEL, alloc_task) for _ in range(nr_slabs * s.oo[1])]
    flush_cpus(sl, s, 0)  # the last slab leaves CPU 0: every slab is full and on no list
    by_slab: dict = {}
    for obj in objs:
        by_slab.setdefault(obj.slab, []).append(obj)
    assert len(by_slab) == nr_slabs
    for slab_objs in by_slab.values():
        sl.kmem_cache_free(s, slab_objs.pop(), free_task)  # frozen onto CPU 1's partial list
    flush_cpus(sl, s, 1)  # ... and unfrozen onto the node's
    assert list(s.node.partial) and set(s.node.partial) == set(by_slab)
    sl._check_cache(s)
    return by_slab, free_task


@pytest.mark.parametrize("extra, discarded", [(0, False), (1, True)])
async def test_an_emptied_partial_slab_is_freed_only_above_min_partial(extra, discarded):
    k = make_kernel("slub", slub_nomerge=True)
    sl = k.slab
    s = sl.kmem_cache_create("partial-test", 1024)
    by_slab, free_task = await node_partial_slabs(k, s, s.min_partial + extra)
    victim, rest = next(iter(by_slab.items()))
    nr_partial = len(s.node.partial)
    for obj in rest[:-1]:
        sl.kmem_cache_free(s, obj, free_task)
        assert victim in s.node.partial and victim in s.node.slabs  # not empty yet: kept
    sl.kmem_cache_free(s, rest[-1], free_task)
    assert victim.inuse == 0
    assert (victim not in s.node.slabs) is discarded
    assert len(s.node.partial) == nr_partial - discarded
    sl._check_cache(s)


@pytest.mark.parametrize("extra, discarded", [(0, False), (1, True)])
async def test_an_empty_cpu_slab_is_freed_only_above_min_partial(extra, discarded):
    k = make_kernel("slub", slub_nomerge=True, cpus=3)
    sl = k.slab
    s = sl.kmem_cache_create("partial-test", 1024)
    task = k.new_task("cpu2", cpu=2)
    obj = await sl.kmem_cache_alloc(s, GFP_KERNEL, task)  # CPU 2's slab, before any partial
    cpu_slab = s.cpu_slab[2].page
    await node_partial_slabs(k, s, s.min_partial + extra)
    sl.kmem_cache_free(s, obj, task)  # onto CPU 2's freelist: the slab is empty
    nr_partial = len(s.node.partial)
    flush_cpus(sl, s, 2)  # deactivate_slab
    assert (cpu_slab not in s.node.slabs) is discarded
    assert len(s.node.partial) == nr_partial + (not discarded)
    sl._check_cache(s)
