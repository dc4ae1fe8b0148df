"""Swap slots, the swap cache, and swap I/O.

Models mm/swapfile.c (swap_map with SWAP_HAS_CACHE, scan_swap_map's
next-free-slot cursor, get_swap_page, swap_duplicate, swap_free,
swapcache_free, try_to_free_swap), mm/swap_state.c (add_to_swap,
add_to_swap_cache with radix-tree node allocation, delete_from_swap_cache,
read_swap_cache_async, swapin_readahead with page_cluster = 3), mm/page_io.c
(swap_writepage, swap_readpage, end_swap_bio_write, end_swap_bio_read), the
unmap half of mm/rmap.c (try_to_unmap for an anonymous page) and the page
lock (lock_page / unlock_page / wait_on_page_locked).

Page contents are real on the wire: swap_writepage turns the page's
(pid, virtual page, generation) into 4096 bytes with a CRC32, and
end_swap_bio_read checks them. A bad checksum is an ``integrity_error``.

Simplified: one swap area; no swap clusters (a next-fit cursor instead of
SWAPFILE_CLUSTER allocation); the swap-cache radix tree is modelled by its node
allocations only (one node per 64 slots, one per 4096 at the level above);
vm_swap_full() is not used (a written page always drops its stale slot when
its writeback is not in progress, as usemem rewrites every page it touches).
"""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING

import structlog
import trio

from emulator.flags import GFP, GFP_NOIO, GFP_KERNEL
from emulator.mm.page import PAGE_SIZE, PG, Owner, Page
from emulator.task import Task
from emulator.wait import HashedWaitTable

if TYPE_CHECKING:
    from emulator.kernel import Kernel

log = structlog.get_logger("swapnbd.swap")

SWAP_HAS_CACHE = 0x40
SWAP_MAP_BAD = 0x3F
PAGE_CLUSTER = 3  # swap_setup(): 3 when RAM >= 16 MiB
RADIX_TREE_MAP_SHIFT = 6

_HDR = struct.Struct(">4sIQQQ")  # magic, crc32 of the rest, pid, vpn, gen
_MAGIC = b"SWPG"


