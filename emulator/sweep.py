"""``swapnbd sweep``: many ``swapnbd run``s spread over Dask workers, with outcome statistics.

Whether a machine locks up is a race, so a question about it is answered by
counts over many runs. A sweep is the cross product configs x grid values x
seeds; each run is ``swapnbd run`` in its own subprocess on a Dask worker
(``distributed``): a ``LocalCluster`` of single-threaded worker processes, one
per core, by default, or any existing cluster by its scheduler address.

Isolation: the subprocess has its own session and process group; stopping a
run kills the group, and the kernel kills the run if its worker dies
(``PR_SET_PDEATHSIG``). A run keeps its own ``run.max_duration_s``; the task
adds a wall-clock limit above it for a subprocess that hangs.

Results in ``OUT``: ``runs.jsonl`` (one tidy row per run: cell, config,
overrides, seed, outcome, elapsed, when the machine stopped progressing,
integrity errors, the vmstat counters of the experiment table, the host, its
CPU count and its load average when the run started), each run's full log under
``OUT/logs`` (gzip-compressed above 1 MiB; the worker ships it back, so logs
from a cluster land on the client), and ``summary.md`` (emulator/analysis/
outcomes.py: counts, P(lockup) with a 95% Wilson interval, elapsed time).

A row's outcome is the log's ``run_end`` outcome; without one (a bad config,
a crash) it is the outcome of the exit status in emulator.machine.EXIT_STATUS,
otherwise ``error``, with the error's last line. Rerunning the same command
with the same ``OUT`` skips every run that has a row with a ``run_end``
(rows are keyed by run id and a hash of the config text, overrides and seed).
Ctrl-C stops the running subprocesses and keeps every finished run. A run
whose worker is lost is submitted once more.

Not a kernel mechanism: nothing here influences an outcome, except that runs
sharing cores change each other's timing (hence one worker per core, and the
host's load in every row; docs/SWEEPS.md).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console

from userspace.children import die_with_parent

RUNS_FILE = "runs.jsonl"
SUMMARY_FILE = "summary.md"
GZIP_ABOVE = 1 << 20  #: logs larger than this (bytes) are stored gzip-compressed
POLL_S = 1.0  #: how often a task checks for a stop request
KILL_GRACE_S = 5.0  #: SIGTERM to SIGKILL
DRAIN_S = 15.0  #: on Ctrl-C, how long the running tasks get to stop their runs
LIMIT_MARGIN_S = 300.0  #: wall-clock limit of a run: 2 x run.max_duration_s + this

#: The run_end vmstat counters a row keeps (those the experiment tables print).
VM_KEYS = ("pswpin", "pswpout", "pgscan_direct", "pgscan_kswapd", "pgsteal_direct",
           "pgsteal_kswapd", "allocstall", "pgscan_direct_throttle", "skb_drop_nomem",
           "skb_drop_pfmemalloc", "oom_kill", "nbd_sender_reclaim",
           "nbd_sender_reclaim_exposed", "nbd_sender_near_miss")


class PlanError(Exception):
    """A sweep that cannot be planned (bad --seeds, --grid, duplicate runs)."""


# -- the plan ---------------------------------------------------------------------------
@attrs.frozen
class RunSpec:
    """One run of a sweep: ``swapnbd run CONFIG --set OVERRIDE... --set run.seed=SEED``."""

    run_id: str  #: unique in the sweep
    cell: str  #: the runs that differ only by seed share a cell
    config: str
    overrides: tuple[str, ...] = ()
    grid: tuple[tuple[str, str], ...] = ()
    seed: int = 1
    log_name: str = ""  #: the log's path under OUT (".gz" is added if compressed)

    def run_overrides(self) -> tuple[str, ...]:
        return (*self.overrides, f"run.seed={self.seed}")


def parse_seeds(text: str) -> list[int]:
    """``1-20``, ``7``, ``1,4,9-12`` -> the seeds in order, without repeats."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m[2] and int(m[2]) < int(m[1])):
            raise PlanError(f"--seeds {text}: expected seeds like 1-20 or 1,5,9-12")
        for s in range(int(m[1]), int(m[2] or m[1]) + 1):
            if s not in seeds:
                seeds.append(s)
    return seeds


