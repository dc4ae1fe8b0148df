"""Mempools: preallocated elements that guarantee forward progress for block I/O.

Models mm/mempool.c (3.6): mempool_create (min_nr elements preallocated with
GFP_KERNEL), mempool_alloc (``__GFP_NOMEMALLOC|__GFP_NORETRY|__GFP_NOWARN``
added; first try the backing allocator without __GFP_WAIT and __GFP_IO, then a
pooled element, then — pool empty — once more with the full mask, then, if
the caller may sleep, io_schedule_timeout(5·HZ) on the pool's wait queue and
start over), mempool_free (refill the pool below min_nr and wake the waiters,
else give the element back to the backing allocator), mempool_alloc_slab /
mempool_free_slab.

A mempool never touches the PFMEMALLOC reserves (__GFP_NOMEMALLOC). Its
guarantee is only that elements come back: for a local disk they do when the
I/O completes; for NBD only if the reply can be received (see
reference §9.3).

Simplified: no mempool_resize / mempool_destroy; the 5·HZ sleep ends early on
any mempool_free that adds an element (as wake_up does), not on spurious
wake-ups; ``vmstat['mempool_wait']`` counts the sleeps (emulator counter).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from emulator.flags import GFP, GFP_KERNEL
from emulator.wait import WaitQueue

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.task import Task

_MEMPOOL_ADD = int(GFP.NOMEMALLOC | GFP.NORETRY | GFP.NOWARN)
_WAIT_IO = int(GFP.WAIT | GFP.IO)
_WAIT = int(GFP.WAIT)
MEMPOOL_TIMEOUT_S = 5.0  #: io_schedule_timeout(5*HZ)

AllocFn = Callable[[GFP, "Task"], Awaitable[Any]]
FreeFn = Callable[[Any, "Task"], None]



@attrs.frozen
class MempoolStatistics:
    """A mempool's state and its counts since creation."""

    name: str
    min_nr: int  #: elements the pool keeps in reserve
    curr_nr: int  #: elements in the pool now
    outstanding: int  #: elements handed out and not yet freed
    waiters: int  #: tasks asleep in mempool_alloc
    alloc: int  #: mempool_alloc calls that returned an element
    alloc_backing: int  #: ... from the backing allocator
    alloc_pool: int  #: ... from the reserve
    alloc_fail: int  #: calls that returned NULL (no __GFP_WAIT)
    waits: int  #: sleeps in mempool_alloc
    free_to_pool: int  #: frees that refilled the reserve
    free_backing: int  #: frees to the backing allocator

