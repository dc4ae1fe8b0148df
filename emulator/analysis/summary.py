"""One pass over a run log -> a RunSummary: outcome, MMTests-style rows, timeline.

What it does: ``summarize(path)`` streams the log once (emulator/analysis/reader.py)
and keeps only running figures (first/last ``vm`` snapshot, peaks, first
occurrences, counts), so memory does not grow with the log's length. The rows
are computed from a *before* and an *after* ``/proc/vmstat``-named snapshot,
exactly as MMTests computes its vmstat block from the dumps it takes before and
after a test.

MMTests counterparts (2012, mmtests 0.04 era):

- ``subreport/mmtests-duration``: "Sys Time Running Test (seconds)",
  "User+Sys Time Running Test (seconds)", "Total Elapsed Time (seconds)" from the
  ``time ::`` line. Here from ``run_end.time`` (user_s, sys_s) and
  ``run_end.elapsed_s``. "User Time Running Test (seconds)" is added (current
  MMTests prints it as "Duration User").
- ``bin/lib/MMTests/MonitorVmstat.pm`` (commit 20ca429f): every vmstat row as
  ``after - before``, the zone sums, the efficiency/velocity/percentage formulas
  and their print formats (``%d`` counts, ``%d%%`` percentages, ``%.3f``
  velocities) are reproduced in ``vmstat_rows``. Rows the model has no counter
  for (THP, compaction) are omitted; rows whose counter is absent from the log
  (e.g. ``nr_vmscan_immediate_reclaim``) are ``None`` (printed "-"), not 0.
- "Major Faults", "Minor Faults", "Allocation stalls": rows of current MMTests
  (``MonitorMmtestsvmstat.pm``), same delta rule.

Not MMTests (swapnbd's own rows, see docs/ANALYSIS.md): "Direct reclaim
throttled" (Δpgscan_direct_throttle; MMTests never had this row), skb drops by
reason, pfmemalloc pages peak, throttle events/time, NBD requests and latency,
OOM kills, integrity errors, swap/process figures.

Simplified / chosen where MMTests defines nothing:

- *before* is the ``vm`` of ``run_start`` if the log has one, otherwise zero for
  every counter: the machine boots at t=0 and its counters are cumulative since
  boot, so boot is the "before" dump (``baseline="first-sample"`` uses the first
  ``vmstat`` sample instead). *after* is ``run_end.vm``, or for an incomplete
  log (no ``run_end``) the last ``vmstat`` sample.
- elapsed for an incomplete log is the ``t`` of its last valid event; user/sys
  time is then the sum over CPUs of the last sample's cumulative ``user``/``sys``.
- Timeline "first ..." entries use the exact event when the log has it (some are
  debug-level), unless the first ``vmstat`` sample whose counter moved past
  *before* is earlier (or there is no event): then the sample's time, an upper
  bound, marked "(sampled)".
"""

from __future__ import annotations

import array
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .reader import LogReader, run_name

ZONES = ("dma", "dma32", "normal", "movable", "high")

# Row kinds -> MMTests print formats.
INT, PCT, VEL, SEC, MS, TEXT = "int", "pct", "vel", "sec", "ms", "text"


@dataclass(frozen=True)
class Row:
    label: str
    kind: str
    origin: str  # "mmtests-2012", "mmtests-current" or "swapnbd"
    definition: str


DURATION_ROWS = (
    Row("User Time Running Test (seconds)", SEC, "mmtests-current",
        "run_end.time.user_s (MMTests: %U of /usr/bin/time; current 'Duration User')"),
    Row("Sys Time Running Test (seconds)", SEC, "mmtests-2012", "run_end.time.sys_s (%S)"),
    Row("User+Sys Time Running Test (seconds)", SEC, "mmtests-2012", "user_s + sys_s (%U + %S)"),
    Row("Total Elapsed Time (seconds)", SEC, "mmtests-2012", "run_end.elapsed_s (%e)"),
)

