"""The machine's log: JSON lines through structlog, and the event catalogue.

Models: nothing in the kernel; this is the emulator's /proc and dmesg: the
sink, its file and its configuration belong to the machine. The kernel's own
switch for debug messages is emulator/printk.py's ``debug_enabled``, which
``configure`` sets. Every
line is one JSON object with ``t`` (seconds since boot, trio clock), ``event``
and, where they apply, ``cpu``, ``pid``, ``comm``. The first line of a run is
``run_start`` and carries ``schema`` (SCHEMA_VERSION) and the full config; the
last is ``run_end``.

Event names are stable: analysis (emulator/analysis/) reads logs written by
this module, possibly on another machine, and refuses other schema versions.

Catalogue (level info unless noted):

=====================  =========================================================
run_start              schema, config (dict), machine (pages, watermarks, ...)
vmstat                 periodic snapshot: ``vm`` (all /proc/vmstat-named counters
                       plus the emulator's, see emulator/mm/vmstat.py), ``cpus``
                       (per-CPU stats), ``nr_throttled``, ``nbd_inflight``
slabinfo               periodic per-cache snapshot: caches
kswapd_wake            kswapd woke: order, free
kswapd_sleep           kswapd went to sleep: free
direct_reclaim_begin   debug: a task entered direct reclaim
direct_reclaim_end     debug: reclaimed, priority
throttle_begin         a direct reclaimer throttled (patch 15): pid, comm, free,
                       threshold
throttle_end           ... released: waited_s, timed_out
alloc_fail             debug: an allocation returned NULL
skb_drop               a segment lost: reason ("nomem": no RX buffer posted;
                       "pfmemalloc": sk_filter; "backlog": an owned socket's
                       backlog full; "rcvbuf": receive memory), sock, free,
                       consecutive (the peer's timeouts in a row), rto_s (until
                       its retransmission)
nbd_connect            export size and flags
nbd_request            debug: cookie, cmd, offset, length
nbd_reply              debug: cookie, error, latency_s
nbd_sender_stall       a send during which the sender entered direct reclaim:
                       cookie, stall_s, exposed_s (None: a reply was always due),
                       allocstall (direct reclaims during the send), high_order
                       (those of them for an order > 0 allocation), reclaimed
                       (pages the sender reclaimed in them), pgfree (pages
                       anyone freed meanwhile), freed_by (those pages by the
                       freeing task's comm; "-": outside any task),
                       pcp_drained (pages drain_all_pages moved from per-cpu
                       lists to the buddy lists meanwhile), pgalloc_below_min
                       (pages atomic callers took at or below min meanwhile),
                       free_before / free_after (free pages as the send began
                       and ended)
nbd_error              warning, rate-limited: a request ended with -EIO: cookie,
                       cmd ("read"/"write"), error (the NBD errno's name),
                       source ("server": an error reply; "driver": the driver
                       failed it itself), reason (driver: "no connection",
                       "send failed: ...", "queue cleared", ...)
nbd_connection_lost    error: the receiver's nbd_read_stat failed (reason,
                       inflight, queued); NBD_DO_IT then fails what is left
nbd_xmit_timeout       warning: a send outlived swap.timeout_s: pid, comm,
                       timeout_s, wchan, activity (where the sender was)
nbd_got_signal         warning: the sender found the signal after its send and
                       shut the socket down: pid, comm, signal
nbd_reconnecting       warning: nbd-client -persist cannot connect yet (it
                       retries every second): host, port, error
nbd_reconnect          nbd-client -persist connected again: host, port,
                       attempts, after_s
nbd_client_exit        error: nbd-client ended; the device has no connection
                       any more: reason
swap_write_error       warning, rate-limited: a swap write completed with an
                       error: pfn, entry, error
swap_read_error        warning, rate-limited: a swap read completed with an
                       error: pfn, entry, error
printk_suppressed      warning: "callbacks suppressed": message (the event),
                       suppressed (how many since it was last logged)
oom_kill               warning: victim (pid), comm, rss, swapents, trigger_pid,
                       trigger, order, free
sigbus                 warning: a swap-in failed, the faulting process gets
                       SIGBUS: pid, comm, vaddr, entry
integrity_error        error: data that came back wrong: what, pid, vaddr,
                       expected, found
process_exit           pid, comm, passes_done, reason ("completed"/"killed"),
                       signal (what killed it: "SIGKILL" for the OOM killer,
                       "SIGBUS"), freed
lockup                 error: the watchdog's diagnosis (emulator/diagnosis)
interrupted            warning: SIGINT or SIGTERM: signal
run_error              error: an exception in the emulator (error, traceback)
run_end                outcome, elapsed_s, integrity_errors, vm, cpus, time,
                       tasks, processes (total, completed, killed, killed_by:
                       oom_kill, sigbus), nbd_latency, nbd_sender, nbd (errors
                       by command and errno, failed by command, connections,
                       lost, reconnects, xmit_timeouts), throttle, suppressed
                       (rate-limited messages left out, by event), signal,
                       error (one line: why the run ended badly). A run whose
                       swap device could not be used has run_start (its
                       machine.export carries the error) and run_end (outcome
                       "swap_unusable", error) and nothing between them.
=====================  =========================================================

The NBD server is another host: its events (``nbd_server_*``, ``nbd_client_*``,
``nbd_accept_error``, ``nbd_backend_error``; docs/NBD.md) are not in the
machine's log. The embedded server, ``swapnbd serve`` in a child process
(userspace/nbd/process.py), logs its warnings and errors to a temporary file
that is quoted if it fails to start.
"""

