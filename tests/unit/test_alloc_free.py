"""The fast path of alloc_pages, what get_page_from_freelist counts, and __free_pages
(emulator/mm/page_alloc.py).

alloc_pages tries the task's own CPU's per-cpu list first (at the low
watermark). Every allocation adds its 2^order frames to pgalloc_normal, and
to pgalloc_pfmemalloc when it ignored the watermarks or to pgalloc_below_min
when only ALLOC_HIGH/ALLOC_HARDER let it pass. __free_pages takes the page's own order when none is given; an
order-0 page freed in a task goes onto that CPU's per-cpu list, at its head
(hot, the default: the next allocation there gets it back) or with ``cold`` at
its tail; a page from the reserves gives back all its 2^order frames to
nr_pfmemalloc_pages; every freed frame is left with no page flags and nothing
of its last owner (mapping, swap entry, contents, slab, private, young bit); a
free to the buddy lists resets the zone's reclaim failure heuristics; pages
freed are credited, by frame, to the freeing task's comm.

Mutation testing found these unguarded (docs/TESTING.md): the tests catch the
fast path made without the CPU, a counter set instead of added to or
counting an order's frames as one, the default turned cold, the page's own order
ignored, a high-order reserve page counted as one frame, a flag or field left
set on a freed frame (an mm of "" makes the frame look mapped), the heuristics
left, a high-order free credited as one frame.
"""

from __future__ import annotations

from slab_helpers import at_min, free_on_cpu, make_kernel

from emulator.flags import (
    ALLOC_HARDER,
    ALLOC_HIGH,
    ALLOC_NO_WATERMARKS,
    ALLOC_WMARK_MIN,
    GFP,
    GFP_ATOMIC,
    GFP_KERNEL,
)
from emulator.mm.page import PG, Owner
from emulator.task import current

MOVABLE = GFP_KERNEL | GFP.MOVABLE  # the list a freed page goes to: its pageblock's


async def test_the_fast_path_uses_the_tasks_cpu_list():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    pa = k.page_alloc
    parked = pa.get_page_from_freelist(MOVABLE, 0, ALLOC_NO_WATERMARKS, Owner.KERNEL)
    free_on_cpu(k, parked, 1)
    page = await pa.alloc_pages(MOVABLE, 0, k.new_task("a", cpu=1), Owner.ANON)
    assert page is parked and k.pgdat.zone.pageset[1].count == 0


async def test_allocations_are_counted_by_frame():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    pa, vm = k.page_alloc, k.vmstat
    pa.get_page_from_freelist(GFP_KERNEL, 0, ALLOC_WMARK_MIN, Owner.KERNEL)
    pa.get_page_from_freelist(GFP_KERNEL, 2, ALLOC_WMARK_MIN, Owner.KERNEL)
    assert (vm["pgalloc_normal"], vm["pgalloc_pfmemalloc"], vm["pgalloc_below_min"]) == (5, 0, 0)
    at_min(k)
    normal = vm["pgalloc_normal"]
    atomic = ALLOC_WMARK_MIN | ALLOC_HIGH | ALLOC_HARDER  # GFP_ATOMIC's
    assert pa.get_page_from_freelist(GFP_ATOMIC, 1, atomic, Owner.KERNEL) is not None
    assert vm["pgalloc_below_min"] == 2 and vm["pgalloc_normal"] == normal + 2
    zone = k.pgdat.zone
    assert (vm["nr_free_pages"], vm["nr_pcp_pages"]) == (zone.nr_free_pages, zone.nr_pcp_pages)


async def test_a_page_is_freed_hot_unless_cold():
    """Two pages freed on CPU 1, the second hot (the default) or cold: the next
    allocation there gets the second back only if it was hot."""
    for cold in (False, True):
        k = make_kernel("slub", cpus=2, memory_mib=64)
        pa = k.page_alloc
        first, second = (pa.get_page_from_freelist(MOVABLE, 0, ALLOC_NO_WATERMARKS,
                                                   Owner.KERNEL) for _ in range(2))
        token = current.set(k.new_task("freer", cpu=1))
        try:
            pa.free_pages(first)
            if cold:
                pa.free_pages(second, cold=True)
            else:
                pa.free_pages(second)
        finally:
            current.reset(token)
        page = await pa.alloc_pages(MOVABLE, 0, k.new_task("a", cpu=1), Owner.ANON)
        assert page is (first if cold else second)