VMSTAT_ROWS = (
    Row("Page Ins", INT, "mmtests-2012", "Δpgpgin"),
    Row("Page Outs", INT, "mmtests-2012", "Δpgpgout"),
    Row("Swap Ins", INT, "mmtests-2012", "Δpswpin"),
    Row("Swap Outs", INT, "mmtests-2012", "Δpswpout"),
    Row("Direct pages scanned", INT, "mmtests-2012",
        "Σ Δpgscan_direct_<zone> (Δpgscan_direct when the log has no zone names)"),
    Row("Kswapd pages scanned", INT, "mmtests-2012",
        "Σ Δpgscan_kswapd_<zone> (Δpgscan_kswapd when the log has no zone names)"),
    Row("Kswapd pages reclaimed", INT, "mmtests-2012",
        "Δkswapd_steal + Σ Δpgsteal_kswapd_<zone> (Δpgsteal_kswapd when no zone names)"),
    Row("Direct pages reclaimed", INT, "mmtests-2012",
        "Σ Δpgsteal_<zone> + Σ Δpgsteal_direct_<zone> (- kswapd reclaimed if kswapd_steal "
        "exists; Δpgsteal_direct when no zone names)"),
    Row("Kswapd efficiency", PCT, "mmtests-2012",
        "kswapd reclaimed*100/kswapd scanned; 100 if nothing scanned; printed %d%%"),
    Row("Kswapd velocity", VEL, "mmtests-2012", "kswapd scanned / elapsed seconds"),
    Row("Direct efficiency", PCT, "mmtests-2012",
        "direct reclaimed*100/direct scanned; 100 if nothing scanned; printed %d%%"),
    Row("Direct velocity", VEL, "mmtests-2012", "direct scanned / elapsed seconds"),
    Row("Percentage direct scans", PCT, "mmtests-2012",
        "direct scanned*100/(kswapd scanned + direct scanned); 0 if none"),
    Row("Page writes by reclaim", INT, "mmtests-2012", "Δnr_vmscan_write"),
    Row("Page writes file", INT, "mmtests-2012", "Δnr_vmscan_write - Δpswpout"),
    Row("Page writes anon", INT, "mmtests-2012", "Δpswpout"),
    Row("Page reclaim immediate", INT, "mmtests-2012",
        "Δnr_vmscan_immediate_reclaim ('-' when the log has no such counter)"),
    Row("Slabs scanned", INT, "mmtests-2012", "Δslabs_scanned"),
    Row("Direct inode steals", INT, "mmtests-2012", "Δpginodesteal"),
    Row("Kswapd skipped wait", INT, "mmtests-2012", "Δkswapd_skip_congestion_wait"),
    Row("Major Faults", INT, "mmtests-current", "Δpgmajfault"),
    Row("Minor Faults", INT, "mmtests-current", "Δpgfault - Δpgmajfault"),
    Row("Allocation stalls", INT, "mmtests-current", "Δallocstall (+ Σ Δallocstall_<zone>)"),
)