def split_values(text: str) -> list[str]:
    """``16,24,[1, 15]`` -> ``['16', '24', '[1, 15]']``: commas inside brackets or
    quotes do not separate values."""
    values, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(cur.strip())
            cur = ""
            continue
        cur += ch
    values.append(cur.strip())
    return values


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``--grid section.key=v1,v2`` options -> [(key, [v1, v2]), ...]."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        values = split_values(raw)
        if not eq or "." not in key or not all(values):
            raise PlanError(f"--grid {item}: expected section.key=value1,value2,...")
        if key in (k for k, _ in grid):
            raise PlanError(f"--grid {key} given twice")
        grid.append((key, values))
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")


def plan_sweep(configs: Sequence[str], overrides: Sequence[str],
               grid: Sequence[tuple[str, Sequence[str]]], seeds: Sequence[int]) -> list[RunSpec]:
    """configs x grid values x seeds, configs outermost, seeds innermost."""
    axes = [[(key, v) for v in values] for key, values in grid]
    specs = []
    for config in configs:
        stem = Path(config).stem
        for combo in itertools.product(*axes):
            sets = [f"{k}={v}" for k, v in combo]
            cell = " ".join([stem, *sets])
            for seed in seeds:
                run_id = "__".join(_slug(x) for x in [stem, *sets, f"seed={seed}"])
                specs.append(RunSpec(run_id, cell, config, (*overrides, *sets), tuple(combo),
                                     seed, f"logs/{run_id}.jsonl"))
    check_unique(specs)
    return specs


def check_unique(specs: Sequence[RunSpec]) -> None:
    seen = Counter(s.run_id for s in specs)
    dup = [k for k, n in seen.items() if n > 1]
    if dup:
        raise PlanError(f"two runs would share the id {dup[0]} (a config listed twice?)")


# -- the worker side --------------------------------------------------------------------
@attrs.frozen
class RunTask:
    """What the client ships to a worker: the run, its config's text (workers on
    other hosts need not have the file) and how to stop it."""

    spec: RunSpec
    config_text: str
    key: str  #: hash of config text, overrides and seed: a row's identity on resume
    stop: str | None  #: name of the distributed.Event that stops the sweep
    limit_s: float
    attempt: int = 1


@attrs.frozen
class RunOutput:
    row: dict
    log: bytes | None = None
    interrupted: bool = False


def execute_run(task: RunTask) -> RunOutput:
    """Run one ``swapnbd run`` subprocess to its end (on a worker) and return its row
    and its log; ``interrupted`` (no row) if the sweep was stopped first."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    host = host_info()
    stop = _stop_check(task.stop)
    if stop():
        return RunOutput({}, interrupted=True)
    with tempfile.TemporaryDirectory(prefix="swapnbd-sweep-") as tmp:
        config = Path(tmp) / Path(task.spec.config).name
        config.write_text(task.config_text, encoding="utf-8")
        log, err = Path(tmp) / "run.jsonl", Path(tmp) / "stderr"
        t0 = time.monotonic()
        with open(err, "wb") as err_fh:
            proc = _spawn(run_argv(config, task.spec, log), err_fh)
            ended = _wait(proc, stop, t0 + task.limit_s)
        if ended == "stopped":
            return RunOutput({}, interrupted=True)
        row = outcome_fields(log, proc.returncode, _last_line(err))
        if ended == "limit":
            row |= {"outcome": "error", "run_end": False,
                    "error": f"killed after {task.limit_s:.0f} s without ending"}
        data, gz = _log_bytes(log)
    row |= {"wall_s": round(time.monotonic() - t0, 2), "started_at": started, **host}
    return RunOutput(make_row(task, row, gz if data is not None else None), data)


def run_argv(config: Path, spec: RunSpec, log: Path) -> list[str]:
    argv = [sys.executable, "-m", "emulator.cli", "run", str(config), "--log", str(log), "--quiet"]
    for o in spec.run_overrides():
        argv += ["--set", o]
    return argv


def make_row(task: RunTask, fields: dict, gz: bool | None) -> dict:
    """The tidy row: the run's identity first, then what happened."""
    s = task.spec
    log = None if gz is None else s.log_name + (".gz" if gz else "")
    return {"run_id": s.run_id, "cell": s.cell, "config": s.config, "overrides": list(s.overrides),
            "grid": dict(s.grid), "seed": s.seed, "key": task.key, "attempt": task.attempt,
            **fields, "log": log}


