"""Terminal output for ``swapnbd run``: the live progress line and the summary.

Not a kernel mechanism: presentation only. The progress line (rich) shows
elapsed time, free pages against the watermarks, swap traffic, direct-reclaim
stalls, throttled tasks and NBD requests in flight, refreshed from the
machine's counters; the summary is printed once the run has ended.
"""

from __future__ import annotations

import signal

import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from emulator.config import Config
from emulator.machine import Machine, RunResult


def _progress_line(m: Machine, start: float) -> Text:
    k = m.k
    if k is None:
        return Text("booting...")
    vm = k.vmstat
    z = k.pgdat.zone
    done = sum(p.passes_done for p in m.processes)
    total = len(m.processes) * m.cfg.workload.passes
    return Text(
        f"{trio.current_time() - start:7.1f}s  free {z.nr_free_pages:6d} "
        f"(min {z.watermark[0]} low {z.watermark[1]} high {z.watermark[2]})  "
        f"pswpout {vm['pswpout']:7d}  pswpin {vm['pswpin']:7d}  allocstall {vm['allocstall']:6d}  "
        f"throttled {len(k.vmscan.throttled):3d}  nbd inflight {vm['nbd_inflight']:3d}  "
        f"drops {vm['skb_drop_nomem'] + vm['skb_drop_pfmemalloc']:5d}  passes {done}/{total}")


async def run_with_progress(m: Machine, progress: bool) -> RunResult:
    """Run ``m``, with the live progress line on stderr when ``progress``."""
    if not progress:
        return await m.run()
    console = Console(stderr=True)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        with Live(Text("booting..."), console=console, refresh_per_second=4, transient=True) as live:
            async def refresh() -> None:
                while True:
                    live.update(_progress_line(m, start))
                    await trio.sleep(0.25)
            nursery.start_soon(refresh)
            result = await m.run()
            nursery.cancel_scope.cancel()
    return result


SUMMARY_ROWS = [
    ("pswpin", "pswpin"), ("pswpout", "pswpout"), ("pgmajfault", "pgmajfault"),
    ("pgscan_kswapd", "pgscan_kswapd"), ("pgscan_direct", "pgscan_direct"),
    ("pgsteal_kswapd", "pgsteal_kswapd"), ("pgsteal_direct", "pgsteal_direct"),
    ("allocstall", "allocstall"), ("pgscan_direct_throttle", "pgscan_direct_throttle"),
    ("skb_drop_nomem", "skb_drop_nomem"), ("skb_drop_pfmemalloc", "skb_drop_pfmemalloc"),
    ("oom_kill", "oom_kill"),
]


def print_run_summary(cfg: Config, r: RunResult, console: Console | None = None) -> None:
    console = console or Console()
    label = {"completed": "[green]completed[/]", "lockup": "[red]LOCKED UP[/]",
             "failed": "[red]FAILED[/]", "timeout": "[yellow]timeout[/]",
             "stopped": "[yellow]stopped[/]", "error": "[red]internal error[/]",
             "interrupted": "[yellow]interrupted[/]",
             "swap_unusable": "[red]swap device unusable[/]",
             "log_error": "[red]log not writable[/]"}[r.outcome]
    if r.outcome == "interrupted" and r.signal:
        label += f" ({signal.Signals(r.signal).name})"
    console.print(f"{cfg.kernel.patches.name}-{cfg.machine.slab}: {label} after "
                  f"{r.elapsed_s:.1f} s  (exit status {r.exit_status})")
    if r.error:
        console.print(f"error: {r.error}", highlight=False, markup=False)
    for line in fault_lines(r.processes, r.nbd):
        console.print(line, highlight=False, markup=False)
    if r.diagnosis:
        console.print(r.diagnosis["text"], highlight=False, markup=False)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(justify="left")
    t.add_column(justify="right")
    if r.time:
        t.add_row("User s", f"{r.time['user_s']:.2f}")
        t.add_row("System s", f"{r.time['sys_s']:.2f}")
        t.add_row("Softirq s", f"{r.time['softirq_s']:.2f}")
    for label_, key in SUMMARY_ROWS:
        if key in r.vm:
            t.add_row(label_, str(r.vm[key]))
    t.add_row("integrity errors (data wrong)", str(r.integrity_errors))
    if r.processes:
        t.add_row("processes completed", f"{r.processes['completed']}/{r.processes['total']}")
        by = r.processes.get("killed_by") or {}
        t.add_row("processes killed by the OOM killer", str(by.get("oom_kill", 0)))
        t.add_row("processes killed by SIGBUS", str(by.get("sigbus", 0)))
    if r.nbd_latency and r.nbd_latency["count"]:
        t.add_row("NBD latency p50/p99/max ms",
                  f"{r.nbd_latency['p50_s'] * 1e3:.2f} / {r.nbd_latency['p99_s'] * 1e3:.2f} / "
                  f"{r.nbd_latency['max_s'] * 1e3:.1f}")
    if r.nbd_sender:
        t.add_row("NBD sender stalls", sender_stalls_text(r.nbd_sender))
    console.print(t)
    if r.log_path:
        console.print(f"log: {r.log_path}")


def nbd_errors_text(nbd: dict | None) -> str | None:
    """'write EIO 120, read EIO 2 (error replies); write 43, read 1 failed by the
    driver', or None when there were none."""
    if not nbd:
        return None
    parts = []
    replies = ", ".join(f"{cmd} {errno_name} {n}" for cmd, by in sorted(nbd.get("errors", {}).items())
                        for errno_name, n in sorted(by.items()))
    if replies:
        parts.append(f"{replies} (error replies from the server)")
    failed = ", ".join(f"{cmd} {n}" for cmd, n in sorted(nbd.get("failed", {}).items()) if n)
    if failed:
        parts.append(f"{failed} (failed by the driver: no connection)")
    return "; ".join(parts) or None


def fault_lines(processes: dict | None, nbd: dict | None) -> list[str]:
    """What went wrong with the swap device and the processes, one line each: NBD
    errors by command and errno, each connection lost (and reconnects, timeouts),
    processes killed by the OOM killer and by SIGBUS."""
    lines = []
    text = nbd_errors_text(nbd)
    if text:
        lines.append(f"NBD errors: {text}")
    for lost in (nbd or {}).get("lost", []):
        lines.append(f"NBD connection lost at {lost['t']:.1f} s: {lost['reason']}")
    if nbd and nbd.get("xmit_timeouts"):
        lines.append(f"NBD xmit timeouts: {nbd['xmit_timeouts']} (the send was killed and "
                     "the socket shut down)")
    if nbd and nbd.get("reconnects"):
        lines.append(f"NBD reconnected {nbd['reconnects']} time(s) (swap.persist)")
    by = (processes or {}).get("killed_by") or {}
    if by.get("oom_kill"):
        lines.append(f"Processes killed by the OOM killer: {by['oom_kill']}")
    if by.get("sigbus"):
        lines.append(f"Processes killed by SIGBUS (a swap-in failed): {by['sigbus']}")
    return lines


def sender_stalls_text(s: dict) -> str:
    """'N (M exposed, K near misses), max X / Y ms': N sends stalled in reclaim,
    M of them with nothing in flight for a while, K of those with nothing
    reclaimed by the sender itself; the longest stall and the longest exposure
    (see drivers/block/nbd.py)."""
    if not s["stalls"]:
        return "0"
    return (f"{s['stalls']} ({s['exposed']} exposed, {s['near_misses']} near misses), "
            f"max {s['longest_s'] * 1e3:.0f} / {s['longest_exposed_s'] * 1e3:.0f} ms")
