"""The emulated kernel's global state: what the kernel keeps in globals.

Models: the kernel-wide objects a 3.6 kernel reaches through globals — the node
(NODE_DATA(0)), vm_stat, the CPUs, the task list, swap_info, the slab
allocator and its caches, the ``memalloc_socks`` static key — gathered in one
object so every subsystem reaches them through ``k``.

``k.lock`` is the machine's lock: every synchronous section that changes zones,
slabs, LRU lists, the swap map or page tables holds it, and none holds it
across an ``await`` (sections are plain functions, so they cannot await). It is
re-entrant because the slab allocator's sections call the page allocator's.

Time: kernel timeouts are written in seconds of kernel time (``HZ/10`` is
``k.hz(0.1)``) and scaled by ``time.hz_scale``.
"""

from __future__ import annotations

import itertools
import random
import threading
from typing import TYPE_CHECKING

import trio

from emulator.config import Config
from emulator.flags import GFP, PF
from emulator.mm.backing_dev import BackingDev
from emulator.mm.mmzone import PgData
from emulator.mm.page import PAGE_SHIFT
from emulator.mm.vmstat import VMStat
from emulator.printk import Printk
from emulator.sched import CPU, sched_wakeup_granularity
from emulator.task import Task

if TYPE_CHECKING:
    from emulator.kthread import Kthreadd
    from emulator.mm.oom_kill import OOMKiller
    from emulator.mm.page_alloc import PageAllocator
    from emulator.mm.slab_common import SlabAllocator
    from emulator.mm.swapfile import SwapInfo
    from emulator.mm.vmscan import VMScan
    from emulator.patches import PatchSet
    from net.dev import NetDevice
    from net.skbuff import SkbAllocator


