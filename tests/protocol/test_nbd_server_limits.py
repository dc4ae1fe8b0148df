"""The server's limits (issue 21 item 8): ``max_clients`` with a clear refusal in the
handshake, the idle timeout after the handshake, and the handshake timeout."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time

import pytest
import trio

import nbdproto as P
from userspace.nbd.client import NBDClient, NBDHandshakeError
from userspace.nbd.server import MAX_REFUSING, ExportSpec, FileBackend

MiB = 1024 * 1024
REFUSAL = "server is at its limit of 1 client at once; try again later"


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def need_nbdinfo() -> str:
    path = shutil.which("nbdinfo")
    if path is None:
        msg = "nbdinfo is not installed (apt-get install libnbd-bin)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def start_options(c) -> None:
    """Read the greeting and send the client flags (fixed newstyle, no zeroes)."""
    magic, opt, _ = struct.unpack(">QQH", c.recvn(18))
    assert magic == P.NBDMAGIC and opt == P.IHAVEOPT
    c.sock.sendall(struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES))


# -- max_clients


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
async def test_second_client_is_refused_and_served_after_the_first_leaves(server_factory, io_mode):
    srv = server_factory(max_clients=1, io_mode=io_mode)
    async with NBDClient.connect(srv.url()) as first:
        await first.pwrite(b"first", 0)
        for structured in (False, True):  # refused on GO, or already on STRUCTURED_REPLY
            with pytest.raises(NBDHandshakeError, match=f"ERR_POLICY {REFUSAL}"):
                async with NBDClient.connect(srv.url(), structured_replies=structured):
                    pass
        # The first client keeps working.
        await first.pwrite(b"still", 4096)
        assert await first.pread(0, 5) == b"first"
        assert srv.server.clients == 1
    assert await trio.to_thread.run_sync(wait_for, lambda: srv.server.clients == 0)
    async with NBDClient.connect(srv.url()) as third:
        assert await third.pread(4096, 5) == b"still"
    assert srv.server.stats["refused"] == 2


def test_refused_client_gets_err_policy_on_every_option_and_may_abort(server_factory, raw_client):
    srv = server_factory(max_clients=1)
    holder = raw_client(srv.port)
    holder.go("")
    c = raw_client(srv.port)
    start_options(c)
    for opt, data in [
        (P.NBD_OPT_LIST, b""),
        (P.NBD_OPT_INFO, P.encode_info_request("")),
        (P.NBD_OPT_GO, P.encode_info_request("")),
    ]:
        c.sock.sendall(P.encode_option(opt, data))
        assert c.option_reply() == (opt, P.NBD_REP_ERR_POLICY, REFUSAL.encode())
    c.sock.sendall(P.encode_option(P.NBD_OPT_ABORT))
    assert c.option_reply() == (P.NBD_OPT_ABORT, P.NBD_REP_ACK, b"")
    assert c.is_closed()
    # The holder was not disturbed.
    holder.request(P.NBD_CMD_WRITE, 1, 0, 4, payload=b"live")
    assert holder.simple_reply() == (0, 1, b"")


def test_refused_export_name_is_closed_without_a_reply(server_factory, raw_client):
    srv = server_factory(max_clients=1)
    holder = raw_client(srv.port)
    holder.go("")
    c = raw_client(srv.port)
    start_options(c)
    c.sock.sendall(P.encode_option(P.NBD_OPT_EXPORT_NAME, b""))
    c.sock.settimeout(10)
    assert c.sock.recv(1) == b""  # closed: no size/flags reply, nothing at all
    holder.request(P.NBD_CMD_READ, 2, 0, 4)
    assert holder.simple_reply(4)[:2] == (0, 2)


def test_refused_client_that_stalls_is_closed_by_the_handshake_timeout(server_factory, raw_client):
    srv = server_factory(max_clients=1, handshake_timeout=0.5)
    holder = raw_client(srv.port)
    holder.go("")
    c = raw_client(srv.port)
    c.recvn(18)  # the greeting, then nothing
    assert c.is_closed(timeout=10)
    assert srv.server.clients == 1


def test_refusals_in_progress_are_bounded(server_factory, raw_client):
    """Beyond MAX_REFUSING refusals at once, a new connection is closed before the greeting."""
    srv = server_factory(max_clients=1, handshake_timeout=30)
    holder = raw_client(srv.port)
    holder.go("")
    for _ in range(MAX_REFUSING):
        raw_client(srv.port).recvn(18)  # greeted: its refusal is in progress
    extra = raw_client(srv.port)
    extra.sock.settimeout(10)
    try:
        assert extra.sock.recv(18) == b""
    except ConnectionResetError:
        pass
    holder.request(P.NBD_CMD_READ, 3, 0, 4)
    assert holder.simple_reply(4)[:2] == (0, 3)


def test_nbdinfo_is_refused_while_the_first_client_holds_the_server(server_factory, raw_client):
    nbdinfo = need_nbdinfo()
    srv = server_factory(max_clients=1)
    holder = raw_client(srv.port)
    holder.go("")
    env = dict(os.environ, LIBNBD_DEBUG="1")
    res = subprocess.run([nbdinfo, srv.url()], capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode != 0
    assert "server replied with error to opt_go request" in res.stderr
    assert f"server error message: {REFUSAL}" in res.stderr
    holder.request(P.NBD_CMD_READ, 4, 0, 4)
    assert holder.simple_reply(4)[:2] == (0, 4)
    holder.close()
    assert wait_for(lambda: srv.server.clients == 0)
    res = subprocess.run([nbdinfo, "--size", srv.url()], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(64 * MiB)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_max_clients_must_be_a_positive_integer(bad):
    from userspace.nbd.server import NBDServer

    with pytest.raises(ValueError, match="max_clients"):
        NBDServer([ExportSpec("", MiB)], max_clients=bad)


# -- idle timeout


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
def test_idle_connection_is_closed(server_factory, raw_client, io_mode):
    srv = server_factory(idle_timeout=0.5, io_mode=io_mode)
    c = raw_client(srv.port)
    c.go("")
    c.request(P.NBD_CMD_WRITE, 1, 0, 4, payload=b"idle")
    assert c.simple_reply() == (0, 1, b"")
    assert c.is_closed(timeout=10)
    assert wait_for(lambda: srv.server.stats["idle_timeouts"] == 1)
    assert wait_for(lambda: srv.server.clients == 0)


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
def test_connection_that_keeps_sending_is_not_closed(server_factory, raw_client, io_mode):
    srv = server_factory(idle_timeout=1.0, io_mode=io_mode)
    c = raw_client(srv.port)
    c.go("")
    cookie = 0
    end = time.monotonic() + 2.5  # well past the idle timeout, in total
    while time.monotonic() < end:
        cookie += 1
        c.request(P.NBD_CMD_READ, cookie, 0, 512)
        assert c.simple_reply(512)[:2] == (0, cookie)
        time.sleep(0.05)
    c.request(P.NBD_CMD_READ, cookie + 1, 0, 512)
    assert c.simple_reply(512)[:2] == (0, cookie + 1)
    assert srv.server.stats["idle_timeouts"] == 0


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
def test_request_in_flight_is_not_idleness(server_factory, raw_client, monkeypatch, tmp_path, io_mode):
    """A FLUSH that takes longer than the idle timeout: the client is waiting, not idle."""
    real_flush = FileBackend.flush

    def slow_flush(self):
        time.sleep(1.5)
        real_flush(self)

    monkeypatch.setattr(FileBackend, "flush", slow_flush)
    export = ExportSpec("f", MiB, backend="file", path=str(tmp_path / "f.img"))
    srv = server_factory([export], idle_timeout=0.5, io_mode=io_mode)
    c = raw_client(srv.port, timeout=10)
    c.go("f")
    c.request(P.NBD_CMD_FLUSH, 7, 0, 0)
    assert c.simple_reply() == (0, 7, b"")
    assert srv.server.stats["idle_timeouts"] == 0
    assert c.is_closed(timeout=10)  # idle once the reply is out
    assert wait_for(lambda: srv.server.stats["idle_timeouts"] == 1)


def test_idle_timeout_zero_never_closes(server_factory, raw_client):
    srv = server_factory()  # idle_timeout defaults to 0
    c = raw_client(srv.port)
    c.go("")
    assert not c.is_closed(timeout=1.0)
    c.request(P.NBD_CMD_READ, 1, 0, 4)
    assert c.simple_reply(4)[:2] == (0, 1)


def test_idle_timeout_is_not_negative():
    from userspace.nbd.server import NBDServer

    with pytest.raises(ValueError, match="idle_timeout"):
        NBDServer([ExportSpec("", MiB)], idle_timeout=-1)
