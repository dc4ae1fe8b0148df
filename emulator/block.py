"""The block layer: bios, requests, the request queue and its congestion.

Models: struct bio and bio_alloc from the fs_bio_set mempool (fs/bio.c,
BIO_POOL_SIZE = 2 reserved), struct request allocated from the queue's
request mempool (block/blk-core.c get_request / get_request_wait, BLKDEV_MIN_RQ
= 4 reserved, nr_requests = 128), the queue's congestion thresholds
(blk_queue_congestion_threshold: on at nr_requests - nr_requests/8 + 1 = 113,
off below nr_requests - nr_requests/8 - nr_requests/16 - 1 = 103) which set
and clear the bdi's congested state that congestion_wait sleeps on (as in
3.5's __freed_request, every request freed below the off threshold clears it
again and so wakes the sleepers), and
request completion (blk_end_request_all -> bio_endio).

Two request lists' worth of accounting, as in 3.5's struct request_list:
count, the full mark, the wait queue and the bdi's congestion bit (kept by
vmscan, as mm/backing-dev.c keeps it) are kept apart for sync
requests (BLK_RW_SYNC: reads, and writes with REQ_SYNC) and async ones
(BLK_RW_ASYNC: reclaim's swap writes, which pageout issues with
WB_SYNC_NONE). Each direction has its own nr_requests, so a swap-in read is
not held back by a queue full of swap-out writes. Reclaim's congestion_wait
sleeps on the async direction only, so a sync request freed wakes nobody
there.

Request batching (3.5's get_request / get_request_wait / __freed_request,
block/blk.h): the allocation that fills the queue (count + 1 >= nr_requests)
marks it full and makes its task a *batcher*; once full, only batchers may
allocate, up to 3/2 of nr_requests. A task that slept in get_request_wait
(an exclusive wait: each request freed below nr_requests wakes one sleeper,
first come first served, and clears the full mark) becomes a batcher when it
wakes. A batcher may allocate BLK_BATCH_REQ = 32 requests, the later ones only
within BLK_BATCH_TIME = HZ/50 of becoming one (ioc_batching). The batching
state lives in the task's io_context. So a reclaimer woken mid-batch can write
out the rest of its isolated pages instead of sleeping again on the next one.

A block driver subclasses BlockDevice and implements ``request_fn``.

Simplified: one bio per request (swap I/O is one page), no merging, no
plugging, no elevator (so elv_may_queue never exempts a task), no
``rl->starved`` hand-over (the request mempool never fails here: its
allocations wait).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

from emulator.flags import GFP
from emulator.mm.backing_dev import BLK_RW_ASYNC, BLK_RW_SYNC
from emulator.mm.mempool import Mempool, mempool_alloc, mempool_free
from emulator.task import Task
from emulator.wait import WaitQueue

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.mm.page import Page

READ, WRITE = 0, 1
BIO_POOL_SIZE = 2
BLKDEV_MIN_RQ = 4
BLKDEV_MAX_RQ = 128
BLK_BATCH_REQ = 32  #: requests a batching task may allocate (block/blk.h)
BLK_BATCH_TIME = 1 / 50  #: HZ/50: how long, in seconds of HZ, a batcher stays one


class IOContext:
    """struct io_context's batching state."""

    __slots__ = ("nr_batch_requests", "last_waited")

    def __init__(self) -> None:
        self.nr_batch_requests = 0
        self.last_waited = -math.inf


def create_io_context(task: Task) -> IOContext:
    """create_io_context(): the task's io_context, made on first need."""
    if task.io_context is None:
        task.io_context = IOContext()
    return task.io_context


def rw_is_sync(rw: int) -> int:
    """rw_is_sync(): reads are sync; writes only with REQ_SYNC, which swap-out
    from reclaim (WB_SYNC_NONE) never sets, so every write here is async."""
    return BLK_RW_SYNC if rw == READ else BLK_RW_ASYNC


class Bio:
    __slots__ = ("rw", "offset", "length", "data", "page", "end_io", "elem", "submitted")

    def __init__(self, elem) -> None:
        self.elem = elem  # the slab object backing this bio
        self.rw = READ
        self.offset = 0
        self.length = 0
        self.data: bytes = b""
        self.page: Page | None = None
        self.end_io = None
        self.submitted = 0.0

    def prepare_write(self, offset: int, data: bytes, page, end_io) -> None:
        self.rw, self.offset, self.length, self.data = WRITE, offset, len(data), data
        self.page, self.end_io = page, end_io

    def prepare_read(self, offset: int, length: int, page, end_io) -> None:
        self.rw, self.offset, self.length, self.data = READ, offset, length, b""
        self.page, self.end_io = page, end_io


class Request:
    __slots__ = ("bio", "elem", "cookie", "started", "error")

    def __init__(self, bio: Bio, elem) -> None:
        self.bio = bio
        self.elem = elem
        self.cookie = 0
        self.started = 0.0
        self.error = 0


