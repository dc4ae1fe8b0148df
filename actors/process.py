"""User processes: tasks with an address space running a workload.

Models a user process as the kernel sees it: a task with an mm_struct whose
user code (the workload, actors/workloads.py) runs in user mode and enters the
kernel on page faults; a fatal signal (SIGKILL from the OOM killer, SIGBUS from a swap-in
that failed) takes effect at the next return to user space, where exit_mmap
frees its memory (do_exit); ``signal`` says which one ended it.

CPU time is charged to user or system mode as the task switches, which is what
the MMTests "User"/"System" duration rows rest on.

Simplified: no fork, no signals but those two fatal ones, one anonymous mapping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from emulator.mm.memory import MMStruct, exit_mmap
from emulator.sched import running

if TYPE_CHECKING:
    from emulator.kernel import Kernel

log = structlog.get_logger("swapnbd.process")


class UserProcess:
    def __init__(self, k: Kernel, comm: str, nr_pages: int, *, passes: int = 1,
                 rate_pages_s: float = 0.0) -> None:
        self.k = k
        self.passes = passes  #: the workload's passes over the mapping
        self.rate_pages_s = rate_pages_s  #: pages per second it writes (0: as fast as it can)
        self.task = k.new_task(comm)
        self.mm = MMStruct(self.task, nr_pages)
        self.task.mm = self.mm
        self.passes_done = 0
        self.outcome: str | None = None  # "completed" | "killed"
        self.signal: str | None = None  # what killed it: "SIGKILL" (OOM) or "SIGBUS"

    async def run(self, workload) -> None:
        task = self.task
        async with running(task):
            task.set_mode("user")
            try:
                completed = await workload(self.k, self)
            finally:
                task.set_mode("sys")
            self.outcome = "completed" if completed else "killed"
            if not completed:
                self.signal = task.signal or "SIGKILL"
            freed = exit_mmap(self.k, self.mm, task)
            task.mm = None
            log.info("process_exit", pid=task.pid, comm=task.comm, cpu=task.cpu.id,
                     passes_done=self.passes_done, reason=self.outcome, signal=self.signal,
                     freed=freed)
