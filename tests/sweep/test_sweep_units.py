"""The sweep's parts that need no cluster: the Wilson interval against published
values, planning (seeds, grid values, the cross product), a row from a log or
from an exit status, the cell summaries, and ``swapnbd plot DIR``."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from emulator.analysis.outcomes import read_rows, summarize_cells, summary_markdown, wilson_interval
from emulator.analysis.reader import LogReader
from emulator.cli import main
from emulator.sweep import (
    GZIP_ABOVE,
    PlanError,
    _log_bytes,
    outcome_fields,
    parse_grid,
    parse_seeds,
    plan_sweep,
    split_values,
)


# -- Wilson interval --------------------------------------------------------------------
@pytest.mark.parametrize("k, n, low, high, tol", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion",
    # Stat. Med. 17:857, table II, method 3 (score interval without continuity correction).
    (81, 263, 0.2553, 0.3662, 5e-5),
    (15, 148, 0.0624, 0.1605, 5e-5),
    (0, 20, 0.0, 0.1611, 5e-5),
    (1, 29, 0.0061, 0.1718, 5e-5),
    # Closed forms: k = 0 gives [0, z²/(n+z²)], k = n gives [n/(n+z²), 1].
    (0, 10, 0.0, 3.8414588 / 13.8414588, 1e-6),
    (10, 10, 10 / 13.8414588, 1.0, 1e-6),
    # Symmetric about 1/2 at k = n/2 (R: binom::binom.wilson(5, 10)).
    (5, 10, 0.2365931, 0.7634069, 1e-6),
])
def test_wilson_interval_matches_known_values(k, n, low, high, tol):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=tol) and hi == pytest.approx(high, abs=tol)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(3, 7)
    assert 0 < lo < 3 / 7 < hi < 1
    with pytest.raises(ValueError):
        wilson_interval(4, 3)


# -- planning ---------------------------------------------------------------------------
def test_seeds_ranges_and_lists():
    assert parse_seeds("1-4") == [1, 2, 3, 4]
    assert parse_seeds("7") == [7]
    assert parse_seeds("1,5,9-11,5") == [1, 5, 9, 10, 11]
    for bad in ("", "a-b", "5-2", "1,,2"):
        with pytest.raises(PlanError):
            parse_seeds(bad)


def test_grid_values_keep_lists_and_strings_whole():
    assert split_values('16,24,[1, 15],"a,b"') == ["16", "24", "[1, 15]", '"a,b"']
    assert parse_grid(["kernel.patches=vanilla,[1,14]"]) == [
        ("kernel.patches", ["vanilla", "[1,14]"])]
    for bad in (["memory_mib=1,2"], ["machine.memory_mib"], ["machine.cpus=1,"],
                ["machine.cpus=1", "machine.cpus=2"]):
        with pytest.raises(PlanError):
            parse_grid(bad)


def test_plan_is_the_cross_product_with_unique_ids():
    specs = plan_sweep(["configs/quick.toml", "x/vanilla-slub.toml"], ["workload.passes=1"],
                       [("machine.memory_mib", ["16", "24"]), ("kernel.patches", ["vanilla"])],
                       [1, 2, 3])
    assert len(specs) == 2 * 2 * 1 * 3
    assert len({s.run_id for s in specs}) == len(specs)
    assert len({s.cell for s in specs}) == 4
    s = specs[0]
    assert s.cell == "quick machine.memory_mib=16 kernel.patches=vanilla"
    assert s.run_overrides() == ("workload.passes=1", "machine.memory_mib=16",
                                 "kernel.patches=vanilla", "run.seed=1")
    assert s.log_name == f"logs/{s.run_id}.jsonl"
    with pytest.raises(PlanError):
        plan_sweep(["a.toml", "a.toml"], [], [], [1])


# -- a row from a run -------------------------------------------------------------------
def _write_log(path, *events):
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def test_row_outcome_comes_from_run_end(tmp_path):
    log = tmp_path / "run.jsonl"
    _write_log(log, {"event": "run_start", "t": 0.0, "schema": 1, "config": {}, "machine": {}},
               {"event": "lockup", "t": 12.5, "diagnosis": {"stalled_s": 5.25}},
               {"event": "run_end", "t": 12.6, "outcome": "some-new-outcome", "elapsed_s": 12.6,
                "integrity_errors": 0, "vm": {"pswpout": 42}, "time": {"user_s": 1, "sys_s": 2},
                "nbd_sender": {"longest_exposed_s": 0.5}, "error": None})
    # The exit status is not consulted when the log has a run_end.
    row = outcome_fields(log, 99, None)
    assert row["outcome"] == "some-new-outcome" and row["run_end"] is True
    assert row["exit_status"] == 99
    assert row["lockup_at_s"] == pytest.approx(7.25)
    assert row["pswpout"] == 42 and row["pswpin"] is None
    assert row["nbd_sender_longest_exposed_s"] == 0.5


def test_row_without_run_end_falls_back_to_the_exit_status(tmp_path):
    missing = tmp_path / "none.jsonl"
    row = outcome_fields(missing, 2, "swapnbd: machine.slab: expected one of ...")
    assert row["outcome"] == "error" and row["run_end"] is False
    assert row["error"].startswith("swapnbd: machine.slab")
    assert outcome_fields(missing, 3, None)["outcome"] == "lockup"
    assert outcome_fields(missing, -9, None)["error"] == "no run_end, exit status -9"


def test_large_logs_are_shipped_compressed_and_still_readable(tmp_path):
    log = tmp_path / "big.jsonl"
    pad = "x" * 1000
    _write_log(log, {"event": "run_start", "t": 0.0, "schema": 1},
               *({"event": "vmstat", "t": float(i), "pad": pad} for i in range(GZIP_ABOVE // 900)),
               {"event": "run_end", "t": 9.0, "outcome": "completed"})
    data, gz = _log_bytes(log)
    assert gz and len(data) < log.stat().st_size
    stored = tmp_path / "big.jsonl.gz"
    stored.write_bytes(data)
    assert gzip.decompress(data) == log.read_bytes()
    reader = LogReader(stored)
    assert sum(1 for _ in reader.events()) == GZIP_ABOVE // 900 + 2
    assert reader.run_end["outcome"] == "completed"


# -- summaries and plot -----------------------------------------------------------------
def _rows():
    rows = []
    for mem, outcomes in (("16", ["lockup"] * 3 + ["completed"]),
                          ("24", ["completed"] * 3 + ["error"])):
        for seed, outcome in enumerate(outcomes, 1):
            rows.append({"run_id": f"q-{mem}-{seed}", "cell": f"quick machine.memory_mib={mem}",
                         "config": "configs/quick.toml", "grid": {"machine.memory_mib": mem},
                         "seed": seed, "outcome": outcome, "run_end": outcome != "error",
                         "elapsed_s": None if outcome == "error" else 10.0 + seed,
                         "lockup_at_s": 4.0 if outcome == "lockup" else None})
    return rows


def test_cells_count_outcomes_and_leave_errors_out_of_p_lockup():
    small, big = summarize_cells(_rows())
    assert small.counts == {"lockup": 3, "completed": 1} and small.decided == 4
    assert small.p_lockup == 0.75 and small.interval == wilson_interval(3, 4)
    assert big.counts == {"completed": 3, "error": 1} and big.decided == 3
    assert big.p_lockup == 0.0 and big.elapsed_s == (11.0, 12.0, 13.0)
    md = summary_markdown([small, big])
    lo, hi = wilson_interval(3, 4)
    assert f"| quick machine.memory_mib=16 | 4 | 1 | 3 | 0 | 0.75 [{lo:.2f}, {hi:.2f}] |" in md
    assert "| 12.0 (11.0-13.0) |" in md


def test_read_rows_skips_torn_lines_and_keeps_the_last_row_of_a_run(tmp_path):
    rows = _rows()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    again = dict(rows[0], outcome="completed")
    (tmp_path / "runs.jsonl").write_text(text + json.dumps(again) + "\n" + '{"run_id": "tor')
    got = read_rows(tmp_path)
    assert len(got) == len(rows)
    assert [r for r in got if r["run_id"] == rows[0]["run_id"]] == [again]


def test_plot_dir_draws_the_sweep(tmp_path, capsys):
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    os.mkdir(empty)
    assert main(["plot", str(empty)]) == 2
