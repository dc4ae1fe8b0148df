"""Tasks: the emulated ``current``.

Models: struct task_struct (pid, comm, flags, TIF_MEMDIE, the pending-SIGKILL
test of fatal_signal_pending) and the scheduler's view of a task: which CPU it
runs on, whether it holds that CPU, and what it sleeps on (``wchan``, which the
lockup diagnosis prints, like /proc/PID/wchan and the hung-task detector).

Each Task is driven by one trio task. It executes emulated code only while it
holds its CPU (emulator/sched.py); every sleep gives the CPU back and takes it again
on wake-up, so at most ``cpus`` tasks run emulated code at once.

``current`` (a ContextVar, like the kernel's ``current`` macro) names the
Task whose code a trio task is running, for code with no task argument, such
as __free_pages choosing the CPU's per-cpu page list.

Softirq work runs in a Task with ``in_softirq`` set: the model gives each
CPU's NET_RX handler its own context instead of borrowing the interrupted
task's, which matches what patch 4's __do_softirq achieves (the interrupted
task's PF_MEMALLOC is masked while the softirq runs).

A task has a nice level (``set_user_nice``) whose load weight is the
kernel's prio_to_weight table (kernel/sched/sched.h); emulator/sched.py uses it
where CFS's wake-up preemption does. Only the NBD driver thread changes it
(nice -20, as 3.6's nbd_thread does).

Simplified: no real-time classes, no migration between CPUs; the only signals
are fatal ones: SIGKILL (the OOM killer; the NBD driver's xmit timeout, for its
own thread) and SIGBUS (a swap-in that failed), recorded in ``signal``.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

import trio

from emulator.flags import PF
from emulator.wait import WaitQueue

if TYPE_CHECKING:
    from emulator.sched import CPU

#: kernel/sched/sched.h prio_to_weight[]: nice -20 .. 19; nice 0 is NICE_0_LOAD (1024),
#: and each step is ~1.25x, so a CPU-bound task gets ~10% more CPU per level.
PRIO_TO_WEIGHT = (
    88761, 71755, 56483, 46273, 36291,
    29154, 23254, 18705, 14949, 11916,
    9548, 7620, 6100, 4904, 3906,
    3121, 2501, 1991, 1586, 1277,
    1024, 820, 655, 526, 423,
    335, 272, 215, 172, 137,
    110, 87, 70, 56, 45,
    36, 29, 23, 18, 15,
)
NICE_0_LOAD = 1024


class Task:
    """struct task_struct, and what the scheduler knows of it."""

    __slots__ = (
        "pid", "comm", "flags", "cpu", "memdie", "in_softirq", "fatal_signal", "signal",
        "wchan", "wait_since", "mode", "utime", "stime", "sirqtime", "slice_start", "slice_used",
        "on_cpu", "mm", "exited", "allocstall", "allocstall_high_order", "direct_reclaimed",
        "activity", "nice", "io_context", "bh_disabled",
        "__weakref__",
    )

    def __init__(self, pid: int, comm: str, cpu: CPU, flags: PF = PF(0), *,
                 in_softirq: bool = False) -> None:
        self.pid = pid
        self.comm = comm
        self.flags = flags
        self.cpu = cpu
        self.memdie = False  #: TIF_MEMDIE: chosen by the OOM killer
        self.in_softirq = in_softirq
        self.fatal_signal = False  #: a fatal signal pending (fatal_signal_pending)
        self.signal: str | None = None  #: which one: "SIGKILL" or "SIGBUS"
        self.wchan: str | None = None
        self.wait_since = 0.0
        self.mode = "softirq" if in_softirq else "sys"  #: "user" | "sys" | "softirq"
        self.utime = 0.0
        self.stime = 0.0
        self.sirqtime = 0.0
        self.slice_start = 0.0
        self.slice_used = 0.0  #: slice already run when preempted before its end
        self.on_cpu = False
        self.mm = None  #: the task's MMStruct (user processes only)
        self.exited = False
        self.allocstall = 0  #: times this task entered direct reclaim
        self.allocstall_high_order = 0  #: ... of them for an allocation of order > 0
        self.direct_reclaimed = 0  #: pages it reclaimed there
        self.activity: str | None = None  #: what a running task is busy with (diagnosis)
        self.nice = 0
        self.io_context = None  #: block-layer batching state (emulator.block.IOContext)
        #: local_bh_disable() depth: process context with softirqs off, as release_sock's
        #: backlog processing runs (in_interrupt() is true there, in_serving_softirq() not)
        self.bh_disabled = 0

    @property
    def load_weight(self) -> int:
        """se.load.weight: prio_to_weight[nice + 20]."""
        return PRIO_TO_WEIGHT[self.nice + 20]

    def set_user_nice(self, nice: int) -> None:
        """set_user_nice(): clamp to [-20, 19]; takes effect at the next enqueue."""
        self.nice = max(-20, min(19, nice))

    # -- context predicates (include/linux/hardirq.h) --------------------------
    def in_interrupt(self) -> bool:
        """in_interrupt(): serving a softirq, or in process context with softirqs
        disabled (local_bh_disable adds SOFTIRQ_DISABLE_OFFSET to preempt_count)."""
        return self.in_softirq or self.bh_disabled > 0

    def in_serving_softirq(self) -> bool:
        """in_serving_softirq(): only a softirq handler itself, not a bh-disabled section."""
        return self.in_softirq

    def local_bh_disable(self) -> None:
        """local_bh_disable(): softirqs off in process context."""
        self.bh_disabled += 1

    def local_bh_enable(self) -> None:
        """local_bh_enable()."""
        self.bh_disabled -= 1

    # -- scheduling ------------------------------------------------------------
    async def cond_resched(self) -> None:
        """Give the CPU to a waiting task if this task's time slice is over.

        Always a trio checkpoint: it is where "interrupts" (real socket readiness,
        timers, other CPUs' tasks) get to run while this task keeps its CPU."""
        cpu = self.cpu
        if cpu.need_resched(self):
            await cpu.schedule(self)
        else:
            await trio.lowlevel.checkpoint()

    def set_mode(self, mode: str) -> str:
        """Switch user/sys accounting; returns the previous mode."""
        prev = self.mode
        if prev != mode:
            if self.on_cpu:
                self.cpu.account(self)
            self.mode = mode
        return prev

    async def sleep_on(self, wq: WaitQueue, condition: Callable[[], bool] | None, *,
                       timeout: float = math.inf, wchan: str, iowait: bool = False) -> bool:
        """wait_event_timeout(): give up the CPU, sleep on ``wq``, take the CPU back.
        With no condition, sleep until the next wake_up (WaitQueue.wait_event)."""
        if condition is not None and condition():
            return True
        self._sleep_begin(wchan, iowait)
        try:
            ok = await wq.wait_event(condition, timeout)
        finally:
            self._sleep_end(iowait)
        await self.cpu.acquire(self, wakeup=True)
        return ok

    async def sleep(self, seconds: float, *, wchan: str, iowait: bool = False) -> None:
        """schedule_timeout_uninterruptible() / congestion_wait()'s timed sleep."""
        self._sleep_begin(wchan, iowait)
        try:
            await trio.sleep(seconds)
        finally:
            self._sleep_end(iowait)
        await self.cpu.acquire(self, wakeup=True)

    async def sleep_until(self, fn: Callable[[], Awaitable[object]], *, wchan: str,
                          iowait: bool = False) -> None:
        """Sleep off the CPU until ``await fn()`` returns: for waits on something outside
        the emulated kernel, such as a real socket becoming writable."""
        self._sleep_begin(wchan, iowait)
        try:
            await fn()
        finally:
            self._sleep_end(iowait)
        await self.cpu.acquire(self, wakeup=True)

    def _sleep_begin(self, wchan: str, iowait: bool) -> None:
        self.wchan = wchan
        self.wait_since = trio.current_time()
        if iowait:
            self.cpu.nr_iowait += 1
        self.cpu.release(self)

    def _sleep_end(self, iowait: bool) -> None:
        self.wchan = None
        if iowait:
            self.cpu.nr_iowait -= 1

    def describe(self) -> dict:
        d = {"pid": self.pid, "comm": self.comm, "cpu": self.cpu.id,
             "flags": PF.names(self.flags)}
        if self.memdie:
            d["memdie"] = True
        if self.fatal_signal:
            d["signal_pending"] = self.signal or "SIGKILL"
        if self.allocstall:
            d["allocstall"] = self.allocstall
        if self.wchan is not None:
            d["wchan"] = self.wchan
            d["waiting_s"] = round(trio.current_time() - self.wait_since, 3)
        elif self.on_cpu:
            d["state"] = "running"
        else:
            d["state"] = "runnable" if not self.exited else "exited"
        if self.activity and self.wchan is None:
            d["activity"] = self.activity
        return d

    def __repr__(self) -> str:
        return f"<Task {self.pid} {self.comm} cpu{self.cpu.id}>"


#: ``current``: the emulated task whose code this trio task is executing. Set by
#: emulator.sched.running() (and by each NET_RX handler for its softirq context);
#: code that has no task argument, such as __free_pages, reads it to find the
#: CPU it runs on. None outside any emulated task (unit tests, SLAB's reaper
#: timer), where frees go straight to the buddy lists.
current: ContextVar[Task | None] = ContextVar("current", default=None)
