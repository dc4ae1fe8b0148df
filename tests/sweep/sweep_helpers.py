"""Helpers for the sweep tests: run ``swapnbd sweep`` as a real process, find the
``swapnbd run`` processes under it, read a results directory back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quick.toml")

#: quick.toml made smaller: one pass over a 16 MiB machine, lockups detected
#: after 5 s. A run takes 1-6 s; vanilla locks up or completes (a race).
SMALL = ["workload.passes=1", "machine.memory_mib=16", "run.lockup_timeout_s=5",
         "run.max_duration_s=120"]

TIMEOUT_S = 300  #: bound on any one sweep command in these tests


def sweep_argv(out: Path, *args: str, overrides=SMALL) -> list[str]:
    argv = [sys.executable, "-m", "emulator.cli", "sweep", QUICK, "--out", str(out)]
    for o in overrides:
        argv += ["--set", o]
    return argv + list(args)


def run_sweep(out: Path, *args: str, overrides=SMALL) -> subprocess.CompletedProcess:
    """The command to its end (the environment, PYTHONPATH included, is inherited)."""
    return subprocess.run(sweep_argv(out, *args, overrides=overrides), check=False,
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)


def rows_of(out: Path) -> list[dict]:
    """Every line of runs.jsonl, which must each be a whole JSON object."""
    path = out / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below ``pid`` (from /proc)."""
    parent = {int(p): _ppid(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def run_processes(pid: int) -> list[int]:
    """The ``swapnbd run`` subprocesses below ``pid``."""
    return [p for p in descendants(pid) if "emulator.cli" in cmdline(p) and "run" in cmdline(p)]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
