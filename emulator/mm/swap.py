"""The LRU lists' entry points: lru_cache_add, rotate_reclaimable_page.

Models the LRU part of mm/swap.c (3.5): lru_cache_add_lru / lru_cache_add_anon
/ lru_cache_add_file, add_page_to_lru_list and del_page_from_lru_list
(include/linux/mm_inline.h), page_lru, rotate_reclaimable_page. The scanning
of those lists is mm/vmscan.c's (emulator/mm/vmscan.py).

Simplified: no per-CPU pagevecs (lru_add_pvecs, lru_rotate_pvecs): a page
joins or moves on its list at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.mm.mmzone import (
    LRU_ACTIVE_ANON,
    LRU_INACTIVE_ANON,
    LRU_INACTIVE_FILE,
    LRU_NAMES,
)
from emulator.mm.page import PG, Page

if TYPE_CHECKING:
    from emulator.mm.vmstat import VMStat

_NR_LRU = tuple(f"nr_{name}" for name in LRU_NAMES)


class LruCache:
    """Mixed into VMScan (emulator/mm/vmscan.py), which owns ``vmstat``."""

    vmstat: VMStat

    @staticmethod
    def page_lru(page: Page) -> int:
        """page_lru(): which list the page belongs on."""
        lru = LRU_INACTIVE_ANON if page.flags & PG.swapbacked else LRU_INACTIVE_FILE
        return lru + 1 if page.flags & PG.active else lru

    def add_page_to_lru(self, page: Page, lru: int) -> None:
        """add_page_to_lru_list(): onto the list's head, PG_lru (and PG_active) set."""
        page.flags |= PG.lru
        if lru & 1:
            page.flags |= PG.active
        else:
            page.flags &= ~PG.active
        page.zone.lru[lru].add(page)
        self.vmstat[_NR_LRU[lru]] += 1

    def lru_cache_add_active(self, page: Page) -> None:
        """lru_cache_add_lru(page, LRU_ACTIVE_ANON): a new anonymous page."""
        self.add_page_to_lru(page, LRU_ACTIVE_ANON)

    def lru_cache_add_inactive(self, page: Page) -> None:
        """lru_cache_add_anon(): a page read in from swap."""
        self.add_page_to_lru(page, LRU_INACTIVE_ANON)

    def lru_cache_add_file(self, page: Page) -> None:
        """lru_cache_add_file(): a page cache page starts on the inactive file list."""
        self.add_page_to_lru(page, LRU_INACTIVE_FILE)

    def del_page_from_lru(self, page: Page) -> None:
        """del_page_from_lru_list(): off its list, PG_lru and PG_active cleared."""
        if not page.flags & PG.lru:
            return
        lru = self.page_lru(page)
        page.zone.lru[lru].remove(page)
        self.vmstat[_NR_LRU[lru]] -= 1
        page.flags &= ~(PG.lru | PG.active)

    def rotate_reclaimable_page(self, page: Page) -> None:
        """rotate_reclaimable_page(): a page whose writeback finished goes to the
        inactive list's tail, to be freed by the next scan."""
        if page.flags & PG.lru and not page.flags & PG.active:
            page.zone.lru[self.page_lru(page)].move_tail(page)
            self.vmstat["pgrotated"] += 1
