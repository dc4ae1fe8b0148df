"""The page allocator: fast path, slow path, reserves, pfmemalloc marking.

Models mm/page_alloc.c (3.6): __alloc_pages_nodemask, get_page_from_freelist,
gfp_to_alloc_flags, gfp_pfmemalloc_allowed, __alloc_pages_slowpath (kswapd
wake-up, the min-watermark attempt, __alloc_pages_high_priority,
__alloc_pages_direct_reclaim, __alloc_pages_may_oom, should_alloc_retry with
wait_iff_congested), __free_pages.

Patch gates (emulator/patches.py): 3 (__GFP_MEMALLOC grants
ALLOC_NO_WATERMARKS), 4 (softirq with PF_MEMALLOC may use the reserves),
5 (page->pfmemalloc only when the no-watermark attempt was needed; without it
every page a reserve-entitled caller gets from the slow path is marked, as
patch 1 alone did).

Per-cpu page lists (mmzone.py): order-0 pages come from the running CPU's
list for the allocation's migrate type (allocflags_to_migratetype) and go
back to the list for their pageblock's type; __free_pages finds that CPU
through ``current``. A direct reclaimer
whose first attempt after reclaim fails drains every CPU's list
(drain_all_pages) and tries once more, as 3.6 does.

Simplified: no compaction (order > 0 requests rely on the buddy lists and reclaim), no
cpusets or mempolicies (ALLOC_CPUSET is computed but has no effect), one zone
so the zonelist walk is one step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from emulator.flags import (
    ALLOC_CPUSET,
    ALLOC_HARDER,
    ALLOC_HIGH,
    ALLOC_NO_WATERMARKS,
    ALLOC_WMARK_HIGH,
    ALLOC_WMARK_LOW,
    ALLOC_WMARK_MASK,
    ALLOC_WMARK_MIN,
    GFP,
    PF,
    gfp_name,
)
from emulator.mm.mmzone import MAX_ORDER, PAGE_ALLOC_COSTLY_ORDER, allocflags_to_migratetype
from emulator.mm.page import PG, Owner, Page
from emulator.patches import (
    GFP_MEMALLOC,
    PFMEMALLOC_WHEN_NEEDED,
    SLAB_PFMEMALLOC,
    SOFTIRQ_PF_MEMALLOC,
    PatchSet,
)
from emulator.task import Task, current

if TYPE_CHECKING:
    from emulator.kernel import Kernel

log = structlog.get_logger("swapnbd.mm")


def gfp_to_alloc_flags(gfp: GFP, task: Task, patches: PatchSet) -> int:
    """gfp_to_alloc_flags(): what a caller in ``task``'s context may dip into.

    Simplified: real-time tasks do not exist, so the rt_task ALLOC_HARDER rule never fires.
    """
    alloc_flags = ALLOC_WMARK_MIN | ALLOC_CPUSET
    wait = gfp & GFP.WAIT
    if gfp & GFP.HIGH:  # ALLOC_HIGH == __GFP_HIGH
        alloc_flags |= ALLOC_HIGH
    if not wait:
        if not gfp & GFP.NOMEMALLOC:
            alloc_flags |= ALLOC_HARDER
        alloc_flags &= ~ALLOC_CPUSET
    if not gfp & GFP.NOMEMALLOC:
        if gfp & GFP.MEMALLOC and patches.has(GFP_MEMALLOC):
            alloc_flags |= ALLOC_NO_WATERMARKS
        elif task.in_serving_softirq() and task.flags & PF.MEMALLOC and patches.has(SOFTIRQ_PF_MEMALLOC):
            alloc_flags |= ALLOC_NO_WATERMARKS
        elif not task.in_interrupt() and (task.flags & PF.MEMALLOC or task.memdie):
            alloc_flags |= ALLOC_NO_WATERMARKS
    return alloc_flags


def gfp_pfmemalloc_allowed(gfp: GFP, task: Task, patches: PatchSet) -> bool:
    """gfp_pfmemalloc_allowed(): may this caller use the PFMEMALLOC reserves?"""
    return bool(gfp_to_alloc_flags(gfp, task, patches) & ALLOC_NO_WATERMARKS)


class PageAllocator:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.zone = k.pgdat.zone
        self.vmstat = k.vmstat
        #: pages freed, by the freeing task's comm ("-": outside any task); an
        #: emulator account that the NBD sender-stall events break down
        self.pgfree_by: dict[str, int] = {}

    # -- get_page_from_freelist -----------------------------------------------------
    def get_page_from_freelist(self, gfp: GFP, order: int, alloc_flags: int,
                               owner: Owner, cpu: int | None = None) -> Page | None:
        """The watermark check, then buffered_rmqueue on ``cpu`` (None: no CPU
        context, straight from the buddy lists) for the migrate type ``gfp``
        asks for."""
        zone = self.zone
        with self.k.lock:
            below_min = False
            if not alloc_flags & ALLOC_NO_WATERMARKS:
                mark = zone.watermark[alloc_flags & ALLOC_WMARK_MASK]
                if not zone.zone_watermark_ok(order, mark, 0, alloc_flags):
                    return None
                # Passed only thanks to ALLOC_HIGH/ALLOC_HARDER: the band below min
                # left to atomic and __GFP_HIGH callers, which cannot reclaim.
                below_min = (alloc_flags & (ALLOC_HIGH | ALLOC_HARDER)
                             and not zone.zone_watermark_ok(order, zone.min_wmark_pages))
            migratetype = allocflags_to_migratetype(gfp, zone.page_group_by_mobility_disabled)
            page = zone.buffered_rmqueue(order, cpu, migratetype, bool(gfp & GFP.COLD))
            if page is None:
                return None
            self._prep_new_page(page, order, owner)
            if self.k.patches.has(PFMEMALLOC_WHEN_NEEDED) and alloc_flags & ALLOC_NO_WATERMARKS:
                # Patch 5: marked only when this very attempt ignored the watermarks.
                self._mark_pfmemalloc(page)
            if alloc_flags & ALLOC_NO_WATERMARKS:
                self.vmstat["pgalloc_pfmemalloc"] += 1 << order
            elif below_min:
                self.vmstat["pgalloc_below_min"] += 1 << order
            return page

    def _mark_pfmemalloc(self, page: Page) -> None:
        if not page.pfmemalloc:
            page.pfmemalloc = True
            self.vmstat["nr_pfmemalloc_pages"] += 1 << page.order

    def _prep_new_page(self, page: Page, order: int, owner: Owner) -> None:
        page.order = order
        page.pfmemalloc = False
        mem_map = self.zone.mem_map
        for pfn in range(page.pfn, page.pfn + (1 << order)):
            p = mem_map[pfn]
            p.owner = owner
            p.flags = PG(0)
        self.vmstat["pgalloc_normal"] += 1 << order
        self.vmstat["nr_free_pages"] = self.zone.nr_free_pages
        self.vmstat["nr_pcp_pages"] = self.zone.nr_pcp_pages

    # -- __alloc_pages_nodemask -------------------------------------------------------
    async def alloc_pages(self, gfp: GFP, order: int, task: Task,
                          owner: Owner = Owner.KERNEL) -> Page | None:
        """alloc_pages(): the fast path at the low watermark, else the slow path."""
        page = self.get_page_from_freelist(gfp, order, ALLOC_WMARK_LOW | ALLOC_CPUSET, owner,
                                           task.cpu.id)
        if page is None:
            try:
                page = await self._alloc_pages_slowpath(gfp, order, task, owner)
            finally:
                task.activity = None
        return page

    async def alloc_page(self, gfp: GFP, task: Task, owner: Owner = Owner.KERNEL) -> Page | None:
        """alloc_page(): alloc_pages of order 0."""
        return await self.alloc_pages(gfp, 0, task, owner)

    async def _alloc_pages_slowpath(self, gfp: GFP, order: int, task: Task,
                                    owner: Owner) -> Page | None:
        k = self.k
        if order >= MAX_ORDER:
            return self._nopage(gfp, order, task, "order")
        wait = gfp & GFP.WAIT
        while True:  # restart:
            if not gfp & GFP.NO_KSWAPD:
                k.vmscan.wake_all_kswapd(order)
            alloc_flags = gfp_to_alloc_flags(gfp, task, k.patches)
            entitled = bool(alloc_flags & ALLOC_NO_WATERMARKS)
            while True:  # rebalance:
                page = self.get_page_from_freelist(gfp, order, alloc_flags & ~ALLOC_NO_WATERMARKS,
                                                   owner, task.cpu.id)
                if page is None and entitled:
                    page = await self._alloc_pages_high_priority(gfp, order, task, owner)
                if page is not None:
                    if (not k.patches.has(PFMEMALLOC_WHEN_NEEDED) and entitled
                            and k.patches.has(SLAB_PFMEMALLOC)):
                        # Patch 1 alone: any slow-path page of an entitled caller is marked.
                        self._mark_pfmemalloc(page)
                    return page
                if not wait:
                    return self._nopage(gfp, order, task, "atomic")
                if task.flags & PF.MEMALLOC:
                    return self._nopage(gfp, order, task, "PF_MEMALLOC")
                if task.memdie and not gfp & GFP.NOFAIL:
                    return self._nopage(gfp, order, task, "TIF_MEMDIE")
                page, progress = await self._alloc_pages_direct_reclaim(
                    gfp, order, task, alloc_flags, owner)
                if page is not None:
                    return page
                if not progress:
                    if gfp & GFP.FS and not gfp & GFP.NORETRY:
                        page = await k.oom.alloc_pages_may_oom(gfp, order, task, owner)
                        if page is not None:
                            return page
                        if task.fatal_signal and not gfp & GFP.NOFAIL:
                            return self._nopage(gfp, order, task, "killed")
                        if not gfp & GFP.NOFAIL and order > PAGE_ALLOC_COSTLY_ORDER:
                            return self._nopage(gfp, order, task, "costly")
                        break  # goto restart
                if not self.should_alloc_retry(gfp, order, progress):
                    return self._nopage(gfp, order, task, "noretry")
                await k.bdi.wait_iff_congested(task, k.hz(1 / 50))
                if task.memdie:  # chosen by the OOM killer meanwhile: reserves now
                    alloc_flags = gfp_to_alloc_flags(gfp, task, k.patches)
                    entitled = bool(alloc_flags & ALLOC_NO_WATERMARKS)

    async def _alloc_pages_high_priority(self, gfp, order, task, owner) -> Page | None:
        """__alloc_pages_high_priority(): ignore the watermarks (patch 6's local
        zonelist is the only zonelist here)."""
        while True:
            page = self.get_page_from_freelist(gfp, order, ALLOC_NO_WATERMARKS, owner,
                                               task.cpu.id)
            if page is not None or not gfp & GFP.NOFAIL:
                return page
            await self.k.bdi.wait_iff_congested(task, self.k.hz(1 / 50))

    async def _alloc_pages_direct_reclaim(self, gfp, order, task, alloc_flags, owner):
        """__alloc_pages_direct_reclaim(): cond_resched, __perform_reclaim with
        PF_MEMALLOC set, cond_resched again, then an attempt; if it fails,
        drain_all_pages and one more. The second cond_resched is where a reclaimer
        whose slice ran out, or that a woken or higher-priority task preempts,
        gives up its CPU between freeing pages and allocating one."""
        await task.cond_resched()
        saved = task.flags & PF.MEMALLOC
        task.flags |= PF.MEMALLOC
        task.activity = f"direct reclaim for a {gfp_name(gfp)} order-{order} allocation"
        try:
            progress = await self.k.vmscan.try_to_free_pages(gfp, order, task)
        finally:
            task.flags = (task.flags & ~PF.MEMALLOC) | saved
        await task.cond_resched()
        if not progress:
            return None, 0
        flags = alloc_flags & ~ALLOC_NO_WATERMARKS
        page = self.get_page_from_freelist(gfp, order, flags, owner, task.cpu.id)
        if page is None:
            self.drain_all_pages()
            page = self.get_page_from_freelist(gfp, order, flags, owner, task.cpu.id)
        return page, progress

    def drain_all_pages(self) -> None:
        """drain_all_pages(): every CPU's per-cpu list back to the buddy lists (the
        kernel sends an IPI to each CPU; here the lists are drained in place)."""
        zone = self.zone
        with self.k.lock:
            drained = sum(zone.drain_pages(pcp.cpu) for pcp in zone.pageset)
            if drained:
                self.vmstat["pcp_drained"] += drained
                self.vmstat["nr_free_pages"] = zone.nr_free_pages
                self.vmstat["nr_pcp_pages"] = zone.nr_pcp_pages

    @staticmethod
    def should_alloc_retry(gfp: GFP, order: int, did_some_progress: int) -> bool:
        """should_alloc_retry(): never with __GFP_NORETRY, always with
        __GFP_NOFAIL or for order <= PAGE_ALLOC_COSTLY_ORDER, else only with
        __GFP_REPEAT and progress."""
        if gfp & GFP.NORETRY:
            return False
        if gfp & GFP.NOFAIL:
            return True
        if order <= PAGE_ALLOC_COSTLY_ORDER:
            return True
        return bool(gfp & GFP.REPEAT and did_some_progress)

    def _nopage(self, gfp: GFP, order: int, task: Task, why: str) -> None:
        self.vmstat["alloc_fail"] += 1
        if order:
            self.vmstat["pgalloc_high_order_fail"] += 1
        if not gfp & GFP.NOWARN:
            log.debug("alloc_fail", comm=task.comm, pid=task.pid, order=order,
                      gfp=gfp_name(gfp), reason=why, free=self.zone.nr_free_pages)
        return None

    # -- __free_pages ---------------------------------------------------------------
    def free_pages(self, page: Page, order: int | None = None, *, cold: bool = False) -> None:
        """__free_pages(): order 0 onto the running CPU's per-cpu list (``cold``: at
        its tail, as reclaim frees), else, or outside any task, to the buddy lists."""
        if order is None:
            order = page.order
        zone = self.zone
        with self.k.lock:
            if page.pfmemalloc:
                self.vmstat["nr_pfmemalloc_pages"] -= 1 << order
                page.pfmemalloc = False
            mem_map = zone.mem_map
            for pfn in range(page.pfn, page.pfn + (1 << order)):
                p = mem_map[pfn]
                assert not p.flags & PG.buddy, f"double free of {p!r}"
                p.owner = Owner.FREE
                p.flags = PG(0)
                p.mm = None
                p.swap = 0
                p.contents = None
                p.slab = None
                p.private = None
                p.young = False
            task = current.get()
            comm = task.comm if task is not None else "-"
            self.pgfree_by[comm] = self.pgfree_by.get(comm, 0) + (1 << order)
            if task is not None and order == 0:
                zone.free_hot_cold_page(page, task.cpu.id, cold)
            else:
                zone.free_one_page(page, order)
                # Resets the reclaim failure heuristics, like free_one_page().
                zone.pages_scanned = 0
                zone.all_unreclaimable = False
            self.vmstat["pgfree"] += 1 << order
            self.vmstat["nr_free_pages"] = zone.nr_free_pages
            self.vmstat["nr_pcp_pages"] = zone.nr_pcp_pages

    def free_page(self, page: Page, *, cold: bool = False) -> None:
        """free_page(): __free_pages of order 0."""
        self.free_pages(page, 0, cold=cold)


# Re-exported for callers that want the watermark-index names.
__all__ = [
    "ALLOC_WMARK_HIGH", "ALLOC_WMARK_LOW", "ALLOC_WMARK_MIN", "PageAllocator",
    "gfp_pfmemalloc_allowed", "gfp_to_alloc_flags",
]
