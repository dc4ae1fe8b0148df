"""__free_pages and the fast path of alloc_pages (emulator/mm/page_alloc.py).

alloc_pages tries the task's own CPU's per-cpu list first (at the low
watermark). __free_pages takes the page's own order when none is given; an
order-0 page freed in a task goes onto that CPU's per-cpu list, at its head
(hot, the default: the next allocation there gets it back) or with ``cold`` at
its tail; a page from the reserves gives back all its 2^order frames to
nr_pfmemalloc_pages; every freed frame is left with no page flags.

Mutation testing found these unguarded (docs/TESTING.md): the tests catch the
fast path made without the CPU, the default turned cold, the page's own order
ignored, a high-order reserve page counted as one frame, and a flag left set
on a freed frame.
"""

from __future__ import annotations

from slab_helpers import free_on_cpu, make_kernel

from emulator.flags import ALLOC_NO_WATERMARKS, GFP, GFP_ATOMIC, GFP_KERNEL
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
