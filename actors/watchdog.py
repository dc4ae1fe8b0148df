"""The lockup detector.

Models the kernel's hung-task detector (kernel/hung_task.c: khungtaskd reports
tasks in uninterruptible sleep for longer than hung_task_timeout_secs) in the
form this emulator needs: the machine is declared locked up when there has
been no forward progress at all — no page accessed by any process and no I/O
completed — for ``run.lockup_timeout_s``. It then builds the diagnosis
(emulator/diagnosis.py) and ends the run.

It observes the machine from outside (like an NMI watchdog): it needs no CPU
of the emulated machine, so it fires even when every CPU is busy spinning in
reclaim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from emulator.kernel import Kernel


async def watchdog(k: Kernel, timeout: float, on_lockup: Callable[[float], None]) -> None:
    last = k.progress
    since = trio.current_time()
    period = min(1.0, timeout / 8)
    while True:
        await trio.sleep(period)
        now = trio.current_time()
        if k.progress != last:
            last = k.progress
            since = now
        elif now - since >= timeout:
            on_lockup(now - since)
            return
