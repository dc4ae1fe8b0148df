"""SLUB's partial-list policy (emulator/mm/slub.py, mm/slub.c of 3.6).

- min_partial: a slab on the node's partial list that a free empties
  (__slab_free), a CPU's slab that is empty when the CPU lets it go
  (deactivate_slab), or a per-CPU partial slab emptied while frozen
  (unfreeze_partials) is given back to the page allocator only while the
  node has more than ``min_partial`` partial slabs; otherwise it stays,
  empty, for the next allocation.
- Where a deactivated slab goes: the head of the node's list, or the tail
  when other CPUs freed into it while it was this CPU's (DEACTIVATE_TO_TAIL).
- put_cpu_partial's drain: a full slab's first free freezes it onto the
  freeing CPU's partial list; when that list already holds more than
  ``cpu_partial`` free objects, it is moved to the node first.
- get_partial_node: a CPU with no slab takes the node's first partial slab as
  its cpu slab and the next ones onto its partial list, until that list holds
  more than ``cpu_partial / 2`` free objects (the cpu slab's count as 0).

Mutation testing found nothing guarding these (docs/TESTING.md): the bugs
these tests catch are an empty slab discarded while objects remain in it,
kept when it should go, or discarded at min_partial instead of above it
(__slab_free, deactivate_slab, unfreeze_partials); a deactivated slab put
at the wrong end; the per-CPU list drained at cpu_partial objects instead of
above, never, or without emptying it; get_partial_node taking one slab, one
slab too few, or stopping without handing over the first.
"""

from __future__ import annotations

import pytest
import trio
from slab_helpers import make_kernel, objects_by_slab

from emulator.flags import GFP_KERNEL


def flush_cpus(sl, s, *cpus: int) -> None:
    """flush_all() for the given CPUs only: their slab and partial slabs to the node."""
    for cpu in cpus:
        c = s.cpu_slab[cpu]
        if c.page is not None:
            sl.flush_slab(s, c)
        sl.unfreeze_partials(s, c)


def partial_test_cache(cpus: int = 2):
    """A SLUB kernel (no merging) and a cache of 1024-byte objects."""
    k = make_kernel("slub", slub_nomerge=True, cpus=cpus)
    return k, k.slab, k.slab.kmem_cache_create("partial-test", 1024)


async def node_partial_slabs(k, s, nr_slabs: int):
    """``nr_slabs`` slabs on the node's partial list, each with one free object;
    returns them with their allocated objects."""
    sl = k.slab
    alloc_task, free_task = k.new_task("alloc", cpu=0), k.new_task("free", cpu=1)
    objs = [await sl.kmem_cache_alloc(s, GFP_KERNEL, alloc_task) for _ in range(nr_slabs * s.oo[1])]
    flush_cpus(sl, s, 0)  # the last slab leaves CPU 0: every slab is full and on no list
    by_slab = objects_by_slab(objs)
    assert len(by_slab) == nr_slabs
    for slab_objs in by_slab.values():
        sl.kmem_cache_free(s, slab_objs.pop(), free_task)  # frozen onto CPU 1's partial list
    flush_cpus(sl, s, 1)  # ... and unfrozen onto the node's
    assert list(s.node.partial) and set(s.node.partial) == set(by_slab)
    sl._check_cache(s)
    return by_slab, free_task


@pytest.mark.parametrize("extra, discarded", [(0, False), (1, True)])
async def test_an_emptied_partial_slab_is_freed_only_above_min_partial(extra, discarded):
    k, sl, s = partial_test_cache()
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
    k, sl, s = partial_test_cache(3)
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


@pytest.mark.parametrize("extra, discarded", [(0, False), (1, True)])
async def test_an_emptied_cpu_partial_slab_is_freed_only_above_min_partial(extra, discarded):
    k, sl, s = partial_test_cache(3)
    cpu2 = k.new_task("cpu2", cpu=2)
    objs = [await sl.kmem_cache_alloc(s, GFP_KERNEL, cpu2) for _ in range(s.oo[1])]
    victim = objs[0].slab
    flush_cpus(sl, s, 2)  # full, on no list
    by_slab, cpu1 = await node_partial_slabs(k, s, s.min_partial + extra)
    for obj in objs:  # the first free freezes it onto CPU 1's partial list
        sl.kmem_cache_free(s, obj, cpu1)
    assert s.cpu_slab[1].partial == [victim] and victim.frozen and victim.inuse == 0
    nr_partial = len(s.node.partial)
    flush_cpus(sl, s, 1)  # unfreeze_partials
    assert (victim not in s.node.slabs) is discarded
    assert len(s.node.partial) == nr_partial + (not discarded)
    sl._check_cache(s)


