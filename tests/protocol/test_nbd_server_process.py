"""NBDServerProcess: ``swapnbd serve`` as the machine's child process."""

from __future__ import annotations

import os

import pytest

from emulator.config import load
from emulator.machine import Machine
from userspace.nbd.client import NBDClient
from userspace.nbd.process import NBDServerProcess, export_argument
from userspace.nbd.serve import parse_export
from userspace.nbd.server import ExportSpec


def test_export_argument_round_trips_through_the_cli_parser(tmp_path):
    for spec in (ExportSpec("swap", 1 << 20),
                 ExportSpec("disk", 8 << 20, backend="file", path=str(tmp_path / "d.img"),
                            read_only=True)):
        back = parse_export(export_argument(spec))
        assert (back.name, back.size, back.backend, back.path, back.read_only) == (
            spec.name, spec.size, spec.backend, spec.path, spec.read_only)
    with pytest.raises(ValueError, match="cannot be passed"):
        export_argument(ExportSpec("a:b", 4096))


async def test_serves_then_stops_by_its_pid():
    srv = NBDServerProcess([ExportSpec("swap", 1 << 20)])
    await srv.start()
    try:
        assert srv.port and srv.url("swap").endswith(f":{srv.port}/swap")
        async with NBDClient.connect(srv.url("swap")) as c:
            await c.pwrite(b"\x5a" * 4096, 8192)
            assert await c.pread(8192, 4096) == b"\x5a" * 4096
    finally:
        await srv.aclose()
    assert srv.proc.returncode == 0  # SIGTERM: a graceful stop, exit status 0
    with pytest.raises(ProcessLookupError):
        os.kill(srv.pid, 0)
    await srv.aclose()  # idempotent


async def test_a_child_that_cannot_serve_says_why(tmp_path):
    missing = tmp_path / "no-such-dir" / "swap.img"
    srv = NBDServerProcess([ExportSpec("swap", 1 << 20, backend="file", path=str(missing),
                                       read_only=True)])
    with pytest.raises(RuntimeError, match="does not exist"):
        await srv.start()
    assert srv.proc.returncode == 2


async def test_the_embedded_server_is_a_child_process_that_ends_with_the_run(tmp_path):
    cfg = load("quick", ["machine.memory_mib=16", "swap.size_mib=32", "workload.size_ratio=1.5",
                         "workload.passes=1"])
    m = Machine(cfg, tmp_path / "run.log")
    result = await m.run()
    assert result.outcome == "completed"
    assert m.server.proc.returncode == 0 and m.server.pid != os.getpid()
