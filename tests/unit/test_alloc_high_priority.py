"""__alloc_pages_high_priority (emulator/mm/page_alloc.py): a caller entitled to
the reserves (ALLOC_NO_WATERMARKS) allocates with no watermark, through its own
CPU's per-cpu list; with __GFP_NOFAIL it waits (wait_iff_congested, HZ/50) and
tries again until a page comes, and it takes exactly one.

Mutation testing found these unguarded (docs/TESTING.md): the tests catch the
attempt made without the task's CPU (straight from the buddy lists), the loop's
exit inverted (a NOFAIL caller that got a page going round again, taking every
page there is), and the wait called without the task.
"""

from __future__ import annotations

import trio
from slab_helpers import free_on_cpu, make_kernel, take_every_page

from emulator.flags import GFP, GFP_ATOMIC
from emulator.mm.page import Owner

#: GFP_ATOMIC for a movable page: the per-cpu list a page freed here goes to
#: (its pageblock's, MIGRATE_MOVABLE) is the one the allocation takes from.
ATOMIC_MOVABLE = GFP_ATOMIC | GFP.MOVABLE


async def test_no_watermark_and_the_tasks_own_cpu_list():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    held = take_every_page(k)
    free_on_cpu(k, held.pop(), 1)
    pcp = k.pgdat.zone.pageset[1]
    assert pcp.count == 1 and k.pgdat.zone.nr_free_pages == 0
    task = k.new_task("kswapd", cpu=1)
    page = await k.page_alloc._alloc_pages_high_priority(ATOMIC_MOVABLE, 0, task, Owner.ANON)
    assert page is not None and page.owner == Owner.ANON
    assert pcp.count == 0


async def test_without_nofail_no_page_is_none_at_once():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    take_every_page(k)
    task = k.new_task("a", cpu=0)
    assert await k.page_alloc._alloc_pages_high_priority(ATOMIC_MOVABLE, 0, task, Owner.ANON) is None


async def test_nofail_takes_one_page():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    free = k.pgdat.zone.nr_free_pages + k.pgdat.zone.nr_pcp_pages
    task = k.new_task("a", cpu=0)
    page = await k.page_alloc._alloc_pages_high_priority(ATOMIC_MOVABLE | GFP.NOFAIL, 0, task,
                                                         Owner.ANON)
    assert page is not None
    assert k.pgdat.zone.nr_free_pages + k.pgdat.zone.nr_pcp_pages == free - 1


async def test_nofail_waits_until_a_page_is_freed():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    held = take_every_page(k)
    task = k.new_task("a", cpu=0)
    got = []

    async def allocate() -> None:
        got.append(await k.page_alloc._alloc_pages_high_priority(
            ATOMIC_MOVABLE | GFP.NOFAIL, 0, task, Owner.ANON))

    with trio.fail_after(60):  # only stops a test that would otherwise hang
        async with trio.open_nursery() as nursery:
            nursery.start_soon(allocate)
            for _ in range(20):
                await trio.sleep(0)
            assert not got  # still trying
            free_on_cpu(k, held[-1], 0)
    assert got == [held[-1]] and got[0].owner == Owner.ANON
