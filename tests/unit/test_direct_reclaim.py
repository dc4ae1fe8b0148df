"""__alloc_pages_direct_reclaim (emulator/mm/page_alloc.py): reclaim runs with
PF_MEMALLOC set (so the reclaimer's own allocations may use the reserves and it
never recurses into reclaim), the task's flags are restored afterwards; no
progress means no attempt; the attempt after reclaim obeys the watermarks even
for a caller entitled to ignore them (__alloc_pages_high_priority is the only
place that does); a failed attempt drains the per-cpu lists and tries again.
And should_alloc_retry, which decides whether the slow path goes round again.

try_to_free_pages is replaced by a stand-in that "reclaims" by freeing pages
the test holds, so each rule is seen alone. Each test's docstring names the
page_alloc mutants (``python scripts/mutation.py``) it was written to kill.
"""

from __future__ import annotations

import pytest
from slab_helpers import at_min, make_kernel

from emulator.flags import ALLOC_CPUSET, ALLOC_NO_WATERMARKS, ALLOC_WMARK_MIN, GFP, GFP_KERNEL, PF
from emulator.mm.page import Owner
from emulator.mm.page_alloc import PageAllocator
from emulator.task import current

FLAGS = ALLOC_WMARK_MIN | ALLOC_CPUSET


def reclaim_by_freeing(k, pages, cpu: int, seen: list, progress: int | None = None):
    """A try_to_free_pages that frees ``pages`` from ``cpu`` (onto its per-cpu list,
    as a reclaimer running there would) and records the reclaimer's flags."""
    async def fake(gfp, order, task):
        seen.append((gfp, order, task.flags))
        token = current.set(k.new_task("reclaimer", cpu=cpu))
        try:
            for page in pages:
                k.page_alloc.free_page(page, cold=True)
        finally:
            current.reset(token)
        return len(pages) if progress is None else progress
    return fake


async def test_reclaim_runs_with_pf_memalloc_and_the_first_attempt_uses_the_cpus_list():
    """try_to_free_pages gets the caller's gfp and order, with PF_MEMALLOC added to
    the task's other flags, which come back afterwards; the first attempt
    allocates on the task's CPU (the page it freed there last comes back first,
    no drain needed) for the caller's owner. Kills _alloc_pages_direct_reclaim's
    mutants that drop the PF_MEMALLOC or the restore, pass None for the gfp, skip
    the first attempt, or call it without the owner or the CPU."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    pa = k.page_alloc
    parked = pa.get_page_from_freelist(GFP_KERNEL, 0, FLAGS, Owner.KERNEL)
    token = current.set(k.new_task("freer", cpu=0))
    try:
        pa.free_page(parked)  # hot, onto CPU 0's list
    finally:
        current.reset(token)
    assert k.pgdat.zone.pageset[0].count == 1
    seen = []
    k.vmscan.try_to_free_pages = reclaim_by_freeing(k, [], 0, seen, progress=1)
    task = k.new_task("usemem", PF.SWAPWRITE, cpu=0)
    page, progress = await pa._alloc_pages_direct_reclaim(GFP_KERNEL, 0, task, FLAGS, Owner.ANON)
    assert seen == [(GFP_KERNEL, 0, PF.SWAPWRITE | PF.MEMALLOC)]
    assert task.flags == PF.SWAPWRITE
    assert progress == 1 and page is parked and page.owner == Owner.ANON
    assert k.pgdat.zone.pageset[0].count == 0 and k.vmstat["pcp_drained"] == 0


async def test_no_progress_means_no_attempt():
    """try_to_free_pages returning 0: (None, 0), and no page is taken although memory
    is free. Kills the `if not progress` test inverted or removed."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    seen = []
    k.vmscan.try_to_free_pages = reclaim_by_freeing(k, [], 0, seen, progress=0)
    free = k.pgdat.zone.nr_free_pages
    task = k.new_task("usemem", cpu=0)
    assert await k.page_alloc._alloc_pages_direct_reclaim(
        GFP_KERNEL, 0, task, FLAGS, Owner.ANON) == (None, 0)
    assert k.pgdat.zone.nr_free_pages == free and len(seen) == 1


