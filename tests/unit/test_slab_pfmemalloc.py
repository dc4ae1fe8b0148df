"""Patch 1 (and 2, 3, 4) scenarios: who gets objects from a slab built on reserve pages.

Setting for every test: free pages are held below the min watermark (even below
GFP_ATOMIC's 3/8 of it), so only ALLOC_NO_WATERMARKS allocations succeed and any
slab page a PF_MEMALLOC task obtains is pfmemalloc. Ordinary callers use
GFP_ATOMIC here (they cannot reclaim in this stubbed kernel); where a test wants
an ordinary GFP_KERNEL caller to succeed it releases the held pages first.
"""

from __future__ import annotations

import pytest
from slab_helpers import ALL, hold_below_min, make_kernel, release

from emulator.flags import GFP, GFP_ATOMIC, GFP_KERNEL, PF

SOFTIRQ_MEMALLOC = GFP_ATOMIC | GFP.MEMALLOC


def tasks(k):
    return {
        "memalloc": k.new_task("kswapd0", PF.MEMALLOC, cpu=0),
        "normal": k.new_task("user", cpu=0),
        "normal1": k.new_task("user1", cpu=1),
        "softirq": k.new_task("ksoftirqd", cpu=0, in_softirq=True),
    }


# -- SLAB -----------------------------------------------------------------------------------
async def slab_setup(patches):
    """kmalloc-4096 (one object per slab): X from an ordinary slab, T from a pfmemalloc
    slab; both freed on CPU 0 so its array holds [X, T(tagged)]."""
    k = make_kernel("slab", patches, memory_mib=64)
    k.memalloc_socks = 1  # the checks run only while sk_memalloc_socks()
    t = tasks(k)
    s = k.slab
    cache = s.kmalloc_caches[4096]
    x = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["normal"])
    assert x is not None and not x.slab.pfmemalloc
    held = await hold_below_min(k, t["normal"])
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"]) is None
    tobj = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"])
    assert tobj is not None and tobj.slab.page.pfmemalloc
    assert k.vmstat["slab_alloc_pfmemalloc"] == 1
    s.kmem_cache_free(cache, x, t["normal"])
    s.kmem_cache_free(cache, tobj, t["memalloc"])
    s.check()
    return k, t, cache, x, tobj, held


async def test_slab_patch1_normal_caller_refused_pfmemalloc_object():
    k, t, cache, x, tobj, held = await slab_setup(ALL)
    s = k.slab
    assert tobj.slab.pfmemalloc and s.pfmemalloc_active
    assert s._slabinfo(cache)["pfmemalloc_slabs"] == 1
    # The tagged T is on top; the ordinary caller gets X instead (the swap).
    got = await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"])
    assert got is x
    assert k.vmstat["slab_pfmemalloc_refused"] == 1
    # Only T is left: refused, forced refill, cache_grow fails -> NULL.
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"]) is None
    assert k.vmstat["slab_pfmemalloc_refused"] == 2
    # A PF_MEMALLOC caller does get it.
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"])
    assert got is tobj
    s.check()
    release(k, held)


@pytest.mark.parametrize(("patches", "allowed"), [(ALL, True), (ALL - {4}, False)])
async def test_slab_softirq_with_pf_memalloc_needs_patch4(patches, allowed):
    k, t, cache, x, tobj, held = await slab_setup(patches)
    s = k.slab
    sirq = t["softirq"]
    sirq.flags |= PF.MEMALLOC  # __netif_receive_skb handling a pfmemalloc skb (patch 12)
    got = await s.kmem_cache_alloc(cache, GFP_ATOMIC, sirq)
    assert got is (tobj if allowed else x)
    release(k, held)


async def test_slab_checks_off_without_memalloc_sockets():
    """Patch 13's static key: with no SOCK_MEMALLOC socket nothing is tagged or checked."""
    k, t, cache, x, tobj, held = await slab_setup(ALL)
    s = k.slab
    k.memalloc_socks = 0
    got = await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"])
    assert got is tobj  # popped without a check (and untagged)
    s.check()
    release(k, held)


async def test_slab_refill_after_memory_returns_clears_pfmemalloc():
    """__ac_get_obj with force_refill and a free slab: the slab is declared
    !pfmemalloc and the caller gets its object; recheck_pfmemalloc_active clears the
    global once no pfmemalloc slab is left in the cache."""
    k, t, cache, x, tobj, held = await slab_setup(ALL)
    s = k.slab
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"]) is x
    release(k, held)  # memory is plentiful again
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["normal"])
    assert got is tobj and not tobj.slab.pfmemalloc
    assert not s.pfmemalloc_active
    assert s._slabinfo(cache)["pfmemalloc_slabs"] == 0
    assert len(cache.nodelist.slabs_free) == 1  # the slab cache_grow just added
    s.check()


async def test_slab_tags_follow_objects_through_the_shared_array():
    k = make_kernel("slab", ALL, memory_mib=64)
    k.memalloc_socks = 1
    t = tasks(k)
    s = k.slab
    cache = s.skbuff_head_cache  # 15 objects per slab, batch 60
    held = await hold_below_min(k, t["normal"])
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"]) for _ in range(150)]
    assert all(o.slab.pfmemalloc for o in objs)
    for o in objs:  # overflow CPU 0's array: batches move to the shared array
        s.kmem_cache_free(cache, o, t["memalloc"])
    assert cache.nodelist.shared.entry
    # CPU 1 refills from the shared array; the tags come along and are enforced.
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal1"]) is None
    assert await s.kmem_cache_alloc(cache, GFP_KERNEL,
                                    k.new_task("kswapd1", PF.MEMALLOC, cpu=1)) is not None
    s.check()
    release(k, held)