def host_info() -> dict:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        load = [None, None, None]
    return {"host": socket.gethostname(), "host_cpus": os.cpu_count(),
            "load_1m": load[0], "load_5m": load[1], "load_15m": load[2]}


def _stop_check(name: str | None):
    """A function telling whether the sweep's stop event is set. Outside a
    worker (no name) it is never set; if the scheduler cannot be asked, the
    sweep is gone, so the run stops too."""
    if name is None:
        return lambda: False
    from distributed import Event

    event = Event(name)

    def stop() -> bool:
        try:
            return event.is_set()
        except Exception:  # noqa: BLE001 - the scheduler is gone: stop
            return True
    return stop


def _spawn(argv: list[str], stderr) -> subprocess.Popen:
    """The run in its own session and process group, dying with its worker;
    it inherits the environment (PYTHONPATH and all)."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr, start_new_session=True,
                            preexec_fn=die_with_parent)  # noqa: PLW1509


def _wait(proc: subprocess.Popen, stop, deadline: float) -> str:
    """"exited", or "stopped" / "limit" after killing the run's process group."""
    while True:
        try:
            proc.wait(timeout=POLL_S)
            return "exited"
        except subprocess.TimeoutExpired:
            pass
        for why, now in (("stopped", stop()), ("limit", time.monotonic() > deadline)):
            if now:
                kill_group(proc)
                return why


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the run's process group, SIGKILL to what is left after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _last_line(path: Path) -> str | None:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1][:500] if lines else None


def _log_bytes(log: Path) -> tuple[bytes | None, bool]:
    try:
        data = log.read_bytes()
    except OSError:
        return None, False
    if len(data) > GZIP_ABOVE:
        return gzip.compress(data, 6), True
    return data, False


def outcome_fields(log: Path, exit_status: int, stderr_line: str | None) -> dict:
    """What happened, from the log's ``run_end`` (and ``lockup``) events, or from
    the exit status when the log has no ``run_end``."""
    run_end, lockup = _scan_log(log)
    if run_end is None:
        return {"outcome": outcome_of_status(exit_status), "run_end": False,
                "exit_status": exit_status, "elapsed_s": None, "lockup_at_s": None,
                "integrity_errors": None,
                "error": stderr_line or f"no run_end, exit status {exit_status}"}
    vm = run_end.get("vm") or {}
    times = run_end.get("time") or {}
    sender = run_end.get("nbd_sender") or {}
    return {"outcome": run_end.get("outcome", "error"), "run_end": True,
            "exit_status": exit_status, "elapsed_s": run_end.get("elapsed_s"),
            "lockup_at_s": _lockup_at(lockup), "integrity_errors": run_end.get("integrity_errors"),
            "error": run_end.get("error"), "user_s": times.get("user_s"),
            "sys_s": times.get("sys_s"), **{k: vm.get(k) for k in VM_KEYS},
            "nbd_sender_longest_exposed_s": sender.get("longest_exposed_s")}


def outcome_of_status(status: int) -> str:
    """The outcome ``swapnbd run`` reports with this exit status, else "error"."""
    from emulator.machine import EXIT_STATUS

    return {v: k for k, v in EXIT_STATUS.items()}.get(status, "error")


def _scan_log(log: Path) -> tuple[dict | None, dict | None]:
    """The last ``run_end`` and the first ``lockup`` event of a log (None if absent)."""
    from emulator.analysis.reader import LogError, LogReader

    lockup = None
    try:
        reader = LogReader(log)
    except LogError:
        return None, None
    for ev in reader.events():
        if ev["event"] == "lockup" and lockup is None:
            lockup = ev
    return reader.run_end, lockup


