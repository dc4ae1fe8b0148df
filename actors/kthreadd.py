"""kthreadd: the trio side of kthread_run and add_timer (emulator/kthread.py).

Owns a nursery for the kernel threads and timers that kernel code starts at
run time (the NBD driver's nbd_thread on every NBD_DO_IT, its xmit timer).
The machine opens it and installs it as ``k.kthreadd`` before anything runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from emulator.sched import running

if TYPE_CHECKING:
    from emulator.task import Task


class KthreaddNursery:
    """``k.kthreadd``: kernel threads and timers run in this actor's nursery."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery

    def kthread_run(self, task: Task, threadfn: Callable[[Task], Awaitable[None]]) -> None:
        async def kthread() -> None:
            async with running(task):
                await threadfn(task)

        self.nursery.start_soon(kthread)

    def add_timer(self, fn: Callable[[], Awaitable[None]]) -> trio.CancelScope:
        scope = trio.CancelScope()

        async def timer() -> None:
            with scope:
                await fn()

        self.nursery.start_soon(timer)
        return scope
