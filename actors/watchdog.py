"""The lockup detector.

Models the kernel's hung-task detector (kernel/hung_task.c: khungtaskd
reports tasks in uninterruptible sleep for longer than
hung_task_timeout_secs, 120 s) in the form this emulator needs. Forward
progress is a page accessed by a process or an I/O completed. The machine is
declared locked up when

- nothing progressed for ``run.lockup_timeout_s`` and the wait-for graph is
  a closed cycle (emulator/diagnosis.py ``nbd_wait_cycle``: memory waits for
  NBD replies and the replies wait for memory), or
- nothing progressed for the hung-task time, 120 s scaled by ``time.hz_scale``,
  whatever the graph says (a frozen server, a retransmission backoff that
  never gets through).

A retransmission backoff alone is not a lockup before the hung-task time: the
peer's retransmission timeout grows to TCP_RTO_MAX = 120 s, and its next
retransmission may get through.

It observes the machine from outside (like an NMI watchdog): it needs no CPU
of the emulated machine, so it fires even when every CPU is busy spinning in
reclaim.

Progress (k.progress) is a page accessed or an I/O completed without an error:
a failed swap write is no progress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from emulator.kernel import Kernel

#: sysctl_hung_task_timeout_secs (CONFIG_DEFAULT_HUNG_TASK_TIMEOUT), in kernel seconds.
HUNG_TASK_TIMEOUT_S = 120.0


async def watchdog(k: Kernel, timeout: float, cycle: Callable[[], list[str] | None],
                   on_lockup: Callable[[float], None]) -> None:
    """Watch ``k.progress``; call ``on_lockup(stalled_s)`` once, by the rules above."""
    hung_task = k.hz(HUNG_TASK_TIMEOUT_S)
    last = k.progress
    since = trio.current_time()
    period = min(1.0, timeout / 8)
    while True:
        await trio.sleep(period)
        now = trio.current_time()
        if k.progress != last:
            last = k.progress
            since = now
            continue
        stalled = now - since
        if stalled >= timeout and (stalled >= hung_task or cycle() is not None):
            on_lockup(stalled)
            return
