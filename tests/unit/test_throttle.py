"""Patch 15/16 (reference §8.5): pfmemalloc_watermark_ok and
throttle_direct_reclaim on a real emulator Kernel (no network, no actors).

Timeouts run on trio's MockClock (``autojump_clock``): pure timing logic, as
DESIGN §3 allows; the assertions are about which waits end and why, never
about how long the host took.
"""

from __future__ import annotations

import pytest
import trio
from page_holder import Holder

from emulator.config import from_dict
from emulator.flags import ALLOC_NO_WATERMARKS, GFP, GFP_KERNEL, GFP_NOFS, GFP_NOIO, PF
from emulator.kernel import Kernel
from emulator.mm.page import PG, Owner

ALL = list(range(1, 17))
HZ_SCALE = 0.01


def make_kernel(patches=ALL) -> Kernel:
    return Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 2},
                             "kernel": {"patches": sorted(patches)},
                             "time": {"hz_scale": HZ_SCALE}}))


def threshold(k: Kernel) -> int:
    return k.pgdat.reserve_pages() // 2


def at_threshold(comm: str) -> tuple[Kernel, Holder, object]:
    """A kernel whose free pages sit at the throttle threshold (the Holder keeps
    the rest), and a task ``comm`` on CPU 0."""
    k = make_kernel()
    h = Holder(k)
    h.set_free(threshold(k))
    return k, h, k.new_task(comm, cpu=0)


# -- pfmemalloc_watermark_ok ------------------------------------------------------------------
def test_reserve_is_the_sum_of_min_watermarks():
    k = make_kernel()
    assert k.pgdat.reserve_pages() == k.pgdat.zone.min_wmark_pages == 128  # 16 MiB: 512 KiB


def test_pfmemalloc_watermark_ok_boundary():
    k = make_kernel()
    h = Holder(k)
    h.set_free(threshold(k))
    assert k.vmscan.pfmemalloc_watermark_ok() is False  # free == reserve/2: not ok
    h.set_free(threshold(k) + 1)
    assert k.vmscan.pfmemalloc_watermark_ok() is True
    h.set_free(threshold(k) - 1)
    assert k.vmscan.pfmemalloc_watermark_ok() is False


async def test_pfmemalloc_watermark_ok_wakes_a_sleeping_kswapd():
    k = make_kernel()
    h = Holder(k)
    woke = trio.Event()

    async def fake_kswapd():
        k.vmscan.kswapd_woken = False
        await k.pgdat.kswapd_wait.wait_event(lambda: k.vmscan.kswapd_woken)
        woke.set()

    async with trio.open_nursery() as n:
        n.start_soon(fake_kswapd)
        await trio.testing.wait_all_tasks_blocked()
        h.set_free(threshold(k) + 1)
        assert k.vmscan.pfmemalloc_watermark_ok()
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()  # ok: kswapd is left alone
        h.set_free(threshold(k))
        assert not k.vmscan.pfmemalloc_watermark_ok()
        with trio.fail_after(5):
            await woke.wait()


# -- throttle_direct_reclaim ------------------------------------------------------------------
async def _throttle(k, gfp, task, done: list):
    await k.vmscan.throttle_direct_reclaim(gfp, task)
    done.append(trio.current_time())


async def test_normal_task_is_throttled_until_kswapd_wakes_it(autojump_clock):
    k = make_kernel()
    h = Holder(k)
    h.set_free(threshold(k))
    t = k.new_task("usemem", cpu=0)
    done = []
    async with trio.open_nursery() as n:
        n.start_soon(_throttle, k, GFP_KERNEL, t, done)
        await trio.sleep(100 * HZ_SCALE)  # far beyond any timeout: __GFP_FS waits forever
        assert not done
        assert t.pid in k.vmscan.throttled and t.wchan == "throttle_direct_reclaim"
        assert k.vmstat["pgscan_direct_throttle"] == 1
        # Memory comes back, but only kswapd wakes pfmemalloc_wait.
        h.set_free(threshold(k) + 1)
        await trio.sleep(100 * HZ_SCALE)
        assert not done
        # prepare_kswapd_sleep wakes the waiters and refuses to sleep this time.
        assert k.vmscan.prepare_kswapd_sleep(0, 0) is False
        await trio.sleep(0.001)
        assert done
    assert t.pid not in k.vmscan.throttled and t.wchan is None
    assert k.vmscan.throttle_events == 1
    assert k.vmstat["pgscan_direct_throttle"] == 1