async def test_a_high_order_page_is_freed_whole_by_its_own_order():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    pa, zone = k.page_alloc, k.pgdat.zone
    page = pa.get_page_from_freelist(GFP_ATOMIC, 2, ALLOC_NO_WATERMARKS, Owner.KERNEL)
    assert page.pfmemalloc and k.vmstat["nr_pfmemalloc_pages"] == 4  # patch 5 marks it
    for pfn in range(page.pfn, page.pfn + 4):
        zone.mem_map[pfn].flags |= PG.dirty | PG.referenced
    free = zone.nr_free_pages
    pa.free_pages(page)  # no order given: the page's own
    assert zone.nr_free_pages == free + 4
    assert k.vmstat["nr_pfmemalloc_pages"] == 0 and not page.pfmemalloc
    for pfn in range(page.pfn, page.pfn + 4):
        frame = zone.mem_map[pfn]
        assert frame.owner == Owner.FREE and not frame.flags & ~PG.buddy


async def test_a_freed_frame_keeps_nothing_of_its_owner():
    """Whatever the frame was (a mapped, swapped, referenced page of a slab here), once
    freed it is clean: no mapping, swap entry, contents, slab, private, young bit."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    pa, zone = k.page_alloc, k.pgdat.zone
    page = pa.get_page_from_freelist(GFP_KERNEL, 1, ALLOC_NO_WATERMARKS, Owner.KERNEL)
    frames = [zone.mem_map[pfn] for pfn in (page.pfn, page.pfn + 1)]
    for f in frames:
        f.mm, f.vaddr, f.swap, f.contents = object(), 7, 3, 12345
        f.slab, f.private, f.young = object(), object(), True
    zone.pages_scanned, zone.all_unreclaimable = 99, True
    pa.free_pages(page, 1)  # order 1: to the buddy lists
    for f in frames:
        assert (f.mm, f.swap, f.contents, f.slab, f.private, f.young) == (
            None, 0, None, None, None, False)
        assert not f.mapped
    # free_one_page resets the reclaim failure heuristics
    assert zone.pages_scanned == 0 and zone.all_unreclaimable is False


async def test_pages_freed_are_credited_to_the_freeing_task_by_frame():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    pa = k.page_alloc
    page = pa.get_page_from_freelist(GFP_KERNEL, 2, ALLOC_NO_WATERMARKS, Owner.KERNEL)
    token = current.set(k.new_task("kswapd0", cpu=0))
    try:
        pa.free_pages(page, 2)
    finally:
        current.reset(token)
    pa.free_pages(pa.get_page_from_freelist(GFP_KERNEL, 0, ALLOC_NO_WATERMARKS, Owner.KERNEL))
    assert pa.pgfree_by == {"kswapd0": 4, "-": 1}
    assert k.vmstat["pgfree"] == 5


async def test_the_gauges_follow_a_free():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    pa, zone = k.page_alloc, k.pgdat.zone
    page = pa.get_page_from_freelist(GFP_KERNEL, 0, ALLOC_NO_WATERMARKS, Owner.KERNEL)
    k.vmstat["nr_free_pages"] = k.vmstat["nr_pcp_pages"] = -1
    free_on_cpu(k, page, 1)
    assert k.vmstat["nr_pcp_pages"] == zone.nr_pcp_pages == 1
    assert k.vmstat["nr_free_pages"] == zone.nr_free_pages


async def test_the_gauges_follow_an_allocation():
    """An order-0 allocation through a CPU refills its per-cpu list (rmqueue_bulk):
    the per-cpu gauge moves with it."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    zone = k.pgdat.zone
    k.page_alloc.get_page_from_freelist(GFP_KERNEL, 0, ALLOC_WMARK_MIN, Owner.KERNEL, 0)
    assert zone.nr_pcp_pages > 0
    assert (k.vmstat["nr_free_pages"], k.vmstat["nr_pcp_pages"]) == (
        zone.nr_free_pages, zone.nr_pcp_pages)
