"""sk_buff: network buffers charged to emulated memory.

Models net/core/skbuff.c (3.5 and 3.6): __alloc_skb (the head from
skbuff_head_cache, or from skbuff_fclone_cache with SKB_ALLOC_FCLONE as
alloc_skb_fclone asks for TCP's transmit skbs; the data through
kmalloc_reserve; SKB_ALLOC_RX adding __GFP_MEMALLOC when
sk_memalloc_socks()), __kmalloc_reserve (a first attempt with
__GFP_NOMEMALLOC, a second with the reserves only if gfp_pfmemalloc_allowed,
which marks skb->pfmemalloc), __netdev_alloc_skb with the per-CPU page-fragment
cache (netdev_alloc_frag) and build_skb, and kfree_skb.

Sizes (x86_64): a head is 256 bytes (sizeof(struct sk_buff) = 232, cache-line
aligned); a fast-clone head 512 (two sk_buffs and fclone_ref, 468, aligned);
the data area is SKB_DATA_ALIGN(size) + SKB_DATA_ALIGN(sizeof(struct
skb_shared_info)), skb_shared_info being 320 bytes; ``truesize`` is
SKB_TRUESIZE(usable data) = ksize(data) + 256 for kmalloc'ed data and
SKB_TRUESIZE(fragsz - 320) for a page fragment, as the kernel computes it.

The receive-buffer path a NIC driver takes (``network.rx_buffers``):
"page_frag" is e1000's: GFP_ATOMIC buffers of at most a page come from
netdev_alloc_frag (3.5: always alloc_page(GFP_ATOMIC | __GFP_COLD), the
caller's gfp ignored; 3.6 with patch 9: the caller's gfp plus __GFP_MEMALLOC
when sk_memalloc_socks()) and build_skb takes the head with GFP_ATOMIC.
build_skb does not propagate the page's pfmemalloc to the skb in 3.6 either
(a hole later kernels closed), so a page-fragment buffer is never
``pfmemalloc`` and sk_filter never drops it. "kmalloc" is a bnx2-style driver
whose buffers come from __alloc_skb(SKB_ALLOC_RX): kmalloc_reserve marks them.

Patch gates: 9 (SKB_ALLOC_RX/__GFP_MEMALLOC, kmalloc_reserve's two attempts
and pfmemalloc marking, the gfp passed to __netdev_alloc_frag).

Simplified: no frags list or shared-info contents; a transmit skb's fast
clone (the companion object that goes to the device) shares the original's
data and is freed on transmit completion, so only the original's life is
modelled: it holds its memory until ACKed. 3.6's page-fragment recycling
(NETDEV_PAGECNT_BIAS) is not modelled: a carved-out page is freed when its
last fragment is, as in 3.5. Patch 11 (pfmemalloc from __skb_alloc_page) has
no driver here that allocates receive pages that way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.flags import GFP, GFP_ATOMIC
from emulator.mm.kmalloc import ksize
from emulator.mm.page import PAGE_SIZE, Owner, Page
from emulator.mm.page_alloc import gfp_pfmemalloc_allowed
from emulator.patches import SKB_RESERVES
from emulator.task import Task

if TYPE_CHECKING:
    from emulator.kernel import Kernel

SKB_ALLOC_FCLONE = 0x01
SKB_ALLOC_RX = 0x02
NET_SKB_PAD = 64
SKB_SHARED_INFO = 320
SMP_CACHE_BYTES = 64
SKB_HEAD_SIZE = 256  #: SKB_DATA_ALIGN(sizeof(struct sk_buff))


def SKB_DATA_ALIGN(x: int) -> int:
    return (x + SMP_CACHE_BYTES - 1) & ~(SMP_CACHE_BYTES - 1)


def SKB_TRUESIZE(x: int) -> int:
    """SKB_TRUESIZE(): the memory an skb with ``x`` bytes of usable data holds."""
    return x + SKB_HEAD_SIZE + SKB_DATA_ALIGN(SKB_SHARED_INFO)


class SkBuff:
    """struct sk_buff: the memory it holds, and the TCP control block (seq, end_seq,
    ack_seq) of the segment it carries."""

    __slots__ = ("head", "head_cache", "data_obj", "frag", "len", "truesize", "pfmemalloc",
                 "data", "sk", "frags", "seq", "end_seq", "ack_seq", "sent")

    def __init__(self, head, head_cache, data_obj, frag, size: int, truesize: int,
                 pfmemalloc: bool) -> None:
        self.head = head
        self.head_cache = head_cache
        self.data_obj = data_obj
        self.frag = frag  # (PageFrag, fragsz) when the data is a page fragment
        self.len = size
        self.truesize = truesize
        self.pfmemalloc = pfmemalloc
        self.data = b""
        self.sk = None
        self.frags = None  # TX page fragments (pages of a socket's sk_sndmsg_page)
        self.seq = 0  #: TCP_SKB_CB(skb)->seq
        self.end_seq = 0  #: TCP_SKB_CB(skb)->end_seq
        self.ack_seq = 0  #: TCP_SKB_CB(skb)->ack_seq (received segments)
        self.sent = False  #: a transmit skb has left tcp_send_head()


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
    def __init__(self, k: Kernel, rx_buffers: str = "page_frag") -> None:
        self.k = k
        self.rx_buffers = rx_buffers  #: the NIC driver's buffer kind
        self.frag_cache: dict[int, PageFrag | None] = {cpu.id: None for cpu in k.cpus}
        self.live = 0  # skbs allocated and not yet freed

    # -- kmalloc_reserve --------------------------------------------------------------
    async def kmalloc_reserve(self, size: int, gfp: GFP, task: Task):
        """__kmalloc_reserve: without the reserves first, then (if allowed) with them.
        Returns (object, pfmemalloc)."""
        k = self.k
        slab = k.slab
        if not k.patches.has(SKB_RESERVES):
            return await slab.kmalloc(size, gfp, task), False
        obj = await slab.kmalloc(size, gfp | GFP.NOMEMALLOC | GFP.NOWARN, task)
        if obj is not None or not gfp_pfmemalloc_allowed(gfp, task, k.patches):
            return obj, False
        obj = await slab.kmalloc(size, gfp, task)
        return obj, obj is not None

    # -- __alloc_skb -------------------------------------------------------------------
    async def alloc_skb(self, size: int, gfp: GFP, flags: int, task: Task) -> SkBuff | None:
        """__alloc_skb(size, gfp, flags): alloc_skb, alloc_skb_fclone (SKB_ALLOC_FCLONE)."""
        k = self.k
        if flags & SKB_ALLOC_RX and k.sk_memalloc_socks() and k.patches.has(SKB_RESERVES):
            gfp |= GFP.MEMALLOC
        slab = k.slab
        cache = slab.skbuff_fclone_cache if flags & SKB_ALLOC_FCLONE else slab.skbuff_head_cache
        head = await slab.kmem_cache_alloc(cache, gfp & ~GFP.DMA, task)
        if head is None:
            return None
        data_size = SKB_DATA_ALIGN(size) + SKB_DATA_ALIGN(SKB_SHARED_INFO)
        data, pfmemalloc = await self.kmalloc_reserve(data_size, gfp, task)
        if data is None:
            slab.kmem_cache_free(cache, head, task)
            return None
        # size = SKB_WITH_OVERHEAD(ksize(data)); truesize = SKB_TRUESIZE(size)
        truesize = SKB_TRUESIZE(ksize(data) - SKB_DATA_ALIGN(SKB_SHARED_INFO))
        return self._account(SkBuff(head, cache, data, None, size, truesize, pfmemalloc))

    async def alloc_skb_fclone(self, size: int, gfp: GFP, task: Task) -> SkBuff | None:
        """alloc_skb_fclone(): TCP's transmit skbs, the head a fast-clone pair."""
        return await self.alloc_skb(size, gfp, SKB_ALLOC_FCLONE, task)

    async def netdev_alloc_skb(self, length: int, gfp: GFP, task: Task) -> SkBuff | None:
        """__netdev_alloc_skb: a driver's RX buffer. A page fragment when the driver
        uses them (network.rx_buffers = "page_frag"), it fits a page and the mask
        may not sleep; else __alloc_skb(length + NET_SKB_PAD, gfp, SKB_ALLOC_RX)."""
        k = self.k
        fragsz = SKB_DATA_ALIGN(length + NET_SKB_PAD) + SKB_DATA_ALIGN(SKB_SHARED_INFO)
        if self.rx_buffers != "page_frag" or fragsz > PAGE_SIZE or gfp & GFP.WAIT:
            return await self.alloc_skb(length + NET_SKB_PAD, gfp, SKB_ALLOC_RX, task)
        if k.patches.has(SKB_RESERVES):
            # 3.6: __netdev_alloc_frag(fragsz, gfp) with __GFP_MEMALLOC if memalloc sockets.
            frag_gfp = gfp | GFP.MEMALLOC if k.sk_memalloc_socks() else gfp
        else:
            frag_gfp = GFP_ATOMIC | GFP.COLD  # 3.5's netdev_alloc_frag ignores the caller's gfp
        frag = await self.netdev_alloc_frag(fragsz, frag_gfp, task)
        if frag is None:
            return None
        slab = k.slab
        head = await slab.kmem_cache_alloc(slab.skbuff_head_cache, GFP_ATOMIC, task)  # build_skb
        if head is None:
            self._put_frag(frag)
            return None
        # build_skb: truesize = SKB_TRUESIZE(fragsz - shared info); pfmemalloc not propagated.
        truesize = SKB_TRUESIZE(fragsz - SKB_DATA_ALIGN(SKB_SHARED_INFO))
        return self._account(SkBuff(head, slab.skbuff_head_cache, None, (frag, fragsz), length,
                                    truesize, False))

    async def netdev_alloc_frag(self, fragsz: int, gfp: GFP, task: Task) -> PageFrag | None:
        """netdev_alloc_frag(): ``fragsz`` bytes of the running CPU's fragment page,
        a new order-0 page when it is used up."""
        cpu = task.cpu.id
        nc = self.frag_cache[cpu]
        if nc is None or nc.offset + fragsz > PAGE_SIZE:
            if nc is not None:
                self.frag_cache[cpu] = None
                self._put_frag(nc)
            page = await self.k.page_alloc.alloc_page(gfp, task, owner=Owner.SKB)
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
        """kfree_skb(): the head back to its cache, the data to kmalloc or the
        fragment's page."""
        slab = self.k.slab
        slab.kmem_cache_free(skb.head_cache, skb.head, task)
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