class Mempool:
    """mempool_t: ``min_nr`` reserved elements over a backing allocator."""

    def __init__(self, k: Kernel, name: str, min_nr: int, alloc: AllocFn, free: FreeFn) -> None:
        if min_nr < 0:
            raise ValueError(f"mempool {name}: min_nr must be >= 0, got {min_nr}")
        self.k = k
        self.name = name
        self.min_nr = min_nr
        self.alloc = alloc
        self.free = free
        self.elements: list = []  #: the reserve (remove_element pops the last added)
        self.wait = WaitQueue(f"mempool:{name}")
        self.nr_adds = 0  # elements put back by mempool_free (the wake_up events)
        # statistics
        self.nr_alloc = 0
        self.nr_alloc_backing = 0
        self.nr_alloc_pool = 0
        self.nr_alloc_fail = 0
        self.nr_waits = 0
        self.nr_free_to_pool = 0
        self.nr_free_backing = 0
        self.outstanding = 0  #: elements handed out and not yet freed

    @property
    def curr_nr(self) -> int:
        return len(self.elements)

    @classmethod
    def create_slab_pool(cls, k: Kernel, cache, min_nr: int, *, name: str | None = None) -> Mempool:
        """mempool_create_slab_pool(): a pool over kmem_cache_alloc / kmem_cache_free.
        Not yet filled: ``await pool.fill(task)`` (or use ``create``)."""
        slab = k.slab

        async def alloc(gfp: GFP, task: Task):
            return await slab.kmem_cache_alloc(cache, gfp, task)

        def free(elem, task: Task) -> None:
            slab.kmem_cache_free(cache, elem, task)

        return cls(k, name or cache.name, min_nr, alloc, free)

    @classmethod
    async def create(cls, k: Kernel, name: str, min_nr: int, alloc: AllocFn, free: FreeFn,
                     task: Task) -> Mempool:
        """mempool_create(): a pool with its min_nr elements already allocated."""
        pool = cls(k, name, min_nr, alloc, free)
        await pool.fill(task)
        return pool

    async def fill(self, task: Task, gfp: GFP = GFP_KERNEL) -> None:
        """Preallocate up to min_nr elements (mempool_create's loop). Raises MemoryError
        if the backing allocator fails, as mempool_create returns NULL."""
        while len(self.elements) < self.min_nr:
            elem = await self.alloc(gfp, task)
            if elem is None:
                raise MemoryError(f"mempool {self.name}: cannot preallocate {self.min_nr}")
            with self.k.lock:
                self.elements.append(elem)

    def statistics(self) -> MempoolStatistics:
        return MempoolStatistics(
            name=self.name, min_nr=self.min_nr, curr_nr=len(self.elements),
            outstanding=self.outstanding, waiters=len(self.wait), alloc=self.nr_alloc,
            alloc_backing=self.nr_alloc_backing, alloc_pool=self.nr_alloc_pool,
            alloc_fail=self.nr_alloc_fail, waits=self.nr_waits,
            free_to_pool=self.nr_free_to_pool, free_backing=self.nr_free_backing)

    def __repr__(self) -> str:
        return f"<mempool {self.name} {len(self.elements)}/{self.min_nr}>"


async def mempool_alloc(pool: Mempool, gfp: GFP, task: Task):
    """mempool_alloc() (3.6): backing allocator without WAIT/IO, the reserve, the
    backing allocator with the full mask, then sleep up to 5·HZ for a free and retry.
    Returns None only for callers without __GFP_WAIT."""
    k = pool.k
    gfp_mask = int(gfp) | _MEMPOOL_ADD
    gfp_temp = gfp_mask & ~_WAIT_IO
    while True:  # repeat_alloc:
        element = await pool.alloc(gfp_temp, task)
        if element is not None:
            with k.lock:
                pool.nr_alloc += 1
                pool.nr_alloc_backing += 1
                pool.outstanding += 1
            return element
        with k.lock:
            if pool.elements:
                element = pool.elements.pop()
                pool.nr_alloc += 1
                pool.nr_alloc_pool += 1
                pool.outstanding += 1
                return element
        if gfp_temp != gfp_mask:
            # The first round used a mask without __GFP_WAIT/__GFP_IO and the pool is
            # empty: retry at once with the caller's full mask.
            gfp_temp = gfp_mask
            continue
        if not gfp_mask & _WAIT:
            with k.lock:
                pool.nr_alloc_fail += 1
            return None
        # Wait for someone to return an element to the pool.
        with k.lock:
            pool.nr_waits += 1
            k.vmstat["mempool_wait"] += 1
            gen = pool.nr_adds
        await task.sleep_on(pool.wait, lambda gen=gen: pool.nr_adds != gen,
                            timeout=k.hz(MEMPOOL_TIMEOUT_S), wchan="mempool_alloc", iowait=True)


def mempool_free(pool: Mempool, element, task: Task | None) -> None:
    """mempool_free(): refill the reserve below min_nr (waking waiters), else free to
    the backing allocator."""
    if element is None:
        return
    k = pool.k
    with k.lock:
        pool.outstanding -= 1
        if len(pool.elements) < pool.min_nr:
            pool.elements.append(element)
            pool.nr_adds += 1
            pool.nr_free_to_pool += 1
            pool.wait.wake_up()
            return
        pool.nr_free_backing += 1
    pool.free(element, task)
