"""Conservation under random alloc/free sequences on several CPUs, both allocators.

Objects come from kmalloc and from the standard caches (under SLUB merged into
kmalloc-256 / kmalloc-192 by default; also run with slub_nomerge) and are freed
with kmem_cache_free or kfree. Every object is free exactly once or allocated;
every slab page is owned by SLAB, carries PG_slab and points at its slab;
NR_SLAB_* equal the pages the slabs hold; and when everything is freed and the
caches shrink (SLAB: also by cache_reap alone), every page goes back to the
buddy allocator.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slab_helpers import ALL, hold_below_min, make_kernel, objects_by_slab, release

from emulator.flags import ALLOC_NO_WATERMARKS, GFP, GFP_ATOMIC, GFP_KERNEL, PF
from emulator.mm.page import Owner

SIZES = [8, 60, 200, 256, 500, 1000, 2048, 3000, 4096, 8192, 9000]
#: the standard caches (under SLUB, skbuff_head_cache, skbuff_fclone_cache and bio are
#: kmalloc-256/-512/-192).
CACHES = ["skbuff_head_cache", "skbuff_fclone_cache", "bio_cache", "request_cache",
          "radix_tree_node"]

op = st.one_of(
    st.tuples(st.just("alloc"), st.sampled_from(SIZES), st.integers(0, 2), st.integers(1, 40)),
    st.tuples(st.just("cache"), st.sampled_from(CACHES), st.integers(0, 2), st.integers(1, 40)),
    st.tuples(st.just("free"), st.integers(0, 10_000), st.integers(0, 2), st.integers(1, 40)),
    st.tuples(st.just("reap"), st.integers(0, 2), st.just(0), st.just(0)),
    st.tuples(st.just("shrink"), st.just(0), st.just(0), st.just(0)),
)


async def run_ops(kind: str, ops, memalloc: bool) -> None:
    nomerge = kind == "slub-nomerge"
    kind = "slub" if nomerge else kind
    k = make_kernel(kind, ALL, cpus=3, memory_mib=32, slub_nomerge=nomerge)
    k.memalloc_socks = 1 if memalloc else 0
    s = k.slab
    free0 = k.pgdat.zone.nr_free_pages
    tasks = [k.new_task(f"t{i}", cpu=i) for i in range(3)]
    kswapd = [k.new_task(f"kswapd{i}", PF.MEMALLOC, cpu=i) for i in range(3)]
    live = []
    now = 0.0
    for what, a, cpu, n in ops:
        if what == "alloc":
            for i in range(n):
                task = kswapd[cpu] if i % 3 == 0 else tasks[cpu]
                obj = await s.kmalloc(a, GFP_KERNEL, task)
                assert obj is not None
                live.append((obj, None))
        elif what == "cache":
            cache = getattr(s, a)
            for i in range(n):
                task = kswapd[cpu] if i % 3 == 0 else tasks[cpu]
                obj = await s.kmem_cache_alloc(cache, GFP_KERNEL, task)
                assert obj is not None and obj.cache is cache
                live.append((obj, cache))
        elif what == "free":
            for i in range(min(n, len(live))):
                obj, cache = live.pop(a % len(live))
                if cache is not None and i % 2:
                    s.kmem_cache_free(cache, obj, tasks[cpu])
                else:
                    s.kfree(obj, tasks[cpu])  # kfree() works on any slab object
        elif what == "reap":
            now += 2.0
            s.cache_reap(a, now)
        else:
            s.shrink_all()
        s.check()
    for obj, _ in live:
        s.kfree(obj, tasks[0])
    s.check()
    s.shrink_all()
    s.check()
    assert k.vmstat["nr_slab_unreclaimable"] == 0 and k.vmstat["nr_slab_reclaimable"] == 0
    assert k.pgdat.zone.nr_free_pages == free0
    info = s.slabinfo()
    assert all(d["num_objs"] == 0 for d in info)
    merged = kind == "slub" and not nomerge
    assert (s.skbuff_head_cache is s.kmalloc_caches[256]) == merged
    assert sum(len(d["aliases"]) for d in info) == (3 if merged else 0)


@pytest.mark.parametrize("kind", ["slab", "slub", "slub-nomerge"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=30), memalloc=st.booleans())
def test_conservation_random_sequences(kind, ops, memalloc):
    trio.run(run_ops, kind, ops, memalloc)


@pytest.mark.parametrize("kind", ["slab", "slub"])
async def test_conservation_with_pfmemalloc_slabs(kind):
    """Reserve slabs mixed with ordinary ones, refusals included, still conserve."""
    k = make_kernel(kind, ALL, cpus=2, memory_mib=64)
    k.memalloc_socks = 1
    s = k.slab
    t0, t1 = k.new_task("a", cpu=0), k.new_task("b", cpu=1)
    m0 = k.new_task("kswapd0", PF.MEMALLOC, cpu=0)
    live = [await s.kmalloc(256, GFP_KERNEL, t0) for _ in range(100)]
    held = await hold_below_min(k, t0)
    live += [await s.kmalloc(256, GFP_KERNEL, m0) for _ in range(100)]
    assert any(o.slab.pfmemalloc for o in live)
    for i, o in enumerate(live[::2]):
        s.kfree(o, t0 if i % 2 else t1)
    live = live[1::2]
    for _ in range(50):
        o = await s.kmalloc(256, GFP_ATOMIC, t0)
        if o is not None:
            live.append(o)
        o = await s.kmalloc(256, GFP_ATOMIC, t1)
        if o is not None:
            live.append(o)
    s.check()
    release(k, held)
    for o in live:
        s.kfree(o, t1)
    s.shrink_all()
    s.check()
    assert k.vmstat["nr_slab_unreclaimable"] == 0


async def test_slab_free_block_returns_surplus_slabs_and_reap_drains():
    """SLAB keeps at most free_limit free objects in slabs; cache_reap gives back the
    rest over time without an explicit shrink."""
    k = make_kernel("slab", ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[2048]  # 2 per slab, limit 24, batch 12, free_limit 38
    t = k.new_task("a", cpu=0)
    free0 = k.pgdat.zone.nr_free_pages
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t) for _ in range(400)]
    assert k.vmstat["nr_slab_unreclaimable"] == 200
    for o in objs:
        s.kmem_cache_free(cache, o, t)
    s.check()
    info = s._slabinfo(cache)
    assert info["cpu_cached"] <= 24 and info["shared_cached"] <= 96
    assert cache.nodelist.free_objects <= cache.nodelist.free_limit
    assert info["slabs"] * 2 <= 24 + 96 + cache.nodelist.free_limit
    now = 0.0
    for _ in range(200):
        now += 2.0
        for cpu in range(2):
            s.cache_reap(cpu, now)
        if k.vmstat["nr_slab_unreclaimable"] == 0:
            break
    s.check()
    assert k.vmstat["nr_slab_unreclaimable"] == 0
    assert k.pgdat.zone.nr_free_pages == free0


async def test_slub_discards_empty_slabs_beyond_min_partial():
    k = make_kernel("slub", ALL, cpus=2, memory_mib=32)
    s = k.slab
    cache = s.kmalloc_caches[256]  # 16 per slab, min_partial 5, cpu_partial 13
    t0, t1 = k.new_task("a", cpu=0), k.new_task("b", cpu=1)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t0) for _ in range(16 * 40)]
    assert len(cache.node.slabs) == 40
    for i, o in enumerate(objs):
        s.kmem_cache_free(cache, o, t1 if i % 2 else t0)
    s.check()
    # Only min_partial empty slabs on the node list plus what the CPUs hold remain.
    held = sum(1 for c in cache.cpu_slab for _ in ([c.page] if c.page else []) + c.partial)
    assert len(cache.node.partial) <= cache.min_partial + 1
    assert len(cache.node.slabs) <= len(cache.node.partial) + held
    assert s.kmem_cache_shrink(cache) > 0
    s.check()
    assert not cache.node.slabs


@pytest.mark.parametrize(("kind", "size"), [("slab", 8192), ("slub", 2048)])
async def test_kmem_cache_shrink_returns_the_pages_it_freed(kind, size):
    """kmem_cache_shrink() gives back every empty slab of the cache and returns how many
    pages that was (the model's return value; shrink_all adds them up), here for slabs
    of order 1 (SLAB's kmalloc-8192) and order 3 (SLUB's kmalloc-2048)."""
    k = make_kernel(kind, ALL, cpus=2, memory_mib=64)
    s = k.slab
    cache = s.kmalloc_caches[size]
    t = k.new_task("a", cpu=0)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t) for _ in range(40)]
    assert all(o.slab.order > 0 for o in objs)
    for o in objs:
        s.kmem_cache_free(cache, o, t)
    before = k.vmstat["nr_slab_unreclaimable"]
    freed = s.kmem_cache_shrink(cache)
    assert freed > 1 << objs[0].slab.order
    assert freed == before - k.vmstat["nr_slab_unreclaimable"]
    s.check()


@pytest.mark.parametrize("kind", ["slab", "slub"])
async def test_kmem_cache_shrink_counts_only_the_slabs_it_gave_back(kind):
    """Slabs still in use, one full and one with a single object left, stay; the pages
    returned are those of the empty slabs only. Catches SLAB's count of the cache's
    slabs with the partial ones subtracted (before or after the drains), or the slabs
    still in use added to the pages given back. One CPU, so SLAB has no shared array:
    the frees that overflow the CPU's array go back to the slabs, and some are partial
    before the drains too."""
    k = make_kernel(kind, ALL, cpus=1, memory_mib=64)
    s = k.slab
    cache = s.kmalloc_caches[1024]
    t = k.new_task("a", cpu=0)
    objs = [await s.kmem_cache_alloc(cache, GFP_KERNEL, t) for _ in range(80)]
    by_slab = objects_by_slab(objs)
    full, partial = list(by_slab)[:2]
    kept = by_slab[full] + by_slab[partial][:1]
    for o in objs:
        if o not in kept:
            s.kmem_cache_free(cache, o, t)
    before = k.vmstat["nr_slab_unreclaimable"]
    freed = s.kmem_cache_shrink(cache)
    assert freed > 0
    assert freed == before - k.vmstat["nr_slab_unreclaimable"]
    assert all(o.allocated for o in kept)
    assert full.inuse == len(by_slab[full]) and partial.inuse == 1
    s.check()


async def test_slub_order_fallback_when_high_order_fails():
    """allocate_slab: the order-3 attempt (the caller's flags with __GFP_NOWARN and
    __GFP_NORETRY, without __GFP_NOFAIL) fails, as there is no free order-3 block; the
    order-0 fallback with the caller's own flags succeeds, with the order-0 object
    count for that slab; order_fallback counts each fallback. Catches the first
    attempt made with other flags."""
    k = make_kernel("slub", ALL, cpus=2, memory_mib=16)
    s = k.slab
    t = k.new_task("a", cpu=0)
    zone = k.pgdat.zone
    # Fragment memory: take every page, then give back every other one.
    pages = []
    while True:
        p = k.page_alloc.get_page_from_freelist(GFP_ATOMIC, 0, ALLOC_NO_WATERMARKS, Owner.KERNEL)
        if p is None:
            break
        pages.append(p)
    for p in pages[::2]:
        k.page_alloc.free_pages(p, 0)
    assert not any(zone.free_area[o].nr_free for o in range(1, 11))
    calls = []
    alloc_pages = k.page_alloc.alloc_pages

    async def recording(gfp, order, task, **kw):
        calls.append((int(gfp), order))
        return await alloc_pages(gfp, order, task, **kw)

    k.page_alloc.alloc_pages = recording
    cache = s.kmalloc_caches[2048]  # prefers order 3 (16 objects), min order 0 (2)
    gfp = GFP_KERNEL | GFP.NOFAIL
    objs = [await s.kmem_cache_alloc(cache, gfp, t) for _ in range(3)]
    assert all(o.slab.order == 0 and o.slab.objects == 2 for o in objs)
    assert objs[0].slab is objs[1].slab is not objs[2].slab
    first = int(GFP_KERNEL | GFP.NOWARN | GFP.NORETRY)
    assert calls == [(first, 3), (int(gfp), 0)] * 2
    assert cache.order_fallback == 2
    for o in objs:
        s.kfree(o, t)
    s.check()
