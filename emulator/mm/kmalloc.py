"""kmalloc / kfree over the size classes of whichever slab allocator is built in.

Models: include/linux/slab_def.h + include/linux/kmalloc_sizes.h (SLAB's
malloc_sizes and __find_general_cachep) and include/linux/slub_def.h + mm/slub.c
(SLUB's kmalloc_caches, kmalloc_index / get_slab with its size_index table for
sizes <= 192, kmalloc_large above SLUB_MAX_SIZE = 2 * PAGE_SIZE), x86_64, 3.6.

Size classes, as each allocator has them on x86_64 with 64-byte cache lines:
  SLUB: 8 16 32 64 96 128 192 256 512 1024 2048 4096 8192
  SLAB: 32 64 128 192 256 512 1024 2048 4096 8192   (kmalloc(8) uses the 32-byte
        class; there is no 96 because L1_CACHE_BYTES is not below 64)
Both are named ``kmalloc-N`` here (3.6 SLAB called them ``size-N``) so that the
two allocators' slabinfo lines compare directly. Under SLUB (merging on, the
default) kmalloc-192 is also the ``bio`` cache and kmalloc-256 also
``skbuff_head_cache``: kmalloc(129..192) and bios, kmalloc(193..256) and skb
heads, share one cache and its per-CPU slabs (mm/slub.py, find_mergeable).

Requests above 8192 bytes go straight to the page allocator
(kmalloc_large: ``alloc_pages(gfp | __GFP_COMP, get_order(size))``, owner
Owner.KERNEL). SLUB does exactly this; 3.6 SLAB would use its size-16384 ...
size-4194304 caches instead — simplified here to SLUB's behaviour for both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.flags import GFP
from emulator.mm.page import Owner, Page

if TYPE_CHECKING:
    from emulator.mm.slab_common import SlabAllocator
    from emulator.task import Task

SLUB_SIZES = (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192)
SLAB_SIZES = (32, 64, 128, 192, 256, 512, 1024, 2048, 4096, 8192)
KMALLOC_MAX_CACHE_SIZE = 8192


def kmalloc_sizes(kind: str) -> tuple[int, ...]:
    """The kmalloc size classes of ``kind`` ("slab" or "slub")."""
    return SLAB_SIZES if kind == "slab" else SLUB_SIZES


def build_lookup(caches: dict) -> list:
    """A size -> cache table for 0..8192 (kmalloc_index / __find_general_cachep)."""
    sizes = sorted(caches)
    table = [None] * (KMALLOC_MAX_CACHE_SIZE + 1)
    i = 0
    for size in range(1, KMALLOC_MAX_CACHE_SIZE + 1):
        while sizes[i] < size:
            i += 1
        table[size] = caches[sizes[i]]
    return table


class ZeroSizePtr:
    """ZERO_SIZE_PTR: what kmalloc(0) returns; kfree ignores it."""

    __slots__ = ()
    cache = None

    def __repr__(self) -> str:
        return "ZERO_SIZE_PTR"


ZERO_SIZE_PTR = ZeroSizePtr()


class KmallocLarge:
    """A kmalloc_large() allocation: ``2^order`` pages straight from the buddy allocator."""

    __slots__ = ("page", "order", "size", "cache")

    def __init__(self, page: Page, order: int, size: int) -> None:
        self.page = page
        self.order = order
        self.size = size
        self.cache = None

    @property
    def pfmemalloc(self) -> bool:
        return self.page.pfmemalloc

    def __repr__(self) -> str:
        where = f"pfn {self.page.pfn}" if self.page is not None else "freed"
        return f"<kmalloc_large {self.size}B order {self.order} {where}>"


def get_order(size: int) -> int:
    """get_order(): the smallest order whose block holds ``size`` bytes."""
    order = 0
    size = (size - 1) >> 12
    while size:
        order += 1
        size >>= 1
    return order


async def kmalloc(slab: SlabAllocator, size: int, gfp: GFP, task: Task):
    """kmalloc() / __kmalloc(): the size class's cache, or kmalloc_large above 8192 bytes."""
    if size <= KMALLOC_MAX_CACHE_SIZE:
        if size <= 0:
            return ZERO_SIZE_PTR
        return await slab.kmem_cache_alloc(slab._kmalloc_lookup[size], gfp, task)
    return await kmalloc_large(slab, size, gfp, task)


async def kmalloc_large(slab: SlabAllocator, size: int, gfp: GFP, task: Task):
    """kmalloc_large() / kmalloc_order(): whole pages, __GFP_COMP, owner KERNEL."""
    order = get_order(size)
    page = await slab.k.page_alloc.alloc_pages(gfp | GFP.COMP, order, task,
                                               owner=Owner.KERNEL)
    if page is None:
        return None
    with slab.lock:
        slab.large_kmallocs += 1
    return KmallocLarge(page, order, size)


def kfree(slab: SlabAllocator, obj, task: Task | None) -> None:
    """kfree(): back to the object's cache, or the pages of a large allocation back
    to the buddy allocator. kfree(None) and kfree(ZERO_SIZE_PTR) do nothing."""
    if obj is None or obj is ZERO_SIZE_PTR:
        return
    cache = obj.cache
    if cache is not None:
        slab.kmem_cache_free(cache, obj, task)
        return
    with slab.lock:
        assert obj.page is not None, f"double kfree of {obj!r}"
        page, obj.page = obj.page, None
        slab.large_kmallocs -= 1
        slab.k.page_alloc.free_pages(page, obj.order)


def ksize(obj) -> int:
    """ksize(): the usable size of a kmalloc'ed object."""
    if obj is ZERO_SIZE_PTR:
        return 0
    if obj.cache is None:
        return 4096 << obj.order
    return obj.cache.object_size
