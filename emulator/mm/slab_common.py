"""What SLAB and SLUB share: the cache interface, standard caches, objects, checks.

Models: mm/slab_common.c and include/linux/slab.h (3.6) — kmem_cache_create,
kmem_cache_alloc/kmem_cache_free, kmalloc/kfree (mm/kmalloc.py), the SLAB_*
creation flags, the caches the rest of the machine uses (kmalloc-*,
skbuff_head_cache, skbuff_fclone_cache, radix_tree_node, bio, blkdev_requests) and the counters
NR_SLAB_RECLAIMABLE / NR_SLAB_UNRECLAIMABLE. ``create_slab_allocator(k, kind)``
picks the allocator as CONFIG_SLAB / CONFIG_SLUB does at build time.

An object is a ``SlabObj``: its cache, its slab and its index in the slab. It
carries no payload; callers keep what they need next to it. ``allocated`` is
the model's double-free / conservation marker (no kernel counterpart).

Locking: every synchronous section that touches slab state holds ``k.lock``;
only the page allocator calls (which may sleep in direct reclaim) are awaited,
outside the lock, and per-CPU state is re-read after them, as the kernel
re-reads ``cpu_cache_get()`` / ``this_cpu_ptr()`` after re-enabling interrupts.

Patch gates: 1 (PFMEMALLOC slab rules, both allocators), 2 (SLUB fast path),
13 (no behavioural effect: the model gates SLAB's checks on
``sk_memalloc_socks()`` with or without the static key).

Cache merging: ``kmem_cache_create`` first asks the allocator for an existing
cache to alias (``_kmem_cache_alias``; 3.6 SLUB does this in its
__kmem_cache_create via find_mergeable, later kernels call it
__kmem_cache_alias). SLAB never merges; SLUB does, by default, as 3.6 does
(see mm/slub.py): the caller gets the existing cache itself, as the kernel
returns the existing ``struct kmem_cache *``, its ``refcount`` goes up and
the new name is added to its ``aliases``. So under SLUB
``k.slab.skbuff_head_cache is k.slab.kmalloc_caches[256]`` and
``k.slab.bio_cache is k.slab.kmalloc_caches[192]``. ``caches`` holds each
real cache once, so slabinfo() lists a merged cache once, under its first
name (as /proc/slabinfo does), with an ``aliases`` field, and check() /
shrink_all() visit it once.

Simplified: one NUMA node and CONFIG_NUMA off (no alien caches, no
____cache_alloc_node fallback, no remote partial lists); no slab debugging,
no constructors' work (``ctor`` only moves SLUB's free pointer as in
calculate_sizes and keeps the cache out of SLUB merging), no
kmem_cache_destroy (so no alias refcount drops), no RCU-deferred slab
freeing, no kmemcheck/kmemleak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.flags import GFP
from emulator.mm import kmalloc as kmalloc_mod
from emulator.mm.page import PAGE_SIZE, PG, Owner, Page
from emulator.mm.page_alloc import gfp_pfmemalloc_allowed
from emulator.patches import SLAB_PFMEMALLOC

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.task import Task

# -- include/linux/slab.h creation flags (3.6 values) ------------------------------
SLAB_DEBUG_FREE = 0x00000100
SLAB_RED_ZONE = 0x00000400
SLAB_POISON = 0x00000800
SLAB_HWCACHE_ALIGN = 0x00002000
SLAB_CACHE_DMA = 0x00004000
SLAB_STORE_USER = 0x00010000
SLAB_RECLAIM_ACCOUNT = 0x00020000
SLAB_PANIC = 0x00040000
SLAB_DESTROY_BY_RCU = 0x00080000
SLAB_MEM_SPREAD = 0x00100000
SLAB_TRACE = 0x00200000
SLAB_DEBUG_OBJECTS = 0x00400000  #: 0 without CONFIG_DEBUG_OBJECTS
SLAB_NOLEAKTRACE = 0x00800000
SLAB_NOTRACK = 0x01000000  #: 0 without CONFIG_KMEMCHECK
SLAB_FAILSLAB = 0x02000000  #: 0 without CONFIG_FAILSLAB

#: cache_line_size() on x86_64.
CACHE_LINE_SIZE = 64
#: ARCH_KMALLOC_MINALIGN = __alignof__(unsigned long long) on x86_64.
ARCH_KMALLOC_MINALIGN = 8
ARCH_SLAB_MINALIGN = 8
BYTES_PER_WORD = 8

#: Object sizes of the standard non-kmalloc caches (x86_64, 3.6), in bytes.
SKBUFF_HEAD_SIZE = 256  #: sizeof(struct sk_buff) ~ 232, cache-line aligned to 256
#: skbuff_fclone_cache: 2 * sizeof(struct sk_buff) + sizeof(atomic_t) (fclone_ref) = 468,
#: which SLAB_HWCACHE_ALIGN rounds to 512 (SLUB then merges it into kmalloc-512).
SKBUFF_FCLONE_SIZE = 2 * 232 + 4
RADIX_TREE_NODE_SIZE = 576  #: sizeof(struct radix_tree_node) on x86_64
BIO_SIZE = 192  #: struct bio + inline bvec ("bio-0"), cache-line aligned
REQUEST_SIZE = 352  #: sizeof(struct request)

#: Largest kmalloc cache; bigger requests go to the page allocator (SLUB_MAX_SIZE).
KMALLOC_MAX_CACHE_SIZE = 2 * PAGE_SIZE



def fls(x: int) -> int:
    """fls(): index of the most significant set bit, 1-based (fls(0) = 0)."""
    return x.bit_length()


def ALIGN(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class SlabObj:
    """One slab object: (cache, slab, index). ``allocated`` marks it handed out."""

    __slots__ = ("cache", "slab", "idx", "allocated")

    def __init__(self, cache, slab, idx: int) -> None:
        self.cache = cache
        self.slab = slab
        self.idx = idx
        self.allocated = False

    @property
    def pfmemalloc(self) -> bool:
        """Informational: is the object's slab PageSlabPfmemalloc right now?"""
        return self.slab.pfmemalloc

    def __repr__(self) -> str:
        return f"<obj {self.cache.name}#{self.slab.page.pfn}.{self.idx}>"


