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
from emulator.mm.slab import _Tagged

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
    assert k.vmstat["slab_alloc_pfmemalloc"] == len({o.slab for o in objs}) == 10
    for o in objs:  # overflow CPU 0's array: batches move to the shared array
        s.kmem_cache_free(cache, o, t["memalloc"])
    assert cache.nodelist.shared.entry
    # CPU 1 refills from the shared array; the tags come along and are enforced.
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal1"]) is None
    assert await s.kmem_cache_alloc(cache, GFP_KERNEL,
                                    k.new_task("kswapd1", PF.MEMALLOC, cpu=1)) is not None
    s.check()
    release(k, held)


def is_tagged(entry) -> bool:
    return entry.__class__ is _Tagged


@pytest.mark.parametrize("socks", [0, 1, 2])
async def test_slab_tags_only_reserve_slab_objects_while_memalloc_sockets_exist(socks):
    """__ac_put_obj and __cache_free tag an object only while sk_memalloc_socks(), only
    if pfmemalloc_active, and only if its own slab is pfmemalloc: on the refill path
    (the objects a refill moves into the array) and on the free path. Catches: tagging
    with no SOCK_MEMALLOC socket (`> 0` -> `>= 0`) or only from a second one (`> 1`),
    and tagging every object while pfmemalloc_active (`and` -> `or`)."""
    k = make_kernel("slab", ALL, memory_mib=64)
    k.memalloc_socks = socks
    t = tasks(k)
    s = k.slab
    cache = s.skbuff_head_cache  # 15 objects per slab: a refill moves a whole slab
    held = await hold_below_min(k, t["normal"])
    first = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"])
    assert first.slab.pfmemalloc and s.pfmemalloc_active
    cpu0 = cache.array[0].entry
    assert len(cpu0) == cache.num - 1  # the rest of the reserve slab, put by the refill
    assert all(is_tagged(e) for e in cpu0) == (socks > 0)
    assert not any(is_tagged(e) for e in cpu0) == (socks == 0)
    s.kmem_cache_free(cache, first, t["memalloc"])
    assert is_tagged(cpu0[-1]) == (socks > 0)
    # Memory comes back: CPU 1 grows an ordinary slab; pfmemalloc_active is still set
    # (the reserve slab is still in the cache), yet nothing of the new slab is tagged.
    release(k, held)
    other = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["normal1"])
    assert not other.slab.pfmemalloc and s.pfmemalloc_active
    assert cache.array[1].entry and not any(is_tagged(e) for e in cache.array[1].entry)
    s.kmem_cache_free(cache, other, t["normal1"])
    assert not is_tagged(cache.array[1].entry[-1])
    s.check()


async def test_slab_tags_lapse_with_the_last_memalloc_socket():
    """Objects tagged while a SOCK_MEMALLOC socket existed reach CPU 1 through the
    shared array after the last such socket is gone: ac_get_obj then pops without a
    check (3.6's ac_get_obj reads sk_memalloc_socks() first), so an ordinary caller
    gets one even while memory is short, and nothing is counted as refused. (3.6
    hands the pointer out with its tag bit still set; the model hands out the
    object.) Catches: the check made with no socket (`> 0` -> `>= 0`), and the tag
    handed out instead of the object."""
    k = make_kernel("slab", ALL, memory_mib=64)
    k.memalloc_socks = 1
    t = tasks(k)
    s = k.slab
    cache = s.skbuff_head_cache
    held = await hold_below_min(k, t["normal"])
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"]) for _ in range(150)]
    for o in objs:  # overflow CPU 0's array: batches move to the shared array, tagged
        s.kmem_cache_free(cache, o, t["memalloc"])
    shared = cache.nodelist.shared.entry
    assert shared and all(is_tagged(e) for e in shared)
    k.memalloc_socks = 0  # sk_clear_memalloc on the last socket
    got = await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal1"])
    assert got in objs and got.allocated and got.slab.pfmemalloc
    assert k.vmstat["slab_pfmemalloc_refused"] == 0
    s.check()
    release(k, held)


async def test_slab_a_free_slab_untags_only_on_a_forced_refill():
    """__ac_get_obj declares a reserve slab ordinary only when the caller was forced to
    refill (cache_grow was tried) and slabs_free is not empty. On the first, unforced
    look a refused caller goes to cache_grow, which fails while memory is short, and
    gets NULL although a free slab sits on slabs_free (3.6's force_grow does not
    look at the lists). Catches: untagging on a free slab alone (`and` -> `or`)."""
    k = make_kernel("slab", ALL, memory_mib=64)
    k.memalloc_socks = 1
    t = tasks(k)
    s = k.slab
    cache = s.kmalloc_caches[4096]  # one object per slab
    x = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["normal1"])
    held = await hold_below_min(k, t["normal"])
    tobj = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"])
    assert tobj.slab.pfmemalloc
    s.kmem_cache_free(cache, tobj, t["memalloc"])  # CPU 0's array: [T, tagged]
    s.kmem_cache_free(cache, x, t["normal1"])
    s.drain_array(cache, cache.array[1], True)  # X's slab, empty, onto slabs_free
    assert x.slab in cache.nodelist.slabs_free
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"]) is None
    assert k.vmstat["slab_pfmemalloc_refused"] == 1  # the first look; then the grow failed
    assert tobj.slab.pfmemalloc and is_tagged(cache.array[0].entry[-1])
    s.check()
    # Memory comes back: the forced refill's cache_grow succeeds, and the second look
    # finds free slabs, so T's slab is declared ordinary and T handed out.
    release(k, held)
    assert await s.kmem_cache_alloc(cache, GFP_ATOMIC, t["normal"]) is tobj
    assert k.vmstat["slab_pfmemalloc_refused"] == 3
    assert not tobj.slab.pfmemalloc and len(cache.nodelist.slabs_free) == 2
    s.check()


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
    assert k.vmstat["slab_pfmemalloc_refused"] == 2  # the cpu slab, then the partial slab
    assert cache.cpu_slab[0].page is None and p in cache.node.partial
    # A PF_MEMALLOC caller takes the object from P.
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"])
    assert got.slab is p
    s.kmem_cache_free(cache, got, t["normal1"])
    # Memory comes back: an ordinary GFP_KERNEL caller gets a different slab, after
    # refusing P as its cpu slab and again on the partial list.
    s.check()
    release(k, held)
    refused = k.vmstat["slab_pfmemalloc_refused"]
    got = await s.kmem_cache_alloc(cache, GFP_KERNEL, t["normal"])
    assert got.slab is not p and not got.slab.pfmemalloc
    assert k.vmstat["slab_pfmemalloc_refused"] == refused + 2 == 4
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


