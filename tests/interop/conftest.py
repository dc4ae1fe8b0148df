"""Fixtures for interop tests against real NBD peers (nbdkit, qemu-nbd, nbd-server,
libnbd tools).  A missing tool skips the test, or fails it when ``CI`` is set."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from userspace.nbd.server import ExportSpec
from userspace.nbd.thread import NBDServerThread

MiB = 1024 * 1024


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = (f"{name} is not installed "
               "(apt-get install nbdkit libnbd-bin qemu-utils nbd-server python3-libnbd fio)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def need_python_nbd() -> str:
    """nbdsh runs `python3 -m nbd`; Debian's module lives in /usr/bin/python3."""
    need_tool("nbdsh")
    ok = subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode == 0
    if not ok:
        msg = "python3-libnbd (module nbd for /usr/bin/python3) is not installed"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return "/usr/bin/python3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, **kwargs)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def our_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ours")
    exports = [
        ExportSpec("", 64 * MiB, description="memory export"),
        ExportSpec("disk", 32 * MiB, backend="file", path=str(tmp / "disk.img")),
        ExportSpec("ro", 4 * MiB, read_only=True),
    ]
    srv = NBDServerThread(exports, shutdown_grace=0.5)
    srv.start()
    yield srv
    srv.stop()


class Peer:
    def __init__(self, name: str, url: str, proc: subprocess.Popen | None = None, pid: int | None = None):
        self.name = name
        self.url = url
        self.proc = proc
        self.pid = pid

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture
def nbdkit_factory():
    peers: list[Peer] = []

    def start(*extra: str, plugin: tuple[str, ...] = ("memory", "64M"), params: tuple[str, ...] = ()) -> Peer:
        need_tool("nbdkit")
        port = free_port()
        proc = subprocess.Popen(
            ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", *extra, *plugin, *params],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        peer = Peer("nbdkit", f"nbd://127.0.0.1:{port}/", proc)
        peers.append(peer)
        wait_port(port, proc)
        return peer

    yield start
    for p in peers:
        p.stop()


@pytest.fixture
def qemu_nbd(tmp_path):
    need_tool("qemu-nbd")
    img = tmp_path / "qemu.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "-t", "-e", "4", "-p", str(port), "-b", "127.0.0.1", "-f", "raw", "-x", "disk",
         str(img)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peer = Peer("qemu-nbd", f"nbd://127.0.0.1:{port}/disk", proc)
    peer.image = img  # type: ignore[attr-defined]
    try:
        wait_port(port, proc)
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def nbd_server_peer(tmp_path):
    need_tool("nbd-server")
    img = tmp_path / "nbd-server.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    port = free_port()
    conf = tmp_path / "nbd-server.conf"
    pidfile = tmp_path / "nbd-server.pid"
    conf.write_text(
        f"[generic]\n    port = {port}\n    listenaddr = 127.0.0.1\n    allowlist = true\n"
        f"[disk]\n    exportname = {img}\n    flush = true\n    fua = true\n    trim = true\n"
        f"[ro]\n    exportname = {img}\n    readonly = true\n"
    )
    subprocess.run(["nbd-server", "-C", str(conf), "-p", str(pidfile)], check=True, capture_output=True,
                   timeout=10)
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        # The daemon creates the pid file before it writes the pid into it.
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text:
            break
        time.sleep(0.05)
    pid = int(text)  # read it now: nbd-server deletes it on exit
    peer = Peer("nbd-server", f"nbd://127.0.0.1:{port}/disk", pid=pid)
    peer.image = img  # type: ignore[attr-defined]
    try:
        wait_port(port)
        yield peer
    finally:
        peer.stop()


class Tools:
    """Helpers handed to tests as a fixture (test modules must not import conftest)."""

    need_tool = staticmethod(need_tool)
    need_python_nbd = staticmethod(need_python_nbd)
    run = staticmethod(run)


@pytest.fixture
def tools() -> Tools:
    return Tools()