async def test_without_patch_16_the_counter_stays_zero(autojump_clock):
    k = make_kernel([p for p in ALL if p != 16])
    h = Holder(k)
    h.set_free(threshold(k))
    t = k.new_task("usemem", cpu=0)
    done = []
    async with trio.open_nursery() as n:
        n.start_soon(_throttle, k, GFP_KERNEL, t, done)
        await trio.sleep(1)
        assert not done and t.pid in k.vmscan.throttled  # still throttled (patch 15)
        h.set_free(threshold(k) + 1)
        k.vmscan.prepare_kswapd_sleep(0, 0)
    assert done
    assert k.vmstat["pgscan_direct_throttle"] == 0


@pytest.mark.parametrize("why", ["no patch 15", "kthread", "watermark ok"])
async def test_cases_that_are_never_throttled(autojump_clock, why):
    k = make_kernel([p for p in ALL if p != 15] if why == "no patch 15" else ALL)
    h = Holder(k)
    h.set_free(threshold(k) + 1 if why == "watermark ok" else 0)
    t = k.new_task("nbd0" if why == "kthread" else "usemem",
                   PF.KTHREAD if why == "kthread" else PF(0), cpu=0)
    start = trio.current_time()
    with trio.fail_after(10):  # virtual seconds: a wrong wait fails instead of hanging
        await k.vmscan.throttle_direct_reclaim(GFP_KERNEL, t)
    assert trio.current_time() == start
    assert k.vmstat["pgscan_direct_throttle"] == 0 and k.vmscan.throttle_events == 0


@pytest.mark.parametrize("gfp", [GFP_NOIO, GFP_NOFS])
async def test_non_fs_caller_returns_after_one_second(autojump_clock, gfp):
    """!__GFP_FS: wait_event_interruptible_timeout(..., HZ): back after k.hz(1.0)
    even though the watermark is still low."""
    k, _holder, t = at_threshold("nofs")
    start = trio.current_time()
    with trio.fail_after(10):
        await k.vmscan.throttle_direct_reclaim(gfp, t)
    assert trio.current_time() - start == pytest.approx(k.hz(1.0))
    assert k.vmstat["pgscan_direct_throttle"] == 1
    assert t.pid not in k.vmscan.throttled


async def test_non_fs_caller_woken_early_by_kswapd(autojump_clock):
    k = make_kernel()
    h = Holder(k)
    h.set_free(threshold(k))
    t = k.new_task("nofs", cpu=0)
    done = []
    start = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(_throttle, k, GFP_NOIO, t, done)
        await trio.sleep(k.hz(0.5))
        assert not done
        h.set_free(threshold(k) + 1)
        k.vmscan.prepare_kswapd_sleep(0, 0)
    # Released at the wake-up (virtual time k.hz(0.5)), not at the k.hz(1.0) timeout.
    assert done[0] - start == pytest.approx(k.hz(0.5))


async def test_every_throttle_is_counted_and_timed(autojump_clock):
    """Patch 16's pgscan_direct_throttle and the totals a run reports (machine.py's
    throttle events and total_s; the throttle_active gauge the sampler reads)
    count every throttle: two !__GFP_FS throttles in a row, each ending at its
    HZ timeout. Kills throttle_direct_reclaim 5 (the counter set to 1 instead of
    incremented), 13 (the events likewise), 16-18 and 71-73 (the gauge not kept
    at the begin or the end), 65 (waited = now + since), 69 and 70 (the total
    set or decremented)."""
    k = make_kernel()
    h = Holder(k)
    h.set_free(threshold(k))
    t = k.new_task("nofs", cpu=0)
    gauge = []

    async def twice():
        for _ in range(2):
            await k.vmscan.throttle_direct_reclaim(GFP_NOIO, t)

    async with trio.open_nursery() as n:
        n.start_soon(twice)
        for _ in range(2):
            await trio.sleep(k.hz(0.5))  # half-way through each throttle
            gauge.append(k.vmstat["throttle_active"])
            await trio.sleep(k.hz(0.5))
    assert gauge == [1, 1] and k.vmstat["throttle_active"] == 0
    assert k.vmstat["pgscan_direct_throttle"] == 2 and k.vmscan.throttle_events == 2
    assert k.vmscan.throttle_total_s == pytest.approx(2 * k.hz(1.0))


