"""Zones, watermarks, the buddy allocator, and the node (pgdat).

Models: include/linux/mmzone.h (struct zone, struct free_area, pg_data_t) and
from mm/page_alloc.c: init_per_zone_wmark_min (min_free_kbytes from memory
size), __setup_per_zone_wmarks, __zone_watermark_ok, __free_one_page (buddy
merge), __rmqueue_smallest and expand (buddy split).

The node carries kswapd's wait queue and patch 15's ``pfmemalloc_wait``.

The zone carries the four evictable LRU lists and their reclaim statistics
(struct lruvec / zone_reclaim_stat).

Per-cpu page lists (struct per_cpu_pages, zone_batchsize, setup_pageset,
buffered_rmqueue's order-0 branch with rmqueue_bulk, free_hot_cold_page,
free_pcppages_bulk, drain_pages): order-0 pages are allocated from and freed to
the running CPU's lists, which the buddy allocator refills and drains ``batch``
pages at a time. Pages on those lists are free but not in NR_FREE_PAGES, so
the watermark checks do not see them until they spill (``high``, counted over
all of a CPU's lists) or are drained (drain_all_pages, after a failed
direct-reclaim attempt). Each CPU has one list per migrate type
(MIGRATE_PCPTYPES: unmovable, reclaimable, movable; allocflags_to_migratetype
picks one from __GFP_MOVABLE and __GFP_RECLAIMABLE): an allocation takes from
its own type's list only and refills that list from the buddy lists when it is
empty, even while the CPU's other lists hold pages. So an skb or slab
allocation on a CPU whose list holds only reclaimed anonymous pages pulls
another batch out of NR_FREE_PAGES. free_pcppages_bulk takes pages from the
lists round-robin, as 3.5 does.

Simplified: one node with one zone (ZONE_NORMAL), so lowmem_reserve is 0 and
zonelist fallback never happens. No pageblocks: the buddy lists are not split
by migrate type (no __rmqueue_fallback, no MIGRATE_RESERVE blocks, so no
anti-fragmentation grouping), and a freed page goes to the per-cpu list of the
type it was last allocated as, where 3.5 uses its pageblock's type (the same
type unless the allocation had fallen back to another type's block). No
memory hotplug, no CMA.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

from emulator.flags import ALLOC_HARDER, ALLOC_HIGH, GFP
from emulator.mm.page import PG, PAGE_SHIFT, Owner, Page
from emulator.wait import WaitQueue

MAX_ORDER = 11  # orders 0..10
LRU_INACTIVE_ANON, LRU_ACTIVE_ANON, LRU_INACTIVE_FILE, LRU_ACTIVE_FILE = 0, 1, 2, 3
LRU_NAMES = ("inactive_anon", "active_anon", "inactive_file", "active_file")
PAGE_ALLOC_COSTLY_ORDER = 3
MIGRATE_UNMOVABLE, MIGRATE_RECLAIMABLE, MIGRATE_MOVABLE = 0, 1, 2
MIGRATE_PCPTYPES = 3  #: the types with a per-cpu list
MIGRATETYPE_NAMES = ("Unmovable", "Reclaimable", "Movable")


def allocflags_to_migratetype(gfp: int) -> int:
    """allocflags_to_migratetype() (include/linux/gfp.h): __GFP_MOVABLE and
    __GFP_RECLAIMABLE, as two bits, are the migrate type."""
    return (bool(gfp & GFP.MOVABLE) << 1) | bool(gfp & GFP.RECLAIMABLE)


def int_sqrt(x: int) -> int:
    return math.isqrt(x)


def default_min_free_kbytes(lowmem_kbytes: int) -> int:
    """init_per_zone_wmark_min(): sqrt(lowmem_kbytes * 16), clamped to [128, 65536]."""
    return max(128, min(65536, int_sqrt(lowmem_kbytes * 16)))


def zone_batchsize(present_pages: int) -> int:
    """zone_batchsize(): about a quarter of a thousandth of the zone, at most 512 KiB's
    worth before the quartering, rounded to 2^n - 1 (0 for very small zones)."""
    batch = present_pages // 1024
    if batch << PAGE_SHIFT > 512 * 1024:
        batch = (512 * 1024) >> PAGE_SHIFT
    batch //= 4
    if batch < 1:
        batch = 1
    return (1 << ((batch + batch // 2).bit_length() - 1)) - 1  # rounddown_pow_of_two - 1


class PerCpuPages:
    """struct per_cpu_pages: one CPU's cache of free order-0 pages, one list per
    migrate type.

    Each list's left end is its head (hot pages, taken first); cold frees go to
    the right end, which free_pcppages_bulk empties first. ``count`` is over
    all the lists, as ``high`` is."""

    __slots__ = ("cpu", "high", "batch", "lists", "count")

    def __init__(self, cpu: int, batch: int) -> None:
        # setup_pageset(): high = 6 * batch, batch at least 1.
        self.cpu = cpu
        self.high = 6 * batch
        self.batch = max(1, batch)
        self.lists: tuple[deque[Page], ...] = tuple(deque() for _ in range(MIGRATE_PCPTYPES))
        self.count = 0


class Zone:
    """struct zone: free area, watermarks, LRU lists, reclaim state."""

    def __init__(self, name: str, start_pfn: int, present_pages: int, mem_map: list[Page]) -> None:
        self.name = name
        self.zone_start_pfn = start_pfn
        self.present_pages = present_pages
        self.mem_map = mem_map
        self.free_area: list[dict[int, Page]] = [dict() for _ in range(MAX_ORDER)]
        self.nr_free_pages = 0
        self.watermark = [0, 0, 0]  # WMARK_MIN, WMARK_LOW, WMARK_HIGH
        self.lowmem_reserve = [0]
        # LRU lists indexed LRU_INACTIVE_ANON, LRU_ACTIVE_ANON, LRU_INACTIVE_FILE,
        # LRU_ACTIVE_FILE: OrderedDict pfn -> page. Insertion end = list head
        # (newest), first item = list tail (the next page reclaim isolates).
        self.lru: list[OrderedDict[int, Page]] = [OrderedDict() for _ in range(4)]
        self.nr_isolated = [0, 0]  # anon, file
        self.pageset: list[PerCpuPages] = []  # per CPU; set up by setup_pagesets
        self.nr_pcp_pages = 0  # pages on all the CPUs' lists (outside nr_free_pages)
        # zone_reclaim_stat: recent_scanned / recent_rotated per type (anon, file).
        self.recent_scanned = [0, 0]
        self.recent_rotated = [0, 0]
        self.pages_scanned = 0
        self.all_unreclaimable = False
        self.inactive_ratio = 1

    # -- watermarks --------------------------------------------------------------
    @property
    def min_wmark_pages(self) -> int:
        return self.watermark[0]

    @property
    def low_wmark_pages(self) -> int:
        return self.watermark[1]

    @property
    def high_wmark_pages(self) -> int:
        return self.watermark[2]

    def zone_watermark_ok(self, order: int, mark: int, classzone_idx: int = 0,
                          alloc_flags: int = 0) -> bool:
        return zone_watermark_ok(self.nr_free_pages, self.free_area_counts(), order, mark,
                                 self.lowmem_reserve[classzone_idx], alloc_flags)

    def free_area_counts(self) -> list[int]:
        return [len(a) for a in self.free_area]

    # Names for the lists, as the kernel's for_each_evictable_lru sees them.
    @property
    def lru_inactive_anon(self) -> OrderedDict[int, Page]:
        return self.lru[LRU_INACTIVE_ANON]

    @property
    def lru_active_anon(self) -> OrderedDict[int, Page]:
        return self.lru[LRU_ACTIVE_ANON]

    @property
    def lru_inactive_file(self) -> OrderedDict[int, Page]:
        return self.lru[LRU_INACTIVE_FILE]

    @property
    def lru_active_file(self) -> OrderedDict[int, Page]:
        return self.lru[LRU_ACTIVE_FILE]

    @property
    def nr_isolated_anon(self) -> int:
        return self.nr_isolated[0]

    def zone_reclaimable_pages(self, nr_swap_pages: int = 1) -> int:
        """zone_reclaimable_pages(): file LRU pages, plus anon ones while swap has room."""
        nr = len(self.lru[LRU_INACTIVE_FILE]) + len(self.lru[LRU_ACTIVE_FILE]) + self.nr_isolated[1]
        if nr_swap_pages > 0:
            nr += len(self.lru[LRU_INACTIVE_ANON]) + len(self.lru[LRU_ACTIVE_ANON]) + self.nr_isolated[0]
        return nr

    def zone_reclaimable(self) -> bool:
        """pages_scanned < 6 x reclaimable pages (mm/vmscan.c)."""
        return self.pages_scanned < self.zone_reclaimable_pages() * 6

    # -- per-cpu page lists --------------------------------------------------------
    def setup_pagesets(self, nr_cpus: int) -> None:
        batch = zone_batchsize(self.present_pages)
        self.pageset = [PerCpuPages(cpu, batch) for cpu in range(nr_cpus)]

    def buffered_rmqueue(self, order: int, cpu: int | None,
                         migratetype: int = MIGRATE_UNMOVABLE) -> Page | None:
        """buffered_rmqueue(): order 0 from ``cpu``'s list for ``migratetype``
        (refilled by rmqueue_bulk when empty), higher orders, or no CPU context,
        straight from the buddy lists."""
        if order or cpu is None:
            return self.rmqueue_smallest(order)
        pcp = self.pageset[cpu]
        pages = pcp.lists[migratetype]
        if not pages:
            for _ in range(pcp.batch):  # rmqueue_bulk
                page = self.rmqueue_smallest(0)
                if page is None:
                    break
                page.owner = Owner.PCP
                pages.append(page)
            if not pages:
                return None
            pcp.count += len(pages)
            self.nr_pcp_pages += len(pages)
        pcp.count -= 1
        self.nr_pcp_pages -= 1
        return pages.popleft()

    def free_hot_cold_page(self, page: Page, cpu: int, cold: bool) -> None:
        """free_hot_cold_page(): onto ``cpu``'s list for the page's migrate type
        (head if hot, tail if cold); when the CPU's lists reach ``high`` together,
        ``batch`` pages go back to the buddy lists."""
        pcp = self.pageset[cpu]
        page.owner = Owner.PCP
        page.order = 0
        if cold:
            pcp.lists[page.migratetype].append(page)
        else:
            pcp.lists[page.migratetype].appendleft(page)
        pcp.count += 1
        self.nr_pcp_pages += 1
        if pcp.count >= pcp.high:
            self.free_pcppages_bulk(pcp, pcp.batch)

    def free_pcppages_bulk(self, pcp: PerCpuPages, count: int) -> None:
        """free_pcppages_bulk(): ``count`` pages to the buddy lists, from the lists'
        tails in turn. The turn moves on after ``batch_free`` pages, where
        batch_free counts the lists looked at to find a non-empty one (so a fuller
        list gives more), and is the whole count when only one list has pages."""
        count = min(count, pcp.count)
        pcp.count -= count
        self.nr_pcp_pages -= count
        migratetype = batch_free = 0
        while count:
            while True:
                batch_free += 1
                migratetype = (migratetype + 1) % MIGRATE_PCPTYPES
                pages = pcp.lists[migratetype]
                if pages:
                    break
            if batch_free == MIGRATE_PCPTYPES:  # the only non-empty list: free them all
                batch_free = count
            while True:
                page = pages.pop()
                page.owner = Owner.FREE
                self.free_one_page(page, 0)
                count -= 1
                batch_free -= 1
                if not (count and batch_free and pages):
                    break
        self.all_unreclaimable = False
        self.pages_scanned = 0

    def drain_pages(self, cpu: int) -> int:
        """drain_pages(): empty one CPU's lists; returns how many pages they held."""
        pcp = self.pageset[cpu]
        n = pcp.count
        if n:
            self.free_pcppages_bulk(pcp, n)
        return n

    # -- buddy allocator -----------------------------------------------------------
    def add_free_block(self, page: Page, order: int) -> None:
        page.flags = PG.buddy
        page.order = order
        self.free_area[order][page.pfn] = page

    def rmqueue_smallest(self, order: int) -> Page | None:
        """__rmqueue_smallest + expand: take a block of ``order``, splitting larger ones."""
        for current in range(order, MAX_ORDER):
            area = self.free_area[current]
            if not area:
                continue
            _, page = area.popitem()  # LIFO: the most recently freed block
            page.flags = PG(0)
            # expand(): give the upper halves back to lower orders.
            high = current
            while high > order:
                high -= 1
                buddy = self.mem_map[page.pfn + (1 << high)]
                self.add_free_block(buddy, high)
            page.order = order
            self.nr_free_pages -= 1 << order
            return page
        return None

    def free_one_page(self, page: Page, order: int) -> None:
        """__free_one_page: merge with free buddies of the same order, then list it."""
        pfn = page.pfn
        self.nr_free_pages += 1 << order
        base = self.zone_start_pfn
        end = base + self.present_pages
        while order < MAX_ORDER - 1:
            buddy_pfn = base + ((pfn - base) ^ (1 << order))
            if buddy_pfn + (1 << order) > end:
                break
            buddy = self.mem_map[buddy_pfn]
            if not (buddy.flags & PG.buddy) or buddy.order != order:
                break
            del self.free_area[order][buddy_pfn]
            buddy.flags = PG(0)
            buddy.order = 0
            pfn = min(pfn, buddy_pfn)
            order += 1
        head = self.mem_map[pfn]
        self.add_free_block(head, order)

    def __repr__(self) -> str:
        return (f"<Zone {self.name} free={self.nr_free_pages} min={self.watermark[0]} "
                f"low={self.watermark[1]} high={self.watermark[2]}>")


