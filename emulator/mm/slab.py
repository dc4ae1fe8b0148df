"""SLAB: per-CPU array caches, the shared array, node slab lists, PFMEMALLOC tags.

Models mm/slab.c (3.6, CONFIG_NUMA off, no CONFIG_DEBUG_SLAB):
  * struct array_cache: a LIFO stack of free objects per CPU (``limit``,
    ``batchcount``, ``touched``) and one shared array per node of capacity
    ``shared * batchcount``; sizes from enable_cpucache's table.
  * struct kmem_list3: slabs_partial / slabs_full / slabs_free, free_objects,
    free_limit = (1 + nr_cpus) * batchcount + num, free_touched, next_reap.
  * struct slab: the slab's free objects (the bufctl chain, LIFO) and inuse.
  * ____cache_alloc, cache_alloc_refill (BATCHREFILL_LIMIT, shared array first,
    then partial, then free slabs, else cache_grow), cache_grow / kmem_getpages,
    __cache_free, cache_flusharray, free_block (surplus empty slabs beyond
    free_limit go back to the buddy allocator at once), drain_array,
    drain_freelist, cache_reap (every REAPTIMEOUT_CPUC = 2 s per CPU; the node
    lists every REAPTIMEOUT_LIST3 = 4 s), __cache_shrink.
  * Sizing: __kmem_cache_create's alignment rules, off-slab management for
    objects >= PAGE_SIZE/8, cache_estimate and calculate_slab_order with
    slab_max_order = 1 when RAM > 32 MiB (else 0), sizeof(struct slab) = 48 and
    a 4-byte kmem_bufctl_t on x86_64.
  * Patch 1: kmem_getpages marks a slab from the reserves PageSlabPfmemalloc
    and sets the global pfmemalloc_active; ac_put_obj tags such objects
    (SLAB_OBJ_PFMEMALLOC, here a ``_Tagged`` wrapper in the array);
    __ac_get_obj hands a tagged object only to gfp_pfmemalloc_allowed callers,
    else swaps in an untagged one from the array, else — when forced to refill
    and a free slab exists — declares the slab no longer pfmemalloc, else
    fails; recheck_pfmemalloc_active; free_block strips tags. Both checks run
    only while sk_memalloc_socks() (patch 13's static key — behaviourally the
    same with or without patch 13). Without patch 1: 3.5, no marks, no tags.

Simplified: no cache colouring (it only shifts addresses); off-slab slab
descriptors are not allocated from a kmalloc cache (their few dozen bytes per
slab are not charged); ClearPageSlabPfmemalloc clears every frame of the slab,
not only the head (only the head is ever read); a tagged entry still in an
array when the last memalloc socket goes away is untagged on its plain pop
instead of being returned as a misaligned pointer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from emulator.flags import GFP, GFP_CONSTRAINT_MASK, GFP_RECLAIM_MASK
from emulator.mm.mmzone import MAX_ORDER
from emulator.mm.page import PAGE_SIZE, Owner, Page
from emulator.mm.slab_common import (
    ALIGN,
    ARCH_SLAB_MINALIGN,
    BYTES_PER_WORD,
    CACHE_LINE_SIZE,
    SLAB_HWCACHE_ALIGN,
    SLAB_RECLAIM_ACCOUNT,
    KmemCacheBase,
    SlabAllocator,
    SlabObj,
)

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.task import Task

SIZEOF_STRUCT_SLAB = 48  #: struct slab on x86_64 (list, colouroff, s_mem, inuse, free, nodeid)
SIZEOF_BUFCTL = 4  #: kmem_bufctl_t
SLAB_LIMIT = 0xFFFFFFFF - 3
BATCHREFILL_LIMIT = 16
REAPTIMEOUT_CPUC = 2.0  #: seconds of kernel time (2*HZ)
REAPTIMEOUT_LIST3 = 4.0  #: 4*HZ
SLAB_MAX_ORDER_HI = 1
SLAB_MAX_ORDER_LO = 0
_SLAB_PAGE_GFP_MASK = int(GFP_RECLAIM_MASK | GFP_CONSTRAINT_MASK)


class _Tagged:
    """An array_cache entry with SLAB_OBJ_PFMEMALLOC set (bit 0 of the pointer)."""

    __slots__ = ("obj",)

    def __init__(self, obj: SlabObj) -> None:
        self.obj = obj

    def __repr__(self) -> str:
        return f"<tagged {self.obj!r}>"


class ArrayCache:
    """struct array_cache: ``entry`` is the LIFO stack, ``avail`` its length."""

    __slots__ = ("entry", "limit", "batchcount", "touched")

    def __init__(self, limit: int, batchcount: int) -> None:
        self.entry: list = []
        self.limit = limit
        self.batchcount = batchcount
        self.touched = False

    @property
    def avail(self) -> int:
        return len(self.entry)


class Slab:
    """struct slab: one slab of ``num`` objects on ``2^order`` pages."""

    __slots__ = ("cache", "page", "order", "objs", "free", "inuse", "list", "pfmemalloc")

    def __init__(self, cache: KmemCache, page: Page, pfmemalloc: bool) -> None:
        self.cache = cache
        self.page = page
        self.order = cache.gfporder
        self.objs = [SlabObj(cache, self, i) for i in range(cache.num)]
        self.free = self.objs[::-1]  # pop() hands out index 0 first, as cache_init_objs chains
        self.inuse = 0
        self.list: OrderedDict | None = None
        self.pfmemalloc = pfmemalloc  #: PageSlabPfmemalloc of the slab's page

    def __repr__(self) -> str:
        return f"<slab {self.cache.name} pfn {self.page.pfn} inuse {self.inuse}/{self.cache.num}>"


class KmemList3:
    """struct kmem_list3 (kmem_cache_node in later kernels) for the one node."""

    __slots__ = ("slabs_partial", "slabs_full", "slabs_free", "free_objects", "free_limit",
                 "shared", "free_touched", "next_reap")

    def __init__(self) -> None:
        # OrderedDict as list_head: first key = list head (->next), last = ->prev.
        self.slabs_partial: OrderedDict[Slab, None] = OrderedDict()
        self.slabs_full: OrderedDict[Slab, None] = OrderedDict()
        self.slabs_free: OrderedDict[Slab, None] = OrderedDict()
        self.free_objects = 0
        self.free_limit = 0
        self.shared: ArrayCache | None = None
        self.free_touched = False
        self.next_reap: float | None = None


class KmemCache(KmemCacheBase):
    """struct kmem_cache (SLAB)."""

    def __init__(self, name, object_size, align, flags, ctor) -> None:
        super().__init__(name, object_size, align, flags, ctor)
        self.num = 0
        self.gfporder = 0
        self.off_slab = False
        self.slab_size = 0
        self.limit = 0
        self.batchcount = 0
        self.shared = 0
        self.array: list[ArrayCache] = []
        self.nodelist = KmemList3()


def cache_estimate(gfporder: int, buffer_size: int, align: int, off_slab: bool) -> tuple[int, int]:
    """cache_estimate(): (objects per slab, left-over bytes) for one slab order."""
    slab_size = PAGE_SIZE << gfporder
    if off_slab:
        mgmt_size = 0
        nr_objs = min(slab_size // buffer_size, SLAB_LIMIT)
    else:
        nr_objs = (slab_size - SIZEOF_STRUCT_SLAB) // (buffer_size + SIZEOF_BUFCTL)
        if slab_mgmt_size(nr_objs, align) + nr_objs * buffer_size > slab_size:
            nr_objs -= 1
        nr_objs = min(nr_objs, SLAB_LIMIT)
        mgmt_size = slab_mgmt_size(nr_objs, align)
    return nr_objs, slab_size - nr_objs * buffer_size - mgmt_size


def slab_mgmt_size(nr_objs: int, align: int) -> int:
    return ALIGN(SIZEOF_STRUCT_SLAB + nr_objs * SIZEOF_BUFCTL, align)


def calculate_slab_order(cachep: KmemCache, size: int, align: int, slab_max_order: int) -> int:
    """calculate_slab_order(): smallest order with <= 1/8 waste, capped at slab_max_order."""
    left_over = 0
    for gfporder in range(MAX_ORDER):
        num, remainder = cache_estimate(gfporder, size, align, cachep.off_slab)
        if not num:
            continue
        if cachep.off_slab:
            offslab_limit = (size - SIZEOF_STRUCT_SLAB) // SIZEOF_BUFCTL
            if num > offslab_limit:
                break
        cachep.num = num
        cachep.gfporder = gfporder
        left_over = remainder
        if cachep.flags & SLAB_RECLAIM_ACCOUNT:
            break
        if gfporder >= slab_max_order:
            break
        if left_over * 8 <= (PAGE_SIZE << gfporder):
            break
    return left_over


def cpucache_limit(size: int) -> int:
    """enable_cpucache()'s per-CPU array limit for an object size."""
    if size > 131072:
        return 1
    if size > PAGE_SIZE:
        return 8
    if size > 1024:
        return 24
    if size > 256:
        return 54
    return 120