def _lockup_at(lockup: dict | None) -> float | None:
    """When the locked-up machine stopped progressing: the watchdog fired at
    ``t`` after ``stalled_s`` without progress."""
    if lockup is None:
        return None
    stalled = (lockup.get("diagnosis") or {}).get("stalled_s") or 0.0
    return round(lockup["t"] - stalled, 3)


# -- the results directory --------------------------------------------------------------
class ResultsDir:
    """OUT: ``runs.jsonl`` (one row per run), the logs, ``summary.md``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.runs = self.path / RUNS_FILE

    def finished(self) -> dict[str, str]:
        """run_id -> key of the runs that have a row with a ``run_end``. Rows
        without one (errors, their run to be retried) are dropped from the file."""
        from emulator.analysis.outcomes import read_rows

        self.path.mkdir(parents=True, exist_ok=True)
        rows = read_rows(self.path)
        keep = [r for r in rows if r.get("run_end")]
        if self.runs.exists() and len(keep) != _count_lines(self.runs):
            tmp = self.runs.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.runs)
        return {r["run_id"]: r.get("key") for r in keep}

    def record(self, out: RunOutput) -> None:
        """The log first, then the row: a row always has its log."""
        if out.log is not None and out.row.get("log"):
            log = self.path / out.row["log"]
            log.parent.mkdir(parents=True, exist_ok=True)
            tmp = log.with_name(log.name + ".tmp")
            tmp.write_bytes(out.log)
            os.replace(tmp, log)
        line = (json.dumps(out.row) + "\n").encode()
        fd = os.open(self.runs, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write: a row is whole or absent
            os.fsync(fd)
        finally:
            os.close(fd)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


# -- the client side --------------------------------------------------------------------
@attrs.frozen
class Cluster:
    """Where the runs go: a LocalCluster of ``workers`` processes, or ``scheduler``."""

    workers: int | None = None
    scheduler: str | None = None


@contextmanager
def dask_client(cluster: Cluster) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if cluster.scheduler:
        with Client(cluster.scheduler, timeout="30s") as client:
            yield client
        return
    # allowed_failures=0: a lost worker's run comes back at once as KilledWorker,
    # and run_sweep submits it once more itself (see _output). The worker
    # processes start with SIGINT ignored (inherited through exec): a Ctrl-C on
    # the terminal reaches the whole process group, and only the client must
    # act on it, by stopping the runs.
    with _sigint_ignored():
        local = LocalCluster(n_workers=cluster.workers or os.cpu_count(), threads_per_worker=1,
                             processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                             silence_logs=logging.ERROR, scheduler_kwargs={"allowed_failures": 0})
    with local, Client(local) as client:
        yield client


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def dashboard_link(client) -> str | None:
    """The Dask dashboard's address, if the scheduler serves one (needs bokeh)."""
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - informational only
        return None
    return client.dashboard_link if "dashboard" in services else None


@attrs.frozen
class SweepResult:
    planned: int
    skipped: int
    interrupted: bool


def make_tasks(specs: Sequence[RunSpec], stop: str | None) -> list[RunTask]:
    from emulator.config import ConfigError, load

    texts: dict[str, str] = {}
    tasks = []
    for s in specs:
        text = texts.setdefault(s.config, Path(s.config).read_text(encoding="utf-8"))
        try:
            limit = 2 * load(s.config, s.run_overrides()).run.max_duration_s + LIMIT_MARGIN_S
        except ConfigError:  # a bad grid value: the run reports it in its row
            limit = LIMIT_MARGIN_S
        key = hashlib.sha256("\0".join([text, *s.run_overrides()]).encode()).hexdigest()[:16]
        tasks.append(RunTask(s, text, key, stop, limit))
    return tasks