def zone_watermark_ok(free_pages: int, nr_free: list[int], order: int, mark: int,
                      lowmem_reserve: int, alloc_flags: int) -> bool:
    """__zone_watermark_ok (3.6), including the ALLOC_HIGH-then-ALLOC_HARDER reductions
    and the per-order loop. Pure: unit-tested against hand-computed values."""
    free_pages -= (1 << order) - 1
    min_ = mark
    if alloc_flags & ALLOC_HIGH:
        min_ -= min_ // 2
    if alloc_flags & ALLOC_HARDER:
        min_ -= min_ // 4
    if free_pages <= min_ + lowmem_reserve:
        return False
    for o in range(order):
        free_pages -= nr_free[o] << o
        min_ >>= 1
        if free_pages <= min_:
            return False
    return True


def setup_per_zone_wmarks(zones: list[Zone], min_free_kbytes: int) -> None:
    """__setup_per_zone_wmarks: split pages_min over zones by size; low/high = min + tmp/4, /2."""
    pages_min = min_free_kbytes >> (PAGE_SHIFT - 10)
    lowmem_pages = sum(z.present_pages for z in zones)
    for z in zones:
        tmp = pages_min * z.present_pages // lowmem_pages
        z.watermark = [tmp, tmp + (tmp >> 2), tmp + (tmp >> 1)]
        # inactive_ratio (calculate_zone_inactive_ratio): int_sqrt(10 * GiB), at least 1.
        gb = (z.present_pages << PAGE_SHIFT) >> 30
        z.inactive_ratio = int_sqrt(10 * gb) if gb else 1


