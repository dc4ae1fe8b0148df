"""Helpers for the fault-injection tests: ``swapnbd run`` as a real process,
nbdkit servers started, killed and restarted by PID, and a relay in front of a
server that can stop reading.

Every process started here is ended by its test (``Proc.stop``: SIGTERM, then
SIGKILL, by PID), and every wait is bounded; the bounds only stop a test that
would otherwise hang, they are not performance thresholds.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quick.toml")

#: A small, fast machine: 8 MiB, 2 CPUs, 4 processes, one pass over 2x memory.
SMALL = ("machine.memory_mib=8", "swap.size_mib=32", "workload.passes=1",
         "run.max_duration_s=120", "run.sample_interval_ms=100")
#: Kernel time 20x faster: the hung-task rule (120 s) fires after 6 s.
FAST_HZ = ("time.hz_scale=0.05", "run.lockup_timeout_s=3")
#: How long a test waits for a run to end before failing it (a bound, not a threshold).
RUN_BOUND_S = 180.0


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        msg = f"{tool} is not installed (apt-get install nbdkit)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


class Proc:
    """A process this test started; ``stop()`` ends it by PID."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test stopped it
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            except ProcessLookupError:
                pass


class Nbdkit(Proc):
    """``nbdkit -f`` on 127.0.0.1:port (restartable on the same port)."""

    def __init__(self, args: tuple[str, ...], port: int | None = None) -> None:
        need("nbdkit")
        self.args = args
        self.port = port or free_port()
        super().__init__(self._spawn())

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(["nbdkit", "-f", "-p", str(self.port), "-i", "127.0.0.1",
                                 *self.args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_port(self.port, proc)
        return proc

    def restart(self) -> None:
        self.proc = self._spawn()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"


class Run(Proc):
    """``swapnbd run`` as a process of its own, logging to ``log``."""

    def __init__(self, tmp: Path, *overrides: str, config: str = QUICK,
                 extra_env: dict | None = None) -> None:
        self.log = tmp / "run.jsonl"
        args = [sys.executable, "-m", "emulator.cli", "run", config, "--quiet",
                "--log", str(self.log)]
        for o in overrides:
            args += ["--set", o]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        env.update(extra_env or {})
        self.out = open(tmp / "stdout.txt", "w+")  # noqa: SIM115 - closed by stop()
        self.err = open(tmp / "stderr.txt", "w+")  # noqa: SIM115
        super().__init__(subprocess.Popen(args, cwd=tmp, env=env, stdout=self.out,
                                          stderr=self.err))

    def events(self) -> list[dict]:
        """The log's events so far (a line being written is left out)."""
        out = []
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_for(self, predicate, timeout: float = 60.0) -> None:
        """Poll the log until ``predicate(events)``; fail if the run ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (status {self.proc.returncode}) first:\n"
                                     f"{self.stderr()}")
            time.sleep(0.1)
        raise AssertionError(f"still not true after {timeout} s")

    def swapped_out(self, pages: int = 1):
        def pred(events: list[dict]) -> bool:
            return any(e["event"] == "vmstat" and e["vm"]["pswpout"] >= pages for e in events)
        return pred

    def wait(self, timeout: float = RUN_BOUND_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"swapnbd run still running after {timeout} s") from None

    def stdout(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def run_end(self) -> dict:
        events = self.events()
        assert events, "empty log"
        assert events[0]["event"] == "run_start", events[0]["event"]
        assert events[-1]["event"] == "run_end", f"the log ends with {events[-1]['event']}"
        return events[-1]

    def stop(self) -> None:
        super().stop()
        self.out.close()
        self.err.close()


class StallingRelay:
    """A TCP relay on loopback in front of a server, which stops reading from its
    client on ``stop_reading()``: a server that takes no more data, whose receive
    window is small and fixed.

    Why not SIGSTOP the server: a stopped server's socket still takes data until
    its receive window closes, and that window is whatever the host's receive
    autotuning grew it to (tcp_rmem[2] is 32 MiB on Debian 12), which can hold
    everything the emulated machine has in flight. The relay's listening socket
    has a small SO_RCVBUF, so the window is a few KiB on any host.

    Replies keep flowing back. ``stop()`` closes every socket and joins the threads.
    """

    RCVBUF = 4096

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.reading = threading.Event()
        self.reading.set()
        self.closed = threading.Event()
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def stop_reading(self) -> None:
        self.reading.clear()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.socks += [client, upstream]
            for src, dst, gate in ((client, upstream, self.reading), (upstream, client, None)):
                t = threading.Thread(target=self._pump, args=(src, dst, gate), daemon=True)
                self.threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, gate) -> None:
        while not self.closed.is_set():
            if gate is not None and not gate.wait(0.2):
                continue  # not reading: the data stays in src's receive queue
            if not select.select([src], [], [], 0.2)[0]:
                continue
            try:
                data = src.recv(4096)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self.closed.set()
        self.reading.set()
        for s in self.socks:  # wakes a pump blocked in sendall
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(10)
        for s in (self.listener, *self.socks):
            s.close()
