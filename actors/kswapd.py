"""kswapd: the per-node reclaim thread.

Models mm/vmscan.c's kswapd() thread: a kernel thread with PF_MEMALLOC |
PF_SWAPWRITE | PF_KSWAPD | PF_KTHREAD that sleeps on pgdat->kswapd_wait and
balances the node to its high watermark when woken: the thread's loop is
here; what it calls (kswapd_try_to_sleep, balance_pgdat, the pfmemalloc_wait
wake-ups of patch 15) lives in emulator/mm/vmscan.py beside direct reclaim,
as in the kernel.

Simplified: one node, so one kswapd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.flags import PF
from emulator.sched import running

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.task import Task

KSWAPD_FLAGS = PF.MEMALLOC | PF.SWAPWRITE | PF.KSWAPD | PF.KTHREAD


def create_kswapd(k: Kernel) -> Task:
    return k.new_task("kswapd0", KSWAPD_FLAGS)


async def kswapd(k: Kernel, task: Task) -> None:
    """kswapd(): sleep until woken, then balance_pgdat, forever, on its CPU."""
    vmscan, pgdat = k.vmscan, k.pgdat
    async with running(task):
        order = 0
        while True:
            await vmscan.kswapd_try_to_sleep(task, order)
            order, pgdat.kswapd_max_order = pgdat.kswapd_max_order, 0
            await vmscan.balance_pgdat(task, order)
