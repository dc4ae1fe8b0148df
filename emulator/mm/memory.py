"""Address spaces, page tables and page faults for anonymous memory.

Models: struct mm_struct (rss and swap-entry counts as in get_mm_counter),
a flat page table per mapping (a PTE is none, a present page, or a swap
entry), and from mm/memory.c: handle_mm_fault for anonymous VMAs,
do_anonymous_page (GFP_HIGHUSER_MOVABLE, new pages on the active anon LRU as
lru_cache_add_lru(LRU_ACTIVE_ANON) does in 3.6) and do_swap_page (swap cache
lookup, swapin_readahead with pgmajfault, lock_page while the read runs, the
PTE installed, swap_free, and the write-fault reuse that drops the stale slot
via try_to_free_swap). exit_mmap frees a dying process's memory.

The access that makes a PTE "young" is the workload's store; page_referenced
in reclaim clears it.

Simplified: one anonymous VMA per process, no page-table page allocations, no
THP, no fork/COW, no mlock. A fault whose allocation fails (only possible for
a task being OOM-killed) returns False: VM_FAULT_OOM ends the process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.flags import GFP_HIGHUSER_MOVABLE
from emulator.mm.page import PG, Owner, Page
from emulator.task import Task

if TYPE_CHECKING:
    from emulator.kernel import Kernel


class MMStruct:
    """mm_struct with one anonymous mapping of ``nr_pages`` pages."""

    __slots__ = ("owner", "nr_pages", "pte", "rss", "swapents")

    def __init__(self, owner: Task, nr_pages: int) -> None:
        self.owner = owner
        self.nr_pages = nr_pages
        #: PTEs: None (never touched), a Page (present), or an int swap entry.
        self.pte: list[Page | int | None] = [None] * nr_pages
        self.rss = 0
        self.swapents = 0


async def handle_mm_fault(k: Kernel, mm: MMStruct, vpn: int, task: Task, write: bool) -> Page | None:
    """handle_mm_fault for the anonymous mapping; returns the mapped page."""
    k.vmstat["pgfault"] += 1
    while True:
        entry = mm.pte[vpn]
        if entry is None:
            return await do_anonymous_page(k, mm, vpn, task)
        if isinstance(entry, Page):
            entry.young = True
            return entry
        page = await do_swap_page(k, mm, vpn, entry, task, write)
        if page is not None or task.fatal_signal:
            return page
        # The PTE changed under us (another path installed it): retry the fault.


async def do_anonymous_page(k: Kernel, mm: MMStruct, vpn: int, task: Task) -> Page | None:
    """do_anonymous_page(): a new zeroed page (GFP_HIGHUSER_MOVABLE), mapped and
    put on the active anon list."""
    page = await k.page_alloc.alloc_page(GFP_HIGHUSER_MOVABLE, task, owner=Owner.ANON)
    if page is None:
        return None
    with k.lock:
        if mm.pte[vpn] is not None:  # raced: someone else mapped it
            k.page_alloc.free_page(page)
            return None
        _map_page(k, mm, vpn, page)
        page.flags |= PG.swapbacked | PG.uptodate
        k.vmscan.lru_cache_add_active(page)
    return page


def _map_page(k: Kernel, mm: MMStruct, vpn: int, page: Page) -> None:
    mm.pte[vpn] = page
    page.mm = mm
    page.vaddr = vpn
    page.young = True
    mm.rss += 1
    k.vmstat["nr_mapped"] += 1
    k.vmstat["nr_anon_pages"] += 1


async def do_swap_page(k: Kernel, mm: MMStruct, vpn: int, entry: int, task: Task,
                       write: bool) -> Page | None:
    """do_swap_page(): the page from the swap cache or swapin_readahead (a major
    fault), lock_page, SIGBUS if the read failed, map it, swap_free the entry."""
    swap = k.swap
    page = swap.swap_cache.get(entry)
    if page is None:
        k.vmstat["pgmajfault"] += 1
        page = await swap.swapin_readahead(entry, GFP_HIGHUSER_MOVABLE, task)
        if page is None:
            # Either the PTE changed meanwhile (retry) or no memory (killed task).
            return None
    # lock_page(): wait for the read (end_swap_bio_read unlocks the page).
    await swap.wait_on_page_locked(page, task, wchan=f"do_swap_page(lock_page pfn {page.pfn})")
    with k.lock:
        if mm.pte[vpn] != entry:
            return None  # someone else resolved the fault
        if page.owner is not Owner.ANON or not page.flags & PG.swapcache or page.swap != entry:
            return None  # the page was reclaimed between lookup and lock: retry
        if not page.flags & PG.uptodate:
            # VM_FAULT_SIGBUS: the read failed (counted by the driver / integrity check).
            k.sigbus(task, vpn, page)
            return None
        _map_page(k, mm, vpn, page)
        mm.swapents -= 1
        swap.swap_free(entry)
        if write:
            # do_wp_page/reuse_swap_page: a written page's slot is stale.
            if not swap.try_to_free_swap(page, task):
                page.flags |= PG.dirty
    return page


def exit_mmap(k: Kernel, mm: MMStruct, task: Task) -> int:
    """exit_mmap / zap_pte_range: free the process's pages and slots.

    Pages still in the swap cache stay there (they are clean or under writeback
    and reclaim frees them); mapped pages that are not in the swap cache go back
    to the buddy allocator at once. Returns the number of pages freed.
    """
    freed = 0
    swap = k.swap

    def release(page: Page) -> None:
        nonlocal freed
        if page.flags & PG.swapcache:
            swap.try_to_free_swap(page, task)
        if page.flags & (PG.swapcache | PG.writeback | PG.locked) or not page.flags & PG.lru:
            return  # in the swap cache, under I/O or isolated: reclaim frees it
        k.vmscan.del_page_from_lru(page)
        k.page_alloc.free_page(page)
        freed += 1

    with k.lock:
        for vpn, entry in enumerate(mm.pte):
            if entry is None:
                continue
            mm.pte[vpn] = None
            if isinstance(entry, Page):
                entry.mm = None
                entry.flags &= ~PG.dirty
                mm.rss -= 1
                k.vmstat["nr_mapped"] -= 1
                k.vmstat["nr_anon_pages"] -= 1
                release(entry)
            else:
                mm.swapents -= 1
                swap.swap_free(entry)
                cached = swap.swap_cache.get(entry)
                if cached is not None and cached.mm is None:
                    release(cached)
    return freed