@pytest.mark.parametrize("gfp", [GFP_KERNEL, GFP_NOIO])
async def test_a_wake_up_while_memory_is_still_low_does_not_end_the_throttle(autojump_clock, gfp):
    """wait_event re-checks its condition: prepare_kswapd_sleep wakes pfmemalloc_wait
    whenever anyone waits on it, but a waiter whose watermark is still not ok goes
    back to sleep (until the wake-up that finds it ok, or, without __GFP_FS, the
    HZ timeout)."""
    k = make_kernel()
    h = Holder(k)
    h.set_free(threshold(k))
    t = k.new_task("usemem", cpu=0)
    done = []
    start = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(_throttle, k, gfp, t, done)
        await trio.sleep(k.hz(0.25))
        assert k.vmscan.prepare_kswapd_sleep(0, 0) is False  # wakes the queue
        await trio.sleep(k.hz(0.25))
        assert not done and t.wchan == "throttle_direct_reclaim"
        if gfp & GFP.FS:
            h.set_free(threshold(k) + 1)
            k.vmscan.prepare_kswapd_sleep(0, 0)
    assert done[0] - start == pytest.approx(k.hz(0.5) if gfp & GFP.FS else k.hz(1.0))


async def test_fatal_signal_ends_the_killable_wait(autojump_clock):
    k = make_kernel()
    h = Holder(k)
    h.set_free(threshold(k))
    t = k.new_task("victim", cpu=0)
    done = []
    async with trio.open_nursery() as n:
        n.start_soon(_throttle, k, GFP_KERNEL, t, done)
        await trio.sleep(1)
        assert not done
        t.fatal_signal = True
        k.wake_killed(t)
    assert done and t.pid not in k.vmscan.throttled


@pytest.mark.parametrize("patches, reclaims", [(ALL, False), ([], True)])
async def test_a_killed_task_skips_reclaim_only_with_patch_15(autojump_clock, patches, reclaims):
    """3.6's try_to_free_pages returns 1 at once for a task with a fatal signal
    (patch 15 added the check); 3.5 lets it reclaim like any other task."""
    k = make_kernel(patches)
    h = Holder(k)
    h.set_free(threshold(k) + 1)  # not throttled either way
    t = k.new_task("usemem", cpu=0)
    t.fatal_signal = True
    assert await k.vmscan.try_to_free_pages(GFP_KERNEL, 0, t) >= 1
    assert (k.vmstat["allocstall"] == 1) is reclaims


async def test_try_to_free_pages_throttles_with_the_callers_gfp(autojump_clock):
    """try_to_free_pages calls throttle_direct_reclaim first, with the caller's gfp:
    a GFP_NOIO reclaimer below the threshold waits out its HZ timeout, then
    reclaims. Kills try_to_free_pages 1 (the gfp not passed on)."""
    k, _holder, t = at_threshold("nofs")
    start = trio.current_time()
    with trio.fail_after(10):
        await k.vmscan.try_to_free_pages(GFP_NOIO, 0, t)
    assert trio.current_time() - start >= k.hz(1.0)
    assert k.vmstat["pgscan_direct_throttle"] == 1 and k.vmstat["allocstall"] == 1


@pytest.mark.parametrize("all_unreclaimable, expected", [(False, 1), (True, 0)])
async def test_nothing_reclaimed_is_progress_unless_all_unreclaimable(autojump_clock,
                                                                      all_unreclaimable, expected):
    """do_try_to_free_pages with nothing on the LRU: 1 ("progress", so the allocator
    retries rather than considering OOM) while the zone is not all_unreclaimable,
    0 once it is. Kills try_to_free_pages 96 (`return 0` -> `return 1`)."""
    k = make_kernel()
    Holder(k).set_free(threshold(k) + 1)  # not throttled
    k.pgdat.zone.all_unreclaimable = all_unreclaimable
    t = k.new_task("usemem", cpu=0)
    assert await k.vmscan.try_to_free_pages(GFP_KERNEL, 0, t) == expected