from __future__ import annotations

import json
import logging
import os
import threading

import structlog
import trio

from emulator import printk

SCHEMA_VERSION = 1

EVENTS = (
    "run_start", "vmstat", "slabinfo", "kswapd_wake", "kswapd_sleep",
    "direct_reclaim_begin", "direct_reclaim_end", "throttle_begin", "throttle_end",
    "alloc_fail", "skb_drop", "nbd_connect", "nbd_request", "nbd_reply", "nbd_sender_stall",
    "nbd_error", "nbd_connection_lost", "nbd_xmit_timeout", "nbd_got_signal",
    "nbd_reconnecting", "nbd_reconnect", "nbd_client_exit",
    "swap_write_error", "swap_read_error", "printk_suppressed",
    "oom_kill", "sigbus", "integrity_error", "process_exit", "lockup", "interrupted",
    "run_error", "run_end",
)


class _Clock:
    """Adds ``t``: seconds since the machine booted, on the trio clock."""

    def __init__(self) -> None:
        self.boot: float | None = None

    def __call__(self, logger, method, event_dict):
        if self.boot is not None and "t" not in event_dict:
            try:
                event_dict["t"] = round(trio.current_time() - self.boot, 4)
            except RuntimeError:  # outside trio (e.g. the server thread's own loop)
                pass
        return event_dict


clock = _Clock()


class JsonLinesFile:
    """The run log: one JSON object per line, written whole with one write() and
    flushed at every line, so a killed run leaves a readable (if incomplete) log.

    A write that fails (ENOSPC, EIO, EFBIG) cuts the file back to its last whole
    line (ftruncate) and calls ``on_error`` once (the machine then stops the run
    with outcome "log_error"); later lines are dropped, except one last try for
    the line after ``final()`` (the run's ``run_end``)."""

    def __init__(self, path: str | os.PathLike | None, on_error=None) -> None:
        self.path = path
        self._fd: int | None = (os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                                if path else None)
        self.lines = 0
        self.size = 0  #: bytes of whole lines written
        self.error: OSError | None = None
        self.on_error = on_error
        self._final = False

    def write(self, line: str) -> None:
        self.lines += 1
        if self._fd is None or (self.error is not None and not self._final):
            return
        self._final = False
        data = (line + "\n").encode("utf-8")
        try:
            n = os.write(self._fd, data)
            while n < len(data):  # a short write: the rest, or the error that stopped it
                n += os.write(self._fd, data[n:])
        except OSError as e:
            self._cut()
            if self.error is None:
                self.error = e
                if self.on_error is not None:
                    self.on_error(e)
            return
        self.size += len(data)

    def _cut(self) -> None:
        """Back to the last whole line."""
        try:
            os.ftruncate(self._fd, self.size)
            os.lseek(self._fd, self.size, os.SEEK_SET)
        except OSError:
            pass  # a device that cannot be truncated (/dev/full): nothing more to do

    def final(self) -> None:
        """The next line gets one more try even after an error (the run's last)."""
        self._final = True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Sink:
    """The structlog processor that routes rendered lines to the current run's file
    and to in-memory observers (the pytest ``machine`` fixture reads events there)."""

    def __init__(self) -> None:
        self.files: list[JsonLinesFile] = []
        self.observers: list = []
        self.level = logging.INFO
        self.owner = threading.get_ident()

    def __call__(self, logger, method, event_dict):
        if threading.get_ident() != self.owner:
            # Another OS thread (the embedded NBD server is a separate host):
            # its events do not belong in the machine's log.
            raise structlog.DropEvent
        level = logging.getLevelName(method.upper()) if isinstance(method, str) else logging.INFO
        if isinstance(level, int) and level < self.level:
            raise structlog.DropEvent
        event_dict.pop("level", None)
        for obs in self.observers:
            obs(event_dict)
        if self.files:
            line = json.dumps(event_dict, default=_default, separators=(",", ":"))
            for f in self.files:
                f.write(line)
        raise structlog.DropEvent


def _default(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "value"):
        return o.value
    return str(o)


sink = _Sink()


_configured = False


def configure(debug: bool = False) -> None:
    """Route every structlog logger through the JSON-lines sink (idempotent)."""
    global _configured
    sink.level = logging.DEBUG if debug else logging.INFO
    printk.set_debug(debug)
    sink.owner = threading.get_ident()
    if _configured:
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            clock,
            sink,
        ],
        wrapper_class=structlog.BoundLogger,
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    _configured = True