# -- SLUB -----------------------------------------------------------------------------------
async def slub_setup(patches):
    """skbuff_head_cache (16 objects, order 0): a PF_MEMALLOC task on CPU 0 builds a
    pfmemalloc cpu slab P and takes all its objects."""
    k = make_kernel("slub", patches, memory_mib=64)
    t = tasks(k)
    s = k.slab
    cache = s.skbuff_head_cache
    held = await hold_below_min(k, t["normal"])
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"]) for _ in range(16)]
    p = objs[0].slab
    assert all(o.slab is p for o in objs) and p.page.pfmemalloc
    assert cache.cpu_slab[0].page is p and not cache.cpu_slab[0].freelist
    return k, t, cache, p, objs, held


async def test_slub_patch1_mismatched_cpu_slab_is_deactivated():
    k, t, cache, p, objs, held = await slub_setup(ALL)
    s = k.slab
    assert p.pfmemalloc
    s.kmem_cache_free(cache, objs.pop(), t["normal1"])  # remote free: onto P's own freelist
    # Ordinary caller on CPU 0: the slow path finds P does not match -> deactivate it,
    # skip it on the partial list, no page for a new slab -> NULL.
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"]) is None
    assert k.vmstat["slab_pfmemalloc_refused"] >= 2  # the cpu slab, then the partial slab
    assert cache.cpu_slab[0].page is None and p in cache.node.partial
    # A PF_MEMALLOC caller takes the object from P.
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"])
    assert got.slab is p
    s.kmem_cache_free(cache, got, t["normal1"])
    # Memory comes back: an ordinary GFP_KERNEL caller gets a different slab.
    s.check()
    release(k, held)
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["normal"])
    assert got.slab is not p and not got.slab.pfmemalloc
    s.check()


async def test_slub_patch2_fast_path_leaks_the_reserve_slab():
    """Patch 2's documented leak: the per-CPU freelist of a pfmemalloc cpu slab serves
    anyone; without patch 2 the fast path checks and deactivates the slab."""
    for patches, leaks in ((ALL, True), (ALL - {2}, False)):
        k = make_kernel("slub", patches, memory_mib=64)
        t = tasks(k)
        s = k.slab
        cache = s.skbuff_head_cache
        held = await hold_below_min(k, t["normal"])
        first = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"])
        assert first.slab.pfmemalloc and cache.cpu_slab[0].freelist
        got = await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"])
        if leaks:
            assert got is not None and got.slab is first.slab
            assert k.vmstat["slab_pfmemalloc_refused"] == 0
        else:
            assert got is None
            assert k.vmstat["slab_pfmemalloc_refused"] >= 1
            assert first.slab in cache.node.partial
        s.check()
        release(k, held)


async def test_slub_partial_slab_reused_by_entitled_caller_only():
    k, t, cache, p, objs, held = await slub_setup(ALL)
    s = k.slab
    for o in objs[:4]:
        s.kmem_cache_free(cache, o, t["normal1"])
    # CPU 1's ordinary caller: P is frozen as CPU 0's slab, so it is not even seen;
    # no page for a new slab -> NULL.
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal1"]) is None
    # CPU 0's ordinary caller deactivates P onto the partial list.
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"]) is None
    # A PF_MEMALLOC task on CPU 1 gets P from the partial list.
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, k.new_task("kswapd1", PF.MEMALLOC, cpu=1))
    assert got.slab is p and cache.cpu_slab[1].page is p
    s.check()
    release(k, held)


# -- both allocators --------------------------------------------------------------------------
async def reserve_setup(kind, patches):
    """Either allocator's setting as (k, t, cache, reserve, other, held): ``reserve`` is
    the object of a reserve slab that the next allocation on CPU 0 finds (SLAB: the
    tagged T on top of the array; SLUB: an object of P freed back from CPU 1), ``other``
    what a caller refused it gets instead (SLAB: X; SLUB: nothing, NULL)."""
    if kind == "slab":
        k, t, cache, x, tobj, held = await slab_setup(patches)
        return k, t, cache, tobj, x, held
    k, t, cache, p, objs, held = await slub_setup(patches)
    freed = objs.pop()
    k.slab.kmem_cache_free(cache, freed, t["normal1"])
    return k, t, cache, freed, None, held


@pytest.mark.parametrize("kind", ["slab", "slub"])
async def test_without_patch1_normal_caller_gets_the_reserve_object(kind):
    k, t, cache, reserve, other, held = await reserve_setup(kind, ALL - {1})
    s = k.slab
    assert not reserve.slab.pfmemalloc  # 3.5: no PageSlabPfmemalloc
    got = await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"])
    assert got is reserve  # SLAB's LIFO array, SLUB's freelist: it goes to an ordinary caller
    assert k.vmstat["slab_pfmemalloc_refused"] == 0
    s.check()
    release(k, held)


@pytest.mark.parametrize("kind", ["slab", "slub"])
@pytest.mark.parametrize(("patches", "allowed"), [(ALL, True), (ALL - {3}, False)])
async def test_softirq_gfp_memalloc_needs_patch3(kind, patches, allowed):
    k, t, cache, reserve, other, held = await reserve_setup(kind, patches)
    s = k.slab
    got = await s.kmem_cache_alloc(cache, SOFTIRQ_MEMALLOC, t["softirq"])
    assert got is (reserve if allowed else other)
    s.check()
    release(k, held)
