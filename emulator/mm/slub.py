"""SLUB: per-CPU slab with its lockless freelist, per-CPU and per-node partial lists.

Models mm/slub.c (3.6, CONFIG_NUMA off, no slub_debug):
  * struct kmem_cache_cpu: ``freelist`` (the lockless per-CPU freelist of the
    cpu slab), ``page`` (the frozen cpu slab), ``partial`` (frozen per-CPU
    partial slabs; each carries ``pages`` / ``pobjects`` as counted when it was
    pushed); no ``tid``.
  * struct kmem_cache_node: the partial list (nr_partial); every slab is also in
    ``slabs`` (the SLUB_DEBUG nr_slabs count) so full slabs stay accounted.
  * The slab fields of struct page: freelist, inuse, objects, frozen.
  * slab_alloc (fast path), __slab_alloc (slow path: pfmemalloc_match,
    get_freelist, per-CPU partial, get_partial_node, new_slab), acquire_slab,
    put_cpu_partial, unfreeze_partials, deactivate_slab, flush_slab,
    slab_free / __slab_free, discard_slab (empty slabs beyond min_partial go
    back to the buddy allocator), kmem_cache_shrink.
  * Sizing: calculate_sizes (word alignment, free pointer after the object for
    caches with a constructor, calculate_alignment), calculate_order /
    slab_order (min_objects = 4 * (fls(nr_cpu_ids) + 1), slub_max_order =
    PAGE_ALLOC_COSTLY_ORDER, waste 1/16, 1/8, 1/4), s->min = get_order(size),
    set_min_partial (ilog2(size)/2 clamped to 5..10), cpu_partial (30/13/6/2).
  * allocate_slab: the preferred order first with __GFP_NOWARN|__GFP_NORETRY
    (no __GFP_NOFAIL), then the minimum order with the caller's flags
    (ORDER_FALLBACK, counted per cache).
  * Patch 1: new_slab marks a slab from the reserves PageSlabPfmemalloc;
    __slab_alloc deactivates a cpu slab that fails pfmemalloc_match;
    get_partial_node skips such partial slabs; a fresh slab that does not match
    is used for one object and deactivated at once. Patch 2: the fast path pops
    the per-CPU freelist with no check (the documented leak); with patch 1 and
    without patch 2 the fast path also checks pfmemalloc_match. Without patch 1:
    3.5, no marks, no checks.

  * Cache merging (3.6 __kmem_cache_create -> find_mergeable, on by default):
    a kmem_cache_create() whose flags have no SLUB_NEVER_MERGE bit and which
    has no constructor is served by the most recently created existing cache
    that is mergeable itself (no SLUB_NEVER_MERGE flag, no ctor, refcount >= 0)
    and has the same SLUB_MERGE_SAME flags, an s->size at least the request's
    size (word-aligned, then aligned to calculate_alignment()) and less than a
    word larger, and an s->size that is a multiple of that alignment. The
    caller gets that cache itself; its refcount goes up, object_size and inuse
    grow to cover the new size, and the name is recorded in ``aliases`` (the
    sysfs_slab_alias() symlink). ``slub_nomerge`` (the boot parameter; the
    constructor argument) turns it off. With the model's standard caches:
    skbuff_head_cache (256, HWCACHE_ALIGN) is kmalloc-256, bio (192,
    HWCACHE_ALIGN) is kmalloc-192; radix_tree_node (ctor) and blkdev_requests
    (352: no 352..359-byte cache) stay separate.

Simplified: no cmpxchg_double and no transaction id (``tid``): the machine lock
serialises every section, so there is no race for them to detect; no full list
(debug only in the kernel); slabs are never sorted by kmem_cache_shrink beyond
discarding the empty ones; no slub_debug, so kmem_cache_flags() adds nothing
before merging. unfreeze_partials is 3.6's (it takes the node's list_lock
before judging a slab): 3.5's discarded an empty per-CPU partial slab
regardless of min_partial when no slab before it in the same call had been
kept.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from emulator.flags import GFP, GFP_CONSTRAINT_MASK, GFP_RECLAIM_MASK
from emulator.mm.kmalloc import get_order
from emulator.mm.mmzone import MAX_ORDER, PAGE_ALLOC_COSTLY_ORDER
from emulator.mm.page import PAGE_SHIFT, PAGE_SIZE, Owner, Page
from emulator.mm.slab_common import (
    ALIGN,
    ARCH_SLAB_MINALIGN,
    BYTES_PER_WORD,
    CACHE_LINE_SIZE,
    SLAB_CACHE_DMA,
    SLAB_DEBUG_FREE,
    SLAB_DESTROY_BY_RCU,
    SLAB_FAILSLAB,
    SLAB_HWCACHE_ALIGN,
    SLAB_NOLEAKTRACE,
    SLAB_NOTRACK,
    SLAB_POISON,
    SLAB_RECLAIM_ACCOUNT,
    SLAB_RED_ZONE,
    SLAB_STORE_USER,
    SLAB_TRACE,
    KmemCacheBase,
    SlabAllocator,
    SlabObj,
    fls,
)
from emulator.patches import SLAB_PFMEMALLOC, SLUB_FASTPATH_NO_CHECK

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.task import Task

MIN_PARTIAL = 5
MAX_PARTIAL = 10
MAX_OBJS_PER_PAGE = 32767
slub_min_order = 0
slub_max_order = PAGE_ALLOC_COSTLY_ORDER
slub_min_objects = 0

#: Flags that keep a cache out of merging, either way (3.6 mm/slub.c).
SLUB_NEVER_MERGE = (SLAB_RED_ZONE | SLAB_POISON | SLAB_STORE_USER | SLAB_TRACE
                    | SLAB_DESTROY_BY_RCU | SLAB_NOLEAKTRACE | SLAB_FAILSLAB)
#: Flags two caches must agree on to merge.
SLUB_MERGE_SAME = SLAB_DEBUG_FREE | SLAB_RECLAIM_ACCOUNT | SLAB_CACHE_DMA | SLAB_NOTRACK

_SLAB_PAGE_GFP_MASK = int(GFP_RECLAIM_MASK | GFP_CONSTRAINT_MASK)
_NOWARN_NORETRY = int(GFP.NOWARN | GFP.NORETRY)
_NOFAIL = int(GFP.NOFAIL)
_NEW_SLAB = object()  # __slab_alloc must call the page allocator


class SlubPage:
    """The slab fields of a struct page (head page of a ``2^order`` slab)."""

    __slots__ = ("cache", "page", "order", "objects", "objs", "freelist", "inuse", "frozen",
                 "pfmemalloc", "pobjects", "pages", "dead")

    def __init__(self, cache: KmemCache, page: Page, order: int, objects: int,
                 pfmemalloc: bool) -> None:
        self.cache = cache
        self.page = page
        self.order = order
        self.objects = objects
        self.objs = [SlabObj(cache, self, i) for i in range(objects)]
        self.freelist = self.objs[::-1]  # pop() = the list head: object 0 first
        self.inuse = objects  # new_slab: inuse = objects, frozen
        self.frozen = True
        self.pfmemalloc = pfmemalloc  #: PageSlabPfmemalloc
        self.pobjects = 0
        self.pages = 0
        self.dead = False

    def __repr__(self) -> str:
        return (f"<slub page {self.cache.name} pfn {self.page.pfn} inuse {self.inuse}/"
                f"{self.objects}{' frozen' if self.frozen else ''}"
                f"{' pfmemalloc' if self.pfmemalloc else ''}>")


class KmemCacheCpu:
    """struct kmem_cache_cpu."""

    __slots__ = ("freelist", "page", "partial")

    def __init__(self) -> None:
        self.freelist: list[SlabObj] = []  # [] is NULL
        self.page: SlubPage | None = None
        self.partial: list[SlubPage] = []  # last element = c->partial (the head)


class KmemCacheNode:
    """struct kmem_cache_node (SLUB)."""

    __slots__ = ("partial", "slabs")

    def __init__(self) -> None:
        self.partial: OrderedDict[SlubPage, None] = OrderedDict()
        self.slabs: set[SlubPage] = set()

    @property
    def nr_partial(self) -> int:
        return len(self.partial)


class KmemCache(KmemCacheBase):
    """struct kmem_cache (SLUB)."""

    def __init__(self, name, object_size, align, flags, ctor, nr_cpus: int) -> None:
        super().__init__(name, object_size, align, flags, ctor)
        self.inuse = 0
        self.oo = (0, 0)  # (order, objects)
        self.min = (0, 0)
        self.min_partial = MIN_PARTIAL
        self.cpu_partial = 0
        self.cpu_slab = [KmemCacheCpu() for _ in range(nr_cpus)]
        self.node = KmemCacheNode()
        self.order_fallback = 0  #: ORDER_FALLBACK stat


def order_objects(order: int, size: int, reserved: int) -> int:
    return ((PAGE_SIZE << order) - reserved) // size


def slab_order(size: int, min_objects: int, max_order: int, fract_leftover: int,
               reserved: int) -> int:
    """slab_order(): the smallest order >= the one holding min_objects whose waste is
    at most 1/fract_leftover of the slab; max_order + 1 if none."""
    min_order = slub_min_order
    if order_objects(min_order, size, reserved) > MAX_OBJS_PER_PAGE:
        return get_order(size * MAX_OBJS_PER_PAGE) - 1
    order = max(min_order, fls(min_objects * size - 1) - PAGE_SHIFT)
    while order <= max_order:
        slab_size = PAGE_SIZE << order
        if slab_size >= min_objects * size + reserved:
            rem = (slab_size - reserved) % size
            if rem <= slab_size // fract_leftover:
                break
        order += 1
    return order


def calculate_order(size: int, reserved: int, nr_cpu_ids: int) -> int:
    """calculate_order(): back off waste (1/16, 1/8, 1/4), then min_objects."""
    min_objects = slub_min_objects or 4 * (fls(nr_cpu_ids) + 1)
    max_objects = order_objects(slub_max_order, size, reserved)
    min_objects = min(min_objects, max_objects)
    while min_objects > 1:
        fraction = 16
        while fraction >= 4:
            order = slab_order(size, min_objects, slub_max_order, fraction, reserved)
            if order <= slub_max_order:
                return order
            fraction //= 2
        min_objects -= 1
    order = slab_order(size, 1, slub_max_order, 1, reserved)
    if order <= slub_max_order:
        return order
    order = slab_order(size, 1, MAX_ORDER, 1, reserved)
    if order < MAX_ORDER:
        return order
    raise ValueError(f"object size {size} cannot be placed in a slab")


def calculate_alignment(flags: int, align: int, size: int) -> int:
    """calculate_alignment(): hardware cache alignment for large enough objects."""
    if flags & SLAB_HWCACHE_ALIGN:
        ralign = CACHE_LINE_SIZE
        while size <= ralign // 2:
            ralign //= 2
        align = max(align, ralign)
    if align < ARCH_SLAB_MINALIGN:
        align = ARCH_SLAB_MINALIGN
    return ALIGN(align, BYTES_PER_WORD)


def cpu_partial_for(size: int) -> int:
    """kmem_cache_open()'s cpu_partial (no debugging)."""
    if size >= PAGE_SIZE:
        return 2
    if size >= 1024:
        return 6
    if size >= 256:
        return 13
    return 30


