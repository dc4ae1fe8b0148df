"""Page reclaim: LRU aging, shrink_page_list, kswapd, direct reclaim, throttling.

Models mm/vmscan.c (3.6): scan_control; get_scan_count; shrink_lruvec /
shrink_list / shrink_active_list / shrink_inactive_list (too_many_isolated,
the writeback wait, putback_inactive_pages freeing pages whose process exited
while they were isolated); shrink_page_list for anonymous pages (add_to_swap,
try_to_unmap, pageout -> swap_writepage, __remove_mapping); kswapd,
kswapd_try_to_sleep, prepare_kswapd_sleep, balance_pgdat (priority loop,
balance gap, all_unreclaimable, congestion_wait, kswapd_skip_congestion_wait);
try_to_free_pages / do_try_to_free_pages (allocstall, priority loop,
wait_iff_congested); patch 15's throttle_direct_reclaim and
pfmemalloc_watermark_ok, patch 16's pgscan_direct_throttle. Congestion
(congestion_wait, wait_iff_congested) is mm/backing_dev.py's; the LRU
helpers (lru_cache_add, rotate_reclaimable_page) are mm/swap.py's.

Page cache pages are clean and unmapped (read at boot, never written), so
reclaiming one needs no I/O. Simplified: shrink_slab has nothing reclaimable;
no memcg; no lumpy
reclaim or compaction; one zone, so the zonelist loops are one step; page
"locking" during reclaim is the PG_locked bit, waited on through the hashed
page wait table. Not modelled: throttle_vm_writeout (it would not fire: with
one page per request, writeback stays far below 110 % of the dirty
threshold), the per-CPU lru_rotate_pvecs (rotate_reclaimable_page acts at
once), __remove_mapping's reference-count check. zone_reclaimable_pages
counts isolated pages, which 3.5's does not (only kswapd's all_unreclaimable
test uses it). One emulator addition: when kswapd finds nothing at all on the
LRU to scan it naps for a 4 ms tick instead of spinning (the kernel would spin;
the outcome is the same, the host CPU is spared).

Details: get_scan_count weighs anon_prio 60 against file_prio 140 (swappiness
60) by recent_scanned/rotated; file only without swap, anon only when file +
free <= high. Referenced anon pages are deactivated anyway (page_referenced
clears the young bit), as in 3.6. shrink_page_list frees its batch together
after the loop (free_hot_cold_page_list), so a reclaimer asleep in
get_request_wait on a later page still holds the earlier ones. Without
page_freeze_refs a page a concurrent swap-in looked up can be freed; the fault
reads it again. do_try_to_free_pages returns 1 when nothing was reclaimed but
the zone is not all_unreclaimable, so order-0 allocations retry instead of
OOM-killing. kswapd_try_to_sleep naps HZ/10 first; prepare_kswapd_sleep wakes
pfmemalloc_wait waiters and never sleeps while they wait; all_unreclaimable
comes at 6x the reclaimable pages scanned. Patch 15: pfmemalloc_watermark_ok
is free > sum(min)/2; kernel threads are exempt; !__GFP_FS callers wait at
most HZ, others killably; a task with a fatal signal returns 1 without
reclaiming.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import structlog
import trio

from emulator.flags import GFP, GFP_KERNEL, PF
from emulator.mm.mmzone import (
    LRU_ACTIVE_ANON,
    LRU_ACTIVE_FILE,
    LRU_INACTIVE_ANON,
    LRU_INACTIVE_FILE,
    LRU_NAMES,
)
from emulator.mm.page import PG, Page
from emulator.mm.swap import LruCache
from emulator.patches import PGSCAN_DIRECT_THROTTLE, THROTTLE_DIRECT_RECLAIM
from emulator.printk import debug_enabled
from emulator.task import Task

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.mm.mmzone import Zone

log = structlog.get_logger("swapnbd.vmscan")

SWAP_CLUSTER_MAX = 32
DEF_PRIORITY = 12
VM_SWAPPINESS = 60
_NR_LRU = tuple(f"nr_{name}" for name in LRU_NAMES)


class ScanControl:
    """struct scan_control."""

    __slots__ = ("gfp_mask", "may_writepage", "may_unmap", "may_swap", "nr_to_reclaim",
                 "order", "nr_scanned", "nr_reclaimed", "priority", "kswapd")

    def __init__(self, gfp_mask: GFP, nr_to_reclaim: float, order: int, kswapd: bool) -> None:
        self.gfp_mask = gfp_mask
        self.may_writepage = True  # !laptop_mode
        self.may_unmap = True
        self.may_swap = True
        self.nr_to_reclaim = nr_to_reclaim
        self.order = order
        self.nr_scanned = 0
        self.nr_reclaimed = 0
        self.priority = DEF_PRIORITY
        self.kswapd = kswapd


class VMScan(LruCache):
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.pgdat = k.pgdat
        self.zone = k.pgdat.zone
        self.vmstat = k.vmstat
        self.kswapd_woken = False
        self.throttled: dict[int, float] = {}  # pid -> since
        self.throttle_events = 0
        self.throttle_total_s = 0.0
        #: Pages shrink_page_list has reclaimed into a batch's free_pages list but
        #: not yet freed (their reclaimer is still walking, or asleep in, the batch).
        self.nr_reclaimed_unfreed = 0

    # -- kswapd wake-up ----------------------------------------------------------------
    def wake_all_kswapd(self, order: int) -> None:
        """wake_all_kswapd(): wakeup_kswapd for the one zone."""
        self.wakeup_kswapd(self.zone, order)

    def wakeup_kswapd(self, zone: Zone, order: int) -> None:
        """wakeup_kswapd(): record the order; wake a sleeping kswapd unless the zone
        meets its low watermark."""
        pgdat = self.pgdat
        if pgdat.kswapd_max_order < order:
            pgdat.kswapd_max_order = order
        if not pgdat.kswapd_wait.active():
            return
        if zone.zone_watermark_ok(order, zone.low_wmark_pages, 0, 0):
            return
        self._wake_kswapd()

    def _wake_kswapd(self) -> None:
        self.kswapd_woken = True
        self.pgdat.kswapd_wait.wake_up()

    def inactive_list_is_low(self, zone: Zone, file: int) -> bool:
        """inactive_anon_is_low (inactive * inactive_ratio < active) and
        inactive_file_is_low (inactive < active)."""
        if file:
            return len(zone.lru[LRU_INACTIVE_FILE]) < len(zone.lru[LRU_ACTIVE_FILE])
        return len(zone.lru[LRU_INACTIVE_ANON]) * zone.inactive_ratio < len(zone.lru[LRU_ACTIVE_ANON])

    def inactive_anon_is_low(self, zone: Zone) -> bool:
        """inactive_anon_is_low(): inactive x inactive_ratio < active."""
        return self.inactive_list_is_low(zone, 0)

    # -- shrink_active_list -------------------------------------------------------------
    def shrink_active_list(self, nr_to_scan: int, zone: Zone, sc: ScanControl,
                           lru: int = LRU_ACTIVE_ANON) -> None:
        """Move up to nr_to_scan pages from the active list's tail to the inactive
        list. page_referenced() clears the young bit; anon pages are deactivated
        even when referenced, and so are file pages (no VM_EXEC text here)."""
        k = self.k
        file = lru >= LRU_INACTIVE_FILE
        with k.lock:
            active = zone.lru[lru]
            inactive = zone.lru[lru - 1]
            n = min(nr_to_scan, len(active))
            rotated = 0
            for _ in range(n):
                page = active.pop_tail()
                if page.young:
                    page.young = False  # page_referenced()
                    rotated += 1
                page.flags &= ~PG.active
                inactive.add(page)
            zone.pages_scanned += n
            zone.recent_scanned[file] += n
            zone.recent_rotated[file] += rotated
            self.vmstat[_NR_LRU[lru]] -= n
            self.vmstat[_NR_LRU[lru - 1]] += n
            self.vmstat["pgrefill_normal"] += n
            self.vmstat["pgdeactivate"] += n

    # -- shrink_inactive_list -----------------------------------------------------------
    def too_many_isolated(self, zone: Zone, file: int, task: Task) -> bool:
        """too_many_isolated(): a direct reclaimer waits while more pages of the type
        are isolated than are inactive (kswapd never does)."""
        if task.flags & PF.KSWAPD:
            return False
        inactive = len(zone.lru[LRU_INACTIVE_FILE if file else LRU_INACTIVE_ANON])
        return zone.nr_isolated[file] > inactive

    async def shrink_inactive_list(self, nr_to_scan: int, zone: Zone, sc: ScanControl,
                                   task: Task, lru: int = LRU_INACTIVE_ANON) -> int:
        """shrink_inactive_list(): wait while too_many_isolated, isolate up to
        ``nr_to_scan`` pages from the list's tail, shrink_page_list them, put the
        survivors back (putback_inactive_pages) and wait_iff_congested when most
        were under writeback. Returns the pages reclaimed."""
        k = self.k
        file = int(lru >= LRU_INACTIVE_FILE)
        while self.too_many_isolated(zone, file, task):
            await self.k.bdi.congestion_wait(task, k.hz(0.1))
            if task.fatal_signal:
                return SWAP_CLUSTER_MAX
        isolated_name = "nr_isolated_file" if file else "nr_isolated_anon"
        with k.lock:
            inactive = zone.lru[lru]
            n = min(nr_to_scan, len(inactive))
            page_list = []
            for _ in range(n):
                page = inactive.pop_tail()
                page.flags &= ~PG.lru
                page_list.append(page)
            nr_taken = len(page_list)
            zone.nr_isolated[file] += nr_taken
            self.vmstat[isolated_name] += nr_taken
            self.vmstat[_NR_LRU[lru]] -= nr_taken
            zone.pages_scanned += n
            zone.recent_scanned[file] += n
            self.vmstat["pgscan_kswapd_normal" if sc.kswapd else "pgscan_direct_normal"] += n
        sc.nr_scanned += n
        if not nr_taken:
            return 0
        nr_reclaimed, nr_writeback, survivors = await self.shrink_page_list(page_list, zone, sc, task)
        with k.lock:
            self.vmstat["pgsteal_kswapd_normal" if sc.kswapd else "pgsteal_direct_normal"] += nr_reclaimed
            for page in survivors:  # putback_inactive_pages
                if self._orphaned(page):
                    # put_page_testzero(): the process exited while the page was
                    # isolated (exit_mmap left it to reclaim), so reclaim's own
                    # reference was the last one. Free it instead of putting it back.
                    k.page_alloc.free_page(page, cold=True)
                    continue
                if page.flags & PG.active:
                    zone.recent_rotated[file] += 1
                    self.vmstat["pgactivate"] += 1
                self.add_page_to_lru(page, self.page_lru(page))
            zone.nr_isolated[file] -= nr_taken
            self.vmstat[isolated_name] -= nr_taken
        if nr_writeback and nr_writeback >= (nr_taken >> (DEF_PRIORITY - sc.priority)):
            await self.k.bdi.wait_iff_congested(task, k.hz(0.1))
        return nr_reclaimed

    @staticmethod
    def _orphaned(page: Page) -> bool:
        """An anon page no process maps, outside the swap cache and not under I/O:
        nothing but the isolating reclaimer refers to it."""
        return (page.mm is None and page.flags & PG.swapbacked
                and not page.flags & (PG.swapcache | PG.writeback | PG.locked))

    # -- shrink_page_list ---------------------------------------------------------------
    async def shrink_page_list(self, page_list: list[Page], zone: Zone, sc: ScanControl,
                               task: Task) -> tuple[int, int, list[Page]]:
        """shrink_page_list() for anonymous and clean page-cache pages: writeback
        pages get PG_reclaim and stay; referenced pages are activated; add_to_swap
        (only with __GFP_IO), try_to_unmap, pageout -> swap_writepage;
        __remove_mapping frees clean unmapped ones, the batch at the end
        (free_hot_cold_page_list). Returns (reclaimed, under writeback, survivors)."""
        k = self.k
        swap = k.swap
        nr_reclaimed = 0
        nr_writeback = 0
        survivors: list[Page] = []
        free_pages: list[Page] = []
        try:
            for page in page_list:
                await task.cond_resched()
                if page.flags & PG.locked:  # trylock_page failed
                    survivors.append(page)
                    continue
                if page.flags & PG.writeback:
                    page.flags |= PG.reclaim
                    nr_writeback += 1
                    survivors.append(page)
                    continue
                if not page.flags & PG.swapbacked:
                    # A clean, unmapped page-cache page: PAGEREF_RECLAIM_CLEAN, then
                    # __remove_mapping. No I/O is needed, so even GFP_NOIO reclaim frees it.
                    if page.young:
                        page.young = False
                        page.flags |= PG.active
                        survivors.append(page)
                        continue
                    with k.lock:
                        k.page_cache_remove(page)
                        self.nr_reclaimed_unfreed += 1
                    free_pages.append(page)
                    nr_reclaimed += 1
                    continue
                if page.young:  # page_check_references: referenced -> activate
                    page.young = False
                    page.flags |= PG.active
                    survivors.append(page)
                    continue
                page.flags |= PG.locked
                try:
                    if not page.flags & PG.swapcache:
                        if not sc.gfp_mask & GFP.IO:
                            survivors.append(page)
                            continue
                        if not await swap.add_to_swap(page, task):
                            page.flags |= PG.active  # activate_locked: swap full / no memory
                            survivors.append(page)
                            continue
                    if page.mm is not None:
                        swap.try_to_unmap(page)
                    if page.flags & PG.dirty:
                        # may_enter_fs for a swap-cache page needs __GFP_IO.
                        if not sc.may_writepage or not sc.gfp_mask & GFP.IO:
                            survivors.append(page)
                            continue
                        # pageout(): clear dirty, SetPageReclaim, swap_writepage.
                        page.flags &= ~PG.dirty
                        page.flags |= PG.reclaim
                        ok = await swap.swap_writepage(page, task)
                        if ok:
                            self.vmstat["nr_vmscan_write"] += 1
                        survivors.append(page)  # PG_writeback now (or redirtied): keep
                        continue
                    # Clean, unmapped, in the swap cache: __remove_mapping.
                    if page.flags & PG.writeback or page.mm is not None:
                        survivors.append(page)
                        continue
                    with k.lock:
                        swap.delete_from_swap_cache(page, task)
                        page.flags &= ~PG.locked
                        self.del_page_from_lru(page)
                        self.nr_reclaimed_unfreed += 1
                    free_pages.append(page)
                    nr_reclaimed += 1
                    page = None
                finally:
                    if page is not None and page.flags & PG.locked:
                        k.swap.unlock_page(page)
        finally:
            # free_hot_cold_page_list(&free_pages, 1): the batch's reclaimed pages go
            # back only now, so a reclaimer that slept in get_request_wait on a
            # later page of its batch held the earlier ones until it woke. (In a
            # finally so that a task cancelled mid-batch at teardown loses no frame.)
            with k.lock:
                for page in free_pages:
                    k.page_alloc.free_page(page, cold=True)
                self.nr_reclaimed_unfreed -= len(free_pages)
        sc.nr_reclaimed += nr_reclaimed
        return nr_reclaimed, nr_writeback, survivors

    # -- shrink_zone ------------------------------------------------------------------
    def get_scan_count(self, zone: Zone, sc: ScanControl, priority: int) -> list[int]:
        """get_scan_count() (3.6): how many pages of each LRU to scan at this priority.

        Anon and file are balanced by swappiness (anon_prio 60, file_prio 140)
        weighted by each type's recent_scanned / recent_rotated; file only without
        swap space; anon only when file + free <= the high watermark."""
        k = self.k
        lists = zone.lru
        anon = len(lists[LRU_INACTIVE_ANON]) + len(lists[LRU_ACTIVE_ANON])
        file = len(lists[LRU_INACTIVE_FILE]) + len(lists[LRU_ACTIVE_FILE])
        force_scan = sc.kswapd and zone.all_unreclaimable
        noswap = not sc.may_swap or k.swap.nr_swap_pages() <= 0
        if noswap:
            fraction, denominator = (0, 1), 1
        elif file + zone.nr_free_pages <= zone.high_wmark_pages:
            fraction, denominator = (1, 0), 1
        else:
            anon_prio = VM_SWAPPINESS
            file_prio = 200 - anon_prio
            rs, rr = zone.recent_scanned, zone.recent_rotated
            if rs[0] > anon // 4:
                rs[0] //= 2
                rr[0] //= 2
            if rs[1] > file // 4:
                rs[1] //= 2
                rr[1] //= 2
            ap = (anon_prio + 1) * (rs[0] + 1) // (rr[0] + 1)
            fp = (file_prio + 1) * (rs[1] + 1) // (rr[1] + 1)
            fraction, denominator = (ap, fp), ap + fp + 1
        nr = []
        for lru in range(4):
            scan = len(lists[lru])
            if priority or noswap:
                scan >>= priority
                if not scan and force_scan:
                    scan = SWAP_CLUSTER_MAX
                scan = scan * fraction[lru >> 1] // denominator
            nr.append(scan)
        return nr

    async def shrink_zone(self, zone: Zone, sc: ScanControl, priority: int, task: Task) -> None:
        """shrink_zone -> shrink_lruvec: SWAP_CLUSTER_MAX-sized bites of each list
        (shrink_list: active lists are only aged when their inactive list is low)."""
        sc.priority = priority
        nr = self.get_scan_count(zone, sc, priority)
        nr_reclaimed = 0
        while nr[LRU_INACTIVE_ANON] or nr[LRU_ACTIVE_FILE] or nr[LRU_INACTIVE_FILE]:
            for lru in range(4):
                if not nr[lru]:
                    continue
                n = min(nr[lru], SWAP_CLUSTER_MAX)
                nr[lru] -= n
                if lru & 1:
                    if self.inactive_list_is_low(zone, lru >> 1):
                        self.shrink_active_list(n, zone, sc, lru)
                else:
                    nr_reclaimed += await self.shrink_inactive_list(n, zone, sc, task, lru)
            if nr_reclaimed >= sc.nr_to_reclaim and priority < DEF_PRIORITY:
                break
            await task.cond_resched()
        if self.inactive_anon_is_low(zone):
            self.shrink_active_list(SWAP_CLUSTER_MAX, zone, sc, LRU_ACTIVE_ANON)

    # -- patch 15 ------------------------------------------------------------------------
    def pfmemalloc_watermark_ok(self) -> bool:
        """pfmemalloc_watermark_ok(): free > half the sum of the min watermarks; wakes
        kswapd when not."""
        pgdat = self.pgdat
        reserve = pgdat.reserve_pages()
        free = pgdat.nr_free_pages()
        ok = free > reserve // 2
        if not ok and pgdat.kswapd_wait.active():
            pgdat.classzone_idx = min(pgdat.classzone_idx, 0)
            self._wake_kswapd()
        return ok

    async def throttle_direct_reclaim(self, gfp: GFP, task: Task) -> None:
        """throttle_direct_reclaim() (patch 15; counter by patch 16)."""
        if not self.k.patches.has(THROTTLE_DIRECT_RECLAIM):
            return
        if task.flags & PF.KTHREAD:
            return
        if self.pfmemalloc_watermark_ok():
            return
        if self.k.patches.has(PGSCAN_DIRECT_THROTTLE):
            self.vmstat["pgscan_direct_throttle"] += 1
        pgdat = self.pgdat
        since = trio.current_time()
        self.throttled[task.pid] = since
        self.throttle_events += 1
        self.vmstat["throttle_active"] = len(self.throttled)
        log.info("throttle_begin", pid=task.pid, comm=task.comm, cpu=task.cpu.id,
                 free=pgdat.nr_free_pages(), threshold=pgdat.reserve_pages() // 2)
        timed_out = False
        try:
            if not gfp & GFP.FS:
                ok = await task.sleep_on(pgdat.pfmemalloc_wait, self.pfmemalloc_watermark_ok,
                                         timeout=self.k.hz(1.0), wchan="throttle_direct_reclaim")
                timed_out = not ok
            else:
                # wait_event_killable: a fatal signal ends the wait.
                await task.sleep_on(
                    pgdat.pfmemalloc_wait,
                    lambda: task.fatal_signal or self.pfmemalloc_watermark_ok(),
                    wchan="throttle_direct_reclaim")
        finally:
            waited = trio.current_time() - since
            self.throttled.pop(task.pid, None)
            self.throttle_total_s += waited
            self.vmstat["throttle_active"] = len(self.throttled)
        log.info("throttle_end", pid=task.pid, comm=task.comm, cpu=task.cpu.id,
                 waited_s=round(waited, 4), timed_out=timed_out)

    # -- direct reclaim ------------------------------------------------------------------
    async def try_to_free_pages(self, gfp: GFP, order: int, task: Task) -> int:
        """try_to_free_pages -> do_try_to_free_pages. Returns pages reclaimed, or 1
        if nothing was reclaimed but the zone is not all_unreclaimable."""
        await self.throttle_direct_reclaim(gfp, task)
        if task.fatal_signal and self.k.patches.has(THROTTLE_DIRECT_RECLAIM):
            # Patch 15: "Do not enter reclaim if fatal signal is pending. 1 is
            # returned so that the page allocator does not consider triggering
            # OOM". 3.5 has no such check: a killed task reclaims like any other.
            return 1
        sc = ScanControl(gfp, SWAP_CLUSTER_MAX, order, kswapd=False)
        self.vmstat["allocstall"] += 1
        task.allocstall += 1
        task.allocstall_high_order += order > 0
        if debug_enabled():
            log.debug("direct_reclaim_begin", pid=task.pid, comm=task.comm, cpu=task.cpu.id,
                      free=self.zone.nr_free_pages)
        zone = self.zone
        for priority in range(DEF_PRIORITY, -1, -1):
            sc.nr_scanned = 0
            if not (zone.all_unreclaimable and priority != DEF_PRIORITY):
                await self.shrink_zone(zone, sc, priority, task)
            if sc.nr_reclaimed >= sc.nr_to_reclaim:
                break
            if priority < DEF_PRIORITY - 2 and sc.nr_scanned:
                await self.k.bdi.wait_iff_congested(task, self.k.hz(0.1))
        task.direct_reclaimed += sc.nr_reclaimed
        if debug_enabled():
            log.debug("direct_reclaim_end", pid=task.pid, comm=task.comm, cpu=task.cpu.id,
                      reclaimed=sc.nr_reclaimed, priority=sc.priority)
        if sc.nr_reclaimed:
            return sc.nr_reclaimed
        if not zone.all_unreclaimable:
            return 1
        return 0

    # -- kswapd ------------------------------------------------------------------------
    def zone_balanced(self, zone: Zone, order: int, balance_gap: int = 0) -> bool:
        """zone_balanced(): the zone meets its high watermark (plus ``balance_gap``)."""
        return zone.zone_watermark_ok(order, zone.high_wmark_pages + balance_gap, 0, 0)

    def pgdat_balanced(self, order: int) -> bool:
        """pgdat_balanced(): the node's zone is balanced or all_unreclaimable."""
        zone = self.zone
        return zone.all_unreclaimable or self.zone_balanced(zone, order)

    def prepare_kswapd_sleep(self, order: int, remaining: float) -> bool:
        """prepare_kswapd_sleep(): never sleep while tasks are throttled (wake
        them, patch 15); else sleep only if the node is balanced."""
        if remaining:
            return False
        if self.pgdat.pfmemalloc_wait.active():
            self.pgdat.pfmemalloc_wait.wake_up()
            return False
        return self.pgdat_balanced(order)

    async def kswapd_try_to_sleep(self, task: Task, order: int) -> None:
        """kswapd_try_to_sleep(): a HZ/10 nap; if the node stayed balanced, sleep
        on kswapd_wait until woken; else count a *_wmark_hit_quickly."""
        pgdat = self.pgdat
        if self.prepare_kswapd_sleep(order, 0):
            # Short nap of HZ/10 to see whether the zone stays balanced.
            self.kswapd_woken = False
            woke = await task.sleep_on(pgdat.kswapd_wait, lambda: self.kswapd_woken,
                                       timeout=self.k.hz(0.1), wchan="kswapd_try_to_sleep")
            if not woke and self.prepare_kswapd_sleep(order, 0):
                log.info("kswapd_sleep", pid=task.pid, comm=task.comm,
                         free=self.zone.nr_free_pages)
                self.kswapd_woken = False
                await task.sleep_on(pgdat.kswapd_wait, lambda: self.kswapd_woken,
                                    wchan="kswapd")
                log.info("kswapd_wake", pid=task.pid, comm=task.comm,
                         order=pgdat.kswapd_max_order, free=self.zone.nr_free_pages)
                return
            self.vmstat["kswapd_low_wmark_hit_quickly" if woke
                        else "kswapd_high_wmark_hit_quickly"] += 1
        else:
            await task.cond_resched()

    async def balance_pgdat(self, task: Task, order: int) -> None:
        """balance_pgdat(): priority 12 -> 0 over the zone until it meets its high
        watermark: age the anon lists, shrink_zone with the balance gap,
        all_unreclaimable, patch 15's wake of throttled reclaimers,
        congestion_wait below priority 10; restart while short of 32 pages."""
        k = self.k
        zone = self.zone
        pgdat = self.pgdat
        while True:  # loop_again
            total_scanned = 0
            sc = ScanControl(GFP_KERNEL, math.inf, order, kswapd=True)
            self.vmstat["pageoutrun"] += 1
            all_zones_ok = False
            for priority in range(DEF_PRIORITY, -1, -1):
                sc.nr_scanned = 0
                all_zones_ok = True
                has_under_min = False
                if self.inactive_anon_is_low(zone):
                    self.shrink_active_list(SWAP_CLUSTER_MAX, zone, sc, LRU_ACTIVE_ANON)
                if self.zone_balanced(zone, order):
                    break  # end_zone not found: the node is balanced
                if not (zone.all_unreclaimable and priority != DEF_PRIORITY):
                    balance_gap = min(zone.low_wmark_pages, (zone.present_pages + 99) // 100)
                    if not self.zone_balanced(zone, order, balance_gap):
                        before = sc.nr_scanned
                        await self.shrink_zone(zone, sc, priority, task)
                        total_scanned += sc.nr_scanned - before
                        if not zone.pages_scanned < zone.zone_reclaimable_pages(
                                k.swap.nr_swap_pages()) * 6:
                            zone.all_unreclaimable = True
                if not self.zone_balanced(zone, order):
                    all_zones_ok = False
                    if not zone.zone_watermark_ok(order, zone.min_wmark_pages, 0, 0):
                        has_under_min = True
                if pgdat.pfmemalloc_wait.active() and self.pfmemalloc_watermark_ok():
                    pgdat.pfmemalloc_wait.wake_up()
                if all_zones_ok:
                    break
                if total_scanned and priority < DEF_PRIORITY - 2:
                    if has_under_min:
                        self.vmstat["kswapd_skip_congestion_wait"] += 1
                    else:
                        await self.k.bdi.congestion_wait(task, k.hz(0.1))
                if sc.nr_reclaimed >= SWAP_CLUSTER_MAX:
                    break
                await task.cond_resched()
            if all_zones_ok or self.pgdat_balanced(order):
                return
            await task.cond_resched()
            if sc.nr_reclaimed < SWAP_CLUSTER_MAX:
                order = sc.order = 0
            if not total_scanned and not sc.nr_reclaimed:
                # Nothing on the LRU at all (e.g. memory held by non-LRU owners):
                # the kernel's kswapd would spin; yield the CPU for a tick so the
                # emulation does not burn a host core doing nothing.
                await task.sleep(k.hz(0.004), wchan="kswapd_idle_spin")
