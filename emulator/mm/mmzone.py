"""Zones, watermarks, the buddy allocator, and the node (pgdat).

Models: include/linux/mmzone.h (struct zone, struct free_area, pg_data_t) and
from mm/page_alloc.c: init_per_zone_wmark_min (min_free_kbytes from memory
size), __setup_per_zone_wmarks, __zone_watermark_ok, __free_one_page (buddy
merge), __rmqueue, __rmqueue_smallest, __rmqueue_fallback and expand (buddy
split), move_freepages_block and setup_zone_migrate_reserve (pageblocks).

The node carries kswapd's wait queue and patch 15's ``pfmemalloc_wait``.

The zone carries the four evictable LRU lists and their reclaim statistics
(struct lruvec / zone_reclaim_stat). The lists are intrusive, as struct
page's ``lru`` list_head makes them in the kernel: each frame's links are its
row in two int32 columns indexed by pfn (8 bytes per frame), and the four list
heads are four more rows past the frames (include/linux/list.h's list_add,
list_add_tail, list_del, list_move_tail; lru_to_page takes the tail).

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

Pageblocks (3.5's anti-fragmentation grouping): the zone is cut into
pageblocks of 2^pageblock_order pages, each with a migrate type, and each
order's free area has one free list per type. An allocation takes the
smallest block of its own type (__rmqueue_smallest); failing that, it steals
the largest free block from the other types in the fallbacks[] order
(__rmqueue_fallback), moving the rest of that pageblock's free pages to its
own type when the stolen block is large (order >= pageblock_order / 2) or
the request reclaimable, and claiming the pageblock when half of it or more
was free; only when nothing else is left does it take from MIGRATE_RESERVE.
setup_zone_migrate_reserve() marks the first movable pageblocks, enough to
cover the min watermark and at most two, as MIGRATE_RESERVE: the kernel keeps
them for high-order atomic allocations, and allocations reach them last. A
freed page goes to its pageblock's type: order 0 onto the per-cpu list of
that type (movable for a reserve pageblock) with the type recorded
(page_private, here ``page.migratetype``), which free_pcppages_bulk hands back
to __free_one_page; rmqueue_bulk records the type that was asked for. Below
pageblock_nr_pages * 5 pages (10 MiB) grouping by mobility is disabled and
every request and every pageblock counts as unmovable.

Simplified: one node with one zone (ZONE_NORMAL), so lowmem_reserve is 0 and
zonelist fallback never happens. The free lists are LIFO: __free_one_page's
placement of a block at the tail of its list when its next-higher buddy is
free is not modelled. No MIGRATE_ISOLATE, no memory hotplug, no CMA, no
compaction.

Details: a stolen block of pageblock size or more retypes its whole range
(change_pageblock_range). A 192 MiB machine (min 443 pages) has one reserve
pageblock; boot's order-10 block at pfn 0 moves onto the reserve lists whole,
so pfn 512-1023 start there too, as in the kernel. Per-cpu high is 6 x batch;
zone_batchsize is 0 below 32 MiB (every free spills at once), 1 at 32 MiB, 3
at 48 MiB, 31 from 512 MiB. Anonymous and page-cache pages are movable, slab
and skb pages unmovable; no cache is SLAB_RECLAIM_ACCOUNT, so the reclaimable
lists stay empty. Frees outside any task (unit tests, SLAB's cache_reap timer)
go to the buddy lists.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Iterator

from emulator.flags import ALLOC_HARDER, ALLOC_HIGH, GFP
from emulator.mm.page import PAGE_SHIFT, PG, Owner, Page
from emulator.wait import WaitQueue

MAX_ORDER = 11  # orders 0..10
LRU_INACTIVE_ANON, LRU_ACTIVE_ANON, LRU_INACTIVE_FILE, LRU_ACTIVE_FILE = 0, 1, 2, 3
LRU_NAMES = ("inactive_anon", "active_anon", "inactive_file", "active_file")
PAGE_ALLOC_COSTLY_ORDER = 3
MIGRATE_UNMOVABLE, MIGRATE_RECLAIMABLE, MIGRATE_MOVABLE = 0, 1, 2
MIGRATE_PCPTYPES = 3  #: the types with a per-cpu list
MIGRATE_RESERVE = MIGRATE_PCPTYPES
MIGRATE_TYPES = 4  #: 3.5 also has MIGRATE_ISOLATE, which the model does not use
MIGRATETYPE_NAMES = ("Unmovable", "Reclaimable", "Movable", "Reserve")  # /proc/pagetypeinfo
#: fallbacks[] (mm/page_alloc.c, 3.5 without CMA): the types each type steals from,
#: in order; MIGRATE_RESERVE, last in every row, is tried separately by __rmqueue.
FALLBACKS = {
    MIGRATE_UNMOVABLE: (MIGRATE_RECLAIMABLE, MIGRATE_MOVABLE),
    MIGRATE_RECLAIMABLE: (MIGRATE_UNMOVABLE, MIGRATE_MOVABLE),
    MIGRATE_MOVABLE: (MIGRATE_RECLAIMABLE, MIGRATE_UNMOVABLE),
}
#: HUGETLB_PAGE_ORDER on x86-64 (2 MiB); the kernel's pageblock_order when
#: CONFIG_HUGETLB_PAGE is set, as in distribution kernels.
pageblock_order = 9
pageblock_nr_pages = 1 << pageblock_order
#: build_all_zonelists() disables grouping by mobility below this many pages:
#: pageblock_nr_pages * MIGRATE_TYPES, where 3.5's MIGRATE_TYPES counts
#: MIGRATE_ISOLATE too (5).
MOBILITY_MIN_PAGES = pageblock_nr_pages * (MIGRATE_TYPES + 1)


def allocflags_to_migratetype(gfp: int, mobility_disabled: bool = False) -> int:
    """allocflags_to_migratetype() (include/linux/gfp.h): __GFP_MOVABLE and
    __GFP_RECLAIMABLE, as two bits, are the migrate type; everything is
    unmovable while grouping by mobility is disabled."""
    if mobility_disabled:
        return MIGRATE_UNMOVABLE
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


class FreeArea:
    """struct free_area: the free blocks of one order, one list per migrate type
    (head pfn -> head page; LIFO), and ``nr_free`` over all of them."""

    __slots__ = ("free_list", "nr_free")

    def __init__(self) -> None:
        self.free_list: tuple[dict[int, Page], ...] = tuple(dict() for _ in range(MIGRATE_TYPES))
        self.nr_free = 0


#: LIST_POISON: the links of a frame on no LRU list (list_del poisons them).
LIST_POISON = -1


class LruList:
    """One list_head of struct lruvec, threaded through the frames' ``lru`` links.

    The links are the zone's two pfn-indexed columns (``next``, ``prev``), shared
    by the four lists: a frame is on at most one. The head end is the newest
    (list_add); the tail is the next page reclaim takes (lru_to_page is
    head->prev). Iteration runs from the tail, in the order reclaim isolates.
    ``nr`` is the list's length (the zone's NR_*_ANON/FILE counter)."""

    __slots__ = ("name", "nr", "_head", "_next", "_prev", "_mem_map", "_start")

    def __init__(self, name: str, head: int, links: tuple[array, array],
                 mem_map: list[Page], start_pfn: int) -> None:
        self.name = name
        self.nr = 0
        self._head = head
        self._next, self._prev = links
        self._mem_map = mem_map
        self._start = start_pfn

    def __len__(self) -> int:
        return self.nr

    def __iter__(self) -> Iterator[Page]:
        prev, head, start, mem_map = self._prev, self._head, self._start, self._mem_map
        i = prev[head]
        while i != head:
            yield mem_map[i + start]
            i = prev[i]

    def __repr__(self) -> str:
        return f"<LruList {self.name} nr={self.nr}>"

    def _link(self, i: int, prev_i: int, next_i: int) -> None:
        """__list_add(): row ``i`` between ``prev_i`` and ``next_i``."""
        nxt, prv = self._next, self._prev
        if nxt[i] != LIST_POISON:
            raise ValueError(f"list_add: pfn {i + self._start} is already on an LRU list")
        nxt[i] = next_i
        prv[i] = prev_i
        prv[next_i] = i
        nxt[prev_i] = i
        self.nr += 1

    def add(self, page: Page) -> None:
        """list_add(&page->lru, head): at the head, the newest end."""
        head = self._head
        self._link(page.pfn - self._start, head, self._next[head])

    def add_tail(self, page: Page) -> None:
        """list_add_tail(&page->lru, head): at the tail, next to be scanned."""
        head = self._head
        self._link(page.pfn - self._start, self._prev[head], head)

    def _unlink(self, i: int) -> None:
        """list_del(): out of the list, links poisoned."""
        nxt, prv = self._next, self._prev
        n, p = nxt[i], prv[i]
        if n == LIST_POISON:
            raise ValueError(f"list_del: pfn {i + self._start} is on no LRU list")
        nxt[p] = n
        prv[n] = p
        nxt[i] = prv[i] = LIST_POISON
        self.nr -= 1

    def remove(self, page: Page) -> None:
        """list_del(&page->lru). The page must be on this list (as in the kernel,
        which list it is on is the caller's knowledge: page_lru)."""
        self._unlink(page.pfn - self._start)

    def move_tail(self, page: Page) -> None:
        """list_move_tail(&page->lru, head): to this list's tail."""
        i = page.pfn - self._start
        self._unlink(i)
        head = self._head
        self._link(i, self._prev[head], head)

    def pop_tail(self) -> Page:
        """lru_to_page(head) and list_del(): take the page at the tail."""
        i = self._prev[self._head]
        if i == self._head:
            raise IndexError(f"pop_tail from the empty {self.name} list")
        self._unlink(i)
        return self._mem_map[i + self._start]


def lruvec_init(nr_frames: int, mem_map: list[Page], start_pfn: int) -> list[LruList]:
    """lruvec_init(): the four empty lists over fresh link columns (every frame's
    links poisoned; each head's links point at itself, INIT_LIST_HEAD)."""
    nxt = array("i", [LIST_POISON]) * (nr_frames + len(LRU_NAMES))
    prv = array("i", nxt)
    lists = []
    for lru, name in enumerate(LRU_NAMES):
        head = nr_frames + lru
        nxt[head] = prv[head] = head
        lists.append(LruList(name, head, (nxt, prv), mem_map, start_pfn))
    return lists


class Zone:
    """struct zone: free area, watermarks, LRU lists, reclaim state."""

    def __init__(self, name: str, start_pfn: int, present_pages: int, mem_map: list[Page]) -> None:
        self.name = name
        self.zone_start_pfn = start_pfn
        self.present_pages = present_pages
        self.mem_map = mem_map
        self.free_area = [FreeArea() for _ in range(MAX_ORDER)]
        self.nr_free_pages = 0
        # pageblock_flags: one migrate type per pageblock; memmap_init_zone
        # starts them all movable.
        nr_blocks = -(-present_pages // pageblock_nr_pages)
        self.pageblock_flags = [MIGRATE_MOVABLE] * nr_blocks
        self.page_group_by_mobility_disabled = present_pages < MOBILITY_MIN_PAGES
        self.watermark = [0, 0, 0]  # WMARK_MIN, WMARK_LOW, WMARK_HIGH
        self.lowmem_reserve = [0]
        # The lruvec's lists, indexed LRU_INACTIVE_ANON, LRU_ACTIVE_ANON,
        # LRU_INACTIVE_FILE, LRU_ACTIVE_FILE.
        self.lru: list[LruList] = lruvec_init(present_pages, mem_map, start_pfn)
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
        """min_wmark_pages(zone)."""
        return self.watermark[0]

    @property
    def low_wmark_pages(self) -> int:
        """low_wmark_pages(zone)."""
        return self.watermark[1]

    @property
    def high_wmark_pages(self) -> int:
        """high_wmark_pages(zone)."""
        return self.watermark[2]

    def zone_watermark_ok(self, order: int, mark: int, classzone_idx: int = 0,
                          alloc_flags: int = 0) -> bool:
        """zone_watermark_ok(): __zone_watermark_ok on this zone's free counts."""
        return zone_watermark_ok(self.nr_free_pages, self.free_area_counts(), order, mark,
                                 self.lowmem_reserve[classzone_idx], alloc_flags)

    def free_area_counts(self) -> list[int]:
        """nr_free per order, for __zone_watermark_ok's per-order loop."""
        return [a.nr_free for a in self.free_area]

    # Names for the lists, as the kernel's for_each_evictable_lru sees them.
    @property
    def lru_inactive_anon(self) -> LruList:
        return self.lru[LRU_INACTIVE_ANON]

    @property
    def lru_active_anon(self) -> LruList:
        return self.lru[LRU_ACTIVE_ANON]

    @property
    def nr_isolated_anon(self) -> int:
        return self.nr_isolated[0]

    def zone_reclaimable_pages(self, nr_swap_pages: int = 1) -> int:
        """zone_reclaimable_pages(): file LRU pages, plus anon ones while swap has room."""
        nr = len(self.lru[LRU_INACTIVE_FILE]) + len(self.lru[LRU_ACTIVE_FILE]) + self.nr_isolated[1]
        if nr_swap_pages > 0:
            nr += len(self.lru[LRU_INACTIVE_ANON]) + len(self.lru[LRU_ACTIVE_ANON]) + self.nr_isolated[0]
        return nr

    # -- per-cpu page lists --------------------------------------------------------
    def setup_pagesets(self, nr_cpus: int) -> None:
        """setup_pageset() for every CPU: batch from zone_batchsize, high 6 x batch."""
        batch = zone_batchsize(self.present_pages)
        self.pageset = [PerCpuPages(cpu, batch) for cpu in range(nr_cpus)]

    def buffered_rmqueue(self, order: int, cpu: int | None,
                         migratetype: int = MIGRATE_UNMOVABLE, cold: bool = False) -> Page | None:
        """buffered_rmqueue(): order 0 from ``cpu``'s list for ``migratetype``
        (refilled by rmqueue_bulk when empty), from its head, or its tail for a
        ``cold`` (__GFP_COLD) request; higher orders, or no CPU context,
        straight from the buddy lists."""
        if order or cpu is None:
            return self.rmqueue(order, migratetype)
        pcp = self.pageset[cpu]
        pages = pcp.lists[migratetype]
        if not pages:
            # rmqueue_bulk: the pages in the order taken, from the end the
            # allocation takes from, so the first one taken is used first.
            add = pages.appendleft if cold else pages.append
            for _ in range(pcp.batch):
                page = self.rmqueue(0, migratetype)
                if page is None:
                    break
                page.owner = Owner.PCP
                page.migratetype = migratetype  # set_page_private(page, migratetype)
                add(page)
            if not pages:
                return None
            pcp.count += len(pages)
            self.nr_pcp_pages += len(pages)
        pcp.count -= 1
        self.nr_pcp_pages -= 1
        return pages.pop() if cold else pages.popleft()

    def free_hot_cold_page(self, page: Page, cpu: int, cold: bool) -> None:
        """free_hot_cold_page(): onto ``cpu``'s list for the page's pageblock type
        (a reserve pageblock's pages share the movable list, keeping their own type
        for the buddy lists), head if hot, tail if cold; when the CPU's lists reach
        ``high`` together, ``batch`` pages go back to the buddy lists."""
        pcp = self.pageset[cpu]
        page.owner = Owner.PCP
        page.order = 0
        migratetype = page.migratetype = self.get_pageblock_migratetype(page.pfn)
        if migratetype >= MIGRATE_PCPTYPES:
            migratetype = MIGRATE_MOVABLE
        if cold:
            pcp.lists[migratetype].append(page)
        else:
            pcp.lists[migratetype].appendleft(page)
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
                self.free_one_page(page, 0, page.migratetype)  # page_private(page)
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

    # -- pageblocks --------------------------------------------------------------
    def get_pageblock_migratetype(self, pfn: int) -> int:
        """get_pageblock_migratetype(): the migrate type of a page's pageblock."""
        return self.pageblock_flags[(pfn - self.zone_start_pfn) >> pageblock_order]

    def set_pageblock_migratetype(self, pfn: int, migratetype: int) -> None:
        """set_pageblock_migratetype(): with grouping by mobility disabled, every
        pageblock is recorded unmovable, reserve ones included (3.5)."""
        if self.page_group_by_mobility_disabled:
            migratetype = MIGRATE_UNMOVABLE
        self.pageblock_flags[(pfn - self.zone_start_pfn) >> pageblock_order] = migratetype

    def move_freepages_block(self, pfn: int, migratetype: int) -> int:
        """move_freepages_block(): every free block that starts in ``pfn``'s
        pageblock onto ``migratetype``'s lists; returns the pages moved (0 for a
        pageblock the zone does not hold entirely)."""
        start = pfn & ~(pageblock_nr_pages - 1)
        end = start + pageblock_nr_pages - 1
        if start < self.zone_start_pfn:
            start = pfn
        if end >= self.zone_start_pfn + self.present_pages:
            return 0
        moved = 0
        pfn = start
        mem_map = self.mem_map
        while pfn <= end:
            page = mem_map[pfn]
            if not page.flags & PG.buddy:
                pfn += 1
                continue
            order = page.order
            area = self.free_area[order]
            del area.free_list[page.migratetype][pfn]
            area.free_list[migratetype][pfn] = page
            page.migratetype = migratetype
            pfn += 1 << order
            moved += 1 << order
        return moved

    def setup_zone_migrate_reserve(self) -> None:
        """setup_zone_migrate_reserve(): enough movable pageblocks to cover the min
        watermark, at most two, become MIGRATE_RESERVE (from the zone's start);
        reserve pageblocks beyond that go back to movable."""
        reserve = min(2, -(-self.min_wmark_pages // pageblock_nr_pages))
        start = -(-self.zone_start_pfn // pageblock_nr_pages) * pageblock_nr_pages
        for pfn in range(start, self.zone_start_pfn + self.present_pages, pageblock_nr_pages):
            block_migratetype = self.get_pageblock_migratetype(pfn)
            if reserve > 0:
                if block_migratetype == MIGRATE_RESERVE:
                    reserve -= 1
                    continue
                if block_migratetype == MIGRATE_MOVABLE:
                    self.set_pageblock_migratetype(pfn, MIGRATE_RESERVE)
                    self.move_freepages_block(pfn, MIGRATE_RESERVE)
                    reserve -= 1
                    continue
            if block_migratetype == MIGRATE_RESERVE:
                self.set_pageblock_migratetype(pfn, MIGRATE_MOVABLE)
                self.move_freepages_block(pfn, MIGRATE_MOVABLE)

    # -- buddy allocator -----------------------------------------------------------
    def add_free_block(self, page: Page, order: int, migratetype: int) -> None:
        page.flags = PG.buddy
        page.order = order
        page.migratetype = migratetype
        area = self.free_area[order]
        area.free_list[migratetype][page.pfn] = page
        area.nr_free += 1

    def del_free_block(self, page: Page) -> None:
        area = self.free_area[page.order]
        del area.free_list[page.migratetype][page.pfn]
        area.nr_free -= 1
        page.flags = PG(0)

    def expand(self, page: Page, low: int, high: int, migratetype: int) -> None:
        """expand(): give the upper halves of a split block back to lower orders."""
        while high > low:
            high -= 1
            self.add_free_block(self.mem_map[page.pfn + (1 << high)], high, migratetype)
        page.order = low

    def rmqueue(self, order: int, migratetype: int) -> Page | None:
        """__rmqueue(): the type's own lists, then stealing from the others, then
        the reserve pageblocks."""
        page = self.rmqueue_smallest(order, migratetype)
        if page is None and migratetype != MIGRATE_RESERVE:
            page = self.rmqueue_fallback(order, migratetype)
            if page is None:
                page = self.rmqueue_smallest(order, MIGRATE_RESERVE)
        if page is not None:
            self.nr_free_pages -= 1 << order
        return page

    def rmqueue_smallest(self, order: int, migratetype: int) -> Page | None:
        """__rmqueue_smallest(): the smallest block of ``migratetype`` that fits,
        split down to ``order``. Leaves NR_FREE_PAGES to the caller."""
        for current in range(order, MAX_ORDER):
            free_list = self.free_area[current].free_list[migratetype]
            if not free_list:
                continue
            page = free_list[next(reversed(free_list))]  # LIFO: the latest freed
            self.del_free_block(page)
            self.expand(page, order, current, migratetype)
            return page
        return None

    def rmqueue_fallback(self, order: int, start_migratetype: int) -> Page | None:
        """__rmqueue_fallback(): the largest free block of another type, in
        fallbacks[] order. A large steal (order >= pageblock_order / 2), or any
        steal for a reclaimable allocation, moves the pageblock's other free
        blocks to ``start_migratetype`` and claims the pageblock when at least
        half of it was free; a block of pageblock size or more is claimed
        outright. The split's leftovers go to ``start_migratetype``'s lists."""
        for current in range(MAX_ORDER - 1, order - 1, -1):
            area = self.free_area[current]
            for migratetype in FALLBACKS[start_migratetype]:
                free_list = area.free_list[migratetype]
                if not free_list:
                    continue
                page = free_list[next(reversed(free_list))]
                if (current >= pageblock_order // 2
                        or start_migratetype == MIGRATE_RECLAIMABLE
                        or self.page_group_by_mobility_disabled):
                    pages = self.move_freepages_block(page.pfn, start_migratetype)
                    if (pages >= 1 << (pageblock_order - 1)
                            or self.page_group_by_mobility_disabled):
                        self.set_pageblock_migratetype(page.pfn, start_migratetype)
                self.del_free_block(page)
                if current >= pageblock_order:  # change_pageblock_range()
                    for pfn in range(page.pfn, page.pfn + (1 << current), pageblock_nr_pages):
                        self.set_pageblock_migratetype(pfn, start_migratetype)
                self.expand(page, order, current, start_migratetype)
                return page
        return None

    def free_one_page(self, page: Page, order: int, migratetype: int | None = None) -> None:
        """free_one_page / __free_one_page: merge with free buddies of the same
        order, whatever list they are on, then put the block on ``migratetype``'s
        list (default: its pageblock's type, as __free_pages_ok passes)."""
        if migratetype is None:
            migratetype = self.get_pageblock_migratetype(page.pfn)
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
            self.del_free_block(buddy)
            buddy.order = 0
            pfn = min(pfn, buddy_pfn)
            order += 1
        self.add_free_block(self.mem_map[pfn], order, migratetype)

    def free_by_migratetype(self) -> list[int]:
        """Free pages on the buddy lists per migrate type (/proc/pagetypeinfo's sums)."""
        return [sum(len(a.free_list[mt]) << o for o, a in enumerate(self.free_area))
                for mt in range(MIGRATE_TYPES)]

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
    """__setup_per_zone_wmarks: split pages_min over zones by size; low/high = min + tmp/4, /2.
    The arithmetic only: PgData then sets up each zone's reserve pageblocks, the
    kernel function's last step."""
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
            z.setup_zone_migrate_reserve()
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