class Kernel:
    """Every subsystem and global the model code reads through ``k``.

    Built from the boot parameters of a Config (memory, CPUs, min_free_kbytes,
    the slab allocator, the patches, swap size, the RNG seed, hz_scale); the
    Config itself is the machine's, not the kernel's. ``skb``, ``netdev`` and
    ``kthreadd`` are installed by the machine as it boots (the network stack
    initialises after mm; kthreadd runs in the machine's nursery)."""

    patches: PatchSet  #: the applied patches (emulator/patches.py)
    boot_time: float  #: trio.current_time() at boot
    hz_scale: float  #: time.hz_scale: seconds of wall-clock time per kernel second
    lock: threading.RLock  #: the machine's lock (module docstring)
    rng: random.Random  #: the kernel's randomness (net_random), seeded by run.seed
    vmstat: VMStat  #: /proc/vmstat
    pgdat: PgData  #: NODE_DATA(0): the zone, mem_map, kswapd's and pfmemalloc's queues
    cpus: list[CPU]
    tasks: dict[int, Task]  #: pid -> task
    memalloc_socks: int  #: the memalloc_socks static key's count (patch 8)
    page_alloc: PageAllocator
    bdi: BackingDev  #: the swap device's congestion state (mm/backing-dev.c)
    vmscan: VMScan
    oom: OOMKiller
    swap: SwapInfo  #: swap_info[0]; its ``bdev`` is set by swapon (the machine)
    slab: SlabAllocator  #: SLAB or SLUB (CONFIG_SLAB / CONFIG_SLUB)
    skb: SkbAllocator | None  #: net/core/skbuff.c
    netdev: NetDevice | None  #: eth0
    kthreadd: Kthreadd | None  #: kthread_run and add_timer (emulator/kthread.py)
    progress: int  #: forward progress (successful page accesses and I/O)
    printk: Printk
    nr_page_cache: int  #: clean page-cache pages
    integrity_errors: int
    integrity_log: list[dict]

    def __init__(self, cfg: Config) -> None:
        from emulator.mm.oom_kill import OOMKiller
        from emulator.mm.page_alloc import PageAllocator
        from emulator.mm.slab_common import create_slab_allocator
        from emulator.mm.swapfile import SwapInfo
        from emulator.mm.vmscan import VMScan

        self.patches = cfg.kernel.patches
        try:
            self.boot_time = trio.current_time()
        except RuntimeError:  # built outside trio (unit tests)
            self.boot_time = 0.0
        self.hz_scale = cfg.time.hz_scale
        self.lock = threading.RLock()
        self.rng = random.Random(cfg.run.seed)
        self.vmstat = VMStat()
        nr_pages = cfg.machine.memory_mib << (20 - PAGE_SHIFT)
        self.pgdat = PgData(nr_pages, cfg.machine.min_free_kbytes, cfg.machine.cpus)
        self.vmstat["nr_free_pages"] = self.pgdat.nr_free_pages()
        gran = sched_wakeup_granularity(cfg.machine.cpus)
        self.cpus = [CPU(i, wakeup_granularity=gran) for i in range(cfg.machine.cpus)]
        self.tasks: dict[int, Task] = {}
        self._pids = itertools.count(1)
        self._next_cpu = itertools.cycle(range(cfg.machine.cpus))
        self.memalloc_socks = 0  #: the memalloc_socks static key's count (patch 8)
        self.page_alloc = PageAllocator(self)
        self.bdi = BackingDev()
        self.vmscan = VMScan(self)
        self.oom = OOMKiller(self)
        self.swap = SwapInfo(self, cfg.swap.size_mib << (20 - PAGE_SHIFT))
        self.slab = create_slab_allocator(self, cfg.machine.slab)
        #: net/core/skbuff.c and the NIC (net/dev.py): set when the machine boots
        #: (emulator.machine.boot_kernel), as the network stack initialises after mm.
        self.skb = None
        self.netdev = None
        self.kthreadd = None
        #: Forward progress: successful work only, page accesses by processes and
        #: I/Os that completed without an error (a failed write re-dirties its page,
        #: which is no progress). The watchdog declares a lockup when it stops moving.
        self.progress = 0
        #: printk_ratelimited's states for the messages a failing device repeats
        self.printk = Printk(self)
        self.nr_page_cache = 0
        self.integrity_errors = 0
        self.integrity_log: list[dict] = []

    # -- helpers ------------------------------------------------------------------
    def uptime(self) -> float:
        """Seconds since the kernel booted, on trio's clock."""
        return trio.current_time() - self.boot_time

    def hz(self, seconds: float) -> float:
        """A kernel timeout in (scaled) wall-clock seconds: ``k.hz(0.1)`` is HZ/10."""
        return seconds * self.hz_scale

    def sk_memalloc_socks(self) -> bool:
        """sk_memalloc_socks(): does any SOCK_MEMALLOC socket exist?"""
        return self.memalloc_socks > 0

    def new_task(self, comm: str, flags: PF = PF(0), *, cpu: int | None = None,
                 in_softirq: bool = False) -> Task:
        """Create a task placed on ``cpu`` (round-robin by default)."""
        pid = next(self._pids)
        cpu_obj = self.cpus[next(self._next_cpu) if cpu is None else cpu]
        task = Task(pid, comm, cpu_obj, flags, in_softirq=in_softirq)
        self.tasks[pid] = task
        return task

    def page_cache_remove(self, page) -> None:
        """__remove_mapping / __delete_from_page_cache for a clean page-cache page."""
        self.nr_page_cache -= 1
        self.vmstat["nr_file_pages"] -= 1

    async def populate_page_cache(self, task: Task, nr_pages: int) -> None:
        """Boot-time page cache: files read while the system and the benchmark
        harness started (clean, unmapped, on the inactive file list)."""
        from emulator.flags import GFP_HIGHUSER_MOVABLE
        from emulator.mm.page import PG, Owner

        for _ in range(nr_pages):
            page = await self.page_alloc.alloc_page(GFP_HIGHUSER_MOVABLE | GFP.NO_KSWAPD, task,
                                                    owner=Owner.FILE)
            if page is None:
                break
            page.flags |= PG.uptodate
            with self.lock:
                self.vmscan.lru_cache_add_file(page)
                self.nr_page_cache += 1
                self.vmstat["nr_file_pages"] += 1

    def integrity_error(self, **details) -> None:
        """Data read back is not what was written: logged, counted, fails the run.
        Only wrong data: an I/O error is not an integrity error."""
        import structlog

        self.integrity_errors += 1
        self.vmstat["integrity_errors"] += 1
        if len(self.integrity_log) < 100:
            self.integrity_log.append(details)
        structlog.get_logger("swapnbd").error("integrity_error", **details)

    def sigbus(self, task: Task, vpn: int, page) -> None:
        """VM_FAULT_SIGBUS from do_swap_page: the swap-in read failed, so the faulting
        process gets SIGBUS (mm_fault_error -> do_sigbus), whose default action
        ends it."""
        import structlog

        self.vmstat["sigbus_kill"] += 1
        structlog.get_logger("swapnbd").warning(
            "sigbus", pid=task.pid, comm=task.comm, vaddr=vpn, entry=page.swap)
        task.fatal_signal = True
        task.signal = "SIGBUS"
        self.wake_killed(task)

    def wake_killed(self, task: Task) -> None:
        """signal_wake_up for SIGKILL: end killable sleeps (the throttle wait)."""
        self.pgdat.pfmemalloc_wait.wake_up()

    @property
    def nr_pages(self) -> int:
        return self.pgdat.node_present_pages
