"""What the NBD server's busy poll costs and buys: server CPU and IOPS with
``--busy-poll-us 0`` against ``--busy-poll-us N``.

Starts two ``swapnbd serve`` processes (memory backend, 256 MiB, filled with
random data by nbdcopy) that differ only in ``--busy-poll-us``, then measures
each in turn, ``--reps`` times, back to back:

* idle: one client connected (libnbd) and doing nothing for ``--idle`` seconds;
* 4 KiB randread / randwrite at QD1 as fast as fio goes (fio's nbd engine);
* 4 KiB randread at QD1 paced at ``--rate`` requests/s (a client with think
  time between requests, as the emulated machine's swap traffic is).

For each: IOPS, and the server's CPU time (user + system of all its threads,
from ``/proc/PID/stat``) per second and per request.

    python benchmarks/nbd_busy_poll.py [--busy-poll-us 50] [--seconds 3] [--reps 3]

This is a report, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd_iops import SIZE, free_port, prefill, wait_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def fio(uri: str, rw: str, seconds: float, tmp: str, rate: int | None) -> float:
    out = os.path.join(tmp, "fio.json")
    cmd = [
        "fio", "--name=bp", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k", "--iodepth=1",
        f"--size={SIZE}", "--time_based", f"--runtime={seconds}", "--norandommap",
        "--output-format=json", f"--output={out}",
    ]  # fmt: skip
    if rate:
        cmd.append(f"--rate_iops={rate}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return side["total_ios"], side["iops"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busy-poll-us", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    scenarios = ["idle", "randread QD1", "randwrite QD1", f"randread QD1 at {args.rate}/s"]
    variants = [0, args.busy_poll_us]
    # results[variant][scenario] = list of (requests, fio's IOPS, seconds, server CPU seconds);
    # the window (seconds) includes fio's start and connection.
    results = {v: {s: [] for s in scenarios} for v in variants}
    procs = {}
    with tempfile.TemporaryDirectory(prefix="nbd-bp-") as tmp:
        try:
            uris = {}
            for v in variants:
                port = free_port()
                procs[v] = subprocess.Popen(
                    [sys.executable, "-m", "userspace.nbd.serve", "--port", str(port), "--size", str(SIZE),
                     "--busy-poll-us", str(v), "--log-level", "warning"],
                    stdout=subprocess.DEVNULL, env=env,
                )  # fmt: skip
                wait_port(port)
                uris[v] = f"nbd://127.0.0.1:{port}/"
                prefill(uris[v], tmp)
            for rep in range(args.reps):
                for scenario in scenarios:
                    for v in variants:
                        pid = procs[v].pid
                        c0, t0 = cpu_seconds(pid), time.monotonic()
                        if scenario == "idle":
                            # libnbd's Python module (python3-libnbd) lives in Debian's python3.
                            script = (
                                f"import nbd, time; h = nbd.NBD(); h.connect_uri({uris[v]!r}); "
                                f"time.sleep({args.idle})"
                            )
                            subprocess.run(["/usr/bin/python3", "-c", script], check=True)
                            n, iops = 0, 0.0
                        else:
                            rw = scenario.split()[0]
                            n, iops = fio(
                                uris[v], rw, args.seconds, tmp, args.rate if "/s" in scenario else None
                            )
                        c1, t1 = cpu_seconds(pid), time.monotonic()
                        results[v][scenario].append((n, iops, t1 - t0, c1 - c0))
                        print(
                            f"rep {rep + 1} {scenario:<24} busy-poll {v:>4} us: {iops:9.0f} IOPS, "
                            f"server CPU {100 * (c1 - c0) / (t1 - t0):5.1f} %",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(10)
    print(f"server CPU = user + system time of the server process over each window; median of {args.reps}")
    print()
    print(
        "| scenario | busy poll (µs) | IOPS (fio) | server CPU (% of one core) "
        "| server CPU per request (µs) |"
    )
    print("|---|---:|---:|---:|---:|")
    for scenario in scenarios:
        for v in variants:
            runs = results[v][scenario]
            rate = statistics.median(r[1] for r in runs)
            cpu = statistics.median(100 * c / t for _, _, t, c in runs)
            per = statistics.median(1e6 * c / n for n, _, _, c in runs) if runs[0][0] else float("nan")
            per_s = "—" if per != per else f"{per:.1f}"
            print(f"| {scenario} | {v} | {rate:,.0f} | {cpu:.1f} | {per_s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
