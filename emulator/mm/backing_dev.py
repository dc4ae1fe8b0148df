"""Backing-device congestion: the bdi's congested bits and congestion_wait.

Models mm/backing-dev.c and include/linux/backing-dev.h (3.5): the swap
device's backing_dev_info state bits BDI_async_congested / BDI_sync_congested
(set_bdi_congested / clear_bdi_congested, which the block layer calls from
blk_set_queue_congested / blk_clear_queue_congested), the global wait queues
congestion_wqh[BLK_RW_ASYNC / BLK_RW_SYNC], congestion_wait and
wait_iff_congested.

Simplified: one backing device (the swap device), so its bits are global.

Thresholds as blk-core.c's for 128 requests: congested at 113, cleared below
103; __freed_request clears the bit, and so wakes congestion_wait's sleepers,
for every request freed below the off threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.wait import WaitQueue

if TYPE_CHECKING:
    from emulator.task import Task

BLK_RW_ASYNC, BLK_RW_SYNC = 0, 1  #: include/linux/backing-dev.h: the two directions


class BackingDev:
    """The bdi's congestion bits and mm/backing-dev.c's congestion wait queues."""

    def __init__(self) -> None:
        #: BDI_async_congested, BDI_sync_congested, indexed BLK_RW_ASYNC / BLK_RW_SYNC
        self.bdi_congested = [False, False]
        self.congestion_wqh = (WaitQueue("congestion_wait[async]"),
                               WaitQueue("congestion_wait[sync]"))

    def set_bdi_congested(self, sync: int) -> None:
        """set_bdi_congested(bdi, sync): mark one direction congested; wakes nobody."""
        self.bdi_congested[sync] = True

    def clear_bdi_congested(self, sync: int) -> None:
        """clear_bdi_congested(bdi, sync): clear the direction's bit and wake every
        congestion_wait sleeper on that direction, each time it is called, not only
        when the state changes: 3.5's __freed_request calls it for every request
        freed while the queue is below its off threshold."""
        self.bdi_congested[sync] = False
        self.congestion_wqh[sync].wake_up()

    async def congestion_wait(self, task: Task, timeout: float) -> None:
        """congestion_wait(BLK_RW_ASYNC, timeout): prepare_to_wait, then
        io_schedule_timeout: one sleep that ends at the next async
        clear_bdi_congested wake-up or when the timeout passes, whichever comes
        first. Every caller in reclaim waits on the async direction."""
        await task.sleep_on(self.congestion_wqh[BLK_RW_ASYNC], None, timeout=timeout,
                            wchan="congestion_wait", iowait=True)

    async def wait_iff_congested(self, task: Task, timeout: float) -> None:
        """wait_iff_congested(): sleep only if a bdi is congested and the zone is
        flagged congested. Swap pages never set ZONE_CONGESTED (reference 8.4), so
        this is a cond_resched() in practice."""
        await task.cond_resched()
