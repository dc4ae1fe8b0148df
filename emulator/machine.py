"""The machine: builds everything from a config and runs it in one nursery.

Models booting a machine and running the seed's benchmark on it: the kernel
(emulator/kernel.py), the swap device (an NBD connection to the embedded
server, ``swapnbd serve`` in a child process, or to any NBD server given by URL, negotiated as nbd-client
would and handed to the NBD driver), kswapd, the NBD driver's threads, the
NET_RX handlers, background network traffic, the workload's processes, the
lockup detector and the vmstat sampler — every one a task in the nursery
``Machine.run`` opens.

Before the machine boots, the swap device is checked: the connection, the
handshake, the export's size, write access and block-size constraints; a
device that cannot be used ends the run with outcome "swap_unusable" and one
line saying why (its log still has ``run_start`` and ``run_end``).

Outcomes and exit statuses (``EXIT_STATUS``): "completed" 0 (every process
finished its passes with intact data), "error" 1 (an exception in the
emulator: a bug), "lockup" 3 (the watchdog fired), "failed" 4 (the workload
finished but data was wrong or processes were killed: by the OOM killer, or
by SIGBUS after a failed swap-in), "timeout" 5 (``run.max_duration_s``
passed while still making progress), "stopped" 6 (ended from outside by an
embedder, e.g. a test), "swap_unusable" 7 (the swap device could not be
used), "log_error" 8 (the log could not be written: ENOSPC, EIO; the log is
cut back to its last whole line), "interrupted" 128 + the signal (130
SIGINT, 143 SIGTERM: ``Machine.interrupt``). Nothing decides the outcome but
those observations.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from pathlib import Path

import attrs
import structlog
import trio

from actors.kswapd import create_kswapd, kswapd
from actors.kthreadd import KthreaddNursery
from actors.nbdclient import HANDSHAKE_TIMEOUT_S, start_nbd_client
from actors.process import UserProcess
from actors.sampler import log_vmstat, sampler
from actors.slab_reaper import slab_reaper
from actors.softirq import start_net_rx
from actors.watchdog import watchdog
from actors.workloads import WORKLOADS
from drivers.block.nbd import NBDDevice
from emulator import logs
from emulator.config import Config
from emulator.diagnosis import diagnose, nbd_wait_cycle
from emulator.flags import PF
from emulator.kernel import Kernel
from emulator.mm.page import PAGE_SIZE
from emulator.sched import running
from nbdproto import parse_nbd_url
from net.dev import NetDevice
from net.skbuff import SkbAllocator
from net.tcp import TcpSock, connect_raw
from userspace.nbd.client import NBDHandshakeError, nbd_handshake
from userspace.nbd.process import NBDServerProcess
from userspace.nbd.server import ExportSpec

log = structlog.get_logger("swapnbd")

EXIT_STATUS = {"completed": 0, "error": 1, "lockup": 3, "failed": 4, "timeout": 5,
               "stopped": 6, "swap_unusable": 7, "log_error": 8,
               "interrupted": 128 + signal.SIGINT}


class SwapDeviceError(Exception):
    """The swap device cannot be used (outcome "swap_unusable"). ``str()`` is one line."""


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
    nbd: dict | None = None  #: NBDDevice.error_summary(): errors, failures, connections
    signal: int | None = None  #: the signal that interrupted the run

    @property
    def exit_status(self) -> int:
        if self.outcome == "interrupted":
            return 128 + (self.signal or signal.SIGINT)
        return EXIT_STATUS[self.outcome]


class Machine:
    def __init__(self, cfg: Config, log_path: str | Path | None = None, *,
                 debug_log: bool = False) -> None:
        self.cfg = cfg
        self.log_path = str(log_path) if log_path else None
        self.debug_log = debug_log
        self.k: Kernel | None = None
        self.nbd: NBDDevice | None = None
        self.bg_sockets: list[TcpSock] = []
        self.processes: list[UserProcess] = []
        self.server: NBDServerProcess | None = None  #: the embedded server's process
        self.result: RunResult | None = None
        self.done = trio.Event()
        self._outcome: str | None = None
        self._signal: int | None = None
        self._diagnosis: dict | None = None
        self._error: str | None = None
        self._boot = 0.0
        self._stop: trio.CancelScope | None = None
        self._file: logs.JsonLinesFile | None = None
        self._senders: list = []  # background traffic sender threads
        self._run_start_logged = False
        self._export: dict = {"server": cfg.swap.server}

    @property
    def sockets(self) -> list[TcpSock]:
        """Every socket of the machine: the NBD device's (while it has one) and the
        background streams'."""
        nbd = [self.nbd.sock] if self.nbd is not None and self.nbd.sock is not None else []
        return nbd + self.bg_sockets

    # -- the run ------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> RunResult:
        """Check the swap device, boot, run the workload to an outcome, shut down.
        ``task_status.started()`` is called once the machine is up (processes about to
        start)."""
        logs.configure(debug=self.debug_log)
        self._file = logs.JsonLinesFile(self.log_path, on_error=self._on_log_error)
        logs.sink.files.append(self._file)
        self._boot = trio.current_time()
        logs.clock.boot = self._boot
        try:
            with trio.CancelScope() as self._stop:
                try:
                    await self._boot_and_run(task_status)
                except SwapDeviceError as e:
                    self._error = str(e)
                    self._outcome = "swap_unusable"
                except Exception as e:  # a bug: keep the traceback in the log
                    import traceback

                    self._error = f"{type(e).__name__}: {e}"
                    self._outcome = "error"
                    log.error("run_error", error=self._error, traceback=traceback.format_exc())
            self._finish()
            return self.result
        finally:
            with trio.CancelScope(shield=True):
                for sender in self._senders:
                    await trio.to_thread.run_sync(sender.stop)
                if self.server is not None:
                    await self.server.aclose()
            logs.sink.files.remove(self._file)
            self._file.close()
            self.done.set()

    async def _open_swap_device(self) -> tuple:
        """Start the embedded server if there is one, then connect to the swap device
        and negotiate the export: (host, port, export, (raw, stream, info)). Raises
        SwapDeviceError."""
        cfg = self.cfg
        swap_bytes = cfg.swap.size_mib << 20
        if cfg.swap.server == "embedded":
            spec = ExportSpec(name="swap", size=swap_bytes, backend=cfg.swap.backend,
                              path=cfg.swap.path)
            self.server = NBDServerProcess([spec])
            try:
                await self.server.start()
            except (RuntimeError, OSError, ValueError) as e:
                self.server = None
                raise SwapDeviceError(f"swap device (embedded server): {_why(e)}") from None
            host, port, export = "127.0.0.1", self.server.port, "swap"
        else:
            host, port, export = parse_nbd_url(cfg.swap.server)
        self._export = {"host": host, "port": port, "name": export}
        conn = await open_nbd_swap(host, port, export, swap_bytes)
        return host, port, export, conn

    def _log_run_start(self, k: Kernel | None, export: dict) -> None:
        cfg = self.cfg
        machine: dict = {"cpus": cfg.machine.cpus, "kernel": cfg.kernel.patches.name,
                         "slab": cfg.machine.slab, "export": export}
        if k is not None:
            zone = k.pgdat.zone
            machine.update({
                "nr_pages": k.nr_pages, "min_free_kbytes": k.pgdat.min_free_kbytes,
                "wmark": {"min": zone.watermark[0], "low": zone.watermark[1],
                          "high": zone.watermark[2]},
                "throttle_threshold": k.pgdat.reserve_pages() // 2,
                "swap_pages": k.swap.max - 1})
        self._run_start_logged = True
        log.info("run_start", t=0.0, schema=logs.SCHEMA_VERSION, config=cfg.to_dict(),
                 machine=machine)

    async def _boot_and_run(self, task_status) -> None:
        cfg = self.cfg
        k = self.k = boot_kernel(cfg)
        try:
            host, port, export, conn = await self._open_swap_device()
        except SwapDeviceError as e:
            self._log_run_start(k, {**self._export, "error": str(e)})
            task_status.started(self)
            raise
        raw, stream, info = conn
        self._log_run_start(k, {"host": host, "port": port, "name": export, "size": info.size})
        self.nbd = attach_nbd_device(k, raw, stream, info, cfg.network.mss)
        self.nbd.peer = (host, port, export)
        log.info("nbd_connect", export=export, size=info.size, flags=info.flags,
                 host=host, port=port)

        # Boot-time allocations (mempools, the NIC's RX ring) by the init task.
        init = k.new_task("swapper", PF.KTHREAD, cpu=0)
        async with running(init):
            await self.nbd.init_pools(init)
            await k.netdev.e1000_open(init)
            await k.populate_page_cache(init, cfg.machine.page_cache << (20 - 12))

        ncpu = cfg.machine.cpus
        nprocs = ncpu * cfg.workload.processes_per_cpu
        per_proc = max(1, cfg.workload_pages // nprocs)
        workload = WORKLOADS[cfg.workload.kind]
        kswapd_task = create_kswapd(k)
        self.processes = [UserProcess(k, "usemem", per_proc, passes=cfg.workload.passes,
                                      rate_pages_s=cfg.workload.rate_pages_s)
                          for _ in range(nprocs)]

        async with trio.open_nursery() as nursery:
            k.kthreadd = KthreaddNursery(nursery)
            nursery.start_soon(kswapd, k, kswapd_task)
            start_net_rx(k, nursery, k.netdev)
            start_nbd_client(k, nursery, self.nbd, persist=cfg.swap.persist,
                             timeout_s=cfg.swap.timeout_s)
            await self._start_background(nursery)
            nursery.start_soon(slab_reaper, k)
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
            self.bg_sockets.extend(socks)

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
        """End the run now (tests, embedders): the outcome is "stopped" unless one was
        already observed."""
        if self._outcome is None:
            self._outcome = "stopped"
        if self._stop is not None:
            self._stop.cancel()

    def interrupt(self, signum: int) -> None:
        """A signal asks the run to end (SIGINT: Ctrl-C, SIGTERM): outcome
        "interrupted" unless one was already observed; the run shuts down as after
        any other outcome and logs ``run_end``."""
        if self._outcome is None:
            self._outcome = "interrupted"
            self._signal = signum
            if not self._run_start_logged and self._file is not None:
                self._log_run_start(self.k, self._export)  # the log starts with run_start
            log.warning("interrupted", signal=signal.Signals(signum).name)
        if self._stop is not None:
            self._stop.cancel()

    def _on_log_error(self, exc: OSError) -> None:
        """The log file could not be written (ENOSPC, EIO): stop the run."""
        if self._outcome is None or self._outcome == "interrupted":
            self._outcome = "log_error"
            self._error = f"log {self.log_path}: cannot write: {_strerror(exc)}"
        if self._stop is not None:
            self._stop.cancel()

    def _finish(self) -> None:
        k = self.k
        elapsed = trio.current_time() - self._boot
        outcome = self._outcome or "error"
        if not self._run_start_logged:  # ended before the swap device was checked
            self._log_run_start(k, self._export)
        sig = signal.Signals(self._signal).name if self._signal else None
        if k is None:
            self.result = RunResult(outcome, elapsed, 0, {}, {}, {}, error=self._error,
                                    log_path=self.log_path, signal=self._signal)
            log.info("run_end", outcome=outcome, elapsed_s=round(elapsed, 3), error=self._error,
                     signal=sig)
            return
        if outcome in ("completed", "failed"):
            # Orderly shutdown: sockets give their skbs back (sock_release), the NIC its ring.
            for s in self.sockets:
                s.release(self._any_task())
            k.netdev.release(self._any_task())
        cpus = [attrs.asdict(c.stat()) for c in k.cpus]
        times = {
            "user_s": round(sum(t.utime for t in k.tasks.values()), 4),
            "sys_s": round(sum(t.stime for t in k.tasks.values()), 4),
            "softirq_s": round(sum(t.sirqtime for t in k.tasks.values()), 4),
            "idle_s": round(sum(c["idle"] for c in cpus), 4),
            "iowait_s": round(sum(c["iowait"] for c in cpus), 4),
        }
        killed_by = {"oom_kill": sum(p.signal == "SIGKILL" for p in self.processes),
                     "sigbus": sum(p.signal == "SIGBUS" for p in self.processes)}
        procs = {"total": len(self.processes),
                 "completed": sum(p.outcome == "completed" for p in self.processes),
                 "killed": sum(p.outcome == "killed" for p in self.processes),
                 "killed_by": killed_by}
        lat = attrs.asdict(self.nbd.latency_summary()) if self.nbd else None
        sender = attrs.asdict(self.nbd.sender_stalls.summary()) if self.nbd else None
        nbd = self.nbd.error_summary() if self.nbd else None
        throttle = {"events": k.vmscan.throttle_events,
                    "total_s": round(k.vmscan.throttle_total_s, 4)}
        self.result = RunResult(outcome, elapsed, k.integrity_errors, k.vmstat.snapshot(), times,
                                procs, diagnosis=self._diagnosis, error=self._error,
                                log_path=self.log_path, nbd_latency=lat, throttle=throttle,
                                nbd_sender=sender, nbd=nbd, signal=self._signal)
        if outcome != "swap_unusable":  # else the machine never started: nothing to sample
            log_vmstat(k, self._extra)
        tasks = [{"pid": t.pid, "comm": t.comm, "user_s": round(t.utime, 3),
                  "sys_s": round(t.stime, 3), "softirq_s": round(t.sirqtime, 3),
                  "allocstall": t.allocstall} for t in k.tasks.values()]
        self._file.final()  # a log that could not be written gets one last try
        log.info("run_end", tasks=tasks, outcome=outcome, elapsed_s=round(elapsed, 3),
                 integrity_errors=k.integrity_errors, vm=self.result.vm, cpus=cpus, time=times,
                 processes=procs, nbd_latency=lat, nbd_sender=sender, nbd=nbd,
                 throttle=throttle, suppressed=k.printk.suppressed_total(), signal=sig,
                 error=self._error)

    def _any_task(self):
        return next(iter(self.k.tasks.values()))


def boot_kernel(cfg: Config) -> Kernel:
    """The kernel with its network buffer allocator and its NIC (call inside trio)."""
    k = Kernel(cfg)
    k.skb = SkbAllocator(k, cfg.network.rx_buffers)
    k.netdev = NetDevice(k, cfg.network.rx_ring)
    return k


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _why(exc: BaseException) -> str:
    """An exception as the end of a one-line message."""
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return _strerror(exc).lower() if exc.errno == errno.ECONNREFUSED else _strerror(exc)
    cause = exc.__cause__ or exc.__context__
    text = str(exc)
    if cause is not None and isinstance(cause, OSError):
        text = f"{text} ({_strerror(cause)})" if text else _strerror(cause)
    return text or type(exc).__name__


class _CountingStream(trio.abc.HalfCloseableStream):
    """A stream that remembers whether the peer sent anything (for the handshake's
    timeout message)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.received = 0

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def receive_some(self, max_bytes=None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_nbd_swap(host: str, port: int, export: str, swap_bytes: int,
                        timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple:
    """What nbd-client does before it hands the socket to the kernel: connect,
    negotiate the export, and check that it can be a swap device of ``swap_bytes``:
    big enough, writable, and taking 4096-byte requests (its NBD_INFO_BLOCK_SIZE
    minimum at most 4096, maximum at least 4096). Returns (raw socket, the
    handshake's stream, ExportInfo); raises SwapDeviceError with one line."""
    where = f"swap device nbd://{host}:{port}/{export}"
    try:
        with trio.fail_after(timeout):
            raw = await connect_raw(host, port)
    except trio.TooSlowError:
        raise SwapDeviceError(f"{where}: no answer to the connection within {timeout:g} s") from None
    except socket.gaierror as e:
        raise SwapDeviceError(f"{where}: cannot resolve {host!r}: {_why(e)}") from None
    except (ConnectionError, OSError) as e:
        why = os.strerror(e.errno).lower() if e.errno else str(e)
        raise SwapDeviceError(f"{where}: cannot connect to {host}:{port}: {why}") from None
    stream = _CountingStream(trio.SocketStream(trio.socket.from_stdlib_socket(raw)))
    try:
        with trio.fail_after(timeout):
            info = await nbd_handshake(stream, export)
    except trio.TooSlowError:
        raw.close()
        if not stream.received:
            raise SwapDeviceError(f"{where}: the server accepted the connection but sent no "
                                  f"NBD greeting within {timeout:g} s (not an NBD server?)") from None
        raise SwapDeviceError(f"{where}: the NBD handshake did not finish within "
                              f"{timeout:g} s") from None
    except NBDHandshakeError as e:
        raw.close()
        raise SwapDeviceError(f"{where}: {e}") from None
    except (OSError, trio.BrokenResourceError) as e:
        raw.close()
        raise SwapDeviceError(f"{where}: the connection failed during the handshake: {_why(e)}") from None
    problem = None
    if info.size < swap_bytes:
        problem = (f"the export is {info.size} bytes ({info.size / 2**20:g} MiB), smaller than "
                   f"swap.size_mib = {swap_bytes >> 20} MiB")
    elif info.read_only:
        problem = "the export is read-only"
    elif info.min_block > PAGE_SIZE:
        problem = (f"the export's minimum block size is {info.min_block} bytes; swap writes "
                   f"{PAGE_SIZE}-byte pages")
    elif 0 < info.max_block < PAGE_SIZE:
        problem = (f"the export's maximum block size is {info.max_block} bytes; swap writes "
                   f"{PAGE_SIZE}-byte pages")
    if problem:
        raw.close()
        raise SwapDeviceError(f"{where}: {problem}")
    return raw, stream.stream, info


def attach_nbd_device(k: Kernel, raw, stream, info, mss: int) -> NBDDevice:
    """NBD_SET_SOCK: the negotiated socket becomes the NBD driver's, the swap device."""
    sock = TcpSock(k, raw, "nbd0", mss)
    k.netdev.attach(sock)
    dev = NBDDevice(k, sock, info, mss)
    dev.stream = stream
    k.swap.bdev = dev
    return dev


async def attach_nbd_swap(k: Kernel, host: str, port: int, export: str, swap_bytes: int,
                          mss: int) -> tuple[NBDDevice, trio.SocketStream]:
    """What nbd-client does: connect, negotiate the export, hand the socket to the
    NBD driver (NBD_SET_SOCK), which becomes the swap device."""
    raw, stream, info = await open_nbd_swap(host, port, export, swap_bytes)
    dev = attach_nbd_device(k, raw, stream, info, mss)
    dev.peer = (host, port, export)
    return dev, stream


async def run_machine(cfg: Config, log_path: str | None = None, **kw) -> RunResult:
    return await Machine(cfg, log_path, **kw).run()


__all__ = ["EXIT_STATUS", "Machine", "RunResult", "SwapDeviceError", "open_nbd_swap",
           "run_machine"]