async def test_slub_an_ordinary_caller_skips_a_reserve_partial_slab_for_the_next():
    """get_partial_node refuses a pfmemalloc partial slab to an ordinary caller and goes
    on down the list to an ordinary one. Catches: stopping at the refused slab
    (`continue` -> `break`), counting a refusal twice, and refusing every slab
    (`aware and page.pfmemalloc` -> `or`)."""
    k = make_kernel("slub", ALL, memory_mib=64)
    t = tasks(k)
    s = k.slab
    cache = s.skbuff_head_cache
    ordinary = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t["normal"]) for _ in range(16)]
    held = await hold_below_min(k, t["normal"])
    reserve = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"]) for _ in range(16)]
    o, p = ordinary[0].slab, reserve[0].slab
    assert p.pfmemalloc and not o.pfmemalloc and o is not p
    s.flush_slab(cache, cache.cpu_slab[0])  # both full, on no list
    # Each slab's first free freezes it onto CPU 1's partial list; flushing CPU 1 puts
    # them on the node's list, the reserve slab first.
    s.kmem_cache_free(cache, ordinary.pop(), t["normal1"])
    s.kmem_cache_free(cache, reserve.pop(), t["normal1"])
    s.unfreeze_partials(cache, cache.cpu_slab[1])
    assert list(cache.node.partial) == [p, o]
    got = await s.kmem_cache_alloc(cache, GFP_ATOMIC, k.new_task("user2", cpu=1))
    assert got.slab is o and list(cache.node.partial) == [p]
    assert k.vmstat["slab_pfmemalloc_refused"] == 1
    s.check()
    release(k, held)



async def test_slub_a_fresh_reserve_slab_gives_a_caller_not_entitled_one_object():
    """__slab_alloc's tail (patch 1): a fresh slab that fails pfmemalloc_match gives the
    caller one object and is deactivated at once, its other objects left on the node's
    partial list. The model's page allocator hands a reserve page only to a caller the
    slab would let in too (3.6 keeps the branch as a defence), so a stand-in marks the
    page. Catches: the slab loaded as the cpu slab anyway (`not aware or` -> `aware
    or`), or deactivated with another cache, page or freelist."""
    k = make_kernel("slub", ALL, slub_nomerge=True, memory_mib=64)
    s = k.slab
    cache = s.kmem_cache_create("reserve-test", 1024)
    task = k.new_task("user", cpu=0)
    real_alloc_pages = k.page_alloc.alloc_pages

    async def reserve_page(*args, **kwargs):
        page = await real_alloc_pages(*args, **kwargs)
        page.pfmemalloc = True
        return page

    k.page_alloc.alloc_pages = reserve_page
    obj = await s.kmem_cache_alloc(cache, GFP_KERNEL, task)
    k.page_alloc.alloc_pages = real_alloc_pages
    slab = obj.slab
    assert slab.pfmemalloc and obj.allocated
    assert cache.cpu_slab[0].page is None and not cache.cpu_slab[0].freelist
    assert list(cache.node.partial) == [slab] and not slab.frozen
    assert len(slab.freelist) == slab.objects - 1
    s.check()

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


@pytest.mark.parametrize("kind", ["slab", "slub"])
async def test_slab_alloc_pfmemalloc_counts_every_reserve_slab_page(kind):
    """vmstat slab_alloc_pfmemalloc adds the pages of each slab built on reserve pages.
    Catches the count set, or taken away, instead of added to."""
    k = make_kernel(kind, ALL, memory_mib=64)
    t = tasks(k)
    s = k.slab
    cache = s.skbuff_head_cache
    held = await hold_below_min(k, t["normal"])
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t["memalloc"]) for _ in range(40)]
    slabs = {o.slab for o in objs}
    assert len(slabs) >= 3 and all(sl.pfmemalloc for sl in slabs)
    pages = sum(1 << sl.order for sl in slabs)
    assert k.vmstat["slab_alloc_pfmemalloc"] == pages
    for o in objs:
        s.kmem_cache_free(cache, o, t["memalloc"])
    s.check()
    release(k, held)
