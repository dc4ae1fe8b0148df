"""Starting kernel threads and timers from kernel code: kthread_run, add_timer.

Models the kernel's interface to kthreadd (kernel/kthread.c: kthread_create /
kthread_run hand the new thread to kthreadd, which forks it) and to the timer
wheel (kernel/timer.c: add_timer, del_timer_sync). Kernel code that starts a
thread at run time (NBD_DO_IT starting nbd_thread) or arms a timer (the NBD
xmit timer) calls ``k.kthreadd``; what runs the threads is an actor
(actors/kthreadd.py), which the machine installs, so the kernel never imports
the actors.

Simplified: no kthread_stop handshake beyond what the caller models itself;
a timer is a trio task sleeping until it fires, cancelled by del_timer_sync.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import trio

    from emulator.task import Task


class Kthreadd(Protocol):
    """What kernel code may ask of kthreadd and the timer wheel."""

    def kthread_run(self, task: Task, threadfn: Callable[[Task], Awaitable[None]]) -> None:
        """Run ``threadfn(task)`` as the kernel thread ``task``, on its CPU."""

    def add_timer(self, fn: Callable[[], Awaitable[None]]) -> trio.CancelScope:
        """Run ``fn`` (it sleeps until its expiry, then fires); cancelling the
        returned scope is del_timer_sync."""


__all__ = ["Kthreadd"]
