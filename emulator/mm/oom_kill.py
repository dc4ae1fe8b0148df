"""The OOM killer.

Models mm/oom_kill.c (3.6): __alloc_pages_may_oom's last high-watermark
attempt, the zonelist OOM lock (a second OOM attempt while one is in progress
sleeps a jiffy and retries), select_bad_process (abort while a previous
victim with TIF_MEMDIE has not exited; otherwise the task with the largest
oom_badness = rss + swap entries), and oom_kill_process (SIGKILL and
TIF_MEMDIE, so the victim may use the reserves to exit).

The victim dies at its next killable point (actors/process.py checks
``fatal_signal`` between page accesses and killable sleeps end on it); a victim
stuck in an uninterruptible sleep (lock_page on a swap read that never
completes) cannot exit, and the OOM killer keeps waiting for it — one of the
ways a machine swapping over a stalled network stays locked up.

Simplified: no oom_score_adj, no per-cpuset or memcg OOM, kernel threads are
never victims, the "Out of memory" report is the ``oom_kill`` log event.

Differs from 3.5: a victim's slow-path allocation fails ("killed") right after
__alloc_pages_may_oom, where 3.5 restarts and lets TIF_MEMDIE take a page from
the reserves; a task chosen while it loops gets the reserves at its next
retry, where 3.5 fails it (goto nopage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from emulator.flags import ALLOC_CPUSET, ALLOC_WMARK_HIGH, GFP
from emulator.mm.page import Owner, Page
from emulator.task import Task

if TYPE_CHECKING:
    from emulator.kernel import Kernel

log = structlog.get_logger("swapnbd.oom")


class OOMKiller:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.zonelist_oom_locked = False
        self.kills = 0

    async def alloc_pages_may_oom(self, gfp: GFP, order: int, task: Task,
                                  owner: Owner) -> Page | None:
        """__alloc_pages_may_oom(): under the zonelist OOM lock, one last attempt at
        the high watermark, then out_of_memory; another task holding the lock
        means a short sleep and a retry."""
        k = self.k
        if self.zonelist_oom_locked:  # try_set_zonelist_oom failed
            await task.sleep(k.hz(0.001), wchan="oom_lock")
            return None
        self.zonelist_oom_locked = True
        try:
            page = k.page_alloc.get_page_from_freelist(gfp, order,
                                                       ALLOC_WMARK_HIGH | ALLOC_CPUSET, owner,
                                                       task.cpu.id)
            if page is not None:
                return page
            if not gfp & GFP.NOFAIL and order > 3:
                return None
            self.out_of_memory(task, order, gfp)
        finally:
            self.zonelist_oom_locked = False
        return None

    def select_bad_process(self) -> Task | None:
        """select_bad_process(): the process with the largest rss + swap entries;
        none while a previous victim (TIF_MEMDIE) is still exiting."""
        victim, points = None, 0
        for t in self.k.tasks.values():
            if t.exited or t.mm is None:
                continue
            if t.memdie:
                return None  # a previous victim is still exiting: wait for it
            badness = t.mm.rss + t.mm.swapents
            if badness > points:
                victim, points = t, badness
        return victim

    def out_of_memory(self, task: Task, order: int, gfp: GFP) -> None:
        # A task that is itself exiting gets the reserves instead of a kill.
        """out_of_memory(): an exiting caller gets TIF_MEMDIE itself; otherwise the
        selected victim is sent SIGKILL and given TIF_MEMDIE (oom_kill_process)."""
        if task.fatal_signal and task.mm is not None:
            task.memdie = True
            return
        victim = self.select_bad_process()
        if victim is None:
            return
        self.kills += 1
        self.k.vmstat["oom_kill"] += 1
        victim.memdie = True
        victim.fatal_signal = True
        victim.signal = "SIGKILL"
        self.k.wake_killed(victim)
        log.warning("oom_kill", victim=victim.pid, comm=victim.comm, rss=victim.mm.rss,
                    swapents=victim.mm.swapents, trigger_pid=task.pid, trigger=task.comm,
                    order=order, free=self.k.pgdat.nr_free_pages())
