"""Config loading (emulator/config.py): every bad value is a ConfigError naming
its key; --set overrides go through the same checks and are applied."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.config import Config, ConfigError, from_dict, load, parse_override
from emulator.patches import PatchSet

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "configs" / "quick.toml"


def test_quick_toml_loads():
    cfg = load(QUICK)
    assert cfg.machine.cpus == 2 and cfg.machine.memory_mib == 32
    assert cfg.machine.min_free_kbytes is None  # "auto"
    assert cfg.kernel.patches == PatchSet.preset("swapnbd")
    assert cfg.swap.server == "embedded" and cfg.workload.passes >= 2
    assert cfg.source == str(QUICK)


def test_overrides_are_applied():
    cfg = load(QUICK, ["machine.cpus=4", "machine.slab=slab", 'swap.backend="memory"',
                       "kernel.patches=[1, 15, 16]", "run.lockup_timeout_s=3",
                       "time.hz_scale=0.5", "machine.min_free_kbytes=1024",
                       "network.background.streams=2"])
    assert cfg.machine.cpus == 4 and cfg.machine.slab == "slab"
    assert cfg.kernel.patches == PatchSet.of({1, 15, 16})
    assert cfg.run.lockup_timeout_s == 3.0 and isinstance(cfg.run.lockup_timeout_s, float)
    assert cfg.time.hz_scale == 0.5 and cfg.machine.min_free_kbytes == 1024
    assert cfg.network.background.streams == 2
    assert load(QUICK, ["kernel.patches=vanilla"]).kernel.patches == PatchSet.preset("vanilla")
    assert load(QUICK, ["machine.min_free_kbytes=auto"]).machine.min_free_kbytes is None
    # The last of repeated overrides wins.
    assert load(QUICK, ["machine.cpus=3", "machine.cpus=5"]).machine.cpus == 5


def test_parse_override():
    assert parse_override("machine.cpus=2") == ("machine.cpus", 2)
    assert parse_override("kernel.patches=[1,2]") == ("kernel.patches", [1, 2])
    assert parse_override("machine.slab=slab") == ("machine.slab", "slab")
    assert parse_override("swap.server=nbd://h:1/x") == ("swap.server", "nbd://h:1/x")


@pytest.mark.parametrize("data, key, words", [
    ({"machine": {"cpu": 2}}, "machine.cpu", "unknown key"),
    ({"machine": {"cpus": "two"}}, "machine.cpus", "integer"),
    ({"machine": {"cpus": True}}, "machine.cpus", "integer"),
    ({"machine": {"cpus": 0}}, "machine.cpus", "out of range"),
    ({"machine": {"memory_mib": 1}}, "machine.memory_mib", "out of range"),
    ({"machine": {"slab": "slob"}}, "machine.slab", "'slab', 'slub'"),
    ({"machine": {"min_free_kbytes": "lots"}}, "machine.min_free_kbytes", "integer"),
    ({"machine": {"memory_mib": 16, "min_free_kbytes": 8192}}, "machine.min_free_kbytes",
     "half of memory"),
    ({"kernel": {"patches": [1, 17]}}, "kernel.patches", "unknown patch number"),
    ({"kernel": {"patches": [0]}}, "kernel.patches", "1-16"),
    ({"kernel": {"patches": "mainline"}}, "kernel.patches", "preset"),
    ({"kernel": {"patches": 5}}, "kernel.patches", "list of patch numbers"),
    ({"swap": {"size_mib": 10}}, "swap.size_mib", "smaller than the workload"),
    ({"swap": {"server": "http://x/"}}, "swap.server", "nbd://"),
    ({"swap": {"server": "nbd://127.0.0.1:0/"}}, "swap.server", "port 0"),
    ({"swap": {"backend": "file"}}, "swap.path", "needs swap.path"),
    ({"workload": {"kind": "fork-bomb"}}, "workload.kind", "anon-mmap-write"),
    ({"workload": {"size_ratio": 0}}, "workload.size_ratio", "out of range"),
    ({"run": {"lockup_timeout_s": "soon"}}, "run.lockup_timeout_s", "number"),
    ({"time": {"hz_scale": float("nan")}}, "time.hz_scale", "out of range"),
    ({"network": {"background": {"streams": -1}}}, "network.background.streams", "out of range"),
    ({"network": {"background": 3}}, "network.background", "table"),
    ({"disk": {"size": 1}}, "disk", "unknown section"),
    ({"machine": 3}, "machine", "table"),
])
def test_bad_values_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}: ")
    assert words in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("machine.bogus=1", "machine.bogus"),
    ("machine.cpus=lots", "machine.cpus"),
    ("machine.cpus=65", "machine.cpus"),
    ("kernel.patches=[16, 99]", "kernel.patches"),
    ("swap.size_mib=1", "swap.size_mib"),
    ("disk.size=1", "disk.size"),
    ("machine.cpus", "machine.cpus"),
    ("cpus=2", "cpus"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load(QUICK, [override])
    assert e.value.key == key


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file") as e:
        load(tmp_path / "missing.toml")
    assert e.value.key == str(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[machine]\ncpus = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load(bad)
    assert e.value.key == str(bad)


def test_defaults_and_workload_pages():
    cfg = from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.workload_pages == int(cfg.workload.size_ratio * cfg.machine.memory_mib * 256)
    d = cfg.to_dict()
    assert d["kernel"]["patches"] == {"name": "swapnbd", "applied": list(range(1, 17))}
