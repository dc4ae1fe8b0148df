"""The machine: builds everything from a config and runs it in one nursery.

Models booting a machine and running the seed's benchmark on it: the kernel
(emulator/kernel.py), the swap device (an NBD connection to the embedded
server thread, or to any NBD server given by URL, negotiated as nbd-client
would and handed to the NBD driver), kswapd, the NBD driver's threads, the
NET_RX handlers, background network traffic, the workload's processes, the
lockup detector and the vmstat sampler — every one a task in the nursery
``Machine.run`` opens.

Outcomes: "completed" (every process finished its passes with intact data),
"failed" (the workload finished but data was wrong or processes were
OOM-killed), "lockup" (the watchdog fired), "timeout" (``run.max_duration_s``
passed while still making progress), "stopped" (ended from outside, e.g. by a
test), "error" (an exception in the emulator: a bug). Nothing decides the outcome but those observations.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import structlog
import trio

from actors.cpu import running
from actors.kswapd import create_kswapd, kswapd
from actors.process import UserProcess
from actors.sampler import log_vmstat, sampler
from actors.softirq import start_net_rx
from actors.watchdog import watchdog
from actors.workloads import WORKLOADS
from emulator import logs
from emulator.config import Config, ConfigError
from emulator.diagnosis import diagnose, nbd_wait_cycle
from emulator.flags import PF
from emulator.kernel import Kernel
from net.nbd.blockdev import NBDDevice
from net.nbd.client import NBDHandshakeError, nbd_handshake, parse_nbd_url
from net.nbd.server import ExportSpec
from net.nbd.thread import NBDServerThread
from net.dev import NetDevice
from net.skbuff import SkbAllocator
from net.tcp import TcpSock, connect_raw

log = structlog.get_logger("swapnbd")

EXIT_STATUS = {"completed": 0, "error": 1, "lockup": 3, "failed": 4, "timeout": 5, "stopped": 6}


@attrs.define
class RunResult:
    outcome: str
    elapsed_s: float
    integrity_errors: int
    vm: dict
    time: dict
    processes: dict
    diagnosis: dict | None = None
    error: str | None = None
    log_path: str | None = None
    nbd_latency: dict | None = None
    throttle: dict | None = None
    nbd_sender: dict | None = None  #: NBDDevice.sender_stalls.summary()

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.outcome]


class Machine:
    def __init__(self, cfg: Config, log_path: str | Path | None = None, *,
                 debug_log: bool = False) -> None:
        self.cfg = cfg
        self.log_path = str(log_path) if log_path else None
        self.debug_log = debug_log
        self.k: Kernel | None = None
        self.nbd: NBDDevice | None = None
        self.sockets: list[TcpSock] = []
        self.processes: list[UserProcess] = []
        self.server: NBDServerThread | None = None
        self.result: RunResult | None = None
        self.done = trio.Event()
        self._outcome: str | None = None
        self._diagnosis: dict | None = None
        self._error: str | None = None
        self._boot = 0.0
        self._stop: trio.CancelScope | None = None
        self._file: logs.JsonLinesFile | None = None
        self._senders: list = []  # background traffic sender threads

    # -- the run ------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> RunResult:
        """Boot, run the workload to an outcome, shut down. ``task_status.started()``
        is called once the machine is up (processes about to start)."""
        logs.configure(debug=self.debug_log)
        self._file = logs.JsonLinesFile(self.log_path)
        logs.sink.files.append(self._file)
        self._boot = trio.current_time()
        logs.clock.boot = self._boot
        try:
            with trio.CancelScope() as self._stop:
                try:
                    await self._boot_and_run(task_status)
                except (ConfigError, NBDHandshakeError, ConnectionError, OSError) as e:
                    if isinstance(e, ConfigError):
                        raise
                    self._error = f"{type(e).__name__}: {e}"
                    self._outcome = "error"
                    log.error("run_error", error=self._error)
                except Exception as e:  # a bug: keep the traceback in the log
                    import traceback

                    self._error = f"{type(e).__name__}: {e}"
                    self._outcome = "error"
                    log.error("run_error", error=self._error, traceback=traceback.format_exc())
            self._finish()
            return self.result
        finally:
            for sender in self._senders:
                await trio.to_thread.run_sync(sender.stop)
            if self.server is not None:
                await trio.to_thread.run_sync(self.server.stop)
            logs.sink.files.remove(self._file)
            self._file.close()
            self.done.set()

    async def _boot_and_run(self, task_status) -> None:
        cfg = self.cfg
        k = self.k = boot_kernel(cfg)
        swap_bytes = cfg.swap.size_mib << 20
        if cfg.swap.server == "embedded":
            spec = ExportSpec(name="swap", size=swap_bytes, backend=cfg.swap.backend,
                              path=cfg.swap.path)
            self.server = NBDServerThread([spec])
            await trio.to_thread.run_sync(self.server.start)
            host, port, export = "127.0.0.1", self.server.port, "swap"
        else:
            host, port, export = parse_nbd_url(cfg.swap.server)
        self.nbd, self._handshake_stream = await attach_nbd_swap(
            k, host, port, export, swap_bytes, cfg.network.mss)
        sock = self.nbd.sock
        info = self.nbd.info
        self.sockets.append(sock)

        zone = k.pgdat.zone
        log.info("run_start", t=0.0, schema=logs.SCHEMA_VERSION, config=cfg.to_dict(),
                 machine={
                     "nr_pages": k.nr_pages, "cpus": cfg.machine.cpus,
                     "min_free_kbytes": k.pgdat.min_free_kbytes,
                     "wmark": {"min": zone.watermark[0], "low": zone.watermark[1],
                               "high": zone.watermark[2]},
                     "throttle_threshold": k.pgdat.reserve_pages() // 2,
                     "swap_pages": k.swap.max - 1, "kernel": k.patches.name,
                     "slab": cfg.machine.slab, "export": {"host": host, "port": port,
                                                          "name": export, "size": info.size},
                 })
        log.info("nbd_connect", export=export, size=info.size, flags=info.flags,
                 host=host, port=port)

        # Boot-time allocations (mempools, the NIC's RX ring) by the init task.
        init = k.new_task("swapper", PF.KTHREAD, cpu=0)
        async with running(init):
            await self.nbd.init_pools(init)
            await k.netdev.e1000_open(init)
            await k.populate_page_cache(init, cfg.machine.page_cache_mib << (20 - 12))

        ncpu = cfg.machine.cpus
        nprocs = ncpu * cfg.workload.processes_per_cpu
        per_proc = max(1, cfg.workload_pages // nprocs)
        workload = WORKLOADS[cfg.workload.kind]
        kswapd_task = create_kswapd(k)
        self.processes = [UserProcess(k, "usemem", per_proc) for _ in range(nprocs)]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kswapd, k, kswapd_task)
            start_net_rx(k, nursery, k.netdev)
            start_nbd_device(k, nursery, self.nbd)
            await self._start_background(nursery)
            nursery.start_soon(k.slab.reap_loop)
            nursery.start_soon(sampler, k, cfg.run.sample_interval_ms / 1000, self._extra)
            nursery.start_soon(watchdog, k, cfg.run.lockup_timeout_s,
                               lambda: nbd_wait_cycle(k, self.nbd), self._on_lockup)
            task_status.started(self)
            with trio.move_on_after(cfg.run.max_duration_s) as deadline:
                async with trio.open_nursery() as procs:
                    for p in self.processes:
                        procs.start_soon(p.run, workload)
            if self._outcome is None:
                if deadline.cancelled_caught:
                    self._outcome = "timeout"
                else:
                    killed = sum(p.outcome == "killed" for p in self.processes)
                    self._outcome = "failed" if (killed or k.integrity_errors) else "completed"
            nursery.cancel_scope.cancel()

    async def _start_background(self, nursery) -> None:
        bg = self.cfg.network.background
        if bg.streams and bg.rate_kib_s:
            from actors.netload import start_background_traffic

            socks = await start_background_traffic(self.k, nursery, bg, self.cfg.network.mss,
                                                   self._senders)
            self.sockets.extend(socks)

    # -- observers ----------------------------------------------------------------
    def _extra(self) -> dict:
        return {"nbd_inflight": len(self.nbd.queue_head) + len(self.nbd.waiting_queue)
                if self.nbd else 0}

    def _on_lockup(self, stalled: float) -> None:
        k = self.k
        self._diagnosis = diagnose(k, stalled, self.sockets, self.nbd)
        self._outcome = "lockup"
        log.error("lockup", diagnosis={kk: v for kk, v in self._diagnosis.items() if kk != "text"},
                  text=self._diagnosis["text"])
        self._stop.cancel()

    def stop(self) -> None:
        """End the run now (tests, Ctrl-C): the outcome is "stopped" unless one was
        already observed."""
        if self._outcome is None:
            self._outcome = "stopped"
        if self._stop is not None:
            self._stop.cancel()

    def _finish(self) -> None:
        k = self.k
        elapsed = trio.current_time() - self._boot
        outcome = self._outcome or "error"
        if k is None:
            self.result = RunResult(outcome, elapsed, 0, {}, {}, {}, error=self._error,
                                    log_path=self.log_path)
            log.info("run_end", outcome=outcome, elapsed_s=round(elapsed, 3), error=self._error)
            return
        if outcome in ("completed", "failed"):
            # Orderly shutdown: sockets give their skbs back (sock_release), the NIC its ring.
            for s in self.sockets:
                s.release(self._any_task())
            k.netdev.release(self._any_task())
        cpus = [c.stat() for c in k.cpus]
        times = {
            "user_s": round(sum(t.utime for t in k.tasks.values()), 4),
            "sys_s": round(sum(t.stime for t in k.tasks.values()), 4),
            "softirq_s": round(sum(t.sirqtime for t in k.tasks.values()), 4),
            "idle_s": round(sum(c["idle"] for c in cpus), 4),
            "iowait_s": round(sum(c["iowait"] for c in cpus), 4),
        }
        procs = {"total": len(self.processes),
                 "completed": sum(p.outcome == "completed" for p in self.processes),
                 "killed": sum(p.outcome == "killed" for p in self.processes)}
        lat = self.nbd.latency_summary() if self.nbd else None
        sender = self.nbd.sender_stalls.summary() if self.nbd else None
        throttle = {"events": k.vmscan.throttle_events,
                    "total_s": round(k.vmscan.throttle_total_s, 4)}
        self.result = RunResult(outcome, elapsed, k.integrity_errors, k.vmstat.snapshot(), times,
                                procs, diagnosis=self._diagnosis, error=self._error,
                                log_path=self.log_path, nbd_latency=lat, throttle=throttle,
                                nbd_sender=sender)
        log_vmstat(k, self._extra)
        tasks = [{"pid": t.pid, "comm": t.comm, "user_s": round(t.utime, 3),
                  "sys_s": round(t.stime, 3), "softirq_s": round(t.sirqtime, 3),
                  "allocstall": t.allocstall} for t in k.tasks.values()]
        log.info("run_end", tasks=tasks, outcome=outcome, elapsed_s=round(elapsed, 3),
                 integrity_errors=k.integrity_errors, vm=self.result.vm, cpus=cpus, time=times,
                 processes=procs, nbd_latency=lat, nbd_sender=sender, throttle=throttle,
                 error=self._error)

    def _any_task(self):
        return next(iter(self.k.tasks.values()))


def boot_kernel(cfg: Config) -> Kernel:
    """The kernel with its network buffer allocator and its NIC (call inside trio)."""
    k = Kernel(cfg)
    k.skb = SkbAllocator(k, cfg.network.rx_buffers)
    k.netdev = NetDevice(k, cfg.network.rx_ring)
    return k


async def attach_nbd_swap(k: Kernel, host: str, port: int, export: str, swap_bytes: int,
                          mss: int) -> tuple[NBDDevice, trio.SocketStream]:
    """What nbd-client does: connect, negotiate the export, hand the socket to the
    NBD driver (NBD_SET_SOCK), which becomes the swap device."""
    raw = await connect_raw(host, port)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    with trio.fail_after(10):
        info = await nbd_handshake(stream, export)
    if info.size < swap_bytes:
        raise ConfigError("swap.size_mib",
                          f"{swap_bytes >> 20} MiB is larger than the NBD export "
                          f"{export!r} at {host}:{port} ({info.size} bytes)")
    if info.read_only:
        raise ConfigError("swap.server", f"the NBD export {export!r} is read-only")
    sock = TcpSock(k, raw, "nbd0", mss)
    k.netdev.attach(sock)
    dev = NBDDevice(k, sock, info, mss)
    k.swap.bdev = dev
    return dev, stream


def start_nbd_device(k: Kernel, nursery: trio.Nursery, dev: NBDDevice) -> None:
    """NBD_DO_IT: the nbd0 kernel thread and the receiver in nbd-client's context. (The
    NIC's softirq, which receives for every socket, is started by the caller.)"""
    async def kthread(task, fn) -> None:
        async with running(task):
            await fn(task)

    nursery.start_soon(kthread, k.new_task("nbd0", PF.KTHREAD), dev.nbd_thread)
    nursery.start_soon(kthread, k.new_task("nbd-client"), dev.nbd_do_it)


async def run_machine(cfg: Config, log_path: str | None = None, **kw) -> RunResult:
    return await Machine(cfg, log_path, **kw).run()


__all__ = ["EXIT_STATUS", "Machine", "RunResult", "run_machine"]