def encode_page(contents: tuple[int, int, int]) -> bytes:
    """The bytes of an anonymous page: a header naming (pid, vpn, gen), a filler
    derived from them, and a CRC32 over everything after the CRC field."""
    pid, vpn, gen = contents
    seed = zlib.crc32(struct.pack(">QQQ", pid, vpn, gen)).to_bytes(4, "big")
    body = struct.pack(">QQQ", pid, vpn, gen) + (seed * ((PAGE_SIZE - _HDR.size) // 4 + 1))
    body = body[: PAGE_SIZE - 8]
    return _MAGIC + zlib.crc32(body).to_bytes(4, "big") + body


def decode_page(data: bytes) -> tuple[int, int, int] | None:
    """(pid, vpn, gen) from a page's bytes, or None if the bytes are not an intact page."""
    if len(data) != PAGE_SIZE or data[:4] != _MAGIC:
        return None
    _, crc, pid, vpn, gen = _HDR.unpack_from(data)
    if zlib.crc32(memoryview(data)[8:]) != crc:
        return None
    return pid, vpn, gen


class SwapInfo:
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
        self.swap_map[entry] += 1

    def swap_free(self, entry: int) -> None:
        """A PTE stopped referring to the slot."""
        assert self.swap_map[entry] & ~SWAP_HAS_CACHE, f"swap_free of unused slot {entry}"
        self.swap_map[entry] -= 1
        self._maybe_free_slot(entry)

    def swapcache_free(self, entry: int) -> None:
        self.swap_map[entry] &= ~SWAP_HAS_CACHE
        self._maybe_free_slot(entry)

    def swapcache_prepare(self, entry: int) -> bool:
        """Claim the slot's cache reference for a swap-in; False if already cached."""
        if self.swap_map[entry] & SWAP_HAS_CACHE or not self.swap_map[entry]:
            return False
        self.swap_map[entry] |= SWAP_HAS_CACHE
        return True

    # -- radix tree nodes of the swap cache --------------------------------------------
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
        slab = self.k.slab
        for key in self._radix_keys(entry):
            self._radix_count[key] -= 1
            if not self._radix_count[key]:
                del self._radix_count[key]
                slab.kmem_cache_free(slab.radix_tree_node, self._radix_nodes.pop(key), task)

    # -- the swap cache ------------------------------------------------------------------
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
        entry = page.swap
        del self.swap_cache[entry]
        self.radix_tree_delete(entry, task)
        page.flags &= ~PG.swapcache
        page.swap = 0
        self.swapcache_free(entry)
        self.k.vmstat["nr_swapcache"] -= 1
        self.k.vmstat["nr_file_pages"] -= 1

    def try_to_free_swap(self, page: Page, task: Task) -> bool:
        """Drop a swap-cache page's slot once no PTE refers to it and no I/O runs."""
        if not page.flags & PG.swapcache or page.flags & PG.writeback:
            return False
        if self.swap_map[page.swap] & ~SWAP_HAS_CACHE:
            return False
        self.delete_from_swap_cache(page, task)
        return True

    # -- rmap ------------------------------------------------------------------------------
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

    # -- page lock -------------------------------------------------------------------------
    def unlock_page(self, page: Page) -> None:
        page.flags &= ~PG.locked
        self.page_wait.for_key(page.pfn).wake_up()

    async def wait_on_page_locked(self, page: Page, task: Task, wchan: str) -> None:
        if page.flags & PG.locked:
            await task.sleep_on(self.page_wait.for_key(page.pfn),
                                lambda: not page.flags & PG.locked, wchan=wchan, iowait=True)

    def end_page_writeback(self, page: Page) -> None:
        page.flags &= ~PG.writeback
        self.k.vmstat["nr_writeback"] -= 1
        if page.flags & PG.reclaim:
            page.flags &= ~PG.reclaim
            self.k.vmscan.rotate_reclaimable_page(page)
        self.page_wait.for_key(page.pfn).wake_up()

    # -- I/O ------------------------------------------------------------------------------
    async def swap_writepage(self, page: Page, task: Task) -> bool:
        """swap_writepage(): bio from the bio mempool with GFP_NOIO, PG_writeback,
        pswpout, submit. The page is unlocked here, as in the kernel."""
        k = self.k
        if self.try_to_free_swap(page, task):
            self.unlock_page(page)
            return False
        bio = await self.bdev.bio_alloc(GFP_NOIO, task)
        if bio is None:
            page.flags |= PG.dirty  # set_page_dirty: try again later
            page.flags &= ~PG.reclaim
            self.unlock_page(page)
            return False
        with k.lock:
            k.vmstat["pswpout"] += 1
            k.vmstat["pgpgout"] += PAGE_SIZE // 1024
            page.flags |= PG.writeback
            k.vmstat["nr_writeback"] += 1
        bio.prepare_write(page.swap * PAGE_SIZE, encode_page(page.contents), page,
                          self.end_swap_bio_write)
        self.unlock_page(page)
        await self.bdev.submit_bio(bio, task)
        return True

    def end_swap_bio_write(self, bio, error: int) -> None:
        """end_swap_bio_write(): on an error, SetPageError, set_page_dirty (the page
        stays in the swap cache and is written again by a later scan), "Write-error
        on swap-device" and ClearPageReclaim, so that end_page_writeback does not
        rotate it. Only a write that succeeded is progress."""
        page = bio.page
        if error:
            page.flags |= PG.error | PG.dirty
            page.flags &= ~PG.reclaim
            self.k.printk.ratelimited("warning", "swap_write_error", pfn=page.pfn,
                                      entry=page.swap, error=error)
        self.end_page_writeback(page)
        if not error:
            self.k.progress += 1

    async def swap_readpage(self, page: Page, task: Task) -> None:
        """swap_readpage(): bio with GFP_KERNEL, pswpin, submit; end_swap_bio_read
        unlocks the page."""
        k = self.k
        bio = await self.bdev.bio_alloc(GFP_KERNEL, task)
        if bio is None:
            self.unlock_page(page)
            return
        k.vmstat["pswpin"] += 1
        k.vmstat["pgpgin"] += PAGE_SIZE // 1024
        bio.prepare_read(page.swap * PAGE_SIZE, PAGE_SIZE, page, self.end_swap_bio_read)
        await self.bdev.submit_bio(bio, task)

    def end_swap_bio_read(self, bio, error: int) -> None:
        """end_swap_bio_read(): SetPageUptodate, or on an error SetPageError and
        "Read-error on swap-device" (do_swap_page then finds the page not uptodate:
        SIGBUS); unlock_page. Only a read that succeeded is progress."""
        page = bio.page
        if not error:
            contents = decode_page(bio.data)
            if contents is None:
                self.k.integrity_error(what="checksum", pid=None, vaddr=None,
                                       expected=f"swap slot {page.swap}",
                                       found="bytes failing the CRC/magic check")
                page.flags |= PG.error
            else:
                page.contents = contents
                page.flags |= PG.uptodate
        else:
            page.flags |= PG.error
            self.k.printk.ratelimited("warning", "swap_read_error", pfn=page.pfn,
                                      entry=page.swap, error=error)
        self.unlock_page(page)
        if not error:
            self.k.progress += 1

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
