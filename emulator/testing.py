"""pytest fixtures for stress tests of the emulated machine (a pytest11 plugin).

Installed with the package (``[project.entry-points.pytest11] swapnbd``), so any
project that has ``swapnbd`` installed gets two fixtures:

``nbd_server``
    A userspace NBD server (userspace/nbd/server.py, memory backend) in its own OS
    thread with its own trio loop, listening on 127.0.0.1 on a free port, with
    one export named ``swap`` of 1 GiB (sparse). Yields an :class:`NBDServerHandle`
    (``.url`` is ``nbd://127.0.0.1:PORT/swap``, also ``.host``, ``.port``,
    ``.export``, ``.size``, ``.thread``). Stopped after the test.

``machine``
    A factory (an async function) that boots an emulated machine
    (``emulator.machine.Machine``, started with ``await nursery.start(m.run)``
    in pytest-trio's ``nursery`` fixture, which lives as long as the test) and
    returns a :class:`MachineHandle` once the machine is up::

        m = await machine("configs/quick.toml", "machine.cpus=2", "workload.passes=3")
        m = await machine(config_object)            # an emulator.config.Config

    Overrides are ``--set``-style ``section.key=value`` strings, checked like
    the CLI's (a bad one raises ConfigError). A relative config path that does
    not exist in the current directory is looked up under pytest's rootdir.
    The handle exposes ``.k`` (the Kernel), ``.vmstat`` (the live counters),
    ``.events`` (every log event since boot, as dicts), ``await
    .wait_until(predicate, timeout)``, ``await .wait_done(timeout)`` (the
    RunResult) and ``.stop()``. Every machine still running when the test ends
    is stopped, and the fixture waits for it to shut down.

Example (a user's own stress test; pytest-trio in trio_mode)::

    async def test_swap_survives_three_passes(machine, nbd_server):
        m = await machine("configs/quick.toml", "workload.passes=3",
                          f"swap.server={nbd_server.url!r}")
        await m.wait_until(lambda m: m.vmstat["pswpout"] > 1000, timeout=60)
        result = await m.wait_done(timeout=120)
        assert result.outcome == "completed"
        assert result.integrity_errors == 0
        assert m.events[-1]["event"] == "run_end"

Limitation: log events are routed through one process-wide sink
(``emulator.logs.sink``), so while two machines run at the same time each
handle's ``.events`` (and each log file) also holds the other's events.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio

from emulator import logs
from emulator.config import Config, load
from emulator.machine import Machine, RunResult
from userspace.nbd.server import ExportSpec
from userspace.nbd.thread import NBDServerThread

__all__ = ["MachineHandle", "NBDServerHandle", "machine", "nbd_server"]

#: Export size of the ``nbd_server`` fixture (memory backend: sparse, so free).
NBD_SERVER_EXPORT_SIZE = 1 << 30
#: How long teardown waits for a stopped machine to shut down.
STOP_TIMEOUT_S = 30.0


@attrs.frozen
class NBDServerHandle:
    url: str
    host: str
    port: int
    export: str
    size: int
    thread: NBDServerThread


@pytest.fixture
def nbd_server():
    """An embedded NBD server (own thread, own trio loop) with one export ``swap``."""
    srv = NBDServerThread([ExportSpec(name="swap", size=NBD_SERVER_EXPORT_SIZE)])
    srv.start()
    try:
        yield NBDServerHandle(url=srv.url("swap"), host=srv.host, port=srv.port,
                              export="swap", size=NBD_SERVER_EXPORT_SIZE, thread=srv)
    finally:
        srv.stop()


class MachineHandle:
    """A running (or finished) machine, as the ``machine`` fixture returns it."""

    def __init__(self, m: Machine) -> None:
        self.machine = m
        self.events: list[dict] = []  #: log events (dicts), oldest first

    # -- observation -----------------------------------------------------------------
    @property
    def k(self):
        """The emulated Kernel (emulator.kernel.Kernel)."""
        return self.machine.k

    @property
    def cfg(self) -> Config:
        return self.machine.cfg

    @property
    def vmstat(self) -> dict:
        """The live counters (/proc/vmstat names plus the emulator's)."""
        return self.machine.k.vmstat

    @property
    def done(self) -> bool:
        return self.machine.done.is_set()

    @property
    def result(self) -> RunResult | None:
        """The RunResult once the run has ended, else None."""
        return self.machine.result

    @property
    def log_path(self) -> str | None:
        return self.machine.log_path

    def events_named(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]

    def _observe(self, event_dict: dict) -> None:
        self.events.append(dict(event_dict))

    def _state(self) -> str:
        k = self.machine.k
        if k is None:
            return "not booted"
        vm = k.vmstat
        return (f"free={vm['nr_free_pages']} pswpout={vm['pswpout']} pswpin={vm['pswpin']} "
                f"progress={k.progress} outcome={self.result.outcome if self.result else None}")

    # -- waiting -----------------------------------------------------------------------
    async def wait_until(self, predicate: Callable[[MachineHandle], bool],
                         timeout: float = 60.0, interval: float = 0.05) -> None:
        """Poll ``predicate(handle)`` every ``interval`` s until it is true.

        Raises AssertionError if ``timeout`` seconds pass first, or if the run
        ends while the predicate is still false."""
        with trio.move_on_after(timeout):
            while True:
                if predicate(self):
                    return
                if self.done:
                    raise AssertionError(
                        f"machine finished ({self._state()}) before "
                        f"{getattr(predicate, '__name__', predicate)} became true")
                await trio.sleep(interval)
        if predicate(self):
            return
        raise AssertionError(f"{getattr(predicate, '__name__', predicate)} still false after "
                             f"{timeout} s ({self._state()})")

    async def wait_done(self, timeout: float = math.inf) -> RunResult:
        """Wait for the run to end; returns the RunResult. AssertionError on timeout."""
        with trio.move_on_after(timeout):
            await self.machine.done.wait()
        if not self.done:
            raise AssertionError(f"machine still running after {timeout} s ({self._state()})")
        return self.machine.result

    def stop(self) -> None:
        """End the run now; the outcome is whatever was observed so far."""
        self.machine.stop()


def _resolve(config: str | Path, rootdir: Path) -> Path:
    path = Path(config)
    if not path.is_absolute() and not path.exists() and (rootdir / path).exists():
        return rootdir / path
    return path


@pytest.fixture
async def machine(nursery, tmp_path, request):
    """Factory: ``await machine(config_or_path, "section.key=value", ...)`` boots a
    machine in the test's nursery and returns its MachineHandle."""
    handles: list[MachineHandle] = []
    rootdir = Path(request.config.rootpath)

    async def factory(config: str | Path | Config, *overrides: str,
                      log_path: str | Path | None = None,
                      debug_log: bool = False) -> MachineHandle:
        if isinstance(config, Config):
            if overrides:
                raise TypeError("overrides apply to a config file; evolve the Config instead")
            cfg = config
        else:
            cfg = load(_resolve(config, rootdir), overrides)
        if log_path is None:
            log_path = tmp_path / f"machine-{len(handles)}.jsonl"
        m = Machine(cfg, log_path, debug_log=debug_log)
        h = MachineHandle(m)
        handles.append(h)

        async def run(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            started = False

            class _Status:
                def started(self, value=None) -> None:
                    nonlocal started
                    started = True
                    task_status.started(value)

            logs.sink.observers.append(h._observe)
            try:
                await m.run(task_status=_Status())
            finally:
                logs.sink.observers.remove(h._observe)
            if not started:  # ended before booting (e.g. cannot reach the server)
                task_status.started(m)

        await nursery.start(run)
        return h

    yield factory

    for h in handles:
        if not h.done:
            h.stop()
    with trio.move_on_after(STOP_TIMEOUT_S):
        for h in handles:
            await h.machine.done.wait()
    stuck = [h for h in handles if not h.done]
    if stuck:
        raise AssertionError(f"{len(stuck)} machine(s) did not stop within {STOP_TIMEOUT_S} s")


def pytest_configure(config) -> None:
    """Route structlog through the run-log sink for the whole session, so that
    events logged outside a running machine are not printed to the terminal."""
    logs.configure()
