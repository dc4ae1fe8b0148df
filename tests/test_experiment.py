"""``swapnbd experiment seed`` end to end on a very small machine, through
emulator.cli.main: the four kernels run (on the sweep engine: a local Dask
cluster, each run a ``swapnbd run`` subprocess), their logs, rows and summaries
are written, ``--runs`` repeats the plan with consecutive seeds and counts the
outcomes with a Wilson interval, and the same command again resumes.

The assertions are about what the command does, not about which outcome a
kernel reaches: on a machine this small the vanilla kernels' outcome is a race
(docs/EXPERIMENT.md).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from emulator.analysis.outcomes import read_rows, wilson_interval
from emulator.cli import main
from emulator.experiment import PIPE_WIDTH, SEED_KERNELS, print_seed_table

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "machine.memory_mib=16", "machine.page_cache_mib=2", "swap.size_mib=64",
    "workload.processes_per_cpu=1", "workload.size_ratio=1.5", "workload.passes=1",
    "network.background.streams=0", "run.lockup_timeout_s=5", "run.max_duration_s=60",
]


def experiment(capsys, *args) -> tuple[int, str]:
    argv = ["experiment", "seed", "--configs", str(ROOT / "configs"), *args]
    for o in TINY:
        argv += ["--set", o]
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out + err


def test_seed_experiment_repeated_counts_every_outcome(capsys, tmp_path):
    status, out = experiment(capsys, "--out", str(tmp_path), "--runs", "2", "--json",
                             "--set", "run.seed=7")
    assert status == 0, out
    counts = json.loads((tmp_path / "seed-outcomes.json").read_text())
    assert list(counts) == SEED_KERNELS
    for name, c in counts.items():
        assert c["runs"] == 2 and c["completed"] + c["lockup"] + c["other"] == 2, (name, c)
        assert len(c["completed_elapsed_s"]) == c["completed"]
    seen: dict[str, list[str]] = {name: [] for name in SEED_KERNELS}
    for i, seed in ((1, 7), (2, 8)):
        summary = json.loads((tmp_path / f"run-{i}" / "seed-summary.json").read_text())
        assert list(summary) == SEED_KERNELS
        for name in SEED_KERNELS:
            log = tmp_path / f"run-{i}" / f"{name}.jsonl"
            start = json.loads(log.read_text().splitlines()[0])
            assert start["event"] == "run_start"
            assert start["config"]["run"]["seed"] == seed
            assert summary[name]["integrity_errors"] == 0
            seen[name].append(summary[name]["outcome"])
    for name, outcomes in seen.items():  # the counts are the runs' own outcomes
        assert counts[name]["completed"] == outcomes.count("completed")
        assert counts[name]["lockup"] == outcomes.count("lockup")
    for c in counts.values():  # P(lockup) over the runs that reached an outcome
        assert c["p_lockup_95"] == list(wilson_interval(c["lockup"], c["decided"]))
    # One row per run in OUT/runs.jsonl, the tables' source.
    rows = read_rows(tmp_path)
    assert sorted((r["cell"], r["seed"]) for r in rows) == sorted(
        (name, seed) for name in SEED_KERNELS for seed in (7, 8))
    for r in rows:
        i = r["seed"] - 6
        assert r["run_end"] and r["log"] == f"run-{i}/{r['cell']}.jsonl"
        assert r["outcome"] == seen[r["cell"]][i - 1]
    assert "outcomes over 2 runs" in out and "P(lockup) [95% CI]" in out
    # The published outcome is printed beside the emulated one, brackets and all,
    # in cells that are not wrapped (the longest is "locked up after 5 s [completed]").
    assert "[locked up]" in out and "[completed]" in out
    # The same command again: every run has its row, nothing runs, same tables.
    status, again = experiment(capsys, "--out", str(tmp_path), "--runs", "2", "--json",
                               "--set", "run.seed=7")
    assert status == 0 and "8 runs: 8 already" in again
    assert read_rows(tmp_path) == rows
    assert json.loads((tmp_path / "seed-outcomes.json").read_text()) == counts


def test_workers_beyond_the_cores_are_refused(capsys, tmp_path):
    status, out = experiment(capsys, "--out", str(tmp_path), "--workers", "4096")
    assert status == 2 and "--oversubscribe" in out


def test_runs_must_be_positive(capsys, tmp_path):
    status, out = experiment(capsys, "--out", str(tmp_path), "--runs", "0")
    assert status == 2 and "--runs" in out


def test_the_seed_table_keeps_its_cells_whole_in_a_pipe():
    """Every kernel locked up: the widest table the experiment can print."""
    run = SimpleNamespace(outcome="lockup", elapsed_s=21.0, time={"sys_s": 20.9, "user_s": 0.1},
                          vm={"pswpout": 217, "nbd_sender_reclaim": 99999,
                              "nbd_sender_reclaim_exposed": 99999, "nbd_sender_near_miss": 99999},
                          nbd_sender={"longest_exposed_s": 99.999}, integrity_errors=0)
    buf = io.StringIO()
    print_seed_table(dict.fromkeys(SEED_KERNELS, run), Console(file=buf, width=PIPE_WIDTH))
    out = buf.getvalue()
    assert out.count("locked up after 21 s [completed]") == 3
    assert out.count("locked up after 21 s [locked up]") == 1
