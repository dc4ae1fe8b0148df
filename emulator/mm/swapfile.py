"""Swap slots: the swap map of the one swap area, and swap_info_struct.

Models mm/swapfile.c (3.5): swap_map with SWAP_HAS_CACHE, scan_swap_map's
next-free-slot cursor, get_swap_page, swap_duplicate, swap_free,
swapcache_free, swapcache_prepare, try_to_free_swap. ``SwapInfo`` is the
single swap_info_struct, and it also carries the swap cache
(emulator/mm/swap_state.py), swap I/O (emulator/mm/page_io.py), the page
lock and writeback bit (emulator/mm/filemap.py) and try_to_unmap
(emulator/mm/rmap.py), each in its own module as the kernel has them; the
class only puts them where every caller reaches them, ``k.swap``.

Simplified: one swap area; no swap clusters (a next-fit cursor instead of
SWAPFILE_CLUSTER allocation); vm_swap_full() is not used (a written page
always drops its stale slot when its writeback is not in progress, as usemem
rewrites every page it touches).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.mm.filemap import Filemap
from emulator.mm.page import PG, Page
from emulator.mm.page_io import PageIO
from emulator.mm.rmap import Rmap
from emulator.mm.swap_state import SWAP_HAS_CACHE, SwapState
from emulator.task import Task
from emulator.wait import HashedWaitTable

if TYPE_CHECKING:
    from emulator.kernel import Kernel

SWAP_MAP_BAD = 0x3F


class SwapInfo(SwapState, PageIO, Filemap, Rmap):
    """swap_info_struct for the single swap area (the NBD device)."""

    def __init__(self, k: Kernel, nr_slots: int) -> None:
        self.k = k
        self.max = nr_slots
        self.swap_map = bytearray(nr_slots)
        self.swap_map[0] = SWAP_MAP_BAD  # the swap header
        self.inuse_pages = 0
        self.cluster_next = 1
        self.swap_cache: dict[int, Page] = {}
        self.page_wait = HashedWaitTable("page_wait")
        self.bdev = None  # set by the machine: emulator.block.BlockDevice
        self._radix_nodes: dict[tuple[int, int], object] = {}
        self._radix_count: dict[tuple[int, int], int] = {}
        k.vmstat["swap_total_pages"] = nr_slots - 1

    # -- slots ---------------------------------------------------------------------
    def nr_swap_pages(self) -> int:
        """nr_swap_pages: free slots."""
        return self.max - 1 - self.inuse_pages

    def get_swap_page(self) -> int:
        """get_swap_page / scan_swap_map: next free slot after the cursor, 0 if full."""
        if self.inuse_pages >= self.max - 1:
            return 0
        smap = self.swap_map
        start = self.cluster_next
        off = smap.find(0, start)
        if off < 0:
            off = smap.find(0, 1, start)
            if off < 0:
                return 0
        smap[off] = SWAP_HAS_CACHE
        self.inuse_pages += 1
        self.cluster_next = off + 1
        self.k.vmstat["swap_used_pages"] = self.inuse_pages
        return off

    def _maybe_free_slot(self, entry: int) -> None:
        if self.swap_map[entry] == 0:
            self.inuse_pages -= 1
            self.k.vmstat["swap_used_pages"] = self.inuse_pages

    def swap_duplicate(self, entry: int) -> None:
        """swap_duplicate(): one more PTE refers to the slot."""
        self.swap_map[entry] += 1

    def swap_free(self, entry: int) -> None:
        """A PTE stopped referring to the slot."""
        assert self.swap_map[entry] & ~SWAP_HAS_CACHE, f"swap_free of unused slot {entry}"
        self.swap_map[entry] -= 1
        self._maybe_free_slot(entry)

    def swapcache_free(self, entry: int) -> None:
        """swapcache_free(): the swap cache lets go of the slot."""
        self.swap_map[entry] &= ~SWAP_HAS_CACHE
        self._maybe_free_slot(entry)

    def swapcache_prepare(self, entry: int) -> bool:
        """Claim the slot's cache reference for a swap-in; False if already cached."""
        if self.swap_map[entry] & SWAP_HAS_CACHE or not self.swap_map[entry]:
            return False
        self.swap_map[entry] |= SWAP_HAS_CACHE
        return True

    # -- radix tree nodes of the swap cache --------------------------------------------
    # -- the swap cache ------------------------------------------------------------------
    def try_to_free_swap(self, page: Page, task: Task) -> bool:
        """Drop a swap-cache page's slot once no PTE refers to it and no I/O runs."""
        if not page.flags & PG.swapcache or page.flags & PG.writeback:
            return False
        if self.swap_map[page.swap] & ~SWAP_HAS_CACHE:
            return False
        self.delete_from_swap_cache(page, task)
        return True

    # -- rmap ------------------------------------------------------------------------------
    # -- page lock -------------------------------------------------------------------------
    # -- I/O ------------------------------------------------------------------------------
