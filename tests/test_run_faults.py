"""``swapnbd run`` when the run itself meets trouble: a log that cannot be written,
a swap device that never answers the handshake, and the small sharp edges of
configs (packaged configs by name, a page cache that scales with memory,
duplicate patches, a machine too big for the host). docs/FAULTS.md."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from emulator.cli import main
from emulator.config import (
    ConfigError,
    check_host_memory,
    from_dict,
    host_memory_mib,
    load,
)
from emulator.machine import SwapDeviceError, open_nbd_swap

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "machine.memory_mib=8", "--set", "swap.size_mib=32",
         "--set", "workload.passes=1"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# -- the log ---------------------------------------------------------------------------
def test_a_log_on_a_full_device_stops_the_run_with_status_8(capsys):
    status = main(["run", "quick", "--quiet", "--log", "/dev/full", *SMALL])
    out, err = capsys.readouterr()
    assert status == 8
    assert err.strip().splitlines() == [
        "swapnbd: log /dev/full: cannot write: No space left on device"]
    assert out == ""


def test_a_log_that_outgrows_its_limit_ends_at_a_line_boundary(tmp_path):
    """RLIMIT_FSIZE makes write() fail mid-run (EFBIG, as ENOSPC would on a full
    disk): the run stops with status 8 and one line, and the log is cut back to its
    last whole line."""
    limit = 12 * 1024

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    log = tmp_path / "run.jsonl"
    res = subprocess.run([sys.executable, "-m", "emulator.cli", "run", "quick", "--quiet",
                          "--log", str(log), *SMALL, "--set", "run.sample_interval_ms=10"],
                         cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False,
                         preexec_fn=limit_file_size)
    assert res.returncode == 8, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"swapnbd: log {log}: cannot write: File too large"]
    text = log.read_text()
    assert 0 < len(text) <= limit and text.endswith("\n")
    events = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert events[0]["event"] == "run_start"
    assert "Traceback" not in res.stderr + res.stdout


# -- a swap device that never speaks ----------------------------------------------------------
async def test_a_silent_listener_is_not_an_nbd_server():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        with pytest.raises(SwapDeviceError, match="sent no NBD greeting within 0.5 s"):
            await open_nbd_swap("127.0.0.1", port, "", 1 << 20, timeout=0.5)
    finally:
        for listener in listeners:
            await listener.aclose()


# -- configs ----------------------------------------------------------------------------------
def test_packaged_configs_work_from_anywhere(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in ("quick", "vanilla-slub", "swapnbd-slub", "vanilla-slab", "swapnbd-slab"):
        assert f"\n{name} " in "\n" + out
    assert main(["run", "quick", "--quiet", "--log", "q.jsonl", *SMALL]) == 0
    assert "completed" in capsys.readouterr().out
    assert load("vanilla-slub").machine.memory_mib == 192  # by name, from any directory


def test_page_cache_scales_with_memory():
    cfg = load("vanilla-slub", ["machine.memory_mib=40", "swap.size_mib=160"])
    assert cfg.machine.page_cache == 5  # 40 / 8
    assert load("vanilla-slub").machine.page_cache == 24
    assert load("quick", ["machine.page_cache_mib=2"]).machine.page_cache == 2


def test_duplicate_patches_are_refused(capsys):
    assert main(["run", "quick", "--set", "kernel.patches=[1, 1]"]) == 2
    err = capsys.readouterr().err
    assert "kernel.patches" in err and "more than once" in err


def test_a_machine_too_big_for_the_host_is_refused(capsys):
    cfg = from_dict({"machine": {"memory_mib": 4096}, "swap": {"size_mib": 8192}})
    assert host_memory_mib(cfg) > 4096
    with pytest.raises(ConfigError, match="needs about .* MiB of host memory"):
        check_host_memory(cfg, available_mib=1024)
    check_host_memory(cfg, available_mib=1 << 30)  # fits
    # 16 GiB of memory and 1 TiB of workload cannot fit anywhere: one line, status 2.
    status = main(["run", "quick", "--set", "machine.memory_mib=16384",
                   "--set", "workload.size_ratio=64", "--set", "swap.size_mib=1048576"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "host memory" in err


def test_the_wheel_ships_the_configs(tmp_path):
    """A plain install (a wheel) has the configs, so `swapnbd run quick` works there."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        path = ROOT / name
        if name.startswith(("emulator/", "actors/", "net/")) or name in ("pyproject.toml",
                                                                          "README.md"):
            dest = src / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    # What a wheel gets: setuptools' build_py (the packages and their package data).
    # (Through build_py rather than `pip wheel`, which needs the `wheel` package.)
    build = tmp_path / "build"
    res = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                          "build_py", "--build-lib", str(build)], cwd=src,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    for config in ("quick", "vanilla-slub", "swapnbd-slub", "vanilla-slab", "swapnbd-slab"):
        assert (build / "emulator" / "configs" / f"{config}.toml").is_file()
    assert (build / "emulator" / "cli.py").is_file()
