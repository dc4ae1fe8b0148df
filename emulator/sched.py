"""CPUs: run queues that grant the processor to one task at a time.

Models: a CPU's run queue and context switch (kernel/sched/core.c: schedule,
cond_resched, the tick's time-slice check), softirq running between task
slices (kernel/softirq.c), and the per-CPU time accounting /proc/stat shows
(user, system, softirq, idle, iowait).

An emulated task (user process, kswapd, NBD driver thread, NET_RX handler)
executes emulated code only while it holds its CPU. ``acquire`` queues it;
``release`` hands the CPU directly to the next waiter, picked in this order:

1. softirq contexts, as pending softirqs run before the next task is picked;
2. tasks with a negative nice level (in this model only the NBD driver thread,
   nice -20), FIFO. Their vruntime advances weight/NICE_0_LOAD times slower
   (87x at nice -20), so in CFS they are leftmost almost whenever they are
   runnable; and check_preempt_wakeup scales the wake-up granularity by the
   waking task's weight (wakeup_gran: calc_delta_fair), so such a task
   preempts a nice-0 holder after 1024/88761 of the granularity (~23 us);
3. tasks waking from a sleep, FIFO. This is CFS's sleeper placement
   (place_entity: a woken task's vruntime is raised to at most
   min_vruntime - sched_latency/2, so it is leftmost in the tree and runs
   next), and check_preempt_wakeup: the running task is asked to reschedule
   once it has run for sysctl_sched_wakeup_granularity;
4. tasks whose slice ran out (cond_resched), FIFO, as CPU-bound tasks of
   equal weight take turns. A task preempted before the end of its slice (by
   a softirq or a woken task) goes back to the head of this queue with the
   rest of its slice: in CFS its vruntime grew only by what it ran, so it is
   still leftmost among its equals once the preempting task is done.

A nice -20 task whose slice runs out gives the CPU to the next waiter, which it
then preempts at that task's next cond_resched: CPU-bound nice-0 tasks get
slivers of its CPU, as CFS gives them about 1% of it.

Without (3) a woken NBD sender or kswapd would wait behind every CPU hog's
full slice, which CFS does not do.

A CPU has one holder at a time, so per-CPU state (slab array caches, per-cpu
slabs, per-cpu page lists, page-fragment caches) is used by exactly one task
at a time, like the kernel's preempt-disabled sections.

Design note: DESIGN.md §3 has each CPU as a dispatcher trio task. Here the CPU
is a hand-off object driven by the tasks themselves: a dispatcher task would
add two trio context switches to every grant, and the grant order and
accounting are the same. So the scheduler is part of the kernel (this
module), not an actor: nothing here is a long-running loop.

Time is wall-clock (trio's clock). The time a task holds a CPU is charged to
the task's mode (user, sys, softirq) and to the CPU; time with no holder is
idle, or iowait while a task of this CPU sleeps on I/O.

Simplified: no preemption inside emulated code (a task runs until it sleeps or
reaches cond_resched), no vruntime bookkeeping (the four FIFO classes above
stand in for the red-black tree; nice levels other than 0 only order the
pick and scale the wake-up granularity), no sleeper credit (CFS places a
long sleeper sched_latency/2 behind min_vruntime, which usually lets it
preempt at once; here a nice-0 sleeper waits for the granularity), no load
balancing (tasks are placed round-robin at creation), one time slice for all
tasks.
"""

from __future__ import annotations

from collections import deque

import attrs
import trio

from emulator.task import NICE_0_LOAD, Task, current

#: sched_latency-sized slice; cond_resched yields once it is used up.
TIMESLICE_S = 0.004
#: sysctl_sched_wakeup_granularity before its CPU-count scaling: how long the running
#: task may go on once a woken task or a softirq is waiting.
WAKEUP_GRANULARITY_S = 0.001


def sched_wakeup_granularity(nr_cpus: int) -> float:
    """sysctl_sched_wakeup_granularity as update_sysctl() scales it by default
    (SCHED_TUNABLESCALING_LOG): 1 ms x (1 + ilog2(min(nr_cpus, 8)))."""
    return WAKEUP_GRANULARITY_S * (1 + (min(max(nr_cpus, 1), 8).bit_length() - 1))


@attrs.frozen
class CpuStat:
    """One CPU's /proc/stat line (seconds of wall-clock time) and its run queue."""

    cpu: int
    user: float
    sys: float
    softirq: float
    idle: float
    iowait: float  #: idle while a task of this CPU sleeps on I/O
    nr_switches: int
    nr_running: int  #: the holder and the queued tasks


