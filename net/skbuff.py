"""sk_buff: network buffers charged to emulated memory.

Models net/core/skbuff.c (3.6): __alloc_skb (head from skbuff_head_cache, data
through kmalloc_reserve, SKB_ALLOC_RX adding __GFP_MEMALLOC when
sk_memalloc_socks()), __kmalloc_reserve (a first attempt with
__GFP_NOMEMALLOC, a second with the reserves only if gfp_pfmemalloc_allowed,
which marks skb->pfmemalloc), the per-CPU page-fragment cache behind
__netdev_alloc_skb / netdev_alloc_frag (network.rx_buffers = "page_frag"),
and kfree_skb.

Sizes: a head is one skbuff_head_cache object (256 bytes here); the data area
is SKB_DATA_ALIGN(size + NET_SKB_PAD) + SKB_DATA_ALIGN(sizeof(struct
skb_shared_info)) with NET_SKB_PAD = 64 and skb_shared_info = 320 bytes
(x86_64), so a 1536-byte RX buffer lands in kmalloc-2048. ``truesize`` is the
memory the skb holds.

Patch gates: 9 (SKB_ALLOC_RX/__GFP_MEMALLOC, kmalloc_reserve's two attempts
and pfmemalloc marking), 11 (a page-fragment RX buffer from a pfmemalloc page
marks the skb).

Simplified: no fast clones (the TX head is an skbuff_head_cache object, not
skbuff_fclone_cache), no frags list, no shared info contents, linear data
only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.flags import GFP
from emulator.mm.page import PAGE_SIZE, Owner, Page
from emulator.mm.page_alloc import gfp_pfmemalloc_allowed
from emulator.task import Task

if TYPE_CHECKING:
    from emulator.kernel import Kernel

SKB_ALLOC_FCLONE = 0x01
SKB_ALLOC_RX = 0x02
NET_SKB_PAD = 64
SKB_SHARED_INFO = 320
SMP_CACHE_BYTES = 64
SKB_HEAD_SIZE = 256


def SKB_DATA_ALIGN(x: int) -> int:
    return (x + SMP_CACHE_BYTES - 1) & ~(SMP_CACHE_BYTES - 1)


class SkBuff:
    __slots__ = ("head", "data_obj", "frag", "len", "truesize", "pfmemalloc", "data", "sk",
                 "frags")

    def __init__(self, head, data_obj, frag, size: int, truesize: int, pfmemalloc: bool) -> None:
        self.head = head
        self.data_obj = data_obj
        self.frag = frag  # (FragCache page, size) when the data is a page fragment
        self.len = size
        self.truesize = truesize
        self.pfmemalloc = pfmemalloc
        self.data = b""
        self.sk = None
        self.frags = None  # TX page fragments (pages of a socket's sk_sndmsg_page)


class PageFrag:
    """The per-CPU netdev_alloc_cache: a page carved into RX fragments.

    The page is freed when it is exhausted and its last fragment is freed
    (get_page/put_page on the page's refcount)."""

    __slots__ = ("page", "offset", "refs")

    def __init__(self, page: Page) -> None:
        self.page = page
        self.offset = 0
        self.refs = 1  # the cache's own reference


class SkbAllocator:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.frag_cache: dict[int, PageFrag | None] = {cpu.id: None for cpu in k.cpus}
        self.live = 0  # skbs allocated and not yet freed

    # -- kmalloc_reserve --------------------------------------------------------------
    async def kmalloc_reserve(self, size: int, gfp: GFP, task: Task):
        """__kmalloc_reserve: without the reserves first, then (if allowed) with them.
        Returns (object, pfmemalloc)."""
        k = self.k
        slab = k.slab
        if not k.patches.has(9):
            return await slab.kmalloc(size, gfp, task), False
        obj = await slab.kmalloc(size, gfp | GFP.NOMEMALLOC | GFP.NOWARN, task)
        if obj is not None or not gfp_pfmemalloc_allowed(gfp, task, k.patches):
            return obj, False
        obj = await slab.kmalloc(size, gfp, task)
        return obj, obj is not None

    # -- __alloc_skb -------------------------------------------------------------------
    async def alloc_skb(self, size: int, gfp: GFP, flags: int, task: Task) -> SkBuff | None:
        """__alloc_skb(size, gfp, flags)."""
        k = self.k
        if flags & SKB_ALLOC_RX and k.sk_memalloc_socks() and k.patches.has(9):
            gfp |= GFP.MEMALLOC
        slab = k.slab
        head = await slab.kmem_cache_alloc(slab.skbuff_head_cache, gfp & ~GFP.DMA, task)
        if head is None:
            return None
        data_size = SKB_DATA_ALIGN(size) + SKB_DATA_ALIGN(SKB_SHARED_INFO)
        data, pfmemalloc = await self.kmalloc_reserve(data_size, gfp, task)
        if data is None:
            slab.kmem_cache_free(slab.skbuff_head_cache, head, task)
            return None
        return self._account(SkBuff(head, data, None, size, data_size + SKB_HEAD_SIZE, pfmemalloc))

    async def netdev_alloc_skb(self, length: int, gfp: GFP, task: Task) -> SkBuff | None:
        """__netdev_alloc_skb: the driver's RX buffer, from page fragments when
        network.rx_buffers = "page_frag" (and it fits a page), else __alloc_skb(RX)."""
        k = self.k
        fragsz = SKB_DATA_ALIGN(length + NET_SKB_PAD) + SKB_DATA_ALIGN(SKB_SHARED_INFO)
        if k.cfg.network.rx_buffers != "page_frag" or fragsz > PAGE_SIZE or gfp & GFP.WAIT:
            return await self.alloc_skb(length + NET_SKB_PAD, gfp, SKB_ALLOC_RX, task)
        if k.sk_memalloc_socks() and k.patches.has(9):
            gfp |= GFP.MEMALLOC
        frag = await self.netdev_alloc_frag(fragsz, gfp, task)
        if frag is None:
            return None
        slab = k.slab
        head = await slab.kmem_cache_alloc(slab.skbuff_head_cache, GFP.HIGH, task)  # build_skb
        if head is None:
            self._put_frag(frag)
            return None
        pfmemalloc = frag.page.pfmemalloc and k.patches.has(11)
        return self._account(SkBuff(head, None, (frag, fragsz), length, fragsz + SKB_HEAD_SIZE,
                                    pfmemalloc))

    async def netdev_alloc_frag(self, fragsz: int, gfp: GFP, task: Task) -> PageFrag | None:
        cpu = task.cpu.id
        nc = self.frag_cache[cpu]
        if nc is None or nc.offset + fragsz > PAGE_SIZE:
            if nc is not None:
                self.frag_cache[cpu] = None
                self._put_frag(nc)
            page = await self.k.page_alloc.alloc_page(gfp | GFP.COLD, task, owner=Owner.SKB)
            if page is None:
                return None
            nc = PageFrag(page)
            if self.frag_cache[cpu] is not None:  # refilled while we allocated
                self._put_frag(nc)
                nc = self.frag_cache[cpu]
            else:
                self.frag_cache[cpu] = nc
        nc.offset += fragsz
        nc.refs += 1
        return nc

    def _put_frag(self, frag: PageFrag) -> None:
        frag.refs -= 1
        if frag.refs == 0:
            self.k.page_alloc.free_page(frag.page)

    def _account(self, skb: SkBuff) -> SkBuff:
        vm = self.k.vmstat
        vm["skb_alloc"] += 1
        if skb.pfmemalloc:
            vm["skb_alloc_pfmemalloc"] += 1
        self.live += 1
        return skb

    # -- kfree_skb ----------------------------------------------------------------------
    def kfree_skb(self, skb: SkBuff, task: Task) -> None:
        slab = self.k.slab
        slab.kmem_cache_free(slab.skbuff_head_cache, skb.head, task)
        if skb.data_obj is not None:
            slab.kfree(skb.data_obj, task)
        else:
            self._put_frag(skb.frag[0])
        skb.head = skb.data_obj = skb.frag = None
        self.live -= 1

    def drain(self, task: Task) -> None:
        """Drop the per-CPU fragment caches' own references (machine shutdown)."""
        for cpu, nc in list(self.frag_cache.items()):
            if nc is not None:
                self.frag_cache[cpu] = None
                self._put_frag(nc)