class SlabAllocatorSLAB(SlabAllocator):
    kind = "slab"
    kmalloc_flags = SLAB_HWCACHE_ALIGN  # ARCH_KMALLOC_FLAGS
    reap_interval = REAPTIMEOUT_CPUC

    def __init__(self, k: Kernel) -> None:
        # kmem_cache_init: slab_max_order = 1 on machines with more than 32 MiB.
        self.slab_max_order = (SLAB_MAX_ORDER_HI if k.pgdat.node_present_pages > (32 << 20) >> 12
                               else SLAB_MAX_ORDER_LO)
        self.pfmemalloc_active = False  #: the global of patch 1
        super().__init__(k)

    # -- __kmem_cache_create ------------------------------------------------------
    def _create(self, name, size, align, flags, ctor) -> KmemCache:
        """__kmem_cache_create(): alignment, on/off-slab, order, then enable_cpucache.
        Simplified: no debug flags, no colouring."""
        object_size = size
        if size & (BYTES_PER_WORD - 1):
            size = ALIGN(size, BYTES_PER_WORD)
        if flags & SLAB_HWCACHE_ALIGN:
            ralign = CACHE_LINE_SIZE
            while size <= ralign // 2:
                ralign //= 2
        else:
            ralign = BYTES_PER_WORD
        if ralign < ARCH_SLAB_MINALIGN:
            ralign = ARCH_SLAB_MINALIGN
        if ralign < align:
            ralign = align
        align = ralign
        cachep = KmemCache(name, object_size, align, flags, ctor)
        if size >= (PAGE_SIZE >> 3):
            cachep.off_slab = True
        size = ALIGN(size, align)
        left_over = calculate_slab_order(cachep, size, align, self.slab_max_order)
        if not cachep.num:
            raise ValueError(f"kmem_cache_create: couldn't create cache {name}")
        slab_size = ALIGN(cachep.num * SIZEOF_BUFCTL + SIZEOF_STRUCT_SLAB, align)
        if cachep.off_slab and left_over >= slab_size:
            cachep.off_slab = False
            left_over -= slab_size
        if cachep.off_slab:
            slab_size = cachep.num * SIZEOF_BUFCTL + SIZEOF_STRUCT_SLAB
        cachep.slab_size = slab_size
        cachep.size = size
        self.enable_cpucache(cachep)
        return cachep

    def enable_cpucache(self, cachep: KmemCache) -> None:
        """enable_cpucache() + do_tune_cpucache() + alloc_kmemlist()."""
        limit = cpucache_limit(cachep.size)
        shared = 8 if cachep.size <= PAGE_SIZE and self.nr_cpus > 1 else 0
        batchcount = (limit + 1) // 2
        cachep.limit, cachep.batchcount, cachep.shared = limit, batchcount, shared
        cachep.array = [ArrayCache(limit, batchcount) for _ in range(self.nr_cpus)]
        l3 = cachep.nodelist
        l3.shared = ArrayCache(shared * batchcount, 0xbaadf00d) if shared else None
        l3.free_limit = (1 + self.nr_cpus) * batchcount + cachep.num

    # -- allocation ---------------------------------------------------------------------
    async def kmem_cache_alloc(self, cachep: KmemCache, gfp: GFP, task: Task):
        """kmem_cache_alloc() -> ____cache_alloc(): the per-CPU array, else
        cache_alloc_refill."""
        cpu = task.cpu.id
        with self.lock:
            ac = cachep.array[cpu]
            if ac.entry:
                ac.touched = True
                if self.pfmemalloc_aware and self.k.memalloc_socks > 0:
                    objp = self.__ac_get_obj(cachep, ac, gfp, task, False)
                else:
                    objp = ac.entry.pop()
                    if objp.__class__ is _Tagged:
                        objp = objp.obj
                if objp is not None:
                    objp.allocated = True
                    cachep.nr_allocated += 1
                    return objp
                force_refill = True
            else:
                force_refill = False
        objp = await self.cache_alloc_refill(cachep, gfp, task, force_refill)
        if objp is not None:
            with self.lock:
                objp.allocated = True
                cachep.nr_allocated += 1
        return objp

    def ac_get_obj(self, cachep: KmemCache, ac: ArrayCache, gfp, task: Task,
                   force_refill: bool):
        """ac_get_obj(): __ac_get_obj only while sk_memalloc_socks()."""
        if self.pfmemalloc_aware and self.k.memalloc_socks > 0:
            return self.__ac_get_obj(cachep, ac, gfp, task, force_refill)
        objp = ac.entry.pop()
        return objp.obj if objp.__class__ is _Tagged else objp

    def __ac_get_obj(self, cachep: KmemCache, ac: ArrayCache, gfp, task: Task,
                     force_refill: bool):
        """__ac_get_obj(): a tagged (pfmemalloc) object only for entitled callers."""
        entry = ac.entry
        objp = entry.pop()
        if objp.__class__ is not _Tagged:
            return objp
        if self.pfmemalloc_allowed(gfp, task):
            return objp.obj
        self.vmstat["slab_pfmemalloc_refused"] += 1
        # The caller cannot use PFMEMALLOC objects: find another one and swap.
        for i, e in enumerate(entry):
            if e.__class__ is not _Tagged:
                entry[i] = objp
                return e
        # Forced to refill and a free slab exists: memory is available again.
        l3 = cachep.nodelist
        if l3.slabs_free and force_refill:
            obj = objp.obj
            slabp = obj.slab
            slabp.pfmemalloc = False
            self.clear_slab_pfmemalloc(slabp.page, slabp.order)
            self.recheck_pfmemalloc_active(cachep)
            return obj
        entry.append(objp)
        return None

    def ac_put_obj(self, cachep: KmemCache, ac: ArrayCache, objp: SlabObj) -> None:
        """ac_put_obj(): tag objects of pfmemalloc slabs while sk_memalloc_socks()."""
        if (self.pfmemalloc_active and objp.slab.pfmemalloc and self.k.memalloc_socks > 0):
            ac.entry.append(_Tagged(objp))
        else:
            ac.entry.append(objp)

    def recheck_pfmemalloc_active(self, cachep: KmemCache) -> None:
        """recheck_pfmemalloc_active(): clear the global if this cache's node lists
        hold no pfmemalloc slab (the kernel looks at this one cache only)."""
        if not self.pfmemalloc_active:
            return
        l3 = cachep.nodelist
        for lst in (l3.slabs_full, l3.slabs_partial, l3.slabs_free):
            for slabp in lst:
                if slabp.pfmemalloc:
                    return
        self.pfmemalloc_active = False

    @staticmethod
    def transfer_objects(to: ArrayCache, frm: ArrayCache, max_: int) -> int:
        """transfer_objects(): move up to ``max_`` entries (tags kept) from the top of
        ``frm`` to ``to``."""
        nr = min(len(frm.entry), max_, to.limit - len(to.entry))
        if nr <= 0:
            return 0
        to.entry.extend(frm.entry[-nr:])
        del frm.entry[-nr:]
        return nr

    async def cache_alloc_refill(self, cachep: KmemCache, gfp, task: Task, force_refill: bool):
        """cache_alloc_refill(): refill the per-CPU array from the shared array or the
        node's slabs, else grow the cache; with ``force_refill`` (every cached object
        was pfmemalloc and refused) go straight to cache_grow and fail if it fails."""
        cpu = task.cpu.id
        skip_to_grow = force_refill
        while True:
            if not skip_to_grow:  # retry:
                with self.lock:
                    ac = cachep.array[cpu]
                    if not ac.entry:
                        self._refill(cachep, ac)
                    if ac.entry:
                        ac.touched = True
                        return self.ac_get_obj(cachep, ac, gfp, task, force_refill)
            skip_to_grow = False
            # force_grow: cache_grow may sleep; the array may change meanwhile.
            x = await self.cache_grow(cachep, gfp, task)
            with self.lock:
                ac = cachep.array[cpu]
                if not x and (not ac.entry or force_refill):
                    return None
                if ac.entry:
                    ac.touched = True
                    return self.ac_get_obj(cachep, ac, gfp, task, force_refill)
            # no objects and the cache grew: goto retry

    def _refill(self, cachep: KmemCache, ac: ArrayCache) -> None:
        """The locked part of cache_alloc_refill (up to must_grow / alloc_done)."""
        batchcount = ac.batchcount
        if not ac.touched and batchcount > BATCHREFILL_LIMIT:
            batchcount = BATCHREFILL_LIMIT
        l3 = cachep.nodelist
        shared = l3.shared
        if shared is not None and self.transfer_objects(ac, shared, batchcount):
            shared.touched = True
            return
        num = cachep.num
        put = self.ac_put_obj
        while batchcount > 0:
            if l3.slabs_partial:
                slabp = next(iter(l3.slabs_partial))
            else:
                l3.free_touched = True
                if not l3.slabs_free:
                    break  # must_grow
                slabp = next(iter(l3.slabs_free))
            free = slabp.free
            while slabp.inuse < num and batchcount > 0:
                batchcount -= 1
                slabp.inuse += 1
                put(cachep, ac, free.pop())  # slab_get_obj
            # move slabp to the correct list (list_add: at the head)
            del slabp.list[slabp]
            lst = l3.slabs_partial if free else l3.slabs_full
            lst[slabp] = None
            lst.move_to_end(slabp, last=False)
            slabp.list = lst
        l3.free_objects -= len(ac.entry)

    async def cache_grow(self, cachep: KmemCache, gfp, task: Task) -> int:
        """cache_grow() + kmem_getpages(): one new slab on slabs_free.
        Simplified: no colouring, no off-slab descriptor allocation."""
        local_flags = gfp & _SLAB_PAGE_GFP_MASK
        page = await self.k.page_alloc.alloc_pages(local_flags, cachep.gfporder, task,
                                                   owner=Owner.SLAB)
        if page is None:
            return 0
        with self.lock:
            nr_pages = 1 << cachep.gfporder
            if page.pfmemalloc:
                self.vmstat["slab_alloc_pfmemalloc"] += nr_pages
            pfmemalloc = self.pfmemalloc_aware and page.pfmemalloc
            if pfmemalloc:
                self.pfmemalloc_active = True
            self.account_slab_pages(cachep, nr_pages)
            slabp = Slab(cachep, page, pfmemalloc)
            self.mark_slab_pages(page, cachep.gfporder, slabp, pfmemalloc)
            l3 = cachep.nodelist
            l3.slabs_free[slabp] = None  # list_add_tail
            slabp.list = l3.slabs_free
            l3.free_objects += cachep.num
        return 1

    # -- freeing ----------------------------------------------------------------------
    def kmem_cache_free(self, cachep: KmemCache, objp: SlabObj, task: Task | None) -> None:
        """kmem_cache_free() -> __cache_free(): into this CPU's array, flushing a batch
        first when it is full. ``task=None`` frees on CPU 0."""
        cpu = task.cpu.id if task is not None else 0
        with self.lock:
            assert objp.allocated, f"double free of {objp!r}"
            assert objp.cache is cachep, f"{objp!r} freed to {cachep.name}"
            objp.allocated = False
            cachep.nr_allocated -= 1
            ac = cachep.array[cpu]
            if len(ac.entry) >= ac.limit:
                self.cache_flusharray(cachep, ac)
            if self.pfmemalloc_active and objp.slab.pfmemalloc and self.k.memalloc_socks > 0:
                ac.entry.append(_Tagged(objp))
            else:
                ac.entry.append(objp)

    def cache_flusharray(self, cachep: KmemCache, ac: ArrayCache) -> None:
        """cache_flusharray(): the oldest batchcount entries to the shared array if it
        has room (tags kept), else back to their slabs."""
        batchcount = ac.batchcount
        l3 = cachep.nodelist
        shared = l3.shared
        if shared is not None:
            max_ = shared.limit - len(shared.entry)
            if max_:
                batchcount = min(batchcount, max_)
                shared.entry.extend(ac.entry[:batchcount])
                del ac.entry[:batchcount]
                return
        self.free_block(cachep, ac.entry[:batchcount])
        del ac.entry[:batchcount]

    def free_block(self, cachep: KmemCache, objpp: list) -> None:
        """free_block(): objects back to their slabs (tags stripped); an empty slab goes
        to slabs_free, or is destroyed at once if the node already holds more than
        free_limit free objects."""
        l3 = cachep.nodelist
        num = cachep.num
        for objp in objpp:
            if objp.__class__ is _Tagged:
                objp = objp.obj
            slabp = objp.slab
            del slabp.list[slabp]
            slabp.free.append(objp)  # slab_put_obj
            slabp.inuse -= 1
            l3.free_objects += 1
            if slabp.inuse == 0:
                if l3.free_objects > l3.free_limit:
                    l3.free_objects -= num
                    slabp.list = None
                    self.slab_destroy(cachep, slabp)
                else:
                    lst = l3.slabs_free
                    lst[slabp] = None
                    lst.move_to_end(slabp, last=False)
                    slabp.list = lst
            else:
                l3.slabs_partial[slabp] = None  # list_add_tail
                slabp.list = l3.slabs_partial

    def slab_destroy(self, cachep: KmemCache, slabp: Slab) -> None:
        """slab_destroy() -> kmem_freepages(): clear PG_slab / PageSlabPfmemalloc and give
        the pages back to the buddy allocator."""
        slabp.list = None
        self.free_slab_pages(cachep, slabp.page, slabp.order)

    # -- reaping and shrinking ---------------------------------------------------------
    def drain_array(self, cachep: KmemCache, ac: ArrayCache | None, force: bool) -> None:
        """drain_array(): an untouched array gives (limit+4)/5 objects back to the slabs."""
        if ac is None or not ac.entry:
            return
        if ac.touched and not force:
            ac.touched = False
            return
        avail = len(ac.entry)
        tofree = avail if force else (ac.limit + 4) // 5
        if tofree > avail:
            tofree = (avail + 1) // 2
        self.free_block(cachep, ac.entry[:tofree])
        del ac.entry[:tofree]

    def drain_freelist(self, cachep: KmemCache, tofree: int) -> int:
        """drain_freelist(): destroy up to ``tofree`` slabs from the tail of slabs_free."""
        l3 = cachep.nodelist
        nr_freed = 0
        while nr_freed < tofree and l3.slabs_free:
            slabp, _ = l3.slabs_free.popitem(last=True)
            l3.free_objects -= cachep.num
            self.slab_destroy(cachep, slabp)
            nr_freed += 1
        return nr_freed

    def cache_reap(self, cpu_id: int, now: float) -> None:
        """cache_reap() for one CPU: drain its untouched arrays; every 4 s per cache,
        drain the shared array and free 1/5 of free_limit's worth of free slabs unless
        the free list was touched. actors/slab_reaper.py calls it every
        ``reap_interval`` (REAPTIMEOUT_CPUC, 2·HZ) for every CPU."""
        list3_timeout = self.k.hz(REAPTIMEOUT_LIST3)
        with self.lock:
            for cachep in self.caches:
                l3 = cachep.nodelist
                self.drain_array(cachep, cachep.array[cpu_id], False)
                if l3.next_reap is None:
                    l3.next_reap = now + list3_timeout
                if l3.next_reap > now:
                    continue
                l3.next_reap = now + list3_timeout
                self.drain_array(cachep, l3.shared, False)
                if l3.free_touched:
                    l3.free_touched = False
                else:
                    num = cachep.num
                    self.drain_freelist(cachep, (l3.free_limit + 5 * num - 1) // (5 * num))

    def kmem_cache_shrink(self, cachep: KmemCache) -> int:
        """__cache_shrink(): drain every CPU array and the shared array, then destroy
        every free slab. Returns the pages given back, those of the slabs free_block
        destroyed during the drains included (3.5 returns only whether slabs are
        still in use)."""
        with self.lock:
            l3 = cachep.nodelist
            nr_slabs = len(l3.slabs_full) + len(l3.slabs_partial) + len(l3.slabs_free)
            for ac in cachep.array:
                self.drain_array(cachep, ac, True)
            self.drain_array(cachep, l3.shared, True)
            self.drain_freelist(cachep, len(l3.slabs_free))
            in_use = len(l3.slabs_full) + len(l3.slabs_partial)
            return (nr_slabs - in_use) << cachep.gfporder

    # -- observability and checks -------------------------------------------------------
    def _slabinfo(self, cachep: KmemCache) -> dict:
        l3 = cachep.nodelist
        num = cachep.num
        active_objs = len(l3.slabs_full) * num + sum(s.inuse for s in l3.slabs_partial)
        active_slabs = len(l3.slabs_full) + len(l3.slabs_partial)
        slabs = active_slabs + len(l3.slabs_free)
        pfm = sum(s.pfmemalloc for lst in (l3.slabs_full, l3.slabs_partial, l3.slabs_free)
                  for s in lst)
        return {
            "name": cachep.name, "active_objs": active_objs, "num_objs": slabs * num,
            "objsize": cachep.size, "objperslab": num, "pagesperslab": 1 << cachep.gfporder,
            "slabs": slabs, "active_slabs": active_slabs, "pfmemalloc_slabs": pfm,
            "cpu_cached": sum(len(ac.entry) for ac in cachep.array),
            "shared_cached": len(l3.shared.entry) if l3.shared is not None else 0,
            "in_use": cachep.nr_allocated, "free_objects": l3.free_objects,
            "limit": cachep.limit, "batchcount": cachep.batchcount,
            "sharedfactor": cachep.shared, "free_limit": l3.free_limit,
        }

    def _check_cache(self, cachep: KmemCache) -> int:
        l3 = cachep.nodelist
        num = cachep.num
        seen: set[int] = set()
        pages = 0
        free_objs = 0
        inuse = 0
        slabs = []
        for lst, what in ((l3.slabs_full, "full"), (l3.slabs_partial, "partial"),
                          (l3.slabs_free, "free")):
            for slabp in lst:
                name = f"{cachep.name}: {slabp!r} on slabs_{what}"
                assert slabp.list is lst, f"{name}: list pointer wrong"
                assert slabp.inuse == num - len(slabp.free), f"{name}: inuse != num - free"
                if what == "full":
                    assert slabp.inuse == num, f"{name}: not full"
                elif what == "partial":
                    assert 0 < slabp.inuse < num, f"{name}: not partial"
                else:
                    assert slabp.inuse == 0, f"{name}: not free"
                self.check_slab_pages(slabp, slabp.page, slabp.order, slabp.pfmemalloc)
                assert not slabp.pfmemalloc or slabp.page.pfmemalloc, (
                    f"{name}: pfmemalloc mark without a reserve page")
                pages += 1 << slabp.order
                free_objs += len(slabp.free)
                inuse += slabp.inuse
                slabs.append(slabp)
                self.check_free_objects(name, slabp, slabp.free, seen)
        assert l3.free_objects == free_objs, (
            f"{cachep.name}: free_objects {l3.free_objects} != {free_objs}")
        cached = 0
        arrays = list(cachep.array) + ([l3.shared] if l3.shared is not None else [])
        for ac in arrays:
            assert len(ac.entry) <= ac.limit, f"{cachep.name}: array over its limit"
            for e in ac.entry:
                o = e.obj if e.__class__ is _Tagged else e
                assert not o.allocated, f"{cachep.name}: allocated {o!r} in an array"
                assert o.slab.list is not None, f"{cachep.name}: {o!r} of a destroyed slab"
                assert id(o) not in seen, f"{cachep.name}: {o!r} cached twice"
                seen.add(id(o))
                cached += 1
        allocated = sum(self.count_allocated(cachep.name, slabp.objs, seen) for slabp in slabs)
        assert allocated == cachep.nr_allocated, (
            f"{cachep.name}: {allocated} allocated objects, counter says {cachep.nr_allocated}")
        assert inuse == allocated + cached, (
            f"{cachep.name}: inuse {inuse} != allocated {allocated} + cached {cached}")
        return pages
