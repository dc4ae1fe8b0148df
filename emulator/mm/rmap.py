"""Reverse mapping, for anonymous pages: try_to_unmap.

Models try_to_unmap_one of mm/rmap.c for an anonymous page with one mapping:
its PTE becomes the swap entry, the slot's count goes up, the process's rss
down and its swap entries up.

Simplified: an anonymous page has at most one mapping (no anon_vma walk, no
mapcount).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.mm.page import Page

if TYPE_CHECKING:
    from emulator.kernel import Kernel


class Rmap:
    """Mixed into SwapInfo (emulator/mm/swapfile.py), whose swap_duplicate it calls."""

    k: Kernel

    def try_to_unmap(self, page: Page) -> None:
        """try_to_unmap_one for an anonymous page: the PTE becomes the swap entry."""
        with self.k.lock:
            mm = page.mm
            entry = page.swap
            mm.pte[page.vaddr] = entry
            self.swap_duplicate(entry)
            mm.rss -= 1
            mm.swapents += 1
            page.mm = None
            self.k.vmstat["nr_mapped"] -= 1
            self.k.vmstat["nr_anon_pages"] -= 1
