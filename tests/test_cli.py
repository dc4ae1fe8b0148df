"""``swapnbd run`` on bad input: exit status 2 and one line naming the problem,
before anything starts (no log file is created). Through emulator.cli.main."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quick.toml")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    status = main(["run", *args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, out, err, *needles):
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("swapnbd: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert not Path("run.log").exists()  # nothing started


@pytest.mark.parametrize("overrides, needles", [
    (["machine.cpuz=2"], ["machine.cpuz", "unknown key", "cpus"]),           # unknown key
    (["machine.cpus=two"], ["machine.cpus", "integer"]),                       # wrong type
    (["machine.memory_mib=1.5"], ["machine.memory_mib", "integer"]),          # wrong type
    (["machine.cpus=0"], ["machine.cpus", "out of range", "1..64"]),          # out of range
    (["time.hz_scale=1000"], ["time.hz_scale", "out of range"]),
    (["kernel.patches=[3, 17]"], ["kernel.patches", "17", "1-16"]),           # unknown patch
    (["kernel.patches=newest"], ["kernel.patches", "vanilla", "swapnbd"]),    # unknown preset
    (["swap.size_mib=32"], ["swap.size_mib", "smaller than the workload", "64"]),  # too small
    (["machine.memory_mib=64"], ["swap.size_mib", "128"]),                    # ... via memory
    (["disk.size_mib=2"], ["disk.size_mib", "unknown section", "machine"]),   # unknown section
    (["machine.cpus"], ["machine.cpus", "section.key=value"]),                # bad --set syntax
    (["cpus=2"], ["cpus", "section.key"]),                                    # bad --set syntax
    (["swap.server=nbd://"], ["swap.server"]),
])
def test_config_errors_exit_2_naming_the_key(capsys, overrides, needles):
    args = [QUICK]
    for o in overrides:
        args += ["--set", o]
    assert_one_line_error(*run_cli(capsys, *args), *needles)


def test_unknown_key_in_the_file(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[machine]\ncpus = 2\nflux_capacitor = 1\n")
    assert_one_line_error(*run_cli(capsys, str(cfg)), "machine.flux_capacitor", "unknown key")


def test_unknown_section_in_the_file(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[machine]\ncpus = 2\n[gpu]\ncount = 1\n")
    assert_one_line_error(*run_cli(capsys, str(cfg)), "gpu", "unknown section")


def test_missing_config_file(capsys):
    assert_one_line_error(*run_cli(capsys, "no/such/config.toml"),
                          "no/such/config.toml", "no such config file")


def test_unparsable_toml(capsys, tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[machine\ncpus = = 2\n")
    assert_one_line_error(*run_cli(capsys, str(cfg)), str(cfg), "not valid TOML")


def test_unwritable_log_path(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, out, err = run_cli(capsys, QUICK, "--log", str(blocker / "sub" / "run.log"))
    assert status == 2 and "--log" in err and len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(capsys):
    assert main(["run"]) == 2  # missing CONFIG
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
    capsys.readouterr()
    assert main(["run", "--help"]) == 0
    assert "--set" in capsys.readouterr().out