class CPU:
    def __init__(self, cpu_id: int, timeslice: float = TIMESLICE_S,
                 wakeup_granularity: float = WAKEUP_GRANULARITY_S) -> None:
        self.id = cpu_id
        self.timeslice = timeslice
        self.wakeup_granularity = wakeup_granularity
        self.current: Task | None = None
        self._tasks: deque[tuple[Task, trio.Event]] = deque()
        self._woken: deque[tuple[Task, trio.Event]] = deque()
        self._boosted: deque[tuple[Task, trio.Event]] = deque()  # nice < 0
        self._softirqs: deque[tuple[Task, trio.Event]] = deque()
        self.nr_iowait = 0
        self.nr_switches = 0
        self.user = 0.0
        self.sys = 0.0
        self.softirq = 0.0
        self.idle = 0.0
        self.iowait = 0.0
        self._since: float | None = None  # set on first use (needs a running trio clock)

    # -- accounting ------------------------------------------------------------
    def account(self, task: Task | None = None) -> None:
        """Charge the time since the last charge to the current holder (or idle)."""
        now = trio.current_time()
        if self._since is None:
            self._since = now
            return
        dt = now - self._since
        self._since = now
        cur = self.current
        if cur is None:
            if self.nr_iowait:
                self.iowait += dt
            else:
                self.idle += dt
            return
        mode = cur.mode
        if mode == "user":
            self.user += dt
            cur.utime += dt
        elif mode == "softirq":
            self.softirq += dt
            cur.sirqtime += dt
        else:
            self.sys += dt
            cur.stime += dt

    def nr_running(self) -> int:
        return (len(self._tasks) + len(self._woken) + len(self._softirqs)
                + len(self._boosted) + (self.current is not None))

    # -- the run queue ---------------------------------------------------------
    async def acquire(self, task: Task, *, wakeup: bool = False,
                      preempted: bool = False) -> None:
        """Become runnable and wait until this CPU is granted.

        ``wakeup``: the task comes back from a sleep (try_to_wake_up), rather than
        from the end of its slice; it is queued ahead of the slice-expired tasks.
        ``preempted``: the task gave way before its slice ended; it is queued at
        the head of the slice-expired tasks and resumes the rest of its slice."""
        if self.current is None and not (self._tasks or self._woken or self._softirqs
                                         or self._boosted):
            self._grant(task)
            await trio.lowlevel.checkpoint()
            return
        ev = trio.Event()
        entry = (task, ev)
        if task.in_softirq:
            queue = self._softirqs
        elif task.nice < 0:
            queue = self._boosted
        elif wakeup:
            queue = self._woken
        else:
            queue = self._tasks
        if preempted and queue is self._tasks:
            queue.appendleft(entry)
        else:
            queue.append(entry)
        try:
            await ev.wait()
        except BaseException:
            if ev.is_set():  # granted, then cancelled: pass the CPU on
                self.release(task)
            else:
                queue.remove(entry)
            raise

    def _grant(self, task: Task) -> None:
        self.account()
        self.current = task
        task.on_cpu = True
        task.slice_start = self._since - task.slice_used
        task.slice_used = 0.0
        self.nr_switches += 1

    def release(self, task: Task) -> None:
        """Give the CPU up (sleep, end of slice, exit) and hand it to the next."""
        if self.current is not task:
            return
        self.account()
        task.on_cpu = False
        self.current = None
        queue = self._softirqs or self._boosted or self._woken or self._tasks
        if queue:
            nxt, ev = queue.popleft()
            self._grant(nxt)
            ev.set()

    async def schedule(self, task: Task) -> None:
        """schedule() from cond_resched with TIF_NEED_RESCHED set: give the CPU to
        the next task and queue again, keeping the rest of the slice if it was
        not used up."""
        ran = trio.current_time() - task.slice_start
        preempted = ran < self.timeslice
        self.release(task)
        task.slice_used = ran if preempted else 0.0
        await self.acquire(task, preempted=preempted)

    def need_resched(self, task: Task) -> bool:
        """TIF_NEED_RESCHED: a softirq or a woken task waits and the running task
        has had its wake-up granularity (scaled by the weight of a waiting task
        of higher priority), or a task waits and the slice is over."""
        ran = trio.current_time() - task.slice_start
        if self._softirqs:
            return ran >= self.wakeup_granularity
        if self._boosted:
            waiter = self._boosted[0][0]
            if waiter.nice < task.nice:
                return ran >= self.wakeup_granularity * NICE_0_LOAD / waiter.load_weight
        if self._woken:
            return ran >= self.wakeup_granularity
        return bool(self._tasks or self._boosted) and ran >= self.timeslice

    def stat(self) -> CpuStat:
        """This CPU's line of /proc/stat (seconds), as of now."""
        self.account()
        return CpuStat(cpu=self.id, user=round(self.user, 4), sys=round(self.sys, 4),
                       softirq=round(self.softirq, 4), idle=round(self.idle, 4),
                       iowait=round(self.iowait, 4), nr_switches=self.nr_switches,
                       nr_running=self.nr_running())

    def __repr__(self) -> str:
        return f"<CPU{self.id} current={self.current!r} queued={len(self._tasks)}>"


class running:
    """``async with running(task):`` hold the task's CPU for the body's duration, with
    ``task`` as ``current``."""

    __slots__ = ("task", "_token")

    def __init__(self, task: Task) -> None:
        self.task = task
        self._token = None

    async def __aenter__(self) -> Task:
        await self.task.cpu.acquire(self.task)
        self._token = current.set(self.task)
        return self.task

    async def __aexit__(self, *exc) -> None:
        self.task.cpu.release(self.task)
        self.task.exited = True
        current.reset(self._token)