EMULATOR_ROWS = (
    Row("Direct reclaim throttled", INT, "swapnbd",
        "Δpgscan_direct_throttle (patch 16/16's counter; not an MMTests row)"),
    Row("Throttle events", INT, "swapnbd",
        "run_end.throttle.events, else the number of throttle_begin events"),
    Row("Throttled time (seconds)", SEC, "swapnbd",
        "run_end.throttle.total_s, else Σ throttle_end.waited_s"),
    Row("Throttled tasks peak", INT, "swapnbd", "max of vmstat.nr_throttled over samples"),
    Row("Skb drops nomem", INT, "swapnbd",
        "Δskb_drop_nomem (no RX buffer posted), else the number of skb_drop events "
        "with reason nomem"),
    Row("Skb drops pfmemalloc", INT, "swapnbd",
        "Δskb_drop_pfmemalloc, else the number of skb_drop events with reason pfmemalloc"),
    Row("Pfmemalloc pages peak", INT, "swapnbd",
        "max of nr_pfmemalloc_pages over samples and run_end"),
    Row("Pfmemalloc page allocations", INT, "swapnbd", "Δpgalloc_pfmemalloc"),
    Row("Atomic page allocations below min", INT, "swapnbd",
        "Δpgalloc_below_min: pages atomic/__GFP_HIGH callers took at or below the min watermark"),
    Row("Slab pfmemalloc refused", INT, "swapnbd", "Δslab_pfmemalloc_refused"),
    Row("TCP retransmit timeouts", INT, "swapnbd", "Δtcp_retransmit_timeouts"),
    Row("TCP backlog drops", INT, "swapnbd", "Δtcp_backlog_drop (TCPBacklogDrop)"),
    Row("TCP backlogged segments", INT, "swapnbd",
        "Δtcp_backlog_queued: segments that arrived while their socket was owned"),
    Row("TCP delayed ACKs locked", INT, "swapnbd",
        "Δdelayed_ack_locked (DelayedACKLocked): the ACK timer found the socket owned"),
    Row("TCP ACK allocation failures", INT, "swapnbd", "Δtcp_ack_nomem"),
    Row("NIC RX refill failures", INT, "swapnbd", "Δalloc_rx_buff_failed (e1000)"),
    Row("NBD requests", INT, "swapnbd", "Δnbd_requests, else run_end.nbd_latency.count"),
    Row("NBD errors", INT, "swapnbd", "Δnbd_errors"),
    Row("NBD in flight peak", INT, "swapnbd", "max of vmstat.nbd_inflight over samples"),
    Row("NBD sender stalls", INT, "swapnbd",
        "Δnbd_sender_reclaim: sends during which the sender entered direct reclaim"),
    Row("NBD sender stalls exposed", INT, "swapnbd",
        "Δnbd_sender_reclaim_exposed: stalls with a time of no request awaiting a reply"),
    Row("NBD sender near misses", INT, "swapnbd",
        "Δnbd_sender_near_miss: exposed stalls in which the sender's own reclaim freed nothing"),
    Row("NBD sender longest exposure (ms)", MS, "swapnbd",
        "run_end.nbd_sender.longest_exposed_s*1000 (an exposure that never ended is a lockup)"),
    Row("NBD latency p50 (ms)", MS, "swapnbd",
        "run_end.nbd_latency.p50_s*1000, else nearest-rank p50 of nbd_reply.latency_s"),
    Row("NBD latency p99 (ms)", MS, "swapnbd", "as p50, 99th percentile"),
    Row("NBD latency max (ms)", MS, "swapnbd", "as p50, maximum"),
    Row("Swap used peak (pages)", INT, "swapnbd", "max of swap_used_pages over samples"),
    Row("NBD read errors", INT, "swapnbd",
        "Δnbd_read_errors: reads that ended with -EIO (an error reply, or failed by the driver)"),
    Row("NBD write errors", INT, "swapnbd",
        "Δnbd_write_errors: writes that ended with -EIO (an error reply, or failed by the driver)"),
    Row("NBD errors by command/errno", TEXT, "swapnbd",
        "run_end.nbd: error replies by command and NBD errno, then the requests the driver "
        "failed itself (no connection), by command; '-' when there were none"),
    Row("NBD connections lost", INT, "swapnbd",
        "Δnbd_connection_lost, else the number of nbd_connection_lost events"),
    Row("NBD reconnects", INT, "swapnbd", "Δnbd_reconnects (swap.persist)"),
    Row("NBD xmit timeouts", INT, "swapnbd", "Δnbd_xmit_timeouts (swap.timeout_s)"),
    Row("OOM kills", INT, "swapnbd", "Δoom_kill, else the number of oom_kill events"),
    Row("Integrity errors", INT, "swapnbd",
        "data that came back wrong: run_end.integrity_errors, else vm integrity_errors, "
        "else integrity_error events"),
    Row("Processes completed", INT, "swapnbd",
        "run_end.processes.completed, else process_exit events with reason completed"),
    Row("Processes killed", INT, "swapnbd",
        "run_end.processes.killed, else process_exit events with reason killed"),
    Row("Processes killed by the OOM killer", INT, "swapnbd",
        "run_end.processes.killed_by.oom_kill, else process_exit events with signal SIGKILL"),
    Row("Processes killed by SIGBUS", INT, "swapnbd",
        "run_end.processes.killed_by.sigbus (a swap-in failed), else Δsigbus_kill, else "
        "process_exit events with signal SIGBUS"),
    Row("Kernel messages suppressed", INT, "swapnbd",
        "Σ run_end.suppressed (printk_ratelimited), else Σ printk_suppressed.suppressed"),
)

ALL_ROWS = {r.label: r for r in DURATION_ROWS + VMSTAT_ROWS + EMULATOR_ROWS}


def format_value(kind: str, value: Any) -> str:
    """MMTests' print formats: %d counts, %d%% percentages, %.3f velocities."""
    if value is None:
        return "-"
    if kind == TEXT:
        return str(value)
    if kind == PCT:
        return f"{int(value)}%"  # Perl's %d truncates toward zero
    if kind == VEL:
        return f"{value:.3f}"
    if kind in (SEC, MS):
        return f"{value:.2f}"
    return f"{int(value)}"


# ---------------------------------------------------------------------------
# Row computations (pure functions of two snapshots; unit-tested directly)

def _num(x: Any) -> float | int | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return x


def delta(before: dict, after: dict, key: str) -> int | float | None:
    """after[key] - before[key]; None when the log never had the counter."""
    a = _num(after.get(key))
    if a is None:
        return None
    return a - (_num(before.get(key)) or 0)


