"""struct page: one page frame.

Models: include/linux/mm_types.h (struct page) and the PG_* flags of
include/linux/page-flags.h that this model needs, plus ``page->pfmemalloc``
(3.6: a bool sharing a union with ``index``, set by get_page_from_freelist).

Every frame is in exactly one place, named by ``owner``: the buddy allocator
(a free block's head or tail), a process mapping, the swap cache, a slab, an
skb, a mempool, a test. The conservation tests walk all frames and check that
each owner's count matches its own bookkeeping.

``contents`` stands for the page's bytes: for an anonymous page, the
(pid, virtual page, write generation) triple the workload last wrote, packed
into one int by ``pack_contents`` (60 bits: two of CPython's 30-bit digits, 32
bytes, where a tuple and its vpn took 96). The real 4096 bytes are produced
from it by swap_writepage (mm/page_io.py) and checked on swap-in, so what
crosses the network is real data.

Simplified: no page refcount or mapcount arithmetic (an anonymous page has at
most one mapping; ``mapped`` is that PTE's presence), no compound-page
metadata beyond ``order`` on the head frame.
"""

from __future__ import annotations

import enum

from emulator.flags import Bits

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


#: Field widths of a packed ``contents``: pid (pid numbers stay far below a
#: million here), virtual page (4 TiB per process, the most a config allows) and
#: generation (workload.passes is at most 1000).
CONTENTS_VPN_SHIFT, CONTENTS_PID_SHIFT = 10, 40
CONTENTS_GEN_LIMIT, CONTENTS_VPN_LIMIT, CONTENTS_PID_LIMIT = 1 << 10, 1 << 30, 1 << 20


def pack_contents(pid: int, vpn: int, gen: int) -> int:
    """The ``contents`` word of (pid, vpn, gen); ValueError outside the widths."""
    if not (0 <= pid < CONTENTS_PID_LIMIT and 0 <= vpn < CONTENTS_VPN_LIMIT
            and 0 <= gen < CONTENTS_GEN_LIMIT):
        raise ValueError(f"page contents out of range: pid {pid}, vpn {vpn}, gen {gen}")
    return pid << CONTENTS_PID_SHIFT | vpn << CONTENTS_VPN_SHIFT | gen


def unpack_contents(word: int) -> tuple[int, int, int]:
    """(pid, vpn, gen) of a ``contents`` word."""
    return (word >> CONTENTS_PID_SHIFT, (word >> CONTENTS_VPN_SHIFT) & (CONTENTS_VPN_LIMIT - 1),
            word & (CONTENTS_GEN_LIMIT - 1))


class PG(Bits):
    locked = 1 << 0
    referenced = 1 << 2
    uptodate = 1 << 3
    dirty = 1 << 4
    lru = 1 << 5
    active = 1 << 6
    slab = 1 << 7
    buddy = 1 << 8  #: PageBuddy: head of a free block in the buddy allocator
    reclaim = 1 << 9
    swapbacked = 1 << 10
    swapcache = 1 << 11
    writeback = 1 << 12
    error = 1 << 13
    slab_pfmemalloc = 1 << 14  #: PageSlabPfmemalloc (patch 1, PG_active reused)


class Owner(enum.Enum):
    """Where a frame is (the conservation invariant's places)."""

    FREE = "free"  #: in a buddy free block
    PCP = "pcp"  #: free, on a CPU's per-cpu page list (not counted in NR_FREE_PAGES)
    ANON = "anon"  #: an anonymous page (mapped, swap cache or both)
    FILE = "file"  #: a page-cache page (clean, unmapped)
    SLAB = "slab"
    SKB = "skb"  #: network pages: RX page fragments, TX sk_sndmsg_page pages
    KERNEL = "kernel"  #: other kernel use (large kmalloc, page tables, tests)
    MEMPOOL = "mempool"


class Page:
    __slots__ = (
        "pfn", "zone", "flags", "order", "owner", "pfmemalloc", "young",
        "mm", "vaddr", "swap", "contents", "slab", "private", "migratetype",
    )

    def __init__(self, pfn: int, zone) -> None:
        self.pfn = pfn
        self.zone = zone
        self.flags = PG(0)
        self.order = 0
        self.owner = Owner.FREE
        self.pfmemalloc = False
        self.young = False  #: the PTE's accessed bit (page_referenced clears it)
        self.mm = None  #: owning MMStruct while mapped (rmap)
        self.vaddr = -1  #: virtual page number in ``mm``
        self.swap = 0  #: swap entry (page_private) while PageSwapCache
        self.contents: int | None = None  #: pack_contents(pid, vpn, gen)
        self.slab = None  #: the slab this frame belongs to (SLAB/SLUB)
        self.private = None
        #: the migrate type of the list the frame is on while free: a buddy
        #: block's free list, or the type recorded with a per-cpu page
        #: (page_private: its pageblock's type when freed, the requested type
        #: when rmqueue_bulk took it); stale while the page is allocated.
        self.migratetype = 2  # MIGRATE_MOVABLE

    @property
    def mapped(self) -> bool:
        return self.mm is not None

    def __repr__(self) -> str:
        fl = "|".join(PG.names(self.flags))
        return f"<Page {self.pfn} {self.owner.value} {fl}{' pfmemalloc' if self.pfmemalloc else ''}>"
