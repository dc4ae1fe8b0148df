"""Request allocation as in 3.5's block/blk-core.c (emulator/block.py): the queue
holds nr_requests, the task whose allocation fills it and every task woken from
get_request_wait become batchers that may go on allocating (BLK_BATCH_REQ
requests, up to 3/2 of nr_requests, the later ones within BLK_BATCH_TIME), and a
freed request wakes one sleeper, the longest waiting.

A real emulator Kernel with a bare BlockDevice; trio's MockClock (autojump).
"""

from __future__ import annotations

import trio

from emulator.block import (
    BLK_BATCH_REQ,
    BLK_BATCH_TIME,
    BLK_RW_ASYNC,
    BLK_RW_SYNC,
    WRITE,
    Bio,
    BlockDevice,
    IOContext,
)
from emulator.config import from_dict
from emulator.kernel import Kernel


class Queue(BlockDevice):
    """Requests stay allocated until the test ends them."""

    def __init__(self, k: Kernel) -> None:
        super().__init__(k)
        self.held = []

    async def request_fn(self, req, task) -> None:
        self.held.append(req)


async def queue() -> tuple[Kernel, Queue]:
    k = Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 1, "page_cache_mib": 0}}))
    q = Queue(k)
    await q.init_pools(k.new_task("swapper"))
    return k, q


async def submit(q: Queue, task) -> None:
    await q.submit_bio(Bio(None), task)


def end_one(q: Queue, task) -> None:
    req = q.held.pop(0)
    req.bio.end_io = lambda bio, error: None
    q.end_request(req, 0, task)


async def test_the_task_that_fills_the_queue_finishes_a_batch_and_others_wait(autojump_clock):
    k, q = await queue()
    filler, other = k.new_task("filler", cpu=0), k.new_task("other", cpu=0)
    for _ in range(q.nr_requests):
        await submit(q, filler)
    assert q.rl_full[BLK_RW_SYNC]  # the filling allocation marked it full...
    with trio.fail_after(1.0):
        await submit(q, filler)  # ...and made the filler a batcher: it goes on
    assert q.count == q.nr_requests + 1
    with trio.move_on_after(1.0):
        await submit(q, other)  # not a batcher: sleeps
    assert q.count == q.nr_requests + 1 and other.wchan is None


async def test_a_woken_sleeper_is_a_batcher_and_no_batch_goes_past_half_again(autojump_clock):
    k, q = await queue()
    filler, waker = k.new_task("filler", cpu=0), k.new_task("irq", cpu=0)
    sleeper = k.new_task("sleeper", cpu=0)
    for _ in range(q.nr_requests):
        await submit(q, filler)
    await trio.sleep(1.0)  # the filler's batch time runs out
    got = []

    async def burst() -> None:
        for _ in range(BLK_BATCH_REQ + 5):
            await submit(q, sleeper)
            got.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(burst)
        await trio.sleep(0.5)
        assert not got and sleeper.wchan == "get_request_wait"
        end_one(q, waker)  # count 127: wakes the sleeper, clears full
        await trio.sleep(k.hz(BLK_BATCH_TIME) / 2)
        # Woken, it took the freed request and a whole batch more at once.
        assert len(got) == BLK_BATCH_REQ and q.count == q.nr_requests - 1 + BLK_BATCH_REQ
        assert sleeper.wchan == "get_request_wait"  # the batch is spent
        n.cancel_scope.cancel()


async def test_batching_stops_at_three_halves_of_nr_requests(autojump_clock):
    k, q = await queue()
    filler = k.new_task("filler", cpu=0)
    for _ in range(q.nr_requests):
        await submit(q, filler)
    counts = []
    for i in range(3):  # three tasks with a fresh batch each, as if just woken
        t = k.new_task(f"woken{i}", cpu=0)
        t.io_context = IOContext()
        q.ioc_set_batching(t.io_context)
        with trio.move_on_after(0.001):
            while True:
                await submit(q, t)
        counts.append(q.count)
    assert q.ioc_batching(t.io_context)  # the third is still a batcher, but:
    assert counts == [q.nr_requests + BLK_BATCH_REQ, 3 * q.nr_requests // 2,
                      3 * q.nr_requests // 2]


async def test_a_freed_request_wakes_one_sleeper_the_longest_waiting(autojump_clock):
    k, q = await queue()
    filler, waker = k.new_task("filler", cpu=0), k.new_task("irq", cpu=0)
    for _ in range(q.nr_requests):
        await submit(q, filler)
    await trio.sleep(1.0)
    sleepers = [k.new_task(f"s{i}", cpu=0) for i in range(3)]
    done = []

    async def one(t) -> None:
        await submit(q, t)
        done.append(t.comm)
        t.cpu.release(t)  # woken, it took the CPU back; it is done with it

    async with trio.open_nursery() as n:
        for t in sleepers:
            n.start_soon(one, t)
            await trio.sleep(0.1)  # s0 waits longest
        assert [t.wchan for t in sleepers] == ["get_request_wait"] * 3
        end_one(q, waker)
        await trio.sleep(0.1)
        assert done == ["s0"]  # one woken, not all three
        end_one(q, waker)
        await trio.sleep(0.1)
        assert done == ["s0", "s1"]
        n.cancel_scope.cancel()


async def test_reads_and_writes_have_their_own_request_lists(autojump_clock):
    """3.5's request_list counts sync (reads) and async (swap-out writes) apart: a
    queue full of writes does not hold back a swap-in read, and only async
    congestion is the bdi congestion that reclaim's congestion_wait sees."""
    k, q = await queue()
    vm = k.bdi
    writer, reader, waker, reclaimer = (k.new_task(c, cpu=0)
                                        for c in ("kswapd0", "faulter", "irq", "usemem"))

    async def write(task) -> None:
        bio = Bio(None)
        bio.rw = WRITE
        await q.submit_bio(bio, task)

    for _ in range(q.nr_requests):
        await write(writer)
    assert q.rl_count == [q.nr_requests, 0] and q.rl_full == [True, False]
    assert q.congested and vm.bdi_congested == [True, False]
    with trio.fail_after(1.0):
        for _ in range(q.congestion_on):
            await submit(q, reader)  # reads: their own nr_requests
    assert q.rl_count[BLK_RW_SYNC] == q.congestion_on and vm.bdi_congested == [True, True]
    with trio.move_on_after(1.0):
        await write(reader)  # but a write waits on the async list
    assert reader.wchan is None and q.rl_count[BLK_RW_ASYNC] == q.nr_requests
    # Freeing reads, even far below the off threshold, wakes no congestion waiter.
    async with trio.open_nursery() as n:
        n.start_soon(vm.congestion_wait, reclaimer, 10.0)
        await trio.sleep(0.1)
        assert reclaimer.wchan == "congestion_wait"
        for _ in range(q.congestion_on):
            req = next(r for r in q.held if r.bio.rw != WRITE)
            q.held.remove(req)
            req.bio.end_io = lambda bio, error: None
            q.end_request(req, 0, waker)
        await trio.sleep(0.1)
        assert reclaimer.wchan == "congestion_wait"  # still asleep
        n.cancel_scope.cancel()
    assert q.rl_count == [q.nr_requests, 0] and q.congested
    assert vm.bdi_congested == [True, False]
