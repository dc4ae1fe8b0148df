"""shrink_page_list frees its batch at the end (free_hot_cold_page_list), on a real
emulator Kernel (no network, no actors).

In mm/vmscan.c a reclaimed page goes onto the local ``free_pages`` list and the
whole list is freed after the loop. A reclaimer that sleeps on a later page of
its batch (in get_request_wait, for a swap write) therefore holds the pages it
already reclaimed until it wakes: they are neither on the LRU nor free.
"""

from __future__ import annotations

import trio
import trio.testing

from emulator.config import from_dict
from emulator.flags import GFP_NOIO, PF
from emulator.kernel import Kernel
from emulator.mm.mmzone import LRU_INACTIVE_FILE
from emulator.mm.page import Owner
from emulator.mm.vmscan import ScanControl
from emulator.task import Task

FREE = (Owner.FREE, Owner.PCP)


def small_kernel() -> Kernel:
    return Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 1, "page_cache_mib": 0}}))


async def isolate_page_cache(k: Kernel, task: Task, n: int = 4) -> list:
    """n clean page-cache pages, taken off the LRU as shrink_inactive_list would."""
    await k.populate_page_cache(task, n)
    batch = list(k.pgdat.zone.lru[LRU_INACTIVE_FILE])[:n]
    for page in batch:
        k.vmscan.del_page_from_lru(page)
    return batch


async def test_reclaimed_pages_are_freed_only_after_the_batch():
    k = small_kernel()
    seen: list[list[bool]] = []
    unfreed: list[int] = []
    batch = []

    class Reclaimer(Task):
        async def cond_resched(self) -> None:
            # Called once per page, before the page is looked at.
            seen.append([page.owner in FREE for page in batch])
            unfreed.append(k.vmscan.nr_reclaimed_unfreed)
            await super().cond_resched()

    task = Reclaimer(100, "reclaimer", k.cpus[0], PF.MEMALLOC)
    batch += await isolate_page_cache(k, task)
    zone = k.pgdat.zone
    seen.clear()
    unfreed.clear()
    sc = ScanControl(GFP_NOIO, 32, 0, kswapd=False)
    nr_reclaimed, nr_writeback, survivors = await k.vmscan.shrink_page_list(batch, zone, sc, task)

    assert (nr_reclaimed, nr_writeback, survivors) == (4, 0, [])
    assert seen == [[False] * 4] * 4  # nothing went back while the batch was walked
    assert all(page.owner in FREE for page in batch)  # all of it at the end
    # The diagnosis counts the reclaimed pages a batch still holds.
    assert unfreed == [0, 1, 2, 3] and k.vmscan.nr_reclaimed_unfreed == 0
    assert k.nr_page_cache == 0


async def test_a_reclaimer_cancelled_mid_batch_still_frees_what_it_reclaimed():
    """Machine teardown cancels tasks wherever they are: no frame may be lost."""
    k = small_kernel()
    batch = []

    class Reclaimer(Task):
        async def cond_resched(self) -> None:
            if k.vmscan.nr_reclaimed_unfreed == 2:  # two reclaimed, two to go
                await trio.sleep_forever()
            await super().cond_resched()

    task = Reclaimer(100, "reclaimer", k.cpus[0], PF.MEMALLOC)
    batch += await isolate_page_cache(k, task)
    zone = k.pgdat.zone
    sc = ScanControl(GFP_NOIO, 32, 0, kswapd=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(k.vmscan.shrink_page_list, batch, zone, sc, task)
        await trio.testing.wait_all_tasks_blocked()
        assert k.vmscan.nr_reclaimed_unfreed == 2
        nursery.cancel_scope.cancel()
    assert [page.owner in FREE for page in batch] == [True, True, False, False]
    assert k.vmscan.nr_reclaimed_unfreed == 0
