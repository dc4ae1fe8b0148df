"""``swapnbd sweep`` end to end on a 2-worker LocalCluster, as a real process:
the rows and the summary of a small grid, resuming, a bad grid value, Ctrl-C,
and a lost worker.

Every run is a real ``swapnbd run`` of a small quick.toml (SMALL: 16 MiB, one
pass). The assertions are about what the sweep does with the runs, not about
which outcome a kernel reaches (on this machine vanilla's outcome is a race).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from sweep_helpers import (
    ROOT,
    TIMEOUT_S,
    alive,
    cmdline,
    rows_of,
    run_processes,
    run_sweep,
    sweep_argv,
    wait_for,
)

from emulator.analysis.outcomes import read_rows, summarize_cells, wilson_interval
from emulator.analysis.reader import LogReader
from emulator.machine import EXIT_STATUS

GRID = ["--grid", "kernel.patches=vanilla,swapnbd", "--grid", "machine.memory_mib=16,20",
        "--workers", "2"]


def _check_row_against_its_log(out, row):
    reader = LogReader(out / row["log"])
    events = list(reader.events())
    config, machine = reader.config, reader.machine
    assert config["run"]["seed"] == row["seed"]
    assert config["machine"]["memory_mib"] == int(row["grid"]["machine.memory_mib"])
    assert machine["kernel"] == row["grid"]["kernel.patches"]
    assert config["workload"]["passes"] == 1  # the common --set reached the run
    run_end = reader.run_end
    assert events[-1] is run_end
    assert row["run_end"] is True
    assert row["outcome"] == run_end["outcome"]
    assert row["elapsed_s"] == run_end["elapsed_s"]
    assert row["exit_status"] == EXIT_STATUS[row["outcome"]]
    assert row["pswpout"] == run_end["vm"]["pswpout"]
    assert row["integrity_errors"] == run_end["integrity_errors"]
    assert (row["lockup_at_s"] is not None) == (row["outcome"] == "lockup")
    assert row["host"] == socket.gethostname() and row["host_cpus"] == os.cpu_count()
    assert row["load_1m"] is not None and row["attempt"] == 1


def test_a_grid_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    done = run_sweep(out, *GRID, "--seeds", "1-2")
    assert done.returncode == 0, done.stderr
    rows = rows_of(out)
    assert sorted((r["grid"]["kernel.patches"], r["grid"]["machine.memory_mib"], r["seed"])
                  for r in rows) == sorted((k, m, s) for k in ("vanilla", "swapnbd")
                                           for m in ("16", "20") for s in (1, 2))
    for row in rows:
        _check_row_against_its_log(out, row)
    assert "8 runs: 0 already" in done.stderr

    # The summary: one line per cell, its counts and interval from its rows.
    summary = (out / "summary.md").read_text()
    cells = summarize_cells(rows)
    assert len(cells) == 4
    for c in cells:
        lo, hi = wilson_interval(c.lockups, c.decided)
        line = next(x for x in summary.splitlines() if x.startswith(f"| {c.cell} |"))
        assert f"| {c.runs} |" in line and c.runs == 2
        assert f"{c.lockups / c.decided:.2f} [{lo:.2f}, {hi:.2f}]" in line
        assert sum(c.counts.values()) == 2
    assert "P(lockup)" in done.stdout

    # Same command: nothing to run, nothing changes.
    again = run_sweep(out, *GRID, "--seeds", "1-2")
    assert again.returncode == 0, again.stderr
    assert "8 runs: 8 already" in again.stderr and "0 to run" in again.stderr
    assert rows_of(out) == rows

    # One more seed: only its four runs are made; the first eight rows stay as they were.
    more = run_sweep(out, *GRID, "--seeds", "1-3")
    assert more.returncode == 0, more.stderr
    assert "12 runs: 8 already" in more.stderr
    new_rows = rows_of(out)
    assert new_rows[:8] == rows
    assert sorted(r["seed"] for r in new_rows[8:]) == [3, 3, 3, 3]


def test_a_bad_grid_value_gives_error_rows_and_the_rest_completes(tmp_path):
    out = tmp_path / "sweep"
    done = run_sweep(out, "--grid", "machine.slab=slub,slob", "--seeds", "1", "--workers", "2")
    assert done.returncode == 1, done.stderr  # some rows are errors
    rows = {r["grid"]["machine.slab"]: r for r in rows_of(out)}
    assert rows["slob"]["outcome"] == "error" and rows["slob"]["run_end"] is False
    assert rows["slob"]["exit_status"] == 2 and "machine.slab" in rows["slob"]["error"]
    assert rows["slob"]["log"] is None
    assert rows["slub"]["run_end"] is True and rows["slub"]["outcome"] != "error"
    assert "| quick machine.slab=slob | 1 | 0 | 1 | - |" in (out / "summary.md").read_text()
    # An error row has no run_end: rerunning retries it (and only it).
    again = run_sweep(out, "--grid", "machine.slab=slub,slob", "--seeds", "1", "--workers", "2")
    assert "2 runs: 1 already" in again.stderr


def test_workers_above_the_core_count_are_refused(tmp_path):
    done = run_sweep(tmp_path, "--seeds", "1", "--workers", str(os.cpu_count() + 1))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--oversubscribe" in done.stderr
    assert not (tmp_path / "runs.jsonl").exists()


@pytest.mark.parametrize("whole_group", [False, True], ids=["sigint-cli", "ctrl-c-group"])
def test_ctrl_c_stops_the_runs_and_keeps_the_finished_ones(tmp_path, whole_group):
    """SIGINT to the CLI alone, or to its whole process group as a terminal's
    Ctrl-C does: exit 130, no ``swapnbd run`` left, a consistent runs.jsonl."""
    out = tmp_path / "sweep"
    proc = subprocess.Popen(sweep_argv(out, "--seeds", "1-60", "--workers", "2"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: set[int] = set()
    try:
        def some_done_and_one_running():
            seen.update(run_processes(proc.pid))
            return rows_of(out) and run_processes(proc.pid)
        wait_for(some_done_and_one_running, TIMEOUT_S, "a finished run and a running one")
        running = run_processes(proc.pid)
        if whole_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert running and seen
    assert not [p for p in seen if alive(p)], "orphaned swapnbd run processes"
    rows = rows_of(out)  # every line whole
    assert 0 < len(rows) < 60
    assert len({r["run_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["run_end"] is True and (out / r["log"]).exists()
    assert f"interrupted: {len(rows)} of 60 runs have a row" in err
    assert "Traceback" not in err, err
    # The logs kept are exactly the rows' logs (a stopped run leaves none).
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(
        os.path.basename(r["log"]) for r in rows)


def test_a_lost_worker_s_run_is_retried_once(tmp_path):
    """SIGKILL to the worker process of a running run: the run dies with it, the
    sweep goes on, and that run is made again (attempt 2)."""
    out = tmp_path / "sweep"
    overrides = ["workload.passes=1", "run.lockup_timeout_s=5", "run.max_duration_s=120"]
    proc = subprocess.Popen(sweep_argv(out, "--seeds", "1-4", "--workers", "2",
                                       overrides=overrides),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = wait_for(lambda: run_processes(proc.pid), TIMEOUT_S, "a running run")[0]
        seed = int(re.search(r"run\.seed=(\d+)", " ".join(cmdline(victim)))[1])
        worker = int(Path(f"/proc/{victim}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(worker, signal.SIGKILL)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert not alive(victim), "the run outlived its worker"
    rows = {r["seed"]: r for r in read_rows(out)}
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[seed]["attempt"] == 2 and rows[seed]["run_end"] is True
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[0])  # whole rows