def run_sweep(specs: Sequence[RunSpec], out: str | os.PathLike[str], cluster: Cluster,
              console: Console) -> SweepResult:
    """Run every spec that has no finished row in OUT yet; record each row as it
    comes. Ctrl-C: stop the runs, keep the finished ones, return interrupted."""
    results = ResultsDir(out)
    done = results.finished()
    tasks = [t for t in make_tasks(specs, f"swapnbd-sweep-stop-{uuid.uuid4().hex}")
             if done.get(t.spec.run_id, "") != t.key]
    skipped = len(specs) - len(tasks)
    console.print(f"{len(specs)} runs: {skipped} already in {results.runs}, {len(tasks)} to run",
                  highlight=False)
    if not tasks:
        return SweepResult(len(specs), skipped, False)
    with dask_client(cluster) as client, _sigint_flag() as interrupted:
        link = dashboard_link(client)
        if link:
            console.print(f"Dask dashboard: {link}", highlight=False)
        futures = {client.submit(execute_run, t, pure=False): t for t in tasks}
        with SweepProgress(len(tasks), console) as progress:
            _collect(client, futures, results, progress, interrupted)
            if interrupted.is_set():
                _interrupt(client, tasks[0].stop, futures, results, progress)
    return SweepResult(len(specs), skipped, interrupted.is_set())


@contextmanager
def _sigint_flag() -> Iterator[threading.Event]:
    """Ctrl-C sets an event instead of raising KeyboardInterrupt in the middle of
    whatever the client was doing; the sweep's loop looks at it between results."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def _collect(client, futures: dict, results: ResultsDir, progress: SweepProgress,
             interrupted: threading.Event) -> None:
    """Record each run's row as it comes, until all are in or Ctrl-C."""
    from distributed import as_completed

    pending = as_completed(list(futures))
    while not pending.is_empty() and not interrupted.is_set():
        for fut in pending.next_batch(block=False):
            task = futures.pop(fut)
            out = _output(fut, task)
            if out is None:  # its worker was lost: once more
                retry = attrs.evolve(task, attempt=task.attempt + 1)
                new = client.submit(execute_run, retry, pure=False)
                futures[new] = retry
                pending.add(new)
                continue
            results.record(out)
            progress.advance(out.row)
        interrupted.wait(0.2)


def _output(fut, task: RunTask) -> RunOutput | None:
    """The task's output; None to retry a run whose worker was lost the first
    time; an error row for a second loss or anything else that went wrong."""
    from distributed import KilledWorker

    try:
        return fut.result()
    except KilledWorker:
        if task.attempt < 2:
            return None
        why = f"its worker was lost {task.attempt} times"
    except Exception as e:  # noqa: BLE001 - one run's failure is its row, not the sweep's end
        why = f"{type(e).__name__}: {e}"
    return RunOutput(make_row(task, {"outcome": "error", "run_end": False, "error": why}, None))


def _interrupt(client, stop: str, futures: dict, results: ResultsDir,
               progress: SweepProgress) -> None:
    """Ctrl-C: tell every task to kill its run, wait for them briefly, keep the
    runs that finished meanwhile, cancel the rest."""
    from distributed import Event, wait

    progress.console.print("interrupted: stopping the runs...", highlight=False)
    try:
        Event(stop, client=client).set()
        wait(list(futures), timeout=DRAIN_S)
    except Exception:  # noqa: BLE001 - a timeout, a lost connection: cancel below
        pass
    for fut in futures:
        if fut.status == "finished":
            out = fut.result()
            if not out.interrupted:
                results.record(out)
                progress.advance(out.row)
    client.cancel(list(futures))


class SweepProgress:
    """A rich progress bar with counts by outcome and an ETA, and one line per run."""

    def __init__(self, total: int, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.counts: Counter[str] = Counter()
        self.progress = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=console)
        self.console = self.progress.console
        self.task = self.progress.add_task("runs", total=total, counts="")

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def advance(self, row: dict) -> None:
        self.counts[row["outcome"]] += 1
        text = "  ".join(f"{o} {n}" for o, n in self.counts.most_common())
        self.progress.update(self.task, advance=1, counts=text)
        self.console.print(run_line(row), highlight=False, markup=False)


def run_line(row: dict) -> str:
    line = f"{row['run_id']}: {row['outcome']}"
    if row.get("elapsed_s") is not None:
        line += f" after {row['elapsed_s']:.1f} s"
    if row.get("host"):
        line += f" on {row['host']} (load {row['load_1m']})"
    if row.get("error"):
        line += f": {row['error']}"
    return line


