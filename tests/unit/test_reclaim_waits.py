"""congestion_wait's early wake-up, putback of pages orphaned while isolated, and
the cond_resched() around direct reclaim, on a real emulator Kernel (no network,
no actors).

- mm/backing-dev.c: congestion_wait() is one prepare_to_wait + io_schedule_timeout;
  clear_bdi_congested() wakes the sleepers, and 3.5's __freed_request calls it for
  every request freed below the queue's off threshold.
- mm/vmscan.c putback_inactive_pages(): a page whose last reference was the
  isolating reclaimer's (its process exited meanwhile) is freed, not put back.
- mm/page_alloc.c __alloc_pages_direct_reclaim(): cond_resched() before the
  reclaim and again between it and the allocation attempt.

Timeouts run on trio's MockClock (``autojump_clock``).
"""

from __future__ import annotations

import pytest
import trio

from emulator.config import from_dict
from emulator.flags import GFP_KERNEL, GFP_NOIO, PF
from emulator.kernel import Kernel
from emulator.mm.backing_dev import BLK_RW_ASYNC
from emulator.mm.memory import MMStruct, do_anonymous_page, exit_mmap
from emulator.mm.mmzone import LRU_INACTIVE_ANON
from emulator.mm.page import PG, Owner
from emulator.mm.vmscan import ScanControl
from emulator.task import Task

FREE = (Owner.FREE, Owner.PCP)


def small_kernel() -> Kernel:
    return Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 1, "page_cache_mib": 0}}))


# -- congestion_wait ----------------------------------------------------------------------
async def _sleep_length(timeout: float, congested_after: float, congested: bool) -> float:
    """How long congestion_wait(timeout) sleeps when the async direction is set
    congested (or cleared) ``congested_after`` seconds into the sleep."""
    k = small_kernel()
    task = k.new_task("reclaimer", cpu=0)
    ended: list[float] = []
    t0 = trio.current_time()

    async def sleeper() -> None:
        await k.bdi.congestion_wait(task, timeout)
        ended.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(sleeper)
        await trio.sleep(congested_after)
        assert not ended and task.wchan == "congestion_wait"
        if congested:
            k.bdi.set_bdi_congested(BLK_RW_ASYNC)
        else:
            k.bdi.clear_bdi_congested(BLK_RW_ASYNC)
    assert task.wchan is None
    return ended[0] - t0


async def test_congestion_wait_ends_at_the_next_clear_bdi_congested(autojump_clock):
    # A request freed below the off threshold clears congestion: the sleep ends.
    assert await _sleep_length(10.0, 1.0, congested=False) == pytest.approx(1.0)


async def test_congestion_wait_without_a_clear_sleeps_the_whole_timeout(autojump_clock):
    # Becoming congested wakes nobody.
    assert await _sleep_length(0.1, 0.05, congested=True) == pytest.approx(0.1)


async def test_a_clear_before_the_sleep_does_not_end_it(autojump_clock):
    """The wake-up is an event, not a state: one that came before the sleeper
    went to sleep does not count (as with prepare_to_wait)."""
    k = small_kernel()
    task = k.new_task("reclaimer", cpu=0)
    k.bdi.clear_bdi_congested(BLK_RW_ASYNC)
    t0 = trio.current_time()
    await k.bdi.congestion_wait(task, 0.1)
    assert trio.current_time() - t0 == pytest.approx(0.1)


# -- putback of orphaned pages ----------------------------------------------------------
async def _isolate_and_reclaim(exit_while_isolated: bool):
    """Four unreferenced anon pages on the inactive list; a GFP_NOIO reclaimer (it
    may not add them to swap, so it keeps them all) isolates them; optionally the
    owning process exits while they are isolated."""
    k = small_kernel()
    owner = k.new_task("usemem", cpu=0)
    mm = MMStruct(owner, 4)
    pages = [await do_anonymous_page(k, mm, vpn, owner) for vpn in range(4)]
    zone = k.pgdat.zone
    for page in pages:  # deactivate_page(): straight to the inactive list, unreferenced
        k.vmscan.del_page_from_lru(page)
        page.young = False
        page.flags &= ~PG.active
        k.vmscan.add_page_to_lru(page, LRU_INACTIVE_ANON)
    exited: list[int] = []

    class Reclaimer(Task):
        async def cond_resched(self) -> None:
            # shrink_page_list's first call comes after the whole batch is isolated.
            if exit_while_isolated and not exited:
                exited.append(exit_mmap(k, mm, owner))
            await super().cond_resched()

    reclaimer = Reclaimer(100, "nbd0", k.cpus[0], PF.MEMALLOC | PF.KTHREAD)
    free_before = zone.nr_free_pages + zone.nr_pcp_pages
    sc = ScanControl(GFP_NOIO, 32, 0, kswapd=False)
    sc.priority = 0
    reclaimed = await k.vmscan.shrink_inactive_list(4, zone, sc, reclaimer, LRU_INACTIVE_ANON)
    free_after = zone.nr_free_pages + zone.nr_pcp_pages
    return k, pages, exited, reclaimed, free_after - free_before


async def test_a_page_orphaned_while_isolated_is_freed_at_putback():
    k, pages, exited, reclaimed, freed = await _isolate_and_reclaim(exit_while_isolated=True)
    assert exited == [0]  # exit_mmap freed nothing itself: every page was isolated
    assert reclaimed == 0  # GFP_NOIO: none of them could be swapped out
    assert freed == 4 and all(page.owner in FREE for page in pages)
    assert len(k.pgdat.zone.lru[LRU_INACTIVE_ANON]) == 0
    assert k.vmstat["nr_isolated_anon"] == 0


async def test_pages_still_mapped_go_back_to_the_lru():
    k, pages, exited, reclaimed, freed = await _isolate_and_reclaim(exit_while_isolated=False)
    assert not exited and reclaimed == 0 and freed == 0
    assert all(page.owner == Owner.ANON and page.flags & PG.lru for page in pages)
    assert len(k.pgdat.zone.lru[LRU_INACTIVE_ANON]) == 4


# -- cond_resched around direct reclaim -------------------------------------------------
async def test_direct_reclaim_reschedules_before_and_after_reclaiming():
    k = small_kernel()
    order_of_events: list[str] = []

    class Allocator(Task):
        async def cond_resched(self) -> None:
            order_of_events.append("cond_resched")
            await super().cond_resched()

    async def fake_try_to_free_pages(gfp, order, task):
        order_of_events.append("reclaim")
        return 1

    k.vmscan.try_to_free_pages = fake_try_to_free_pages
    task = Allocator(100, "usemem", k.cpus[0], PF(0))
    page, progress = await k.page_alloc._alloc_pages_direct_reclaim(
        GFP_KERNEL, 0, task, 0, Owner.ANON)
    assert progress == 1 and page is not None
    assert order_of_events == ["cond_resched", "reclaim", "cond_resched"]