# -- kswapd's wake-up inside balance_pgdat ----------------------------------------------------
class PageCacheFiller:
    """Memory taken as fast as kswapd frees it: every page above ``target`` free
    goes straight into the page cache (clean, on the inactive file list), as a
    reader streaming a large file would use it. kswapd always finds pages to
    reclaim and the zone never reaches its high watermark."""

    def __init__(self, k: Kernel, target: int) -> None:
        self.k = k
        self.target = target

    def fill(self) -> None:
        k = self.k
        zone = k.pgdat.zone
        with k.lock:
            while zone.nr_free_pages > self.target:
                page = k.page_alloc.get_page_from_freelist(GFP(0), 0, ALLOC_NO_WATERMARKS,
                                                           Owner.FILE)
                if page.pfmemalloc:  # a test device, not a pfmemalloc user
                    page.pfmemalloc = False
                    k.vmstat["nr_pfmemalloc_pages"] -= 1
                page.flags |= PG.uptodate
                k.vmscan.lru_cache_add_file(page)
                k.nr_page_cache += 1
                k.vmstat["nr_file_pages"] += 1


async def test_kswapd_wakes_throttled_reclaimers_while_still_balancing(autojump_clock):
    """Targets: removing kswapd's wake-up of pfmemalloc_wait inside balance_pgdat
    (patch 15: "wake throttled direct reclaimers" once pfmemalloc_watermark_ok
    holds, in the priority loop).

    The zone never gets balanced (a page-cache reader takes every page above
    the throttle threshold + 32, far below the high watermark), so kswapd never
    leaves balance_pgdat and never calls prepare_kswapd_sleep, the other place
    that wakes pfmemalloc_wait. The throttled task (GFP_KERNEL: no timeout)
    can then only be released by the wake-up in the balancing loop."""
    from actors.kswapd import create_kswapd, kswapd

    k = make_kernel()
    vmscan = k.vmscan
    zone = k.pgdat.zone
    sleep_checks = []
    prepare = vmscan.prepare_kswapd_sleep

    def spy(order, remaining):
        sleep_checks.append(trio.current_time())
        return prepare(order, remaining)

    vmscan.prepare_kswapd_sleep = spy
    # Below the threshold with room to spare: kswapd's frees between two
    # refills must not lift free above it before the task is throttled.
    reader = PageCacheFiller(k, threshold(k) - 32)
    reader.fill()
    kswapd_task = create_kswapd(k)
    t = k.new_task("usemem", cpu=1)
    done = []

    async def read_until(predicate, rounds: int) -> None:
        """Keep the reader going until ``predicate()``, or until kswapd has gone
        round balance_pgdat's loop ``rounds`` more times."""
        start = k.vmstat["pageoutrun"]
        while not predicate() and k.vmstat["pageoutrun"] - start < rounds:
            reader.fill()
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as n:
        n.start_soon(kswapd, k, kswapd_task)  # free is low: it starts balancing at once
        await read_until(lambda: False, 5)
        n.start_soon(_throttle, k, GFP_KERNEL, t, done)
        await read_until(lambda: t.pid in vmscan.throttled, 5)
        assert t.pid in vmscan.throttled and t.wchan == "throttle_direct_reclaim"
        checks_before = len(sleep_checks)
        # Memory comes back, above the throttle threshold, still far below high.
        reader.target = threshold(k) + 32
        assert reader.target < zone.high_wmark_pages
        await read_until(lambda: done, 50)
        released = bool(done)
        n.cancel_scope.cancel()
    assert released, "the throttled task was never woken while kswapd balanced"
    # kswapd never got as far as prepare_kswapd_sleep: the wake-up came from the loop.
    assert len(sleep_checks) == checks_before
    assert k.vmscan.throttle_events == 1
