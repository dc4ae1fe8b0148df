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
from emulator.flags import GFP_KERNEL, GFP_NOFS, GFP_NOIO, PF
from emulator.kernel import Kernel

ALL = list(range(1, 17))
HZ_SCALE = 0.01


def make_kernel(patches=ALL) -> Kernel:
    return Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 2},
                             "kernel": {"patches": sorted(patches)},
                             "time": {"hz_scale": HZ_SCALE}}))


def threshold(k: Kernel) -> int:
    return k.pgdat.reserve_pages() // 2


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
    k = make_kernel()
    h = Holder(k)
    h.set_free(threshold(k))
    t = k.new_task("nofs", cpu=0)
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
