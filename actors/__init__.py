"""The trio entry points: every long-running loop of the machine starts here.

``process`` and ``workloads`` (user processes), ``kswapd``, ``softirq`` (the
NIC's interrupts and NAPI poll), ``nbdclient`` (nbd-client's NBD_DO_IT and
reconnection), ``kthreadd`` (kernel threads and timers kernel code starts),
``slab_reaper`` (SLAB's cache_reap), ``watchdog`` (the lockup detector),
``sampler`` (vmstat snapshots) and ``netload`` (background traffic from
another host). They drive the kernel (emulator/, net/), which never imports
them.
"""

__all__ = ["kswapd", "kthreadd", "nbdclient", "netload", "process", "sampler", "slab_reaper",
           "softirq", "watchdog", "workloads"]
