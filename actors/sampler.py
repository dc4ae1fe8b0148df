"""The vmstat sampler: periodic snapshots into the log.

Models reading /proc/vmstat (and /proc/stat's per-CPU times, /proc/slabinfo)
every ``run.sample_interval_ms``, as MMTests' monitors do during a benchmark.
The snapshot is taken synchronously, so it is consistent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import structlog
import trio

if TYPE_CHECKING:
    from emulator.kernel import Kernel

log = structlog.get_logger("swapnbd.sampler")


async def sampler(k: Kernel, interval: float, extra: Callable[[], dict]) -> None:
    while True:
        log_vmstat(k, extra)
        await trio.sleep(interval)


def log_vmstat(k: Kernel, extra: Callable[[], dict]) -> None:
    log.info("vmstat", vm=k.vmstat.snapshot(), cpus=[attrs.asdict(c.stat()) for c in k.cpus],
             nr_throttled=len(k.vmscan.throttled), **extra())
    slabinfo = getattr(k.slab, "slabinfo", None)
    if slabinfo is not None:
        log.info("slabinfo", caches=[c for c in slabinfo() if c.get("num_objs")])