@pytest.mark.parametrize("remote_free, at_tail", [(False, False), (True, True)])
async def test_a_deactivated_slab_goes_to_the_tail_only_after_remote_frees(remote_free, at_tail):
    k, sl, s = partial_test_cache(3)
    cpu2 = k.new_task("cpu2", cpu=2)
    objs = [await sl.kmem_cache_alloc(s, GFP_KERNEL, cpu2) for _ in range(2)]
    slab = objs[0].slab
    await node_partial_slabs(k, s, 2)
    # Freed by CPU 2, the object goes to its per-CPU freelist; by CPU 0, to the
    # slab's own freelist (a remote free: the slab is frozen as CPU 2's).
    sl.kmem_cache_free(s, objs[1], k.new_task("cpu0", cpu=0) if remote_free else cpu2)
    assert bool(slab.freelist) is remote_free
    flush_cpus(sl, s, 2)  # deactivate_slab
    order = list(s.node.partial)
    assert len(order) == 3 and slab in order
    assert order.index(slab) == (2 if at_tail else 0)
    sl._check_cache(s)


async def test_the_cpu_partial_list_drains_when_it_holds_more_than_cpu_partial_objects():
    """One free into each of cpu_partial + 2 full slabs, on one CPU: each slab is
    frozen onto that CPU's partial list with one free object. The list grows to
    cpu_partial + 1 slabs (pushing onto cpu_partial objects does not drain); the
    next push finds more than cpu_partial and moves all of them to the node."""
    k, sl, s = partial_test_cache()
    assert s.cpu_partial == 6
    cpu0, cpu1 = k.new_task("alloc", cpu=0), k.new_task("free", cpu=1)
    nr = s.cpu_partial + 2
    objs = [await sl.kmem_cache_alloc(s, GFP_KERNEL, cpu0) for _ in range(nr * s.oo[1])]
    flush_cpus(sl, s, 0)
    slabs = list(dict.fromkeys(o.slab for o in objs))
    assert len(slabs) == nr and not s.node.partial
    c = s.cpu_slab[1]
    first = {slab: next(o for o in objs if o.slab is slab) for slab in slabs}
    for i, slab in enumerate(slabs[:-1], start=1):
        sl.kmem_cache_free(s, first[slab], cpu1)
        assert c.partial == slabs[:i] and (slab.pages, slab.pobjects) == (i, i)
        assert not s.node.partial
    sl.kmem_cache_free(s, first[slabs[-1]], cpu1)
    assert c.partial == slabs[-1:] and (slabs[-1].pages, slabs[-1].pobjects) == (1, 1)
    assert list(s.node.partial) == slabs[:-1][::-1]  # popped from the head, added at the tail
    assert not any(slab.frozen for slab in slabs[:-1])
    sl._check_cache(s)


async def test_get_partial_node_takes_slabs_until_more_than_half_cpu_partial_objects():
    k, sl, s = partial_test_cache()
    half = s.cpu_partial // 2
    assert (s.cpu_partial, half) == (6, 3)
    by_slab, _ = await node_partial_slabs(k, s, 8)  # one free object each
    node = list(s.node.partial)
    got = await sl.kmem_cache_alloc(s, GFP_KERNEL, k.new_task("c", cpu=0))
    c0 = s.cpu_slab[0]
    assert got.slab is node[0] and c0.page is node[0]
    # 1, 2, 3 objects are not more than 3: the fourth slab on the list makes 4.
    assert sorted(c0.partial, key=node.index) == node[1:half + 2]
    assert c0.partial[-1].pobjects == half + 1
    assert list(s.node.partial) == node[half + 2:]
    sl._check_cache(s)


async def test_a_cpu_slab_installed_while_new_slab_slept_goes_to_the_node():
    """new_slab_objects(): the page allocator may sleep, and another task on the same
    CPU may install a cpu slab meanwhile; the task that wakes with its new slab
    flushes that one to the node's partial list (flush_slab) and installs its own.
    Catches the flush given another cache or another CPU structure (a crash), or
    skipped (the other slab, with free objects, on no list: lost)."""
    k, sl, s = partial_test_cache(1)
    a, b = k.new_task("a", cpu=0), k.new_task("b", cpu=0)
    real_alloc_pages = k.page_alloc.alloc_pages
    asleep, wake = trio.Event(), trio.Event()

    async def sleepy_alloc_pages(*args, **kwargs):
        if not asleep.is_set():  # the first call, a's: sleep until b is done
            asleep.set()
            await wake.wait()
        return await real_alloc_pages(*args, **kwargs)

    k.page_alloc.alloc_pages = sleepy_alloc_pages
    got = {}

    async def alloc(task):
        got[task] = await sl.kmem_cache_alloc(s, GFP_KERNEL, task)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(alloc, a)
        await asleep.wait()
        await alloc(b)  # b's slab becomes CPU 0's while a sleeps in new_slab
        b_slab = s.cpu_slab[0].page
        assert b_slab is got[b].slab
        wake.set()
    assert s.cpu_slab[0].page is got[a].slab is not b_slab
    assert list(s.node.partial) == [b_slab] and not b_slab.frozen
    sl._check_cache(s)
