"""`swapnbd serve` (userspace.nbd.serve): argument handling and a real foreground run."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import trio

import nbdproto as P
from userspace.nbd.client import NBDClient, NBDHandshakeError
from userspace.nbd.serve import add_serve_arguments, parse_export, parse_size, serve_main

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
        (["--size", "1M", "--max-clients", "0"], "--max-clients"),
        (["--size", "1M", "--idle-timeout", "-1"], "--idle-timeout"),
        (["--size", "1M", "--idle-timeout", "nan"], "--idle-timeout"),
        (["--size", "1M", "--handshake-timeout", "0"], "--handshake-timeout"),
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
            [sys.executable, "-m", "userspace.nbd.serve", *args],
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


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


async def test_serve_max_clients_refuses_and_idle_timeout_closes(serve_process, raw_client):
    proc = serve_process("--port", "0", "--size", "1M", "--max-clients", "1", "--idle-timeout", "0.5")
    line = await trio.to_thread.run_sync(proc.stdout.readline)
    port = int(re.search(r"nbd://127\.0\.0\.1:(\d+)/", line).group(1))
    url = f"nbd://127.0.0.1:{port}/"
    first = raw_client(port)
    first.go("")
    first.request(P.NBD_CMD_WRITE, 1, 0, 4, payload=b"held")
    assert first.simple_reply() == (0, 1, b"")
    with pytest.raises(NBDHandshakeError, match="ERR_POLICY server is at its limit of 1 client at once"):
        async with NBDClient.connect(url):
            pass
    first.request(P.NBD_CMD_READ, 2, 0, 4)
    assert first.simple_reply(4) == (0, 2, b"held")
    # Then the first client is idle: the server closes its connection, which frees the slot.
    assert await trio.to_thread.run_sync(first.is_closed, 10)
    async with NBDClient.connect(url) as again:  # the slot is free again
        assert await again.pread(0, 4) == b"held"
    proc.send_signal(signal.SIGTERM)
    rc = await trio.to_thread.run_sync(proc.wait, 10)
    evs = events(proc.stderr.read())
    assert rc == 0
    listening = next(e for e in evs if e["event"] == "nbd_server_listening")
    assert listening["max_clients"] == 1 and listening["idle_timeout_s"] == 0.5
    refused = [e for e in evs if e["event"] == "nbd_client_refused"]
    assert len(refused) == 1 and refused[0]["level"] == "warning"
    assert refused[0]["max_clients"] == 1 and refused[0]["peer"].startswith("127.0.0.1:")
    assert any(e["event"] == "nbd_client_idle_timeout" for e in evs)
    assert any(e["event"] == "nbd_client_closed" and e["reason"] == "idle_timeout" for e in evs)
    stopped = next(e for e in evs if e["event"] == "nbd_server_stopped")
    assert stopped["refused"] == 1 and stopped["idle_timeouts"] >= 1


def test_serve_help_documents_the_limits():
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-m", "userspace.nbd.serve", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    ).stdout
    for text in ("--max-clients", "--idle-timeout", "--handshake-timeout", "NBD_REP_ERR_POLICY", "limits:"):
        assert text in out, text