def _zone_sum(before: dict, after: dict, prefix: str, fallback: str | None) -> int | float | None:
    keys = [f"{prefix}_{z}" for z in ZONES if f"{prefix}_{z}" in after]
    if keys:
        return sum(delta(before, after, k) or 0 for k in keys)
    return delta(before, after, fallback) if fallback else None


def vmstat_rows(before: dict, after: dict, elapsed: float | None) -> dict[str, Any]:
    """The vmstat block: MonitorVmstat.pm's arithmetic on before/after snapshots."""
    d = lambda k: delta(before, after, k)  # noqa: E731

    direct_scan = _zone_sum(before, after, "pgscan_direct", "pgscan_direct")
    kswapd_scan = _zone_sum(before, after, "pgscan_kswapd", "pgscan_kswapd")

    # kswapd steal: kswapd_steal (<= 3.3) plus the per-zone pgsteal_kswapd_*.
    ks_old = d("kswapd_steal")
    ks_zone = _zone_sum(before, after, "pgsteal_kswapd", "pgsteal_kswapd")
    kswapd_steal = None if ks_old is None and ks_zone is None else (ks_old or 0) + (ks_zone or 0)
    # direct steal: pgsteal_<zone> (<= 3.3, includes kswapd's) + pgsteal_direct_<zone>.
    ds_old = _zone_sum(before, after, "pgsteal", None)
    ds_zone = _zone_sum(before, after, "pgsteal_direct", "pgsteal_direct")
    if ds_old is None and ds_zone is None:
        direct_steal = None
    else:
        direct_steal = (ds_old or 0) + (ds_zone or 0)
        if ks_old is not None:
            direct_steal -= kswapd_steal or 0

    def eff(steal, scan):
        if scan is None:
            return None
        return steal * 100 / scan if scan else 100

    def vel(scan):
        if scan is None or not elapsed:
            return None
        return scan / elapsed

    if direct_scan is None and kswapd_scan is None:
        pct_direct = None
    else:
        total = (direct_scan or 0) + (kswapd_scan or 0)
        pct_direct = (direct_scan or 0) * 100 / total if total else 0

    vmscan_write = d("nr_vmscan_write")
    pswpout = d("pswpout")
    pgfault, pgmajfault = d("pgfault"), d("pgmajfault")
    stall = d("allocstall")
    stall_zones = [k for k in (f"allocstall_{z}" for z in ZONES) if k in after]
    if stall_zones:
        stall = (stall or 0) + sum(d(k) or 0 for k in stall_zones)

    return {
        "Page Ins": d("pgpgin"),
        "Page Outs": d("pgpgout"),
        "Swap Ins": d("pswpin"),
        "Swap Outs": pswpout,
        "Direct pages scanned": direct_scan,
        "Kswapd pages scanned": kswapd_scan,
        "Kswapd pages reclaimed": kswapd_steal,
        "Direct pages reclaimed": direct_steal,
        "Kswapd efficiency": eff(kswapd_steal or 0, kswapd_scan),
        "Kswapd velocity": vel(kswapd_scan),
        "Direct efficiency": eff(direct_steal or 0, direct_scan),
        "Direct velocity": vel(direct_scan),
        "Percentage direct scans": pct_direct,
        "Page writes by reclaim": vmscan_write,
        "Page writes file": (None if vmscan_write is None
                             else vmscan_write - (pswpout or 0)),
        "Page writes anon": pswpout,
        "Page reclaim immediate": d("nr_vmscan_immediate_reclaim"),
        "Slabs scanned": d("slabs_scanned"),
        "Direct inode steals": d("pginodesteal"),
        "Kswapd skipped wait": d("kswapd_skip_congestion_wait"),
        "Major Faults": pgmajfault,
        "Minor Faults": None if pgfault is None else pgfault - (pgmajfault or 0),
        "Allocation stalls": stall,
    }


def nbd_errors_text(nbd: dict | None) -> str | None:
    """run_end.nbd as 'write EIO 120; failed by the driver: read 3' (None: no errors)."""
    if not nbd:
        return None
    parts = []
    errors = nbd.get("errors")
    if isinstance(errors, dict):
        parts += [f"{cmd} {e} {n}" for cmd, by in sorted(errors.items()) if isinstance(by, dict)
                  for e, n in sorted(by.items())]
    failed = nbd.get("failed")
    if isinstance(failed, dict) and any(failed.values()):
        parts.append("failed by the driver: " + ", ".join(
            f"{cmd} {n}" for cmd, n in sorted(failed.items()) if n))
    return "; ".join(parts) or None