class BlockDevice:
    """A request-based block device with the kernel's request accounting."""

    name = "blk"

    def __init__(self, k: Kernel) -> None:
        self.k = k
        slab = k.slab
        self.bio_pool = Mempool.create_slab_pool(k, slab.bio_cache, BIO_POOL_SIZE, name="fs_bio_set")
        self.rq_pool = Mempool.create_slab_pool(k, slab.request_cache, BLKDEV_MIN_RQ,
                                                name="request_pool")
        self.nr_requests = BLKDEV_MAX_RQ
        self.congestion_on = self.nr_requests - self.nr_requests // 8 + 1
        self.congestion_off = self.nr_requests - self.nr_requests // 8 - self.nr_requests // 16 - 1
        # struct request_list, indexed BLK_RW_ASYNC / BLK_RW_SYNC:
        self.rl_count = [0, 0]  #: requests allocated (queued or in flight)
        self.rl_full = [False, False]  #: blk_queue_full: only batchers may allocate
        self.rl_wait = (WaitQueue("request_list.wait[async]"),
                        WaitQueue("request_list.wait[sync]"))  #: exclusive waiters

    @property
    def count(self) -> int:
        """Requests allocated in both directions."""
        return self.rl_count[0] + self.rl_count[1]

    @property
    def congested(self) -> bool:
        """bdi_write_congested(): the async direction's congestion, the one reclaim sees."""
        return self.k.bdi.bdi_congested[BLK_RW_ASYNC]

    async def init_pools(self, task: Task) -> None:
        await self.bio_pool.fill(task)
        await self.rq_pool.fill(task)

    async def bio_alloc(self, gfp: GFP, task: Task) -> Bio | None:
        """bio_alloc(): a bio from fs_bio_set's mempool."""
        elem = await mempool_alloc(self.bio_pool, gfp, task)
        return None if elem is None else Bio(elem)

    def bio_put(self, bio: Bio, task: Task) -> None:
        """bio_put(): the bio back to its mempool."""
        mempool_free(self.bio_pool, bio.elem, task)

    # -- request allocation (get_request, get_request_wait) ------------------------------
    def ioc_batching(self, ioc: IOContext | None) -> bool:
        """ioc_batching(): a whole batch left, or some left within BLK_BATCH_TIME."""
        if ioc is None:
            return False
        return (ioc.nr_batch_requests == BLK_BATCH_REQ
                or (ioc.nr_batch_requests > 0
                    and trio.current_time() < ioc.last_waited + self.k.hz(BLK_BATCH_TIME)))

    def ioc_set_batching(self, ioc: IOContext) -> None:
        """ioc_set_batching(): a fresh batch, unless the task is batching already."""
        if self.ioc_batching(ioc):
            return
        ioc.nr_batch_requests = BLK_BATCH_REQ
        ioc.last_waited = trio.current_time()

    async def get_request(self, bio: Bio, task: Task) -> Request | None:
        """get_request(): a request, or None if the bio's direction is full to this task."""
        ioc = task.io_context
        is_sync = rw_is_sync(bio.rw)
        count = self.rl_count[is_sync]
        if count + 1 >= self.congestion_on:
            if count + 1 >= self.nr_requests:
                ioc = create_io_context(task)
                if not self.rl_full[is_sync]:
                    # The queue fills with this allocation: its task may finish a batch.
                    self.ioc_set_batching(ioc)
                    self.rl_full[is_sync] = True
                elif not self.ioc_batching(ioc):
                    return None
            self.k.bdi.set_bdi_congested(is_sync)  # blk_set_queue_congested
        if count >= 3 * self.nr_requests // 2:
            return None  # not even a batcher goes 50 % over nr_requests
        self.rl_count[is_sync] += 1
        elem = await mempool_alloc(self.rq_pool, GFP.WAIT, task)  # GFP_NOIO: never fails
        if self.ioc_batching(ioc):
            ioc.nr_batch_requests -= 1
        return Request(bio, elem)

    async def get_request_wait(self, bio: Bio, task: Task) -> Request:
        """get_request_wait(): sleep (exclusively) until a request is freed, then
        retry as a batcher."""
        req = await self.get_request(bio, task)
        while req is None:
            await task.sleep_on(self.rl_wait[rw_is_sync(bio.rw)], None,
                                wchan="get_request_wait", iowait=True)
            self.ioc_set_batching(create_io_context(task))
            req = await self.get_request(bio, task)
        return req

    async def submit_bio(self, bio: Bio, task: Task) -> None:
        """submit_bio(): a request (get_request_wait), then the driver's request_fn."""
        bio.submitted = trio.current_time()
        req = await self.get_request_wait(bio, task)
        await self.request_fn(req, task)

    async def request_fn(self, req: Request, task: Task) -> None:  # pragma: no cover
        """The driver's request_fn (q->request_fn)."""
        raise NotImplementedError

    def end_request(self, req: Request, error: int, task: Task) -> None:
        """__blk_end_request_all: complete the bio, free the request, maybe uncongest."""
        bio = req.bio
        is_sync = rw_is_sync(bio.rw)
        bio.end_io(bio, error)
        self.bio_put(bio, task)
        mempool_free(self.rq_pool, req.elem, task)
        self.rl_count[is_sync] -= 1
        count = self.rl_count[is_sync]
        if count < self.congestion_off:  # __freed_request
            # blk_clear_queue_congested on every request freed below the off
            # threshold: it wakes the direction's congestion_wait sleepers even
            # when the queue was not marked congested.
            self.k.bdi.clear_bdi_congested(is_sync)
        if count + 1 <= self.nr_requests:
            self.rl_wait[is_sync].wake_up(nr_exclusive=1)
            self.rl_full[is_sync] = False  # blk_clear_queue_full