def create_unique_id(s: KmemCache) -> str:
    """create_unique_id(): the /sys/kernel/slab directory of a mergeable cache, e.g.
    ":t-0000256" (its names are symlinks to it). 't': SLAB_NOTRACK is clear."""
    tags = ""
    if s.flags & SLAB_CACHE_DMA:
        tags += "d"
    if s.flags & SLAB_RECLAIM_ACCOUNT:
        tags += "a"
    if s.flags & SLAB_DEBUG_FREE:
        tags += "F"
    if not s.flags & SLAB_NOTRACK:
        tags += "t"
    return f":{tags}{'-' if tags else ''}{s.size:07d}"


class SlabAllocatorSLUB(SlabAllocator):
    kind = "slub"
    kmalloc_flags = 0

    def __init__(self, k: Kernel, *, slub_nomerge: bool = False) -> None:
        #: patch 2 absent (with patch 1): the fast path checks pfmemalloc_match too.
        self.fastpath_check = k.patches.has(SLAB_PFMEMALLOC) and not k.patches.has(SLUB_FASTPATH_NO_CHECK)
        #: the ``slub_nomerge`` boot parameter: no cache merging. It must be given to
        #: the constructor to affect the standard caches (created here, at "boot");
        #: changing it later affects later kmem_cache_create() calls only.
        self.slub_nomerge = slub_nomerge
        super().__init__(k)

    # -- cache merging (find_mergeable / slab_unmergeable) ----------------------------
    def slab_unmergeable(self, s: KmemCache) -> bool:
        """slab_unmergeable(): may ``s`` take aliases?"""
        return bool(self.slub_nomerge or s.flags & SLUB_NEVER_MERGE or s.ctor
                    or s.refcount < 0)

    def find_mergeable(self, size: int, align: int, flags: int, ctor: bool) -> KmemCache | None:
        """find_mergeable(): an existing cache that can serve this kmem_cache_create().
        slab_caches is a list_add()ed list, so the newest cache is tried first."""
        if self.slub_nomerge or flags & SLUB_NEVER_MERGE:
            return None
        if ctor:
            return None
        size = ALIGN(size, BYTES_PER_WORD)
        align = calculate_alignment(flags, align, size)
        size = ALIGN(size, align)
        for s in reversed(self.caches):
            if self.slab_unmergeable(s):
                continue
            if size > s.size:
                continue
            if flags & SLUB_MERGE_SAME != s.flags & SLUB_MERGE_SAME:
                continue
            if s.size & ~(align - 1) != s.size:  # alignment compatible
                continue
            if s.size - size >= BYTES_PER_WORD:
                continue
            return s
        return None

    def _kmem_cache_alias(self, name, size, align, flags, ctor) -> KmemCache | None:
        """The merging half of 3.6's __kmem_cache_create: refcount++, grow object_size
        and inuse to cover the new user's objects, record the alias name."""
        s = self.find_mergeable(size, align, flags, ctor)
        if s is None:
            return None
        s.refcount += 1
        s.object_size = max(s.object_size, size)
        s.inuse = max(s.inuse, ALIGN(size, BYTES_PER_WORD))
        s.aliases.append(name)
        return s

    # -- kmem_cache_open / calculate_sizes -------------------------------------------
    def _create(self, name, size, align, flags, ctor) -> KmemCache:
        """kmem_cache_open() + calculate_sizes(). Simplified: no debug metadata."""
        s = KmemCache(name, size, align, flags, ctor, self.nr_cpus)
        sz = ALIGN(size, BYTES_PER_WORD)
        s.inuse = sz
        if flags & SLAB_DESTROY_BY_RCU or ctor:
            sz += BYTES_PER_WORD  # the free pointer after the object (s->offset)
        s.align = calculate_alignment(flags, align, size)
        sz = ALIGN(sz, s.align)
        s.size = sz
        order = calculate_order(sz, 0, self.nr_cpus)
        s.oo = (order, order_objects(order, sz, 0))
        min_order = get_order(sz)
        s.min = (min_order, order_objects(min_order, sz, 0))
        s.min_partial = max(MIN_PARTIAL, min(MAX_PARTIAL, (sz.bit_length() - 1) // 2))
        s.cpu_partial = cpu_partial_for(sz)
        return s

    # -- allocation ---------------------------------------------------------------------
    async def kmem_cache_alloc(self, s: KmemCache, gfp: GFP, task: Task):
        """kmem_cache_alloc() -> slab_alloc(): pop the per-CPU freelist (no pfmemalloc
        check with patch 2), else __slab_alloc."""
        cpu = task.cpu.id
        with self.lock:
            c = s.cpu_slab[cpu]
            fl = c.freelist
            if fl and not (self.fastpath_check and c.page.pfmemalloc
                           and not self.pfmemalloc_allowed(gfp, task)):
                obj = fl.pop()
                obj.allocated = True
                s.nr_allocated += 1
                return obj
            obj = self._slab_alloc(s, gfp, task, c)
            if obj is not _NEW_SLAB:
                if obj is not None:
                    obj.allocated = True
                    s.nr_allocated += 1
                return obj
        # new_slab_objects(): no partial slab; the page allocator may sleep.
        page = await self.new_slab(s, gfp, task)
        if page is None:
            return None
        with self.lock:
            c = s.cpu_slab[cpu]
            if c.page is not None:
                self.flush_slab(s, c)
            freelist = page.freelist
            page.freelist = []
            c.page = page
            obj = self._load_new(s, c, page, freelist, gfp, task)
            obj.allocated = True
            s.nr_allocated += 1
            return obj

    def pfmemalloc_match(self, page: SlubPage, gfp, task: Task) -> bool:
        """pfmemalloc_match(): a PageSlabPfmemalloc slab only for entitled callers."""
        if page.pfmemalloc:
            return self.pfmemalloc_allowed(gfp, task)
        return True

    def _slab_alloc(self, s: KmemCache, gfp, task: Task, c: KmemCacheCpu):
        """__slab_alloc() up to new_slab() (the locked part): an object, or _NEW_SLAB."""
        aware = self.pfmemalloc_aware
        page = c.page
        while True:
            if page is not None:  # redo:
                if aware and page.pfmemalloc and not self.pfmemalloc_allowed(gfp, task):
                    self.vmstat["slab_pfmemalloc_refused"] += 1
                    self.deactivate_slab(s, page, c.freelist)
                    c.page = None
                    c.freelist = []
                    page = None
                else:
                    freelist = c.freelist
                    if not freelist:
                        freelist = self.get_freelist(s, page)
                        if not freelist:
                            c.page = None  # DEACTIVATE_BYPASS: the slab is full
                            page = None
                    if page is not None:  # load_freelist:
                        obj = freelist.pop()
                        c.freelist = freelist
                        return obj
            # new_slab:
            if c.partial:
                page = c.page = c.partial.pop()
                c.freelist = []
                continue
            freelist = self.get_partial_node(s, s.node, c, gfp, task)
            if freelist:
                return self._load_new(s, c, c.page, freelist, gfp, task)
            return _NEW_SLAB

    def _load_new(self, s: KmemCache, c: KmemCacheCpu, page: SlubPage, freelist: list,
                  gfp, task: Task) -> SlabObj:
        """The tail of __slab_alloc after new_slab_objects(): load the freelist into the
        per-CPU freelist if the slab matches, else take one object and deactivate it."""
        obj = freelist.pop()
        if not self.pfmemalloc_aware or self.pfmemalloc_match(page, gfp, task):
            c.freelist = freelist
            return obj
        self.deactivate_slab(s, page, freelist)
        c.page = None
        c.freelist = []
        return obj

    @staticmethod
    def get_freelist(s: KmemCache, page: SlubPage) -> list:
        """get_freelist(): take the page's freelist (remote frees); a page with none left
        is unfrozen (it is full and on no list)."""
        freelist = page.freelist
        page.freelist = []
        page.inuse = page.objects
        page.frozen = bool(freelist)
        return freelist

    def get_partial_node(self, s: KmemCache, n: KmemCacheNode, c: KmemCacheCpu, gfp,
                         task: Task) -> list | None:
        """get_partial_node(): freeze the first matching partial slab as the cpu slab,
        then more into the per-CPU partial list until more than cpu_partial/2 objects
        are available (3.6 counts 0 for the first slab)."""
        if not n.partial:
            return None
        obj_list = None
        aware = self.pfmemalloc_aware
        allowed = None
        for page in list(n.partial):
            if aware and page.pfmemalloc:
                if allowed is None:
                    allowed = self.pfmemalloc_allowed(gfp, task)
                if not allowed:
                    self.vmstat["slab_pfmemalloc_refused"] += 1
                    continue
            del n.partial[page]  # acquire_slab: remove_partial + freeze
            page.frozen = True
            if obj_list is None:
                obj_list = page.freelist
                page.freelist = []
                page.inuse = page.objects
                c.page = page
                available = page.objects - page.inuse
            else:
                available = self.put_cpu_partial(s, page, False, c)
            if available > s.cpu_partial // 2:
                break
        return obj_list

    async def new_slab(self, s: KmemCache, gfp, task: Task) -> SlubPage | None:
        """new_slab() + allocate_slab(): the preferred order with __GFP_NORETRY|NOWARN,
        then the minimum order; mark PageSlabPfmemalloc (patch 1)."""
        flags = int(gfp) & _SLAB_PAGE_GFP_MASK
        alloc_gfp = (flags | _NOWARN_NORETRY) & ~_NOFAIL
        order, objects = s.oo
        palloc = self.k.page_alloc
        page = await palloc.alloc_pages(alloc_gfp, order, task, owner=Owner.SLAB)
        if page is None:
            order, objects = s.min
            page = await palloc.alloc_pages(flags, order, task, owner=Owner.SLAB)
            if page is None:
                return None
            with self.lock:
                s.order_fallback += 1
        with self.lock:
            nr = 1 << order
            if page.pfmemalloc:
                self.vmstat["slab_alloc_pfmemalloc"] += nr
            pfmemalloc = self.pfmemalloc_aware and page.pfmemalloc
            self.account_slab_pages(s, nr)
            sp = SlubPage(s, page, order, objects, pfmemalloc)
            self.mark_slab_pages(page, order, sp, pfmemalloc)
            s.node.slabs.add(sp)
        return sp

    # -- partial lists and deactivation ---------------------------------------------------
    def put_cpu_partial(self, s: KmemCache, page: SlubPage, drain: bool,
                        c: KmemCacheCpu) -> int:
        """put_cpu_partial(): push a frozen slab on the per-CPU partial list; when
        draining and the list already holds more than cpu_partial objects, move them
        all to the node list first."""
        pages = pobjects = 0
        if c.partial:
            old = c.partial[-1]
            pobjects, pages = old.pobjects, old.pages
            if drain and pobjects > s.cpu_partial:
                self.unfreeze_partials(s, c)
                pobjects = pages = 0
        pages += 1
        pobjects += page.objects - page.inuse
        page.pages, page.pobjects = pages, pobjects
        c.partial.append(page)
        return pobjects

    def unfreeze_partials(self, s: KmemCache, c: KmemCacheCpu) -> None:
        """unfreeze_partials(): every per-CPU partial slab to the node partial list
        (tail), or discarded if empty while the node has more than min_partial."""
        n = s.node
        discard = []
        while c.partial:
            page = c.partial.pop()
            page.frozen = False
            if page.inuse == 0 and len(n.partial) > s.min_partial:
                discard.append(page)
            else:
                n.partial[page] = None  # add_partial(DEACTIVATE_TO_TAIL)
        for page in discard:
            self.discard_slab(s, page)

    def deactivate_slab(self, s: KmemCache, page: SlubPage, freelist: list) -> None:
        """deactivate_slab(): per-CPU objects back to the page, unfreeze, and put it on
        the partial list (tail if it had remote frees), leave it full, or discard it if
        empty while the node has more than min_partial partial slabs."""
        tail = bool(page.freelist)
        if freelist:
            page.freelist.extend(freelist)
            page.inuse -= len(freelist)
        page.frozen = False
        n = s.node
        if page.inuse == 0 and len(n.partial) > s.min_partial:
            self.discard_slab(s, page)
        elif page.freelist:
            n.partial[page] = None
            if not tail:
                n.partial.move_to_end(page, last=False)

    def flush_slab(self, s: KmemCache, c: KmemCacheCpu) -> None:
        """flush_slab(): deactivate the cpu slab."""
        self.deactivate_slab(s, c.page, c.freelist)
        c.page = None
        c.freelist = []

    def discard_slab(self, s: KmemCache, page: SlubPage) -> None:
        """discard_slab() -> __free_slab(): clear PageSlabPfmemalloc, free the pages."""
        s.node.slabs.discard(page)
        page.dead = True
        self.free_slab_pages(s, page.page, page.order)

    # -- freeing ------------------------------------------------------------------------
    def kmem_cache_free(self, s: KmemCache, obj: SlabObj, task: Task | None) -> None:
        """kmem_cache_free() -> slab_free(): onto the per-CPU freelist if the object is in
        this CPU's cpu slab, else __slab_free. ``task=None`` frees on CPU 0."""
        cpu = task.cpu.id if task is not None else 0
        with self.lock:
            assert obj.allocated, f"double free of {obj!r}"
            assert obj.cache is s, f"{obj!r} freed to {s.name}"
            obj.allocated = False
            s.nr_allocated -= 1
            c = s.cpu_slab[cpu]
            page = obj.slab
            if page is c.page:
                c.freelist.append(obj)
                return
            self.__slab_free(s, page, obj, c)

    def __slab_free(self, s: KmemCache, page: SlubPage, obj: SlabObj, c: KmemCacheCpu) -> None:
        """__slab_free(): onto the page's freelist; a full slab is frozen onto this CPU's
        partial list; an empty slab on the node list is discarded beyond min_partial."""
        prior = bool(page.freelist)
        page.freelist.append(obj)
        page.inuse -= 1
        was_frozen = page.frozen
        if was_frozen:
            return
        if not prior:
            # Slab was full and on no list: freeze it onto the per-CPU partial list.
            page.frozen = True
            self.put_cpu_partial(s, page, True, c)
            return
        n = s.node
        if page.inuse == 0 and len(n.partial) > s.min_partial:
            del n.partial[page]
            self.discard_slab(s, page)

    # -- shrinking -------------------------------------------------------------------------
    def flush_all(self, s: KmemCache) -> None:
        """flush_all(): every CPU's cpu slab and per-CPU partial slabs back to the node."""
        for c in s.cpu_slab:
            if c.page is not None:
                self.flush_slab(s, c)
            self.unfreeze_partials(s, c)

    def kmem_cache_shrink(self, s: KmemCache) -> int:
        """kmem_cache_shrink(): flush_all, then discard every empty partial slab (even
        below min_partial). Returns the pages given back, those of the empty slabs
        flush_all discarded above min_partial included (3.6 returns 0)."""
        with self.lock:
            n = s.node
            pages_before = sum(1 << page.order for page in n.slabs)
            self.flush_all(s)
            for page in [p for p in n.partial if p.inuse == 0]:
                del n.partial[page]
                self.discard_slab(s, page)
            return pages_before - sum(1 << page.order for page in n.slabs)

    # -- observability and checks ----------------------------------------------------------
    def _slabinfo(self, s: KmemCache) -> dict:
        n = s.node
        nr_objs = sum(p.objects for p in n.slabs)
        nr_free_partial = sum(len(p.freelist) for p in n.partial)
        cpu_cached = 0
        cpu_slabs = 0
        cpu_partial_slabs = 0
        for c in s.cpu_slab:
            cpu_cached += len(c.freelist)
            if c.page is not None:
                cpu_slabs += 1
                cpu_cached += len(c.page.freelist)
            for p in c.partial:
                cpu_partial_slabs += 1
                cpu_cached += len(p.freelist)
        return {
            "name": s.name, "active_objs": nr_objs - nr_free_partial, "num_objs": nr_objs,
            "objsize": s.size, "objperslab": s.oo[1], "pagesperslab": 1 << s.oo[0],
            "slabs": len(n.slabs), "pfmemalloc_slabs": sum(p.pfmemalloc for p in n.slabs),
            "cpu_cached": cpu_cached, "shared_cached": 0, "in_use": s.nr_allocated,
            "partial_slabs": len(n.partial), "cpu_slabs": cpu_slabs,
            "cpu_partial_slabs": cpu_partial_slabs, "min_partial": s.min_partial,
            "cpu_partial": s.cpu_partial, "order_fallback": s.order_fallback,
            "pages": sum(1 << p.order for p in n.slabs),
            "sysfs_name": s.name if self.slab_unmergeable(s) else create_unique_id(s),
        }

    def _check_cache(self, s: KmemCache) -> int:
        n = s.node
        seen: set[int] = set()
        owner: dict[int, str] = {}
        name = s.name
        for cpu, c in enumerate(s.cpu_slab):
            if c.page is not None:
                p = c.page
                assert p in n.slabs and not p.dead, f"{name}: cpu{cpu} slab {p!r} not live"
                assert p.frozen, f"{name}: cpu{cpu} slab {p!r} not frozen"
                assert p not in n.partial, f"{name}: cpu{cpu} slab {p!r} on the node list"
                assert id(p) not in owner, f"{name}: {p!r} is cpu slab and {owner[id(p)]}"
                owner[id(p)] = f"cpu{cpu} slab"
                self.check_free_objects(name, p, c.freelist, seen, "cpu freelist")
            else:
                assert not c.freelist, f"{name}: cpu{cpu} freelist without a cpu slab"
            for p in c.partial:
                assert p in n.slabs and p.frozen, f"{name}: cpu{cpu} partial {p!r} bad"
                assert p not in n.partial, f"{name}: {p!r} on both partial lists"
                assert id(p) not in owner, f"{name}: {p!r} is cpu partial and {owner[id(p)]}"
                owner[id(p)] = f"cpu{cpu} partial"
        for p in n.partial:
            assert p in n.slabs and not p.frozen and p.freelist, f"{name}: node partial {p!r} bad"
        pages = 0
        allocated = 0
        for p in n.slabs:
            if p.frozen:
                assert id(p) in owner, f"{name}: frozen {p!r} owned by no CPU"
            else:
                assert id(p) not in owner, f"{name}: unfrozen {p!r} owned by a CPU"
                assert (p in n.partial) == bool(p.freelist), (
                    f"{name}: {p!r} with free objects must be on the partial list")
            assert p.inuse == p.objects - len(p.freelist), f"{name}: {p!r} inuse wrong"
            self.check_slab_pages(p, p.page, p.order, p.pfmemalloc)
            assert not p.pfmemalloc or p.page.pfmemalloc, f"{name}: {p!r} mark without reserve"
            pages += 1 << p.order
            self.check_free_objects(name, p, p.freelist, seen)
            allocated += self.count_allocated(name, p.objs, seen)
        assert allocated == s.nr_allocated, (
            f"{name}: {allocated} allocated objects, counter says {s.nr_allocated}")
        return pages