class PgData:
    """pg_data_t: the node. Owns the zone(s), the frame array and kswapd's queues."""

    def __init__(self, nr_pages: int, min_free_kbytes: int | None, nr_cpus: int = 1) -> None:
        self.mem_map: list[Page] = []
        self.node_zones: list[Zone] = []
        zone = Zone("Normal", 0, nr_pages, self.mem_map)
        self.mem_map.extend(Page(pfn, zone) for pfn in range(nr_pages))
        self.node_zones.append(zone)
        # Hand every frame to the buddy allocator in maximal aligned blocks
        # (free_all_bootmem -> __free_pages_bootmem).
        pfn = 0
        while pfn < nr_pages:
            order = MAX_ORDER - 1
            while order and (pfn & ((1 << order) - 1) or pfn + (1 << order) > nr_pages):
                order -= 1
            zone.free_one_page(self.mem_map[pfn], order)
            pfn += 1 << order
        if min_free_kbytes is None:
            min_free_kbytes = default_min_free_kbytes(nr_pages << (PAGE_SHIFT - 10))
        self.min_free_kbytes = min_free_kbytes
        setup_per_zone_wmarks(self.node_zones, min_free_kbytes)
        for z in self.node_zones:
            z.setup_pagesets(nr_cpus)
        self.kswapd_wait = WaitQueue("kswapd_wait")
        self.pfmemalloc_wait = WaitQueue("pfmemalloc_wait")
        self.kswapd_max_order = 0
        self.classzone_idx = 0

    @property
    def zone(self) -> Zone:
        return self.node_zones[0]

    @property
    def node_present_pages(self) -> int:
        return sum(z.present_pages for z in self.node_zones)

    def nr_free_pages(self) -> int:
        """NR_FREE_PAGES: the buddy lists only (per-cpu lists are not counted)."""
        return sum(z.nr_free_pages for z in self.node_zones)

    def reserve_pages(self) -> int:
        """Σ WMARK_MIN over zones <= ZONE_NORMAL (pfmemalloc_watermark_ok's reserve)."""
        return sum(z.min_wmark_pages for z in self.node_zones)

    def owners(self) -> dict[str, int]:
        """Frames per owner, walking mem_map (free blocks count all their frames)."""
        counts = {o.value: 0 for o in Owner}
        skip = 0
        for page in self.mem_map:
            if skip:
                skip -= 1
                continue
            if page.flags & PG.buddy:
                counts[Owner.FREE.value] += 1 << page.order
                skip = (1 << page.order) - 1
            else:
                counts[page.owner.value] += 1
        return counts
