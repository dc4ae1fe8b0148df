"""Wait queues: the kernel's ``wait_event`` family over trio's ParkingLot.

Models: include/linux/wait.h (wait_event, wait_event_timeout,
wait_event_killable, wake_up, waitqueue_active; prepare_to_wait followed by one
schedule_timeout, as congestion_wait sleeps, when there is no condition) and the hashed page wait
tables of mm/filemap.c (page_waitqueue / wait_on_page_bit / wake_up_page).

A sleeping task gives its CPU back for the whole sleep (see emulator/sched.py);
that is done by the caller (``Task.sleep_on``), not here. ``wake_up`` wakes
every waiter, and each re-checks its condition; ``wake_up(nr_exclusive=1)``
wakes the one that has waited longest, for queues whose sleepers all wait
exclusively (prepare_to_wait_exclusive: get_request_wait's request list).

Simplified: a queue is exclusive by how it is woken, not per waiter (no queue
mixes the two kinds here); no wait-queue entry callbacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio


class WaitQueue:
    """A ``wait_queue_head_t``."""

    __slots__ = ("name", "_lot")

    def __init__(self, name: str) -> None:
        self.name = name
        self._lot = trio.lowlevel.ParkingLot()

    def active(self) -> bool:
        """waitqueue_active(): is anyone waiting?"""
        return len(self._lot) > 0

    def __len__(self) -> int:
        return len(self._lot)

    def wake_up(self, nr_exclusive: int = 0) -> None:
        """wake_up(): every waiter; with ``nr_exclusive``, that many, longest
        waiting first, as __wake_up wakes exclusive waiters (the queue's
        waiters must then all be exclusive ones, as get_request_wait's are)."""
        if self._lot:
            if nr_exclusive:
                self._lot.unpark(count=nr_exclusive)
            else:
                self._lot.unpark_all()

    async def wait_event(self, condition: Callable[[], bool] | None,
                         timeout: float = math.inf) -> bool:
        """Sleep until ``condition()`` holds; False if ``timeout`` seconds passed first.

        With no condition, one sleep (prepare_to_wait + schedule_timeout): the
        next wake_up ends it, True if one came before the timeout."""
        if condition is None:
            with trio.move_on_after(timeout):
                await self._lot.park()
                return True
            return False
        if condition():
            return True
        with trio.move_on_after(timeout):
            while True:
                await self._lot.park()
                if condition():
                    return True
        return condition()

    def __repr__(self) -> str:
        return f"<WaitQueue {self.name} with {len(self._lot)} waiting>"


class HashedWaitTable:
    """page_waitqueue(): a small table of wait queues shared by hashing the pfn."""

    def __init__(self, name: str, size: int = 256) -> None:
        self._queues = [WaitQueue(f"{name}[{i}]") for i in range(size)]
        self._mask = size - 1

    def for_key(self, key: int) -> WaitQueue:
        return self._queues[key & self._mask]
