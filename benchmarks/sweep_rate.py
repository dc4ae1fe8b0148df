"""Sweep throughput: runs per hour of the same grid with 1 and with 2 workers,
and how each cell's P(lockup) moves between them.

Runs ``swapnbd sweep`` (a real process, a LocalCluster) once per worker count,
each into a fresh directory so nothing resumes, and times the whole command
(cluster start and shutdown included). Prints one markdown table per worker
count (runs, wall time, runs per hour, mean load average at run start) and one
of P(lockup) with its 95% Wilson interval per cell and worker count.

The default grid: configs/quick.toml, vanilla kernel, one pass over a 16 MiB
machine, lockups detected after 5 s, page cache 0, 2 and 4 MiB, seeds 1-40
(120 runs per worker count; about 25 minutes in all on 2 cores). With no page
cache vanilla always locks up; with a little, its outcome is a race, and the
timing of a run depends on what else shares the cores.

    flock -x /work/locks/quiet python benchmarks/sweep_rate.py [--seeds 1-40] [--workers 1,2]

Not part of the test run: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulator.analysis.outcomes import read_rows, summarize_cells  # noqa: E402

OVERRIDES = ["kernel.patches=vanilla", "workload.passes=1", "machine.memory_mib=16",
             "run.lockup_timeout_s=5"]
GRID = ["machine.page_cache_mib=0,2,4"]


def sweep(out: Path, workers: int, seeds: str) -> float:
    argv = [sys.executable, "-m", "emulator.cli", "sweep", str(ROOT / "configs" / "quick.toml"),
            "--out", str(out), "--seeds", seeds, "--workers", str(workers)]
    for o in OVERRIDES:
        argv += ["--set", o]
    for g in GRID:
        argv += ["--grid", g]
    t0 = time.monotonic()
    done = subprocess.run(argv, check=False, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    if done.returncode not in (0, 1):
        sys.exit(f"sweep with {workers} workers: exit status {done.returncode}\n{done.stderr}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1-40")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="sweep-rate-") as tmp:
        for n in (int(x) for x in args.workers.split(",")):
            out = Path(tmp) / f"w{n}"
            wall = sweep(out, n, args.seeds)
            results[n] = (wall, read_rows(out))
            print(f"{n} worker(s): {len(results[n][1])} runs in {wall:.0f} s", file=sys.stderr)
    print("| workers | runs | wall s | runs/hour | mean load (1 min) at run start |")
    print("|---|---|---|---|---|")
    for n, (wall, rows) in results.items():
        load = statistics.mean(r["load_1m"] for r in rows if r.get("load_1m") is not None)
        print(f"| {n} | {len(rows)} | {wall:.0f} | {len(rows) / wall * 3600:.0f} | {load:.2f} |")
    print()
    print("| cell | workers | runs | lockups | P(lockup) [95% CI] | elapsed s median (range) |")
    print("|---|---|---|---|---|---|")
    cells = {n: {c.cell: c for c in summarize_cells(rows)} for n, (_, rows) in results.items()}
    for name in sorted(next(iter(cells.values())), key=lambda x: [len(x), x]):
        for n, by_name in cells.items():
            c = by_name[name]
            lo, hi = c.interval or (0.0, 1.0)
            p = "-" if c.p_lockup is None else f"{c.p_lockup:.2f} [{lo:.2f}, {hi:.2f}]"
            el = "-" if not c.elapsed_s else (f"{c.elapsed_median:.1f} "
                                             f"({c.elapsed_s[0]:.1f}-{c.elapsed_s[-1]:.1f})")
            print(f"| {name} | {n} | {c.decided} | {c.lockups} | {p} | {el} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
