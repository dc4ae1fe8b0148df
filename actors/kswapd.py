"""kswapd: the per-node reclaim thread.

Models mm/vmscan.c's kswapd() thread: a kernel thread with PF_MEMALLOC |
PF_SWAPWRITE | PF_KSWAPD | PF_KTHREAD that sleeps on pgdat->kswapd_wait and
balances the node to its high watermark when woken. The algorithm itself
(kswapd_try_to_sleep, balance_pgdat, the pfmemalloc_wait wake-ups of patch 15)
lives in emulator/mm/vmscan.py beside direct reclaim, as in the kernel; this
actor only creates the task and runs it on its CPU.

Simplified: one node, so one kswapd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.cpu import running
from emulator.flags import PF

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.task import Task

KSWAPD_FLAGS = PF.MEMALLOC | PF.SWAPWRITE | PF.KSWAPD | PF.KTHREAD


def create_kswapd(k: Kernel) -> Task:
    task = k.new_task("kswapd0", KSWAPD_FLAGS)
    k.vmscan.kswapd_task = task
    return task


async def kswapd(k: Kernel, task: Task) -> None:
    async with running(task):
        await k.vmscan.kswapd(task)
