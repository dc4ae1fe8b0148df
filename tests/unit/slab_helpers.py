"""A small kernel for slab/mempool unit tests (no vmscan, swap or OOM killer).

``make_kernel(kind, patches, ...)`` builds just what the slab allocators and the
page allocator touch: the lock, vmstat, one node, CPUs, the memalloc_socks count,
stubbed reclaim (never makes progress) and OOM (never kills). SLUB merges caches
as the kernel does by default; ``slub_nomerge=True`` boots it with the
``slub_nomerge`` parameter.
"""

from __future__ import annotations

import threading

from emulator.flags import ALLOC_CPUSET, ALLOC_NO_WATERMARKS, GFP, PF
from emulator.mm.backing_dev import BackingDev
from emulator.mm.mmzone import PgData
from emulator.mm.page import Owner
from emulator.mm.page_alloc import PageAllocator
from emulator.mm.slab_common import create_slab_allocator
from emulator.mm.vmstat import VMStat
from emulator.patches import PATCHES, PatchSet
from emulator.sched import CPU
from emulator.task import Task, current

ALL = frozenset(PATCHES)


class _VMScanStub:
    def wake_all_kswapd(self, order: int) -> None:
        pass


    async def try_to_free_pages(self, gfp, order, task) -> int:
        return 0



class _OOMStub:
    async def alloc_pages_may_oom(self, gfp, order, task, owner):
        return None


class TestKernel:
    """Just enough of emulator.kernel.Kernel for the slab and page allocators."""

    __test__ = False

    def __init__(self, kind: str = "slub", patches=ALL, *, cpus: int = 2,
                 memory_mib: int = 64, min_free_kbytes: int | None = None,
                 slub_nomerge: bool = False) -> None:
        self.patches = patches if isinstance(patches, PatchSet) else PatchSet.of(patches)
        self.hz_scale = 1.0
        self.lock = threading.RLock()
        self.vmstat = VMStat()
        self.pgdat = PgData(memory_mib << 8, min_free_kbytes, cpus)
        self.vmstat["nr_free_pages"] = self.pgdat.nr_free_pages()
        self.cpus = [CPU(i) for i in range(cpus)]
        self.memalloc_socks = 0
        self.vmscan = _VMScanStub()
        self.bdi = BackingDev()
        self.oom = _OOMStub()
        self.page_alloc = PageAllocator(self)
        self.slab = create_slab_allocator(self, kind, slub_nomerge=slub_nomerge)
        self._pid = 0

    def hz(self, seconds: float) -> float:
        return seconds * self.hz_scale

    def sk_memalloc_socks(self) -> bool:
        return self.memalloc_socks > 0

    @property
    def nr_pages(self) -> int:
        return self.pgdat.node_present_pages

    def new_task(self, comm: str = "t", flags: PF = PF(0), *, cpu: int = 0,
                 in_softirq: bool = False) -> Task:
        self._pid += 1
        return Task(self._pid, comm, self.cpus[cpu], flags, in_softirq=in_softirq)


def make_kernel(kind: str = "slub", patches=ALL, **kw) -> TestKernel:
    return TestKernel(kind, patches, **kw)



def objects_by_slab(objs: list) -> dict:
    """slab -> its objects among ``objs``, slabs and objects in allocation order."""
    groups: dict = {}
    for obj in objs:
        groups.setdefault(obj.slab, []).append(obj)
    return groups

async def hold_below_min(k: TestKernel, task: Task) -> list:
    """Allocate order-0 pages (owner KERNEL) with GFP_ATOMIC-like masks until the free
    count is below the min watermark (ALLOC_HIGH|ALLOC_HARDER stop at 3/8 min, then
    __GFP_MEMALLOC-free attempts fail). Returns the pages held."""
    held = []
    zone = k.pgdat.zone
    # Normal allocations stop at the min watermark (atomic ones at 3/8 of it).
    while True:
        page = k.page_alloc.get_page_from_freelist(GFP(0), 0, 0x10 | 0x20, Owner.KERNEL)
        if page is None:
            break
        held.append(page)
    # Then go right down to a handful of pages with no watermark at all.
    while zone.nr_free_pages > 64:
        page = k.page_alloc.get_page_from_freelist(GFP(0), 0, ALLOC_NO_WATERMARKS, Owner.KERNEL)
        held.append(page)
    return held


def release(k: TestKernel, pages: list) -> None:
    for p in pages:
        k.page_alloc.free_pages(p, 0)


def take_every_page(k: TestKernel) -> list:
    """Every page the buddy lists hold, taken with no watermark (owner KERNEL)."""
    held = []
    while (page := k.page_alloc.get_page_from_freelist(GFP(0), 0, ALLOC_NO_WATERMARKS,
                                                       Owner.KERNEL)) is not None:
        held.append(page)
    return held


def free_on_cpu(k: TestKernel, page, cpu: int) -> None:
    """free_page() as a task running on ``cpu``: onto that CPU's per-cpu list (the
    list of the page's pageblock's migrate type)."""
    token = current.set(k.new_task("freer", cpu=cpu))
    try:
        k.page_alloc.free_page(page)
    finally:
        current.reset(token)


def at_min(k: TestKernel) -> list:
    """Take pages until the zone is at exactly its min watermark (order 0 needs
    free > min): returns the pages taken."""
    zone, pa = k.pgdat.zone, k.page_alloc
    held = []
    while zone.nr_free_pages > zone.min_wmark_pages:
        held.append(pa.get_page_from_freelist(GFP(0), 0, ALLOC_CPUSET, Owner.KERNEL))
    return held
