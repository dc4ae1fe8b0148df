"""The emulated swap path against the bare NBD round-trip floor, in one run.

Runs a machine (configs/quick.toml by default), then, against a fresh
NBDServerThread of the same kind, the bare rate of 4 KiB NBD WRITE+READ round
trips from a plain trio client at the queue depth the machine's swap path
actually had (the mean of ``nbd_inflight`` over the run's samples). Prints:
emulated page faults/s, swap pages/s (pswpin + pswpout per second of wall
time), wall time, the floor (requests/s), and the ratio swap pages/s / floor.

    python benchmarks/emulator_swap.py [CONFIG] [--set k=v ...] [--seconds 3]

Not part of the test run: the figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import structlog
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbd_roundtrip import roundtrip_rate  # noqa: E402

from emulator.config import load  # noqa: E402
from emulator.machine import Machine  # noqa: E402
from userspace.nbd.server import ExportSpec  # noqa: E402
from userspace.nbd.thread import NBDServerThread  # noqa: E402


def mean_inflight(log_path: str) -> float:
    vals = []
    with open(log_path) as f:
        for line in f:
            e = json.loads(line)
            if e.get("event") == "vmstat" and e["vm"]["pswpout"]:
                vals.append(e.get("nbd_inflight", 0))
    return sum(vals) / len(vals) if vals else 1.0


async def main_async(args) -> int:
    cfg = load(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = str(Path(tmp) / "bench.jsonl")
        start = trio.current_time()
        result = await Machine(cfg, log_path).run()
        wall = trio.current_time() - start
        qd = max(1, round(mean_inflight(log_path)))
    vm = result.vm
    faults = vm["pgfault"] / wall
    swap = (vm["pswpin"] + vm["pswpout"]) / wall
    srv = NBDServerThread([ExportSpec(name="swap", size=cfg.swap.size_mib << 20)])
    await trio.to_thread.run_sync(srv.start)
    try:
        floor = await roundtrip_rate(srv.url("swap"), args.seconds, qd)
    finally:
        await trio.to_thread.run_sync(srv.stop)
    print(f"config              {args.config} {' '.join(args.overrides)}")
    print(f"outcome             {result.outcome} ({result.integrity_errors} integrity errors)")
    print(f"wall time           {wall:.2f} s")
    print(f"page faults/s       {faults:,.0f}")
    print(f"swap pages/s        {swap:,.0f}  (pswpin {vm['pswpin']}, pswpout {vm['pswpout']})")
    print(f"mean NBD queue      {qd}")
    print(f"bare NBD floor      {floor:,.0f} requests/s (4 KiB write+read, QD {qd})")
    print(f"ratio               {swap / floor:.2f} of the floor")
    return 0 if result.outcome == "completed" else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/quick.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return trio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
