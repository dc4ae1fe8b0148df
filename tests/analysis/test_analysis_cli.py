"""analyze / compare / plot through the functions emulator/cli.py calls."""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import sys

import pytest
from logfactory import iter_run, write_log

from emulator.analysis import cli
from emulator.analysis.summary import VMSTAT_ROWS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _args(add, argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def analyze(argv):
    return cli.analyze_main(_args(cli.add_analyze_arguments, argv))


def compare(argv):
    return cli.compare_main(_args(cli.add_compare_arguments, argv))


def plot(argv):
    return cli.plot_main(_args(cli.add_plot_arguments, argv))


@pytest.fixture
def logs(tmp_path):
    return {
        "ok": write_log(tmp_path / "ok.jsonl", iter_run(samples=40, seed=1)),
        "lock": write_log(tmp_path / "lock.jsonl",
                          iter_run(samples=50, seed=2, kernel="vanilla", outcome="lockup")),
        "slab": write_log(tmp_path / "slab.jsonl", iter_run(samples=30, seed=3, slab="slab")),
        "cut": write_log(tmp_path / "cut.jsonl", iter_run(samples=30, seed=4, with_run_end=False),
                         corrupt_every=5, truncate_last=True),
    }


def test_analyze_prints_rows_and_timeline(logs, capsys):
    assert analyze([str(logs["ok"])]) == 0
    out = capsys.readouterr().out
    assert "MMTests Statistics: duration" in out and "MMTests Statistics: vmstat" in out
    for r in VMSTAT_ROWS:
        assert r.label in out
    assert "Kswapd efficiency" in out and re.search(r"Kswapd efficiency\s+\d+%", out)
    assert "first kswapd wake" in out and "completed" in out


def test_analyze_lockup_prints_diagnosis(logs, capsys):
    assert analyze([str(logs["lock"])]) == 0
    out = capsys.readouterr().out
    assert "Lockup at t=" in out
    assert "every skb allocation fails (reserves held by [netload] sockets)" in out


def test_analyze_incomplete_reports_skipped_lines(logs, capsys):
    assert analyze([str(logs["cut"])]) == 0
    out = capsys.readouterr().out
    assert "incomplete" in out
    assert re.search(r"\b\d+ lines skipped", out)


def test_analyze_json_is_one_object(logs, capsys):
    assert analyze([str(logs["ok"]), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    obj = json.loads(out)
    assert obj["outcome"] == "completed" and obj["schema"] == 1
    assert obj["vmstat"]["Swap Outs"] > 0
    assert obj["name"] == "swapnbd-slub"
    assert {"duration", "vmstat", "emulator", "timeline", "lockup", "lines_skipped"} <= set(obj)


def _header_ends(out, names):
    header = next(line for line in out.splitlines() if all(n in line for n in names))
    return [header.index(n) + len(n) for n in names]


def test_compare_columns_line_up(logs, capsys):
    paths = [str(logs[k]) for k in ("ok", "lock", "slab")]
    assert compare(paths) == 0
    out = capsys.readouterr().out
    names = ["swapnbd-slub", "vanilla-slub", "swapnbd-slab"]
    ends = _header_ends(out, names)
    labels = [r.label for r in VMSTAT_ROWS] + ["Total Elapsed Time (seconds)", "NBD requests"]
    checked = 0
    for line in out.splitlines():
        if any(line.strip().startswith(label) for label in labels):
            for e in ends:  # each cell right-aligned under its column name
                assert line[e - 1] != " " and (e == len(line) or line[e] == " "), line
            checked += 1
    assert checked >= len(labels)
    # blocks in MMTests order
    assert out.index("MMTests Statistics: duration") < out.index("MMTests Statistics: vmstat")


def test_compare_names_and_duplicates(logs, capsys):
    assert compare([str(logs["ok"]), str(logs["ok"]), "--name", "A", "--name", "B"]) == 0
    out = capsys.readouterr().out
    assert _header_ends(out, ["A", "B"])
    assert compare([str(logs["ok"]), str(logs["ok"])]) == 0
    out = capsys.readouterr().out
    assert "swapnbd-slub#2" in out
    assert compare([str(logs["ok"]), str(logs["lock"]), "--name", "only-one"]) == 2
    err = capsys.readouterr().err
    assert "--name" in err and err.count("\n") == 1


def test_compare_json(logs, capsys):
    assert compare([str(logs["ok"]), str(logs["lock"]), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in obj["runs"]] == ["swapnbd-slub", "vanilla-slub"]
    assert [r["outcome"] for r in obj["runs"]] == ["completed", "lockup"]


BAD = {
    "missing": (None, "no such file"),
    "empty": ("", "empty file"),
    "text": ("this is not json\n", "not a JSON-lines file"),
    "schema": ('{"event":"run_start","t":0,"schema":7,"config":{},"machine":{}}\n',
               "different schema version"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["analyze", "compare", "plot"])
def test_bad_input_exits_2_with_one_line(tmp_path, logs, capsys, case, command):
    content, message = BAD[case]
    p = tmp_path / f"{case}.jsonl"
    if content is not None:
        p.write_text(content)
    if command == "analyze":
        rc = analyze([str(p)])
    elif command == "compare":
        rc = compare([str(logs["ok"]), str(p)])
    else:
        rc = plot([str(p), "-o", str(tmp_path / "x.png")])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.count("\n") == 1 and message in captured.err
    assert captured.err.startswith(f"swapnbd {command}: error: ")
    assert "Traceback" not in captured.err
    assert not (tmp_path / "x.png").exists()


def _check_png(path, min_bytes=30_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 800 and height > 800
    return width, height


def test_plot_completed_and_lockup(logs, tmp_path, capsys):
    for key in ("ok", "lock"):
        out = tmp_path / f"{key}.png"
        assert plot([str(logs[key]), "-o", str(out)]) == 0
        _check_png(out)
    assert "wrote" in capsys.readouterr().out


def test_plot_overlay_incomplete_and_names(logs, tmp_path, capsys):
    out = tmp_path / "all.png"
    rc = plot([str(logs["ok"]), str(logs["lock"]), str(logs["cut"]), "-o", str(out),
               "--name", "patched", "--name", "vanilla", "--name", "killed"])
    assert rc == 0
    _check_png(out)
    assert "lines skipped" in capsys.readouterr().out


def test_plot_bad_output_and_no_samples(logs, tmp_path, capsys):
    assert plot([str(logs["ok"]), "-o", str(tmp_path / "nodir" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    header_only = write_log(tmp_path / "h.jsonl", [next(iter_run())])
    assert plot([str(header_only), "-o", str(tmp_path / "h.png")]) == 2
    assert "no vmstat samples" in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()


def test_module_entry_point(logs):
    r = subprocess.run([sys.executable, "-m", "emulator.analysis.cli", "analyze", str(logs["ok"])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Swap Outs" in r.stdout
    r = subprocess.run([sys.executable, "-m", "emulator.analysis.cli", "analyze",
                        str(logs["ok"]) + ".missing"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_labels_are_not_rich_markup(logs, capsys):
    assert compare([str(logs["ok"]), str(logs["lock"]), "--name", "[bold]x", "--name", "a[/]"]) == 0
    out = capsys.readouterr().out
    assert "[bold]x" in out and "a[/]" in out


def test_plot_real_run(tmp_path):
    from pathlib import Path

    log = Path(__file__).parent / "data" / "quick-swapnbd-slub.jsonl"
    out = tmp_path / "real.png"
    assert plot([str(log), "-o", str(out)]) == 0
    _check_png(out)


def test_real_lockup_run(tmp_path, capsys):
    """data/quick-vanilla-slub-lockup.jsonl: a real `swapnbd run configs/quick.toml
    --set kernel.patches=vanilla` log that ended in a lockup (exit 3)."""
    from pathlib import Path

    log = Path(__file__).parent / "data" / "quick-vanilla-slub-lockup.jsonl"
    assert analyze([str(log)]) == 0
    out = capsys.readouterr().out
    assert "Outcome   lockup" in out and "LOCKUP:" in out and "Lockup at t=" in out
    png = tmp_path / "lockup.png"
    assert plot([str(log), "-o", str(png)]) == 0
    _check_png(png)


# -- outcomes ---------------------------------------------------------------

def outcomes(argv):
    return cli.outcomes_main(_args(cli.add_outcomes_arguments, argv))


def _write_rows(d, rows):
    d.mkdir()
    with open(d / "runs.jsonl", "w") as fh:
        for i, r in enumerate(rows):
            fh.write(json.dumps({"run_id": f"{d.name}-{i}", "grid": {}, "overrides": [], **r}) + "\n")


def test_outcomes_pools_directories_and_keeps_set_overrides_apart(tmp_path, capsys):
    _write_rows(tmp_path / "a", [
        {"cell": "vanilla-slub", "seed": 1, "outcome": "lockup", "elapsed_s": 40.0, "lockup_at_s": 20.0},
        {"cell": "swapnbd-slub", "seed": 1, "outcome": "completed", "elapsed_s": 100.0}])
    _write_rows(tmp_path / "b", [
        {"cell": "vanilla-slub", "seed": 2, "outcome": "completed", "elapsed_s": 60.0},
        {"cell": "swapnbd-slub", "seed": 2, "outcome": "completed", "elapsed_s": 300.0},
        # Another sweep's --set: the same config name, not the same cell.
        {"cell": "vanilla-slub", "seed": 1, "outcome": "lockup", "elapsed_s": 30.0,
         "overrides": ["machine.cpus=4"]},
        # A grid value is in the cell name already and is not repeated.
        {"cell": "vanilla-slub machine.memory_mib=96", "seed": 1, "outcome": "lockup",
         "elapsed_s": 30.0, "overrides": ["machine.memory_mib=96"],
         "grid": {"machine.memory_mib": "96"}}])
    assert outcomes([str(tmp_path / "a"), str(tmp_path / "b"), "--markdown",
                     "--ratio", "swapnbd-slub/vanilla-slub"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in out.splitlines() if ln.startswith("| ")}
    assert "| 2 | 1 | 1 | 0.50 [" in lines["vanilla-slub"]
    assert "| 2 | 2 | 0 | 0.00 [" in lines["swapnbd-slub"]
    assert "| 1 | 0 | 1 | 1.00 [" in lines["vanilla-slub machine.cpus=4"]
    assert "vanilla-slub machine.memory_mib=96" in lines
    assert "median elapsed swapnbd-slub / vanilla-slub: 200.0 s / 50.0 s = 4.00" in out


def test_outcomes_refuses_an_unknown_cell_and_an_empty_directory(tmp_path, capsys):
    _write_rows(tmp_path / "a", [{"cell": "x", "seed": 1, "outcome": "completed", "elapsed_s": 1.0}])
    assert outcomes([str(tmp_path / "a"), "--ratio", "x/y"]) == cli.EXIT_BAD_INPUT
    assert "no cell named 'y'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert outcomes([str(tmp_path / "empty")]) == cli.EXIT_BAD_INPUT
    assert "no runs.jsonl rows" in capsys.readouterr().err


def test_outcomes_prints_shared_overrides_once_and_names_only_what_differs(tmp_path, capsys):
    shared = ["machine.memory_mib=24", "workload.passes=2"]
    _write_rows(tmp_path / "a", [
        # The ablation's kernel.patches differs between cells but not inside one:
        # the cell name already says it.
        {"cell": "vanilla+14", "seed": 1, "outcome": "completed", "elapsed_s": 20.0,
         "overrides": [*shared, "kernel.patches=[14]"]},
        {"cell": "vanilla+14", "seed": 2, "outcome": "completed", "elapsed_s": 22.0,
         "overrides": [*shared, "kernel.patches=[14]"]},
        {"cell": "vanilla+1", "seed": 1, "outcome": "lockup", "elapsed_s": 21.0, "lockup_at_s": 1.0,
         "overrides": [*shared, "kernel.patches=[1]"]}])
    assert outcomes([str(tmp_path / "a"), "--markdown"]) == 0
    out = capsys.readouterr().out
    names = [ln.split(" | ")[0].lstrip("| ") for ln in out.splitlines() if ln.startswith("| ")][1:]
    assert names == ["vanilla+14", "vanilla+1"]
    assert "every run: --set machine.memory_mib=24 --set workload.passes=2" in out