# -- the command ------------------------------------------------------------------------
def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """--workers / --scheduler / --oversubscribe (sweep and experiment)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, metavar="N",
                   help="local worker processes, one run each (default: one per core)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="use an existing Dask cluster, e.g. tcp://host:8786 (see README)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="allow --workers above the number of cores")


def cluster_of(args: argparse.Namespace) -> Cluster | str:
    """The Cluster the options ask for, or a one-line error."""
    cores = os.cpu_count() or 1
    if args.scheduler:
        return Cluster(scheduler=args.scheduler)
    workers = cores if args.workers is None else args.workers
    if workers < 1:
        return "--workers must be at least 1"
    if workers > cores and not args.oversubscribe:
        return (f"--workers {workers} is more than the {cores} cores: runs would share cores, "
                "which changes their timing and so their outcomes "
                "(--oversubscribe to do it anyway)")
    return Cluster(workers=workers)


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="TOML config files")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override applied to every run (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="an axis of the sweep (repeatable; the runs are the cross product)")
    p.add_argument("--seeds", required=True, help="run.seed values, e.g. 1-20 or 1,5,9-12")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="results: runs.jsonl, logs/, summary.md (rerun to resume)")
    add_cluster_arguments(p)


def _err(msg: str) -> None:
    print(f"swapnbd: {msg}", file=sys.stderr)


def _plan_from_args(args: argparse.Namespace) -> list[RunSpec]:
    from emulator.config import ConfigError, load

    specs = plan_sweep(args.configs, args.overrides, parse_grid(args.grid),
                       parse_seeds(args.seeds))
    for config in args.configs:  # the common part must be good; a grid value may not be
        try:
            load(config, args.overrides)
        except ConfigError as e:
            raise PlanError(str(e)) from None
    return specs


def sweep_main(args: argparse.Namespace) -> int:
    """Exit status: 0 every run has a row with a machine outcome; 1 some rows are
    errors; 2 bad input; 130 interrupted."""
    cluster = cluster_of(args)
    if isinstance(cluster, str):
        _err(cluster)
        return 2
    try:
        specs = _plan_from_args(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except PlanError as e:
        _err(str(e))
        return 2
    except OSError as e:
        _err(f"--out {args.out}: {e.strerror}")
        return 2
    try:
        result = run_sweep(specs, args.out, cluster, progress_console())
    except KeyboardInterrupt:  # while the cluster was starting: nothing was running yet
        result = SweepResult(len(specs), 0, True)
    rows = plan_rows(specs, args.out)
    print_summary(rows, args.out, stdout_console())
    if result.interrupted:
        _err(f"interrupted: {len(rows)} of {len(specs)} runs have a row; rerun to resume")
        return 130
    return 1 if any(not r.get("run_end") for r in rows) else 0


def plan_rows(specs: Sequence[RunSpec], out: str | os.PathLike[str]) -> list[dict]:
    """The rows of OUT for these specs, in plan order."""
    from emulator.analysis.outcomes import read_rows

    order = {s.run_id: i for i, s in enumerate(specs)}
    rows = [r for r in read_rows(out) if r["run_id"] in order]
    return sorted(rows, key=lambda r: order[r["run_id"]])


def progress_console() -> Console:
    """stderr: the progress bar and one line per run (unwrapped in a pipe)."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def stdout_console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def print_summary(rows: Sequence[dict], out: str | os.PathLike[str], console: Console) -> None:
    """The per-cell table on the terminal and in OUT/summary.md."""
    from emulator.analysis.outcomes import summarize_cells, summary_markdown, summary_table

    cells = summarize_cells(rows)
    (Path(out) / SUMMARY_FILE).write_text(
        f"# Sweep summary\n\n{len(rows)} runs, rows in `{RUNS_FILE}`. P(lockup): lockups over "
        "runs with a machine outcome (errors left out), with its 95% Wilson interval "
        "(docs/SWEEPS.md); elapsed: median (min-max) of those runs; stalled at: when "
        "locked-up runs stopped progressing.\n\n" + summary_markdown(cells))
    console.print(summary_table(cells))