def percentile(sorted_values: list[float] | array.array, p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of an already sorted sequence."""
    n = len(sorted_values)
    if not n:
        return None
    k = max(1, -(-p * n // 100))  # ceil(p*n/100), at least rank 1
    return sorted_values[int(min(k, n)) - 1]


# ---------------------------------------------------------------------------
# The single pass

@dataclass
class TimelineEntry:
    t: float
    what: str
    detail: str = ""
    sampled: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"t": self.t, "what": self.what, "detail": self.detail, "sampled": self.sampled}


@dataclass
class RunSummary:
    path: str
    name: str
    machine: dict[str, Any]
    config: dict[str, Any]
    outcome: str  # run_end.outcome, or "incomplete"
    complete: bool
    lines: int
    skipped: int
    samples: int
    elapsed: float | None
    duration: dict[str, Any]
    vmstat: dict[str, Any]
    emulator: dict[str, Any]
    timeline: list[TimelineEntry]
    lockup: dict[str, Any] | None
    events: dict[str, int] = field(default_factory=dict)
    baseline: str = "boot"
    error: str | None = None  #: run_end.error: why the run ended badly (one line)
    signal: str | None = None  #: run_end.signal: the signal that interrupted it

    def rows(self) -> dict[str, Any]:
        return {**self.duration, **self.vmstat, **self.emulator}

    def as_dict(self) -> dict[str, Any]:
        return {
            "log": self.path, "name": self.name, "schema": 1,
            "outcome": self.outcome, "complete": self.complete,
            "lines": self.lines, "lines_skipped": self.skipped, "samples": self.samples,
            "elapsed_s": self.elapsed, "baseline": self.baseline,
            "machine": self.machine,
            "duration": self.duration, "vmstat": self.vmstat, "emulator": self.emulator,
            "timeline": [e.as_dict() for e in self.timeline],
            "lockup": self.lockup, "events": self.events,
            "error": self.error, "signal": self.signal,
        }


# Sample-derived "first" detection: (timeline label, counters any of which moving means it).
_SAMPLED_FIRSTS = (
    ("first kswapd wake", ("pageoutrun", "pgscan_kswapd", "pgscan_kswapd_normal")),
    ("first swap out", ("pswpout",)),
    ("first direct reclaim", ("allocstall",)),
    ("first throttle", ("pgscan_direct_throttle",)),
    ("first skb drop", ("skb_drop_nomem", "skb_drop_pfmemalloc")),
    ("first NBD error", ("nbd_errors",)),
    ("first connection lost", ("nbd_connection_lost",)),
    ("first OOM kill", ("oom_kill",)),
    ("first SIGBUS", ("sigbus_kill",)),
    ("first integrity error", ("integrity_errors",)),
)
_TIMELINE_ORDER = [label for label, _ in _SAMPLED_FIRSTS] + ["interrupted"]

_RESERVOIR = 1_000_000  # nbd_reply latencies kept (reservoir-sampled beyond this)


class _Pass:
    """Running state for one streaming pass (kept small on purpose)."""

    def __init__(self, reader: LogReader, baseline: str) -> None:
        self.reader = reader
        self.baseline = baseline
        start_vm = reader.run_start.get("vm")
        self.before: dict | None = start_vm if isinstance(start_vm, dict) else None
        if self.before is None and baseline == "boot":
            self.before = {}
        self.first_vm: dict | None = None
        self.last_vm: dict | None = None
        self.last_cpus: list | None = None
        self.samples = 0
        self.last_t = 0.0
        self.counts: Counter[str] = Counter()
        self.peak: dict[str, float] = {}
        self.first_event: dict[str, TimelineEntry] = {}
        self.first_sample: dict[str, TimelineEntry] = {}
        self.pending = list(_SAMPLED_FIRSTS)
        self.drops: Counter[str] = Counter()
        self.throttle_waited = 0.0
        self.exits: Counter[str] = Counter()
        self.exit_signals: Counter[str] = Counter()
        self.suppressed = 0
        self.latencies: array.array = array.array("d")
        self.latency_seen = 0
        self.latency_max = 0.0
        self._rng = random.Random(0)
        self.lockup: dict[str, Any] | None = None
        self.handlers = {
            "vmstat": self.on_vmstat,
            "kswapd_wake": self.on_first("first kswapd wake", ("order", "free")),
            "direct_reclaim_begin": self.on_first("first direct reclaim", ("pid", "comm")),
            "throttle_begin": self.on_first("first throttle", ("pid", "comm", "free", "threshold")),
            "throttle_end": self.on_throttle_end,
            "skb_drop": self.on_skb_drop,
            "oom_kill": self.on_first("first OOM kill", ("victim", "comm", "rss", "swapents")),
            "nbd_error": self.on_first("first NBD error", ("cmd", "error", "source", "reason")),
            "nbd_connection_lost": self.on_first("first connection lost", ("reason",)),
            "sigbus": self.on_first("first SIGBUS", ("pid", "comm", "vaddr")),
            "printk_suppressed": self.on_suppressed,
            "interrupted": self.on_first("interrupted", ("signal",)),
            "integrity_error": self.on_first("first integrity error", ("pid", "vaddr", "what")),
            "process_exit": self.on_process_exit,
            "nbd_reply": self.on_nbd_reply,
            "lockup": self.on_lockup,
        }

    # -- handlers --------------------------------------------------------------
    def feed(self, ev: dict) -> None:
        name = ev["event"]
        self.counts[name] += 1
        t = ev["t"]
        if t > self.last_t:
            self.last_t = t
        h = self.handlers.get(name)
        if h is not None:
            h(ev)

    def _peak(self, key: str, value: Any) -> None:
        v = _num(value)
        if v is not None and v > self.peak.get(key, float("-inf")):
            self.peak[key] = v

    def on_vmstat(self, ev: dict) -> None:
        vm = ev.get("vm")
        if not isinstance(vm, dict):
            return
        self.samples += 1
        if self.first_vm is None:
            self.first_vm = vm
            if self.before is None:  # baseline == "first-sample"
                self.before = vm
        self.last_vm = vm
        cpus = ev.get("cpus")
        if isinstance(cpus, list):
            self.last_cpus = cpus
        for key in ("nr_pfmemalloc_pages", "swap_used_pages", "nbd_inflight"):
            if key in vm:
                self._peak(key, vm[key])
        self._peak("nbd_inflight", ev.get("nbd_inflight"))
        self._peak("nr_throttled", ev.get("nr_throttled"))
        if self.pending:
            before = self.before or {}
            still = []
            for label, keys in self.pending:
                for k in keys:
                    v = _num(vm.get(k))
                    if v is not None and v > (_num(before.get(k)) or 0):
                        self.first_sample[label] = TimelineEntry(
                            ev["t"], label, f"{k} = {v:g}", sampled=True)
                        break
                else:
                    still.append((label, keys))
            self.pending = still

    def on_first(self, label: str, keys: tuple[str, ...]):
        def handler(ev: dict) -> None:
            if label not in self.first_event:
                detail = ", ".join(f"{k}={ev[k]}" for k in keys if k in ev)
                self.first_event[label] = TimelineEntry(ev["t"], label, detail)
        return handler

    def on_throttle_end(self, ev: dict) -> None:
        w = _num(ev.get("waited_s"))
        if w is not None:
            self.throttle_waited += w

    def on_skb_drop(self, ev: dict) -> None:
        reason = ev.get("reason")
        self.drops[str(reason)] += 1
        if "first skb drop" not in self.first_event:
            self.first_event["first skb drop"] = TimelineEntry(
                ev["t"], "first skb drop", f"reason={reason}, sock={ev.get('sock')}")

    def on_process_exit(self, ev: dict) -> None:
        self.exits[str(ev.get("reason"))] += 1
        if ev.get("signal"):
            self.exit_signals[str(ev.get("signal"))] += 1

    def on_suppressed(self, ev: dict) -> None:
        n = _num(ev.get("suppressed"))
        if n:
            self.suppressed += int(n)

    def on_nbd_reply(self, ev: dict) -> None:
        lat = _num(ev.get("latency_s"))
        if lat is None:
            return
        self.latency_seen += 1
        if lat > self.latency_max:
            self.latency_max = lat
        if len(self.latencies) < _RESERVOIR:
            self.latencies.append(lat)
        else:
            j = self._rng.randrange(self.latency_seen)
            if j < _RESERVOIR:
                self.latencies[j] = lat

    def on_lockup(self, ev: dict) -> None:
        if self.lockup is None:
            diag = ev.get("diagnosis")
            text = ev.get("text")
            self.lockup = {"t": ev["t"], "text": text if isinstance(text, str) else "",
                           "diagnosis": diag if isinstance(diag, dict) else {}}

    # -- result ----------------------------------------------------------------
    def result(self) -> RunSummary:
        r = self.reader
        end = r.run_end
        complete = end is not None
        before = self.before or {}
        after: dict = {}
        if complete and isinstance(end.get("vm"), dict):
            after = end["vm"]
        elif self.last_vm is not None:
            after = self.last_vm
        if complete:
            for key in ("nr_pfmemalloc_pages", "swap_used_pages", "nbd_inflight"):
                if key in after:
                    self._peak(key, after[key])

        elapsed = _num(end.get("elapsed_s")) if complete else None
        if elapsed is None:
            elapsed = self.last_t if (complete or self.samples) else None

        # duration block
        user = sys_ = None
        tm = end.get("time") if complete else None
        if isinstance(tm, dict):
            user, sys_ = _num(tm.get("user_s")), _num(tm.get("sys_s"))
        if user is None and sys_ is None:
            cpus = (end.get("cpus") if complete else None) or self.last_cpus
            if isinstance(cpus, list) and cpus:
                user = sum(_num(c.get("user")) or 0 for c in cpus if isinstance(c, dict))
                sys_ = sum(_num(c.get("sys")) or 0 for c in cpus if isinstance(c, dict))
        duration = {
            "User Time Running Test (seconds)": user,
            "Sys Time Running Test (seconds)": sys_,
            "User+Sys Time Running Test (seconds)": (
                None if user is None and sys_ is None else (user or 0) + (sys_ or 0)),
            "Total Elapsed Time (seconds)": elapsed,
        }

        vm = vmstat_rows(before, after, elapsed)
        d = lambda k: delta(before, after, k)  # noqa: E731

        def or_count(value, count_key: str):
            if value is not None:
                return value
            return self.counts.get(count_key) if count_key in self.counts else None

        thr = end.get("throttle") if complete else None
        thr = thr if isinstance(thr, dict) else {}
        throttle_events = _num(thr.get("events"))
        if throttle_events is None and "throttle_begin" in self.counts:
            throttle_events = self.counts["throttle_begin"]
        throttle_s = _num(thr.get("total_s"))
        if throttle_s is None and "throttle_end" in self.counts:
            throttle_s = self.throttle_waited

        lat = end.get("nbd_latency") if complete else None
        lat = lat if isinstance(lat, dict) else {}
        sender = end.get("nbd_sender") if complete else None
        sender = sender if isinstance(sender, dict) else {}
        p50, p99, pmax = (_num(lat.get(k)) for k in ("p50_s", "p99_s", "max_s"))
        if p50 is None and self.latencies:
            s = sorted(self.latencies)
            p50, p99, pmax = percentile(s, 50), percentile(s, 99), self.latency_max
        ms = lambda x: None if x is None else x * 1000.0  # noqa: E731

        nbd_requests = d("nbd_requests")
        if nbd_requests is None:
            nbd_requests = _num(lat.get("count"))

        integrity = _num(end.get("integrity_errors")) if complete else None
        if integrity is None:
            integrity = _num(after.get("integrity_errors"))
        if integrity is None and "integrity_error" in self.counts:
            integrity = self.counts["integrity_error"]

        procs = end.get("processes") if complete else None
        procs = procs if isinstance(procs, dict) else {}
        done = _num(procs.get("completed"))
        killed = _num(procs.get("killed"))
        if done is None and "process_exit" in self.counts:
            done = self.exits.get("completed", 0)
        if killed is None and "process_exit" in self.counts:
            killed = self.exits.get("killed", 0)

        by = procs.get("killed_by")
        by = by if isinstance(by, dict) else {}
        killed_oom = _num(by.get("oom_kill"))
        killed_bus = _num(by.get("sigbus"))
        if killed_bus is None:
            killed_bus = d("sigbus_kill")
        if killed_oom is None and "process_exit" in self.counts:
            killed_oom = self.exit_signals.get("SIGKILL", 0)
        if killed_bus is None and "process_exit" in self.counts:
            killed_bus = self.exit_signals.get("SIGBUS", 0)
        nbd = end.get("nbd") if complete else None
        nbd = nbd if isinstance(nbd, dict) else None
        sup = end.get("suppressed") if complete else None
        suppressed = (sum(v for v in sup.values() if isinstance(v, int))
                      if isinstance(sup, dict) else None)
        if suppressed is None and "printk_suppressed" in self.counts:
            suppressed = self.suppressed

        drop_nomem = d("skb_drop_nomem")
        drop_pfm = d("skb_drop_pfmemalloc")
        if drop_nomem is None and "skb_drop" in self.counts:
            drop_nomem = self.drops.get("nomem", 0)
        if drop_pfm is None and "skb_drop" in self.counts:
            drop_pfm = self.drops.get("pfmemalloc", 0)

        emulator = {
            "Direct reclaim throttled": d("pgscan_direct_throttle"),
            "Throttle events": throttle_events,
            "Throttled time (seconds)": throttle_s,
            "Throttled tasks peak": self.peak.get("nr_throttled"),
            "Skb drops nomem": drop_nomem,
            "Skb drops pfmemalloc": drop_pfm,
            "Pfmemalloc pages peak": self.peak.get("nr_pfmemalloc_pages"),
            "Pfmemalloc page allocations": d("pgalloc_pfmemalloc"),
            "Atomic page allocations below min": d("pgalloc_below_min"),
            "Slab pfmemalloc refused": d("slab_pfmemalloc_refused"),
            "TCP retransmit timeouts": d("tcp_retransmit_timeouts"),
            "TCP backlog drops": d("tcp_backlog_drop"),
            "TCP backlogged segments": d("tcp_backlog_queued"),
            "TCP delayed ACKs locked": d("delayed_ack_locked"),
            "TCP ACK allocation failures": d("tcp_ack_nomem"),
            "NIC RX refill failures": d("alloc_rx_buff_failed"),
            "NBD requests": nbd_requests,
            "NBD errors": d("nbd_errors"),
            "NBD in flight peak": self.peak.get("nbd_inflight"),
            "NBD sender stalls": d("nbd_sender_reclaim"),
            "NBD sender stalls exposed": d("nbd_sender_reclaim_exposed"),
            "NBD sender near misses": d("nbd_sender_near_miss"),
            "NBD sender longest exposure (ms)": ms(_num(sender.get("longest_exposed_s"))),
            "NBD latency p50 (ms)": ms(p50),
            "NBD latency p99 (ms)": ms(p99),
            "NBD latency max (ms)": ms(pmax),
            "Swap used peak (pages)": self.peak.get("swap_used_pages"),
            "NBD read errors": d("nbd_read_errors"),
            "NBD write errors": d("nbd_write_errors"),
            "NBD errors by command/errno": nbd_errors_text(nbd),
            "NBD connections lost": or_count(d("nbd_connection_lost"), "nbd_connection_lost"),
            "NBD reconnects": d("nbd_reconnects"),
            "NBD xmit timeouts": d("nbd_xmit_timeouts"),
            "OOM kills": or_count(d("oom_kill"), "oom_kill"),
            "Integrity errors": integrity,
            "Processes completed": done,
            "Processes killed": killed,
            "Processes killed by the OOM killer": killed_oom,
            "Processes killed by SIGBUS": killed_bus,
            "Kernel messages suppressed": suppressed,
        }

        timeline: list[TimelineEntry] = []
        for label in _TIMELINE_ORDER:
            # The exact event, unless a sample shows the counter moved earlier
            # (e.g. a wake that was not logged): then the sample's time, an upper bound.
            cands = [x for x in (self.first_event.get(label), self.first_sample.get(label))
                     if x is not None]
            if cands:
                timeline.append(min(cands, key=lambda x: (x.t, x.sampled)))
        if self.lockup is not None:
            first_line = (self.lockup["text"].strip().splitlines() or [""])[0]
            timeline.append(TimelineEntry(self.lockup["t"], "lockup", first_line))
        if complete:
            timeline.append(TimelineEntry(end["t"], "run end", f"outcome={end.get('outcome')}"))
        else:
            timeline.append(TimelineEntry(self.last_t, "log ends (no run_end)", "incomplete"))
        timeline.sort(key=lambda e: e.t)

        outcome = str(end.get("outcome", "unknown")) if complete else "incomplete"
        return RunSummary(
            path=r.path, name=run_name(r.machine, r.config), machine=r.machine,
            config=r.config, outcome=outcome, complete=complete, lines=r.lines,
            skipped=r.skipped, samples=self.samples, elapsed=elapsed,
            duration=duration, vmstat=vm, emulator=emulator, timeline=timeline,
            lockup=self.lockup, events=dict(self.counts), baseline=self.baseline,
            error=end.get("error") if complete and isinstance(end.get("error"), str) else None,
            signal=end.get("signal") if complete and isinstance(end.get("signal"), str) else None)


def summarize(path: str, *, baseline: str = "boot") -> RunSummary:
    """Stream the log at ``path`` once and summarise it. Raises LogError for a
    file that is not a readable log of this schema version."""
    if baseline not in ("boot", "first-sample"):
        raise ValueError(f"baseline must be 'boot' or 'first-sample', not {baseline!r}")
    reader = LogReader(path)
    p = _Pass(reader, baseline)
    feed = p.feed
    for ev in reader.events():
        feed(ev)
    return p.result()
