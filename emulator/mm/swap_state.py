"""The swap cache: add_to_swap, delete_from_swap_cache, swap-in and readahead.

Models mm/swap_state.c (3.5): add_to_swap (a slot, then the swap cache, its
radix-tree nodes allocated with __GFP_HIGH|__GFP_NOMEMALLOC|__GFP_NOWARN:
never from the reserves), __add_to_swap_cache, delete_from_swap_cache,
read_swap_cache_async and swapin_readahead (page_cluster = 3: the aligned
block of 8 slots).

Simplified: the swap-cache radix tree is modelled by its node allocations only
(one node per 64 slots, one per 4096 at the level above); the cache itself is
a dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from emulator.flags import GFP, GFP_KERNEL
from emulator.mm.page import PG, Owner, Page
from emulator.task import Task

if TYPE_CHECKING:
    from emulator.kernel import Kernel

PAGE_CLUSTER = 3  # swap_setup(): 3 when RAM >= 16 MiB
RADIX_TREE_MAP_SHIFT = 6
SWAP_HAS_CACHE = 0x40  #: also in swapfile.py's swap_map


class SwapState:
    """Mixed into SwapInfo (emulator/mm/swapfile.py), which owns ``swap_cache``,
    the swap map and the radix-tree node bookkeeping."""

    k: Kernel
    swap_cache: dict[int, Page]

    def _radix_keys(self, entry: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (0, entry >> RADIX_TREE_MAP_SHIFT), (1, entry >> (2 * RADIX_TREE_MAP_SHIFT))

    async def radix_tree_insert(self, entry: int, gfp: GFP, task: Task) -> bool:
        """radix_tree_preload + insert: allocate the nodes the new entry needs."""
        slab = self.k.slab
        new = []
        for key in self._radix_keys(entry):
            if key not in self._radix_nodes and key not in (n[0] for n in new):
                node = await slab.kmem_cache_alloc(slab.radix_tree_node, gfp, task)
                if node is None:
                    for _, n in new:
                        slab.kmem_cache_free(slab.radix_tree_node, n, task)
                    return False
                new.append((key, node))
        with self.k.lock:
            for key, node in new:
                if key in self._radix_nodes:  # raced with another insertion
                    slab.kmem_cache_free(slab.radix_tree_node, node, task)
                else:
                    self._radix_nodes[key] = node
                    self._radix_count[key] = 0
            for key in self._radix_keys(entry):
                self._radix_count[key] += 1
        return True

    def radix_tree_delete(self, entry: int, task: Task) -> None:
        """radix_tree_delete(): free the nodes that no entry uses any more."""
        slab = self.k.slab
        for key in self._radix_keys(entry):
            self._radix_count[key] -= 1
            if not self._radix_count[key]:
                del self._radix_count[key]
                slab.kmem_cache_free(slab.radix_tree_node, self._radix_nodes.pop(key), task)

    async def add_to_swap(self, page: Page, task: Task) -> bool:
        """add_to_swap(): a slot, then the swap cache (nodes allocated with
        __GFP_HIGH|__GFP_NOMEMALLOC|__GFP_NOWARN: never from the reserves)."""
        k = self.k
        with k.lock:
            entry = self.get_swap_page()
        if not entry:
            return False
        if not await self.radix_tree_insert(entry, GFP.HIGH | GFP.NOMEMALLOC | GFP.NOWARN, task):
            with k.lock:
                self.swapcache_free(entry)
            return False
        with k.lock:
            self._add_to_swap_cache(page, entry)
            page.flags |= PG.dirty
        return True

    def _add_to_swap_cache(self, page: Page, entry: int) -> None:
        page.swap = entry
        page.flags |= PG.swapcache | PG.swapbacked
        self.swap_cache[entry] = page
        self.k.vmstat["nr_swapcache"] += 1
        self.k.vmstat["nr_file_pages"] += 1

    def delete_from_swap_cache(self, page: Page, task: Task) -> None:
        """delete_from_swap_cache(): out of the cache and its radix tree; the slot's
        cache reference dropped (swapcache_free)."""
        entry = page.swap
        del self.swap_cache[entry]
        self.radix_tree_delete(entry, task)
        page.flags &= ~PG.swapcache
        page.swap = 0
        self.swapcache_free(entry)
        self.k.vmstat["nr_swapcache"] -= 1
        self.k.vmstat["nr_file_pages"] -= 1

    async def read_swap_cache_async(self, entry: int, gfp: GFP, task: Task) -> Page | None:
        """read_swap_cache_async(): the cached page, or a new locked page being read."""
        k = self.k
        while True:
            page = self.swap_cache.get(entry)
            if page is not None:
                return page
            if not self.swap_map[entry] & ~SWAP_HAS_CACHE:
                return None  # the slot was freed meanwhile
            new_page = await k.page_alloc.alloc_page(gfp, task, owner=Owner.ANON)
            if new_page is None:
                return None
            if not await self.radix_tree_insert(entry, gfp & GFP_KERNEL, task):
                with k.lock:
                    k.page_alloc.free_page(new_page)
                return None
            with k.lock:
                raced = not self.swapcache_prepare(entry)
                if raced:  # another task added it (or the slot went): look again
                    self.radix_tree_delete(entry, task)
                    k.page_alloc.free_page(new_page)
                else:
                    new_page.flags |= PG.locked
                    self._add_to_swap_cache(new_page, entry)
                    k.vmscan.lru_cache_add_inactive(new_page)
            if raced:
                await trio.lowlevel.checkpoint()
                continue
            await self.swap_readpage(new_page, task)
            return new_page

    async def swapin_readahead(self, entry: int, gfp: GFP, task: Task) -> Page | None:
        """swapin_readahead(): read the aligned block of 2**page_cluster slots, then
        return the target's page."""
        mask = (1 << PAGE_CLUSTER) - 1
        start = entry & ~mask or 1
        end = min((entry | mask) + 1, self.max)
        for off in range(start, end):
            if off == entry:
                continue
            if self.swap_map[off] & ~SWAP_HAS_CACHE and off not in self.swap_cache:
                if await self.read_swap_cache_async(off, gfp, task) is None:
                    break
        return await self.read_swap_cache_async(entry, gfp, task)
