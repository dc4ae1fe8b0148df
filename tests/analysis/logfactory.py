"""Synthetic, schema-correct swapnbd run logs for the analysis tests and benchmark.

What it does: ``iter_run(...)`` yields the events of a made-up run (run_start,
periodic vmstat samples with monotonic counters, kswapd/throttle/drop/OOM events,
optionally debug events, a lockup, run_end whose counters equal the last
snapshot's), lazily, so a million-line log never sits in memory.
``write_log`` writes events as JSON lines and can splice corrupt lines in.

Counterpart: emulator/logs.py writes the real thing; this mimics its format as
the analysis brief documents it (schema 1). Simplified: the numbers are
plausible, not emulated: free pages follow a fixed curve, counters grow by
pseudo-random increments from a seeded RNG.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

WMARK = {"min": 181, "low": 226, "high": 271}
THRESHOLD = 90
NR_PAGES = 8192

COUNTERS = (
    "pgpgin", "pgpgout", "pswpin", "pswpout", "pgfault", "pgmajfault", "pgalloc_normal",
    "pgfree", "pgactivate", "pgdeactivate", "pgrefill_normal", "pgscan_kswapd_normal",
    "pgscan_direct_normal", "pgsteal_kswapd_normal", "pgsteal_direct_normal",
    "pgscan_direct_throttle", "allocstall", "pageoutrun", "pgrotated",
    "kswapd_low_wmark_hit_quickly", "kswapd_high_wmark_hit_quickly", "oom_kill",
    "nr_vmscan_write", "pgalloc_pfmemalloc", "alloc_fail", "slab_pfmemalloc_refused",
    "slab_alloc_pfmemalloc", "skb_alloc", "skb_alloc_pfmemalloc", "skb_drop_nomem",
    "skb_drop_pfmemalloc", "tcp_retransmit_timeouts", "nbd_requests", "nbd_replies",
    "nbd_errors", "mempool_wait", "integrity_errors", "slabs_scanned", "pginodesteal",
    "kswapd_skip_congestion_wait",
)


def run_start(kernel: str = "swapnbd", slab: str = "slub", cpus: int = 2) -> dict[str, Any]:
    return {
        "event": "run_start", "t": 0.0, "schema": 1,
        "config": {
            "machine": {"cpus": cpus, "memory_mib": 32, "min_free_kbytes": None, "slab": slab},
            "kernel": {"patches": {"name": kernel,
                                   "applied": list(range(1, 17)) if kernel == "swapnbd" else []}},
            "swap": {"size_mib": 128},
            "workload": {"kind": "anon-mmap-write", "processes_per_cpu": 2,
                         "size_ratio": 2.0, "passes": 2},
            "run": {"timeout_s": 60}, "time": {"hz_scale": 1.0}, "network": {"netload": True},
        },
        "machine": {"nr_pages": NR_PAGES, "cpus": cpus, "min_free_kbytes": 724,
                    "wmark": dict(WMARK), "throttle_threshold": THRESHOLD,
                    "swap_pages": 32768, "kernel": kernel, "slab": slab},
    }


class _State:
    def __init__(self, rng: random.Random, cpus: int) -> None:
        self.rng = rng
        self.c = dict.fromkeys(COUNTERS, 0)
        self.free = NR_PAGES - 600
        self.pfm = 0
        self.skb_rx = 0
        self.skb_tx = 0
        self.inflight = 0
        self.throttled = 0
        self.swap_used = 0
        self.cpus = [{"cpu": i, "user": 0.0, "sys": 0.0, "softirq": 0.0, "idle": 0.0,
                      "iowait": 0.0, "nr_switches": 0, "nr_running": 1} for i in range(cpus)]

    def vm(self) -> dict[str, Any]:
        c = self.c
        vm: dict[str, Any] = dict(c)
        vm.update({
            "nr_free_pages": self.free, "nr_inactive_anon": 3000, "nr_active_anon": 3500,
            "nr_anon_pages": 6500, "nr_writeback": self.inflight, "nr_swapcache": 40,
            "nr_slab_unreclaimable": 300,
            "pgscan_kswapd": c["pgscan_kswapd_normal"], "pgscan_direct": c["pgscan_direct_normal"],
            "pgsteal_kswapd": c["pgsteal_kswapd_normal"],
            "pgsteal_direct": c["pgsteal_direct_normal"],
            "nr_pfmemalloc_pages": self.pfm, "skb_rx_queued": self.skb_rx,
            "skb_tx_queued": self.skb_tx, "net_bytes_in_flight": 4096 * self.inflight,
            "nbd_inflight": self.inflight, "throttle_active": int(self.throttled > 0),
            "swap_used_pages": self.swap_used, "swap_total_pages": 32768,
        })
        return vm


def iter_run(*, kernel: str = "swapnbd", slab: str = "slub", samples: int = 40,
             interval: float = 0.25, seed: int = 0, outcome: str = "completed",
             debug: bool = False, with_run_end: bool = True, cpus: int = 2,
             extra_every: int = 0) -> Iterator[dict[str, Any]]:
    """Yield one synthetic run's events.

    ``outcome="lockup"``: pressure collapses in the last quarter (free pages under
    min, drops, throttling), then a ``lockup`` event precedes ``run_end``.
    ``extra_every=n`` adds an unknown event (and unknown keys) every n samples.
    """
    rng = random.Random(seed)
    st = _State(rng, cpus)
    c = st.c
    yield run_start(kernel, slab, cpus)
    yield {"event": "nbd_connect", "t": 0.01, "size": 134217728, "flags": 3, "export": ""}
    throttle_events = 0
    throttle_total = 0.0
    open_throttles: list[tuple[int, float]] = []
    latencies: list[float] = []
    kswapd_awake = False
    locking = outcome == "lockup"
    t = 0.0
    cookie = 0
    pid_base = 100
    for i in range(samples):
        t = round((i + 1) * interval, 4)
        phase = i / max(1, samples - 1)
        # free pages: fall from ~7600 to the watermarks, then hover (or collapse).
        if phase < 0.3:
            st.free = int(NR_PAGES - 600 - phase / 0.3 * (NR_PAGES - 900))
        elif locking and phase > 0.75:
            st.free = max(3, int(st.free * 0.6))
        else:
            st.free = int(WMARK["low"] + rng.randint(-80, 80))
            if rng.random() < 0.15:  # a dip under the throttle threshold
                st.free = rng.randint(40, THRESHOLD - 1)
        pressure = st.free < WMARK["high"]
        if pressure and not kswapd_awake:
            kswapd_awake = True
            yield {"event": "kswapd_wake", "t": t, "order": 0, "free": st.free,
                   "pid": 2, "comm": "kswapd0", "cpu": 0}
        if pressure:
            scan = rng.randint(200, 400)
            steal = int(scan * rng.uniform(0.6, 0.95))
            c["pgscan_kswapd_normal"] += scan
            c["pgsteal_kswapd_normal"] += steal
            c["pageoutrun"] += 1
            c["pswpout"] += steal
            c["pgpgout"] += steal * 4
            c["nr_vmscan_write"] += steal
            st.swap_used += steal
            swapin = rng.randint(0, steal // 2)
            c["pswpin"] += swapin
            c["pgpgin"] += swapin * 4
            c["pgmajfault"] += swapin
            st.inflight = rng.randint(1, 16)
            c["nbd_requests"] += steal // 8 + swapin // 8 + 1
            c["nbd_replies"] = c["nbd_requests"] - st.inflight
            if st.free < WMARK["min"] + 40:
                dscan = rng.randint(30, 120)
                c["pgscan_direct_normal"] += dscan
                c["pgsteal_direct_normal"] += int(dscan * rng.uniform(0.2, 0.7))
                c["allocstall"] += rng.randint(1, 4)
                if debug:
                    yield {"event": "direct_reclaim_begin", "t": t - 0.01, "pid": pid_base,
                           "comm": "usemem"}
                    yield {"event": "direct_reclaim_end", "t": t - 0.005, "pid": pid_base,
                           "comm": "usemem", "reclaimed": 12, "priority": 11}
            if st.free < THRESHOLD and kernel == "swapnbd":
                pid = pid_base + len(open_throttles)
                c["pgscan_direct_throttle"] += 1
                throttle_events += 1
                open_throttles.append((pid, t))
                yield {"event": "throttle_begin", "t": t, "pid": pid, "comm": "usemem",
                       "free": st.free, "threshold": THRESHOLD}
            elif open_throttles and not locking:
                pid, t0 = open_throttles.pop(0)
                waited = round(t - t0, 4)
                throttle_total += waited
                yield {"event": "throttle_end", "t": t, "pid": pid, "comm": "usemem",
                       "waited_s": waited, "timed_out": False}
            st.throttled = len(open_throttles)
            st.pfm = rng.randint(0, 30) if st.free < WMARK["min"] else max(0, st.pfm - 10)
            st.skb_rx = rng.randint(0, 40)
            st.skb_tx = rng.randint(0, 20)
            if st.free < WMARK["min"]:
                reason = "pfmemalloc" if kernel == "swapnbd" else "nomem"
                n = rng.randint(1, 3)
                c[f"skb_drop_{reason}"] += n
                c["tcp_retransmit_timeouts"] += 1
                for _ in range(n):
                    yield {"event": "skb_drop", "t": t, "reason": reason, "sock": "netload-0",
                           "cpu": 1}
            if debug:
                for _ in range(3):
                    cookie += 1
                    lat = round(rng.uniform(0.001, 0.02), 5)
                    latencies.append(lat)
                    yield {"event": "nbd_request", "t": t, "cookie": cookie, "cmd": "write",
                           "offset": 4096 * cookie, "length": 4096}
                    yield {"event": "nbd_reply", "t": t, "cookie": cookie, "error": 0,
                           "latency_s": lat}
        else:
            st.inflight = 0
        c["pgfault"] += rng.randint(500, 900)
        c["pgalloc_normal"] += rng.randint(500, 900)
        c["pgfree"] += rng.randint(400, 800)
        c["pgalloc_pfmemalloc"] += st.pfm
        c["skb_alloc"] += st.skb_rx + st.skb_tx
        for cpu in st.cpus:
            cpu["user"] = round(cpu["user"] + interval * 0.3, 4)
            cpu["sys"] = round(cpu["sys"] + interval * 0.5, 4)
            cpu["softirq"] = round(cpu["softirq"] + interval * 0.05, 4)
            cpu["idle"] = round(cpu["idle"] + interval * 0.15, 4)
            cpu["nr_switches"] += 10
        ev: dict[str, Any] = {
            "event": "vmstat", "t": t, "vm": st.vm(),
            "cpus": [dict(x) for x in st.cpus],
            "nr_throttled": st.throttled, "nbd_inflight": st.inflight,
        }
        if extra_every and i % extra_every == 0:
            ev["future_key"] = {"x": 1}
            yield {"event": "some_future_event", "t": t, "payload": [1, 2, 3]}
        yield ev
    if locking:
        t = round(t + 1.0, 4)
        victim = pid_base + 1
        c["oom_kill"] += 1
        yield {"event": "oom_kill", "t": t - 0.5, "victim": victim, "comm": "usemem",
               "rss": 1200, "swapents": 300}
        yield {"event": "process_exit", "t": t - 0.5, "pid": victim, "comm": "usemem",
               "passes_done": 0, "reason": "killed"}
        yield {"event": "lockup", "t": t,
               "diagnosis": {"free": st.free, "wmark": dict(WMARK), "atomic_floor": 45,
                             "owners": {"skb": 120, "slab": 40},
                             "tasks": [{"pid": 101, "comm": "usemem", "wchan": "throttle_direct_reclaim",
                                        "waiting_s": 12.0}],
                             "nbd": {"inflight": [{"cookie": 7, "cmd": "write", "age_s": 11.5}]},
                             "net": {"rx_dropped": 42}},
               "text": "LOCKUP: no progress for 10.0 s\n"
                       "free pages 3 < min watermark 181; NBD replies cannot be received:\n"
                       "  every skb allocation fails (reserves held by [netload] sockets)\n"
                       "  4 tasks blocked in throttle_direct_reclaim"}
    else:
        for p in range(cpus * 2):
            yield {"event": "process_exit", "t": t, "pid": pid_base + p, "comm": "usemem",
                   "passes_done": 2, "reason": "completed"}
    if not with_run_end:
        return
    elapsed = round(t + 0.05, 4)
    lat_sorted = sorted(latencies)
    run_end = {
        "event": "run_end", "t": elapsed, "outcome": outcome, "elapsed_s": elapsed,
        "integrity_errors": c["integrity_errors"], "vm": st.vm(),
        "cpus": [dict(x) for x in st.cpus],
        "time": {"user_s": round(sum(x["user"] for x in st.cpus), 4),
                 "sys_s": round(sum(x["sys"] for x in st.cpus), 4),
                 "softirq_s": round(sum(x["softirq"] for x in st.cpus), 4),
                 "idle_s": round(sum(x["idle"] for x in st.cpus), 4),
                 "iowait_s": 0.0},
        "processes": {"total": cpus * 2, "completed": 0 if locking else cpus * 2,
                      "killed": 1 if locking else 0},
        "nbd_latency": {"count": c["nbd_replies"],
                        "p50_s": lat_sorted[len(lat_sorted) // 2] if lat_sorted else 0.004,
                        "p99_s": lat_sorted[-1] if lat_sorted else 0.015,
                        "max_s": lat_sorted[-1] if lat_sorted else 0.02},
        "throttle": {"events": throttle_events, "total_s": round(throttle_total, 4)},
    }
    yield run_end


CORRUPT_LINES = (
    '{"event":"vmstat","t":3.0,"vm":{"nr_free_pa',       # truncated mid-write
    "\x00\x00\x00garbage\x00",                            # binary junk
    '["not", "an", "object"]',                            # JSON, not an object
    '{"t": 1.0, "vm": {}}',                               # no event name
    '{"event": "vmstat", "t": "soon"}',                   # t not a number
    "not json at all",
)


def write_log(path: str | Path, events: Iterable[dict[str, Any]], *,
              corrupt_every: int = 0, truncate_last: bool = False) -> Path:
    """Write ``events`` as JSON lines. ``corrupt_every=n`` inserts one of
    CORRUPT_LINES after every n-th line (never before run_start);
    ``truncate_last`` cuts the final line in half (a killed writer)."""
    path = Path(path)
    last: str | None = None
    k = 0
    with open(path, "w", encoding="utf-8") as fh:
        for n, ev in enumerate(events, 1):
            if last is not None:
                fh.write(last + "\n")
            last = json.dumps(ev, separators=(",", ":"))
            if corrupt_every and n > 1 and n % corrupt_every == 0:
                fh.write(last + "\n")
                last = CORRUPT_LINES[k % len(CORRUPT_LINES)]
                k += 1
        if last is not None:
            fh.write(last[: len(last) // 2] if truncate_last else last + "\n")
    return path


def count_corrupt(n_events: int, corrupt_every: int) -> int:
    """How many corrupt lines write_log inserts for n_events events."""
    return sum(1 for n in range(2, n_events + 1) if n % corrupt_every == 0)
