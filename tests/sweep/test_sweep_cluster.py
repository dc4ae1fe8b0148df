"""``swapnbd sweep --scheduler``: an existing Dask cluster (``dask scheduler`` and
one ``dask worker``, started here on 127.0.0.1 and stopped by PID), whose worker
runs in another directory: the rows and the logs come back to the client's OUT."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from sweep_helpers import rows_of, run_sweep, wait_for

from emulator.analysis.reader import LogReader


def _start(argv, cwd, log):
    return subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _address(sched_file) -> str | None:
    try:
        return json.loads(sched_file.read_text())["address"]
    except (OSError, ValueError, KeyError):  # not written yet, or half written
        return None


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler on 127.0.0.1 (port 0, address read back from its scheduler
    file) and one single-threaded worker, in a directory of its own."""
    home = tmp_path / "cluster"
    home.mkdir()
    sched_file = home / "scheduler.json"
    log = open(home / "dask.log", "w")  # noqa: SIM115 - closed in teardown
    dask = [sys.executable, "-m", "dask"]  # the `dask` command, with this interpreter
    procs = [_start([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(sched_file)], home, log)]
    try:
        address = wait_for(lambda: _address(sched_file), 60, "the scheduler")
        assert address.startswith("tcp://127.0.0.1:")
        worker_cwd = home / "worker"
        worker_cwd.mkdir()
        procs.append(_start([*dask, "worker", address, "--nthreads", "1", "--nworkers", "1",
                             "--no-dashboard", "--host", "127.0.0.1",
                             "--local-directory", str(worker_cwd)], worker_cwd, log))
        yield address
    finally:
        for p in reversed(procs):
            _stop(p)
        log.close()


def test_a_sweep_on_an_existing_cluster_brings_its_logs_back(tmp_path, dask_cluster):
    out = tmp_path / "client" / "sweep"
    done = run_sweep(out, "--seeds", "1-2", "--scheduler", dask_cluster)
    assert done.returncode == 0, done.stderr
    rows = rows_of(out)
    assert sorted(r["seed"] for r in rows) == [1, 2]
    for row in rows:
        assert row["run_end"] is True and row["host"] == socket.gethostname()
        log = out / row["log"]
        assert log.is_file() and log.parent == out / "logs"
        reader = LogReader(log)
        for _ in reader.events():
            pass
        assert reader.config["run"]["seed"] == row["seed"]
        assert reader.run_end["outcome"] == row["outcome"]
    # Nothing was written where the worker runs: the logs travelled back.
    assert not list((tmp_path / "cluster" / "worker").rglob("*.jsonl"))
    assert (out / "summary.md").exists()


def test_workers_and_scheduler_do_not_go_together(tmp_path):
    done = run_sweep(tmp_path, "--seeds", "1", "--workers", "1", "--scheduler", "tcp://x:1")
    assert done.returncode == 2 and "not allowed with" in done.stderr
    assert not os.path.exists(tmp_path / "runs.jsonl")