async def test_the_attempt_after_reclaim_obeys_the_watermarks():
    """Even with ALLOC_NO_WATERMARKS in alloc_flags the attempt after reclaim checks
    the min watermark (alloc_flags & ~ALLOC_NO_WATERMARKS): at min with nothing
    reclaimed onto the lists it fails. Kills the mask removed or inverted."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    at_min(k)
    free = k.pgdat.zone.nr_free_pages
    k.vmscan.try_to_free_pages = reclaim_by_freeing(k, [], 0, [], progress=1)
    task = k.new_task("usemem", cpu=0)
    page, progress = await k.page_alloc._alloc_pages_direct_reclaim(
        GFP_KERNEL, 0, task, FLAGS | ALLOC_NO_WATERMARKS, Owner.ANON)
    assert (page, progress) == (None, 1)
    assert k.pgdat.zone.nr_free_pages == free


async def test_pages_reclaimed_onto_another_cpus_list_are_found_after_draining():
    """Reclaim frees 5 pages onto CPU 0's per-cpu list; the allocating task runs on
    CPU 1 and the zone is at min, so the first attempt fails (pcp pages are not
    in NR_FREE_PAGES); drain_all_pages gives them back and the second attempt
    succeeds. Kills the drain or the second attempt removed, or the attempt's
    arguments (gfp, order, flags, owner, cpu) replaced."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    held = at_min(k)
    k.vmscan.try_to_free_pages = reclaim_by_freeing(k, held[:5], 0, [])
    task = k.new_task("usemem", cpu=1)
    page, progress = await k.page_alloc._alloc_pages_direct_reclaim(
        GFP_KERNEL, 0, task, FLAGS, Owner.ANON)
    assert progress == 5 and page is not None and page.owner == Owner.ANON
    assert k.vmstat["pcp_drained"] == 5  # all of CPU 0's list went back first
    assert k.pgdat.zone.pageset[1].count > 0  # the second attempt went through CPU 1's list


@pytest.mark.parametrize("gfp, order, progress, retry", [
    (GFP_KERNEL | GFP.NORETRY, 0, 1, False),               # __GFP_NORETRY first: never
    (GFP_KERNEL | GFP.NORETRY | GFP.NOFAIL, 0, 1, False),
    (GFP_KERNEL | GFP.NOFAIL, 9, 0, True),                 # __GFP_NOFAIL: always
    (GFP_KERNEL, 3, 0, True),                              # order <= COSTLY_ORDER: always
    (GFP_KERNEL, 4, 1, False),                             # costly, no __GFP_REPEAT
    (GFP_KERNEL | GFP.REPEAT, 4, 1, True),                 # costly, __GFP_REPEAT, progress
    (GFP_KERNEL | GFP.REPEAT, 4, 0, False),                # ... without progress
])
def test_should_alloc_retry(gfp, order, progress, retry):
    """should_alloc_retry (3.6): the order of its tests and the costly-order
    boundary. Kills should_alloc_retry's mutants that drop or reorder a test,
    move the boundary (`<=` -> `<`) or make __GFP_REPEAT ignore the progress."""
    assert PageAllocator.should_alloc_retry(gfp, order, progress) is retry


async def test_alloc_page_is_one_order_0_page():
    """alloc_page is alloc_pages of order 0: one page, and the zone's free count
    (buddy plus per-cpu lists) goes down by exactly one. Kills alloc_page 9
    (order 1)."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    zone = k.pgdat.zone
    before = zone.nr_free_pages + zone.nr_pcp_pages
    page = await k.page_alloc.alloc_page(GFP_KERNEL, k.new_task("usemem", cpu=0), Owner.ANON)
    assert page.order == 0 and page.owner == Owner.ANON
    assert zone.nr_free_pages + zone.nr_pcp_pages == before - 1