class KmemCacheBase:
    """Fields both allocators' struct kmem_cache have."""

    def __init__(self, name: str, object_size: int, align: int, flags: int, ctor: bool) -> None:
        self.name = name
        self.object_size = object_size
        self.align = align
        self.flags = flags
        self.ctor = ctor
        self.size = object_size  # the aligned per-object footprint
        self.nr_allocated = 0  #: objects handed out and not yet freed (exact)
        #: kmem_cache_create() calls that returned this cache (SLUB aliases add one).
        self.refcount = 1
        #: names of the kmem_cache_create() calls merged into this cache (SLUB only).
        self.aliases: list[str] = []

    @property
    def reclaim_account(self) -> bool:
        return bool(self.flags & SLAB_RECLAIM_ACCOUNT)

    def __repr__(self) -> str:
        return f"<kmem_cache {self.name} size={self.size}>"


class SlabAllocator:
    """The interface the rest of the machine uses; SLAB and SLUB implement it."""

    kind = "?"

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.lock = k.lock
        self.vmstat = k.vmstat
        self.nr_cpus = len(k.cpus)
        #: patch 1 ("mm: sl[au]b: add knowledge of PFMEMALLOC reserve pages"): read once.
        self.pfmemalloc_aware = k.patches.has(SLAB_PFMEMALLOC)
        self.caches: list = []
        self.kmalloc_sizes = kmalloc_mod.kmalloc_sizes(self.kind)
        self.kmalloc_caches: dict[int, KmemCacheBase] = {}
        for size in self.kmalloc_sizes:
            self.kmalloc_caches[size] = self.kmem_cache_create(
                f"kmalloc-{size}", size, ARCH_KMALLOC_MINALIGN, flags=self.kmalloc_flags)
        self._kmalloc_lookup = kmalloc_mod.build_lookup(self.kmalloc_caches)
        self.skbuff_head_cache = self.kmem_cache_create(
            "skbuff_head_cache", SKBUFF_HEAD_SIZE, 0, flags=SLAB_HWCACHE_ALIGN | SLAB_PANIC)
        self.skbuff_fclone_cache = self.kmem_cache_create(
            "skbuff_fclone_cache", SKBUFF_FCLONE_SIZE, 0, flags=SLAB_HWCACHE_ALIGN | SLAB_PANIC)
        self.radix_tree_node = self.kmem_cache_create(
            "radix_tree_node", RADIX_TREE_NODE_SIZE, 0,
            flags=SLAB_PANIC | SLAB_RECLAIM_ACCOUNT, ctor=True)
        self.bio_cache = self.kmem_cache_create("bio", BIO_SIZE, 0, flags=SLAB_HWCACHE_ALIGN)
        self.request_cache = self.kmem_cache_create("blkdev_requests", REQUEST_SIZE, 0,
                                                    flags=SLAB_PANIC)
        self.large_kmallocs = 0  #: kmalloc_large objects outstanding

    # kmalloc caches' creation flags (ARCH_KMALLOC_FLAGS for SLAB, 0 for SLUB).
    kmalloc_flags = 0

    # -- the interface ------------------------------------------------------------
    def kmem_cache_create(self, name: str, size: int, align: int = 8, *, flags: int = 0,
                          ctor: bool = False):
        """kmem_cache_create(): a cache of ``size``-byte objects — an existing one if the
        allocator merges this request into it (SLUB), else a new one."""
        if size <= 0 or size > KMALLOC_MAX_CACHE_SIZE:
            raise ValueError(f"kmem_cache_create({name!r}): size {size} not in 1..8192")
        with self.lock:
            cache = self._kmem_cache_alias(name, size, align, flags, ctor)
            if cache is not None:
                return cache
            cache = self._create(name, size, align, flags, ctor)
            self.caches.append(cache)
            return cache

    def _kmem_cache_alias(self, name, size, align, flags, ctor):
        """An existing cache to merge this request into, its refcount and aliases
        updated; None for a new cache. SLAB never merges."""
        return None

    def _create(self, name, size, align, flags, ctor):  # pragma: no cover
        raise NotImplementedError

    async def kmem_cache_alloc(self, cache, gfp: GFP, task: Task):  # pragma: no cover
        raise NotImplementedError

    def kmem_cache_free(self, cache, obj, task: Task | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def kmem_cache_shrink(self, cache) -> int:  # pragma: no cover
        """kmem_cache_shrink(): give every empty slab back; returns pages freed."""
        raise NotImplementedError

    def shrink_all(self) -> int:
        """kmem_cache_shrink() on every cache; returns the pages freed."""
        return sum(self.kmem_cache_shrink(c) for c in self.caches)

    #: Seconds of kernel time between two cache_reap runs per CPU (SLAB's
    #: REAPTIMEOUT_CPUC); None: the allocator has no periodic reaping (SLUB).
    reap_interval: float | None = None

    def cache_reap(self, cpu_id: int, now: float) -> None:
        """Periodic per-CPU reaping (SLAB's cache_reap); SLUB has none."""

    async def kmalloc(self, size: int, gfp: GFP, task: Task):
        """kmalloc(): the size class's cache; 0 -> ZERO_SIZE_PTR; > 8192 -> pages."""
        if 0 < size <= KMALLOC_MAX_CACHE_SIZE:
            return await self.kmem_cache_alloc(self._kmalloc_lookup[size], gfp, task)
        return await kmalloc_mod.kmalloc(self, size, gfp, task)

    def kfree(self, obj, task: Task | None) -> None:
        """kfree(): back to the object's cache (or the page allocator)."""
        if obj is not None and obj.cache is not None:
            self.kmem_cache_free(obj.cache, obj, task)
        else:
            kmalloc_mod.kfree(self, obj, task)

    def slabinfo(self) -> list[dict]:
        """One dict per cache, as /proc/slabinfo lists them: a merged SLUB cache once,
        under its first name, with the merged names in ``aliases``."""
        with self.lock:
            out = []
            for c in self.caches:
                d = self._slabinfo(c)
                d["aliases"] = list(c.aliases)
                out.append(d)
            return out

    def _slabinfo(self, cache) -> dict:  # pragma: no cover
        raise NotImplementedError

    def check(self) -> None:
        """Raise AssertionError on any conservation violation."""
        with self.lock:
            pages = 0
            reclaimable = 0
            for cache in self.caches:
                assert cache.refcount == 1 + len(cache.aliases), (
                    f"{cache.name}: refcount {cache.refcount}, aliases {cache.aliases}")
                n = self._check_cache(cache)
                pages += n
                if cache.reclaim_account:
                    reclaimable += n
            vm = self.vmstat
            assert vm["nr_slab_unreclaimable"] == pages - reclaimable, (
                f"nr_slab_unreclaimable {vm['nr_slab_unreclaimable']} != {pages - reclaimable}")
            assert vm["nr_slab_reclaimable"] == reclaimable, (
                f"nr_slab_reclaimable {vm['nr_slab_reclaimable']} != {reclaimable}")
            frames = self._count_slab_frames()
            assert frames == pages, f"{frames} frames owned by SLAB, slabs hold {pages}"

    def _check_cache(self, cache) -> int:  # pragma: no cover
        raise NotImplementedError

    def _count_slab_frames(self) -> int:
        n = 0
        slab_owner = Owner.SLAB
        for p in self.k.pgdat.mem_map:
            if p.owner is slab_owner and not p.flags & PG.buddy:
                n += 1
        return n

    # -- helpers both allocators use ---------------------------------------------------
    def pfmemalloc_allowed(self, gfp, task: Task) -> bool:
        """gfp_pfmemalloc_allowed() in the caller's context."""
        return gfp_pfmemalloc_allowed(gfp, task, self.k.patches)

    def account_slab_pages(self, cache, nr_pages: int) -> None:
        """NR_SLAB_RECLAIMABLE / NR_SLAB_UNRECLAIMABLE += nr_pages (caller holds the lock)."""
        if cache.flags & SLAB_RECLAIM_ACCOUNT:
            self.vmstat["nr_slab_reclaimable"] += nr_pages
        else:
            self.vmstat["nr_slab_unreclaimable"] += nr_pages

    def mark_slab_pages(self, page: Page, order: int, slab, pfmemalloc: bool) -> None:
        """__SetPageSlab (+ SetPageSlabPfmemalloc) on every frame of a new slab."""
        mem_map = self.k.pgdat.mem_map
        flags = PG.slab | PG.slab_pfmemalloc if pfmemalloc else PG.slab
        for pfn in range(page.pfn, page.pfn + (1 << order)):
            p = mem_map[pfn]
            p.flags |= flags
            p.slab = slab

    def clear_slab_pfmemalloc(self, page: Page, order: int) -> None:
        """ClearPageSlabPfmemalloc on every frame of a slab."""
        mem_map = self.k.pgdat.mem_map
        for pfn in range(page.pfn, page.pfn + (1 << order)):
            mem_map[pfn].flags &= ~PG.slab_pfmemalloc

    def free_slab_pages(self, cache, page: Page, order: int) -> None:
        """kmem_freepages / __free_slab: clear the slab flags, uncount, free the pages."""
        nr = 1 << order
        mem_map = self.k.pgdat.mem_map
        for pfn in range(page.pfn, page.pfn + nr):
            p = mem_map[pfn]
            p.flags &= ~(PG.slab | PG.slab_pfmemalloc)
            p.slab = None
        self.account_slab_pages(cache, -nr)
        self.k.page_alloc.free_pages(page, order)

    def check_slab_pages(self, slab, page: Page, order: int, pfmemalloc: bool) -> None:
        mem_map = self.k.pgdat.mem_map
        for pfn in range(page.pfn, page.pfn + (1 << order)):
            p = mem_map[pfn]
            assert p.owner is Owner.SLAB, f"{p!r} of {slab!r} not owned by SLAB"
            assert p.flags & PG.slab, f"{p!r} of {slab!r} lacks PG_slab"
            assert p.slab is slab, f"{p!r} points to {p.slab!r}, not {slab!r}"
            assert bool(p.flags & PG.slab_pfmemalloc) == pfmemalloc, (
                f"{p!r}: PageSlabPfmemalloc disagrees with {slab!r}")

    @staticmethod
    def check_free_objects(name: str, slab, free, seen: set[int], what: str = "free object") -> None:
        """Each object of the free list ``free`` belongs to ``slab``, is not
        allocated and is free only once (``seen`` collects the ids)."""
        for o in free:
            assert o.slab is slab and not o.allocated, f"{name}: bad {what} {o!r}"
            assert id(o) not in seen, f"{name}: {o!r} free twice"
            seen.add(id(o))

    @staticmethod
    def count_allocated(name: str, objs, seen: set[int]) -> int:
        """How many of a slab's ``objs`` are allocated; each is either that or in
        ``seen`` (free or cached), never both."""
        allocated = 0
        for o in objs:
            if o.allocated:
                allocated += 1
                assert id(o) not in seen, f"{name}: {o!r} allocated and free"
            else:
                assert id(o) in seen, f"{name}: {o!r} lost (neither free nor allocated)"
        return allocated


def create_slab_allocator(k: Kernel, kind: str, *, slub_nomerge: bool = False) -> SlabAllocator:
    """The slab allocator the kernel was built with: "slab" (CONFIG_SLAB) or "slub".
    ``slub_nomerge`` is the boot parameter of that name: SLUB merges no caches (SLAB
    ignores it; it never merges)."""
    if kind == "slab":
        from emulator.mm.slab import SlabAllocatorSLAB
        return SlabAllocatorSLAB(k)
    if kind == "slub":
        from emulator.mm.slub import SlabAllocatorSLUB
        return SlabAllocatorSLUB(k, slub_nomerge=slub_nomerge)
    raise ValueError(f"machine.slab: {kind!r} is not 'slab' or 'slub'")
