"""NBD server IOPS / throughput comparison, all servers driven by fio's nbd engine.

Starts, in one run: our server (``python -m userspace.nbd.serve``, a separate
process, memory backend), nbdkit's memory plugin, qemu-nbd on a raw file and
nbd-server on a raw file, all on 127.0.0.1.  Each export (256 MiB) is first
filled with random data using nbdcopy.  Then every cell (4 KiB randwrite /
randread at QD1 and QD16, 1 MiB sequential write / read at QD4) is measured
on every server in turn, ``--reps`` times, interleaved so that the noise of
the machine spreads evenly; the table reports medians.  Every server is
stopped by its PID at the end.

    python benchmarks/nbd_iops.py [--seconds 3] [--reps 3] [--only ours,nbdkit]
                                  [--markdown out.md] [--json out.json]

This is a report, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SIZE = 256 * 1024 * 1024
CELLS = [
    ("4k randwrite QD1", "randwrite", "4k", 1),
    ("4k randwrite QD16", "randwrite", "4k", 16),
    ("4k randread QD1", "randread", "4k", 1),
    ("4k randread QD16", "randread", "4k", 16),
    ("1M seq write QD4", "write", "1M", 4),
    ("1M seq read QD4", "read", "1M", 4),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


class Servers:
    def __init__(self, tmp: str, only: set[str] | None, python: str) -> None:
        self.tmp = tmp
        self.only = only
        self.python = python
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []
        self.uris: dict[str, str] = {}

    def want(self, name: str) -> bool:
        return self.only is None or name in self.only

    def start(self) -> None:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if self.want("ours"):
            p = free_port()
            env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "userspace.nbd.serve",
                    "--port",
                    str(p),
                    "--size",
                    str(SIZE),
                    "--log-level",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(self.tmp, "ours.log"), "w"),
                env=env,
            )
            self.procs.append(proc)
            wait_port(p)
            self.uris["ours (swapnbd serve, memory)"] = f"nbd://127.0.0.1:{p}/"
        if self.want("nbdkit") and shutil.which("nbdkit"):
            p = free_port()
            proc = subprocess.Popen(["nbdkit", "-f", "-p", str(p), "-i", "127.0.0.1", "memory", str(SIZE)])
            self.procs.append(proc)
            wait_port(p)
            self.uris["nbdkit memory"] = f"nbd://127.0.0.1:{p}/"
        if self.want("qemu-nbd") and shutil.which("qemu-nbd"):
            p = free_port()
            img = os.path.join(self.tmp, "qemu.img")
            with open(img, "wb") as f:
                f.truncate(SIZE)
            proc = subprocess.Popen(
                ["qemu-nbd", "-t", "-p", str(p), "-b", "127.0.0.1", "-f", "raw", "-x", "disk", img]
            )
            self.procs.append(proc)
            wait_port(p)
            self.uris["qemu-nbd raw file"] = f"nbd://127.0.0.1:{p}/disk"
        if self.want("nbd-server") and shutil.which("nbd-server"):
            p = free_port()
            img = os.path.join(self.tmp, "nbd-server.img")
            with open(img, "wb") as f:
                f.truncate(SIZE)
            conf = os.path.join(self.tmp, "nbd-server.conf")
            pidf = os.path.join(self.tmp, "nbd-server.pid")
            with open(conf, "w") as f:
                f.write(
                    f"[generic]\n    port = {p}\n    listenaddr = 127.0.0.1\n    allowlist = true\n"
                    f"[disk]\n    exportname = {img}\n    flush = true\n    fua = true\n    trim = true\n"
                )
            subprocess.run(["nbd-server", "-C", conf, "-p", pidf], check=True)
            wait_port(p)
            for _ in range(100):
                if os.path.exists(pidf):
                    break
                time.sleep(0.05)
            with open(pidf) as f:
                self.pids.append(int(f.read().strip()))
            self.uris["nbd-server file"] = f"nbd://127.0.0.1:{p}/disk"

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def prefill(uri: str, tmp: str) -> None:
    src = os.path.join(tmp, "random.bin")
    if not os.path.exists(src):
        with open(src, "wb") as f:
            for _ in range(SIZE // (1 << 20)):
                f.write(os.urandom(1 << 20))
    subprocess.run(["nbdcopy", src, uri], check=True)


def run_fio(uri: str, rw: str, bs: str, qd: int, seconds: float, tmp: str) -> float:
    out = os.path.join(tmp, "fio.json")
    cmd = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={qd}",
        f"--size={SIZE}",
        "--time_based",
        f"--runtime={seconds}",
        "--ramp_time=1",
        "--norandommap",
        "--output-format=json",
        f"--output={out}",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    if bs == "4k":
        return side["iops"]
    return side["bw_bytes"] / (1 << 20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma list of: ours,nbdkit,qemu-nbd,nbd-server")
    ap.add_argument("--python", default=sys.executable, help="interpreter for our server")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    for tool in ("fio", "nbdcopy"):
        if not shutil.which(tool):
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    only = set(args.only.split(",")) if args.only else None
    interp = subprocess.run(
        [
            args.python,
            "-c",
            "import sys,platform; "
            "print(platform.python_implementation(), sys.version.split()[0], sys.executable)",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as tmp:
        servers = Servers(tmp, only, args.python)
        try:
            servers.start()
            for name, uri in servers.uris.items():
                prefill(uri, tmp)
                results[name] = {c[0]: [] for c in CELLS}
            for rep in range(args.reps):
                for label, rw, bs, qd in CELLS:
                    for name, uri in servers.uris.items():
                        v = run_fio(uri, rw, bs, qd, args.seconds, tmp)
                        results[name][label].append(v)
                        print(f"rep {rep + 1} {label:<18} {name:<32} {v:10.0f}", file=sys.stderr, flush=True)
        finally:
            servers.stop()
    lines = [
        f"Machine: {platform.node()} {os.cpu_count()} CPUs; our server's interpreter: {interp}; "
        f"fio --ioengine=nbd, {args.seconds:g} s per cell + 1 s ramp, median of {args.reps}.",
        "",
        "| server | " + " | ".join(c[0] + (" (IOPS)" if c[2] == "4k" else " (MiB/s)") for c in CELLS) + " |",
        "|---|" + "---:|" * len(CELLS),
    ]
    for name, cells in results.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{statistics.median(v):,.0f}" for v in cells.values()) + " |"
        )
    if "ours (swapnbd serve, memory)" in results and "nbdkit memory" in results:
        ours = results["ours (swapnbd serve, memory)"]
        ref = results["nbdkit memory"]
        lines.append(
            "| *ours / nbdkit (ratio of medians)* | "
            + " | ".join(f"{statistics.median(ours[c]) / statistics.median(ref[c]):.2f}×" for c in ours)
            + " |"
        )
        # Each repetition measured ours and nbdkit back to back: the median of
        # the per-repetition ratios is less sensitive to load from elsewhere.
        for name, label in (
            ("nbdkit memory", "nbdkit"),
            ("qemu-nbd raw file", "qemu-nbd"),
            ("nbd-server file", "nbd-server"),
        ):
            if name in results:
                other = results[name]
                lines.append(
                    f"| *ours / {label} (median of paired ratios)* | "
                    + " | ".join(
                        f"{statistics.median(a / b for a, b in zip(ours[c], other[c], strict=True)):.2f}×"
                        for c in ours
                    )
                    + " |"
                )
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"interpreter": interp, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
