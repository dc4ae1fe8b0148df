"""`swapnbd serve` (net.nbd.serve): argument handling and a real foreground run."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

import pytest
import trio

from net.nbd.client import NBDClient
from net.nbd.serve import add_serve_arguments, parse_export, parse_size, serve_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize(
    "text,value", [("4096", 4096), ("512M", 512 << 20), ("1G", 1 << 30), ("2k", 2048), ("1GiB", 1 << 30)]
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1", "1X", "G", "1.5G"])
def test_parse_size_errors(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_export():
    e = parse_export("disk=1G:file=/tmp/x.img:ro")
    assert (e.name, e.size, e.backend, e.path, e.read_only) == ("disk", 1 << 30, "file", "/tmp/x.img", True)
    assert parse_export("=4096").name == ""
    with pytest.raises(ValueError, match="unknown option"):
        parse_export("a=1M:rw")


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "nothing to serve"),
        (["--size", "lots"], "invalid size"),
        (["--export", "a=1M", "--export", "a=2M"], "duplicate"),
        (["--size", "1M", "--max-request-mib", "0"], "max-request-mib"),
        (["--export", "x"], "invalid --export"),
        (["--size", "1M", "--port", "70000"], "--port"),
        (["--size", "1M", "--busy-poll-us", "-1"], "--busy-poll-us"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert serve_main(parse(argv)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_process(tmp_path):
    procs = []

    def start(*args):
        env = dict(os.environ, PYTHONPATH=REPO)
        proc = subprocess.Popen(
            [sys.executable, "-m", "net.nbd.serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_serve_foreground_and_sigterm(serve_process, tmp_path):
    port = free_port()
    proc = serve_process(
        "--port",
        str(port),
        "--size",
        "4M",
        "--export",
        f"f=1M:file={tmp_path / 'f.img'}",
        "--export",
        "r=64k:ro",
    )
    line = await trio.to_thread.run_sync(proc.stdout.readline)
    assert f"nbd://127.0.0.1:{port}/ " in line and f"nbd://127.0.0.1:{port}/f" in line
    async with NBDClient.connect(f"nbd://127.0.0.1:{port}/f") as c:
        await c.pwrite(b"hello", 0)
        await c.flush()
        assert await c.pread(0, 5) == b"hello"
    proc.send_signal(signal.SIGTERM)
    rc = await trio.to_thread.run_sync(proc.wait, 10)
    err = proc.stderr.read()
    assert rc == 0, err
    assert '"event": "nbd_server_listening"' in err and '"event": "nbd_server_stopped"' in err
    assert (tmp_path / "f.img").read_bytes()[:5] == b"hello"


async def test_serve_port_in_use(serve_process):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = serve_process("--port", str(s.getsockname()[1]), "--size", "1M")
        rc = await trio.to_thread.run_sync(proc.wait, 10)
    assert rc == 2 and "cannot serve" in proc.stderr.read()
