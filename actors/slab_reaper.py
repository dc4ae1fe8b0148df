"""SLAB's reaper: the per-CPU delayed work that runs cache_reap.

Models the delayed work mm/slab.c schedules on every CPU (start_cpu_timer ->
cache_reap every REAPTIMEOUT_CPUC = 2·HZ): this loop runs cache_reap
(emulator/mm/slab.py) for every CPU at that interval. SLUB has no such work;
the loop returns at once for it.

Simplified: one timer for all CPUs instead of one per CPU, no per-CPU
staggering, and the reaping does not take the CPUs (it runs outside any
emulated task, as a timer's work does between task slices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from emulator.kernel import Kernel


async def slab_reaper(k: Kernel) -> None:
    slab = k.slab
    if slab.reap_interval is None:
        return
    while True:
        await trio.sleep(k.hz(slab.reap_interval))
        now = trio.current_time()
        for cpu in range(len(k.cpus)):
            slab.cache_reap(cpu, now)
