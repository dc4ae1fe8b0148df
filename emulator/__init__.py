"""swapnbd's emulated kernel and the machine around it.

The kernel: ``kernel`` (the globals, ``Kernel``), ``sched`` (CPUs), ``task``,
``wait``, ``flags``, ``patches``, ``block``, ``printk``, ``kthread``,
``diagnosis`` and the memory model in ``mm``. The machine and its tools:
``config``, ``machine`` (``Machine``, ``RunResult``), ``logs``, ``cli``,
``report``, ``experiment``, ``sweep``, ``testing`` (the pytest plugin) and
``analysis``. Import the submodules; this package re-exports nothing.
"""

__all__ = ["analysis", "block", "cli", "config", "diagnosis", "experiment", "flags", "kernel",
           "kthread", "logs", "machine", "mm", "patches", "printk", "report", "sched", "sweep",
           "task", "testing", "wait"]
