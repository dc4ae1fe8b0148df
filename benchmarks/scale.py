"""How the emulator scales with memory: wall time, peak RSS, and the swap path's speed.

For each memory size, one pass of a seed config (swapnbd-slub by default) runs
as its own ``swapnbd run`` process against an NBD server that is another
process (``swapnbd serve`` by default, or nbdkit's memory plugin), so that the
swapped data is not counted as emulator memory. Then, against a fresh server,
the bare rate of 4 KiB NBD WRITE+READ round trips from a plain trio client at
the queue depth the run's swap path had (benchmarks/nbd_roundtrip.py). Prints
one row per size and:

- the RSS slope per emulated page frame (least squares of peak RSS over
  frames), the emulator's memory cost per page it emulates;
- the swap-path ratio: emulated swap pages/s (pswpin + pswpout per second of
  wall time) over the bare round trips/s at the same queue depth.

    python benchmarks/scale.py [--sizes 48,96,192,384] [--config configs/swapnbd-slub.toml]
                               [--server serve|nbdkit] [--seconds 3] [--json]

Not part of the test run: the figures depend on the machine and its load.
Run it on a quiet machine (the project's helpers use ``flock -x``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbd_roundtrip import roundtrip_rate  # noqa: E402

PAGES_PER_MIB = 256


class Server:
    """An NBD server in its own process, on a loopback port chosen by the system."""

    def __init__(self, kind: str, size_mib: int) -> None:
        self.kind = kind
        self.size_mib = size_mib
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> Server:
        if self.kind == "serve":
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "emulator.cli", "serve", "--port", "0",
                 "--export", f"swap={self.size_mib}M", "--log-level", "warning"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
            line = self.proc.stdout.readline()
            m = re.search(r"nbd://\S+", line)
            if not m:
                raise RuntimeError(f"swapnbd serve did not say where it listens: {line!r}")
            self.url = m.group(0) + "swap" if m.group(0).endswith("/") else m.group(0)
        else:
            if not shutil.which("nbdkit"):
                raise SystemExit("nbdkit is not installed (apt-get install nbdkit)")
            # Socket activation: we bind port 0 and hand nbdkit the listening socket as fd 3.
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(16)
            port = lsock.getsockname()[1]
            fd = lsock.fileno()
            self.proc = subprocess.Popen(
                ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec nbdkit -f memory "$0"',
                 f"{self.size_mib}M"],
                # close_fds runs after preexec_fn: keep fd 3 too, which dup2 made ours.
                pass_fds=[fd, 3], preexec_fn=lambda: os.dup2(fd, 3),
                stderr=subprocess.DEVNULL)
            lsock.close()
            self.url = f"nbd://127.0.0.1:{port}/swap"
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_once(config: str, memory_mib: int, server: str, extra: list[str]) -> dict:
    """One pass at ``memory_mib``: wall time, peak RSS (the run's own process), swap
    counters and the mean NBD queue depth, from the run's log."""
    swap_mib = 4 * memory_mib + 16
    with Server(server, swap_mib) as srv, tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "run.jsonl"
        sets = [f"machine.memory_mib={memory_mib}", "workload.passes=1",
                f"swap.size_mib={swap_mib}", f"machine.page_cache_mib={memory_mib // 8}",
                f"swap.server={srv.url}", *extra]
        cmd = [sys.executable, "-m", "emulator.cli", "run", config, "--quiet", "--log", str(log)]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        end, inflight = {}, []
        for line in log.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("event") == "vmstat" and ev["vm"].get("pswpout"):
                inflight.append(ev.get("nbd_inflight", 0))
            elif ev.get("event") == "run_end":
                end = ev
    vm = end.get("vm", {})
    return {"memory_mib": memory_mib, "frames": memory_mib * PAGES_PER_MIB,
            "outcome": end.get("outcome"), "exit_status": os.waitstatus_to_exitcode(status),
            "wall_s": round(wall, 2), "elapsed_s": end.get("elapsed_s"),
            "peak_rss_kib": usage.ru_maxrss,
            "swap_pages": vm.get("pswpin", 0) + vm.get("pswpout", 0),
            "queue_depth": max(1, round(sum(inflight) / len(inflight))) if inflight else 1}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else math.nan


async def floor_rate(server: str, seconds: float, qd: int) -> float:
    with Server(server, 256) as srv:
        with trio.fail_after(30):
            while True:  # until the server accepts connections
                try:
                    return await roundtrip_rate(srv.url, seconds, qd)
                except OSError:
                    await trio.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="48,96,192,384", help="memory sizes in MiB")
    ap.add_argument("--config", default="configs/swapnbd-slub.toml")
    ap.add_argument("--server", choices=("serve", "nbdkit"), default="serve")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="an extra override for every run (repeatable)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per floor measurement")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rows = []
    for mib in [int(s) for s in args.sizes.split(",")]:
        row = run_once(args.config, mib, args.server, args.overrides)
        floor = trio.run(floor_rate, args.server, args.seconds, row["queue_depth"])
        row["swap_pages_s"] = round(row["swap_pages"] / row["wall_s"], 1)
        row["floor_rt_s"] = round(floor, 1)
        row["ratio"] = round(row["swap_pages_s"] / floor, 3) if floor else None
        rows.append(row)
        if not args.json:
            print(f"{mib:5d} MiB  {row['outcome']:9s}  wall {row['wall_s']:7.1f} s  "
                  f"peak RSS {row['peak_rss_kib'] / 1024:7.1f} MiB  "
                  f"swap {row['swap_pages_s']:8.0f} pages/s  QD {row['queue_depth']:3d}  "
                  f"floor {floor:8.0f}/s  ratio {row['ratio']}", flush=True)
    rss_slope = slope([r["frames"] for r in rows], [r["peak_rss_kib"] * 1024 for r in rows])
    ratios = sorted(r["ratio"] for r in rows if r["ratio"] is not None)
    summary = {"config": args.config, "server": args.server, "rows": rows,
               "rss_bytes_per_frame": round(rss_slope, 1),
               "swap_path_ratio_median": ratios[len(ratios) // 2] if ratios else None}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"RSS slope: {summary['rss_bytes_per_frame']} bytes per emulated page frame")
        print(f"swap path: {summary['swap_path_ratio_median']} of the bare NBD round-trip "
              f"rate (median over sizes)")
    return 0 if all(r["outcome"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
