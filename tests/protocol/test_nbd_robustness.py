"""Robustness of the server against bad, hostile and vanishing clients (issue 7 item 6)."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import struct
import termios
import threading
import time
import tracemalloc

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbdproto as P
from userspace.nbd.client import NBDClient
from userspace.nbd.server import ExportSpec

MiB = 1024 * 1024


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def assert_alive(port: int, raw_client) -> None:
    c = raw_client(port)
    c.go("")
    c.request(P.NBD_CMD_WRITE, 1, 4096, 4, payload=b"live")
    assert c.simple_reply() == (0, 1, b"")
    c.request(P.NBD_CMD_READ, 2, 4096, 4)
    assert c.simple_reply(4) == (0, 2, b"live")
    c.close()


def test_wrong_request_magic_closes_connection(nbd_server, raw_client):
    c = raw_client(nbd_server.port)
    c.go("")
    c.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    assert c.is_closed()
    assert_alive(nbd_server.port, raw_client)


def test_truncated_header_times_out(nbd_server, raw_client):
    c = raw_client(nbd_server.port)
    c.go("")
    c.sock.sendall(P.encode_request(P.NBD_CMD_READ, 1, 0, 512)[:13])
    assert c.is_closed(timeout=10)  # request_timeout is 2 s in the fixture
    assert_alive(nbd_server.port, raw_client)


def test_stalled_handshake_times_out(nbd_server, raw_client):
    c = raw_client(nbd_server.port)
    c.recvn(18)
    c.sock.sendall(b"\x00\x00")  # half of the client flags
    assert c.is_closed(timeout=10)


def test_length_zero_requests_keep_connection(nbd_server, raw_client):
    c = raw_client(nbd_server.port)
    c.go("")
    for cookie, cmd in enumerate(
        [P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES], 1
    ):
        c.request(cmd, cookie, 0, 0)
        assert c.simple_reply() == (0, cookie, b"")
    c.request(P.NBD_CMD_READ, 9, 0, 4)
    assert c.simple_reply(4) == (0, 9, bytes(4))


def test_oversized_write_is_drained_and_refused(server_factory, raw_client):
    srv = server_factory([ExportSpec("", 8 * MiB)], max_request=MiB)
    c = raw_client(srv.port)
    _, flags = c.go("")
    c.request(P.NBD_CMD_WRITE, 1, 0, 2 * MiB, payload=os.urandom(2 * MiB))
    assert c.simple_reply() == (P.NBD_EINVAL, 1, b"")
    c.request(P.NBD_CMD_READ, 2, 0, 2 * MiB)  # over the maximum too
    assert c.simple_reply() == (P.NBD_EINVAL, 2, b"")
    c.request(P.NBD_CMD_READ, 3, 0, 8)
    assert c.simple_reply(8) == (0, 3, bytes(8))  # nothing was written, stream intact


def test_bad_commands_keep_connection(nbd_server, raw_client):
    c = raw_client(nbd_server.port)
    size, _ = c.go("")
    c.request(77, 1, 0, 0)
    c.request(P.NBD_CMD_WRITE, 2, size - 2, 4, payload=b"abcd")
    c.request(P.NBD_CMD_READ, 3, 2**64 - 512, 1024)
    c.request(P.NBD_CMD_FLUSH, 4, 0, 0, flags=0x4000)
    assert [c.simple_reply()[:2] for _ in range(4)] == [
        (P.NBD_EINVAL, 1),
        (P.NBD_ENOSPC, 2),
        (P.NBD_EINVAL, 3),
        (P.NBD_EINVAL, 4),
    ]
    ro = raw_client(nbd_server.port)
    ro.go("ro")
    ro.request(P.NBD_CMD_WRITE, 5, 0, 4, payload=b"nope")
    ro.request(P.NBD_CMD_WRITE_ZEROES, 6, 0, 4)
    ro.request(P.NBD_CMD_READ, 7, 0, 4)
    assert ro.simple_reply() == (P.NBD_EPERM, 5, b"")
    assert ro.simple_reply() == (P.NBD_EPERM, 6, b"")
    assert ro.simple_reply(4) == (0, 7, bytes(4))


def test_client_vanishing_mid_write(nbd_server, raw_client):
    for _ in range(3):
        c = raw_client(nbd_server.port)
        c.go("")
        c.sock.sendall(P.encode_request(P.NBD_CMD_WRITE, 1, 0, MiB) + os.urandom(100_000))
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        c.close()
    assert wait_for(lambda: nbd_server.server._connections == 0)
    assert_alive(nbd_server.port, raw_client)


def test_disc_with_pending_replies(nbd_server, raw_client):
    c = raw_client(nbd_server.port)
    c.go("")
    c.sock.sendall(
        P.encode_request(P.NBD_CMD_WRITE, 1, 0, 4) + b"abcd" + P.encode_request(P.NBD_CMD_DISC, 2, 0, 0)
    )
    assert c.simple_reply() == (0, 1, b"")
    assert c.is_closed()


async def test_64_concurrent_clients_each_verify_own_region(nbd_server):
    region = 256 * 1024
    errors = []

    async def one(i: int) -> None:
        rnd = random.Random(i)
        async with NBDClient.connect(nbd_server.url()) as c:
            data = rnd.randbytes(region)
            for off in range(0, region, 64 * 1024):
                await c.pwrite(data[off : off + 64 * 1024], i * region + off)
            await c.flush()
            if await c.pread(i * region, region) != data:
                errors.append(i)

    async with trio.open_nursery() as n:
        for i in range(64):
            n.start_soon(one, i)
    assert errors == []
    assert wait_for(lambda: nbd_server.server._connections == 0)


# -- fuzzing, with a well-behaved client running alongside


@pytest.fixture
def fuzz_server(server_factory):
    return server_factory(
        [ExportSpec("", 4 * MiB), ExportSpec("safe", 4 * MiB)],
        max_request=MiB,
        handshake_timeout=2.0,
        request_timeout=2.0,
    )


@pytest.fixture
def good_client(fuzz_server, raw_client):
    state = {"rounds": 0, "error": None}
    stop = threading.Event()

    def run():
        try:
            c = raw_client(fuzz_server.port)
            c.go("safe")
            rnd = random.Random(7)
            cookie = 0
            while not stop.is_set():
                cookie += 1
                off = rnd.randrange(0, 4 * MiB - 65536, 512)
                data = rnd.randbytes(rnd.choice([512, 4096, 65536]))
                c.request(P.NBD_CMD_WRITE, cookie, off, len(data), payload=data)
                assert c.simple_reply() == (0, cookie, b"")
                cookie += 1
                c.request(P.NBD_CMD_READ, cookie, off, len(data))
                assert c.simple_reply(len(data)) == (0, cookie, data)
                state["rounds"] += 1
            c.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the fixture
            state["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield state
    stop.set()
    t.join(10)
    assert not t.is_alive()
    assert state["error"] is None, state["error"]
    assert state["rounds"] > 0


def _must_close(raw_client, port: int, payload: bytes, after_go: bool) -> None:
    c = raw_client(port, timeout=10)
    try:
        if after_go:
            c.go("")
        else:
            c.recvn(18)
        try:
            c.sock.sendall(payload)
            c.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return  # the server already closed: fine
        assert c.is_closed(timeout=10), "server kept a finished connection open"
    finally:
        c.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.tuples(st.sampled_from([1, 3, 0x80000003]), st.integers(0, 12), st.binary(max_size=40)),
            max_size=6,
        ).map(
            lambda opts: (
                struct.pack(">I", opts[0][0] & 3 if opts else 1)
                + b"".join(P.encode_option(o, d) for _, o, d in opts)
            )
        ),
    )
)
def test_fuzz_handshake(fuzz_server, good_client, raw_client, payload):
    _must_close(raw_client, fuzz_server.port, payload, after_go=False)


_request = st.builds(
    lambda cmd, flags, cookie, offset, length: (
        P.encode_request(cmd, cookie, offset, length, flags)
        + (bytes(min(length, 5000)) if cmd == P.NBD_CMD_WRITE else b"")
    ),
    st.integers(0, 10),
    st.sampled_from([0, 1, 2, 4, 0x10, 0x8000, 0xFFFF]),
    st.integers(0, 2**64 - 1),
    st.one_of(st.integers(0, 4 * MiB + 10), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 70000), st.sampled_from([2 * MiB, 2**32 - 1])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(_request, st.binary(min_size=1, max_size=64)), min_size=1, max_size=8))
def test_fuzz_transmission(fuzz_server, good_client, raw_client, parts):
    _must_close(raw_client, fuzz_server.port, b"".join(parts), after_go=True)


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
def test_many_pipelined_big_reads_with_slow_reader(server_factory, raw_client, io_mode):
    """128 pipelined 1 MiB READs while the client does not read: the server
    sends as it goes (bounded memory) and every reply arrives intact."""
    srv = server_factory([ExportSpec("", 8 * MiB)], io_mode=io_mode)
    c = raw_client(srv.port, timeout=20)
    c.go("")
    pattern = bytes(range(256)) * 4096
    c.request(P.NBD_CMD_WRITE, 1, 0, MiB, payload=pattern)
    assert c.simple_reply() == (0, 1, b"")
    c.sock.sendall(b"".join(P.encode_request(P.NBD_CMD_READ, 100 + i, 0, MiB) for i in range(128)))
    time.sleep(0.2)  # let the server hit a full socket buffer
    for i in range(128):
        assert c.simple_reply(MiB) == (0, 100 + i, pattern)


def _unread_bytes(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
@pytest.mark.parametrize("backend", ["memory", "memory-holes", "file"])
def test_memory_bounded_when_client_never_reads_replies(
    server_factory, raw_client, tmp_path, io_mode, backend
):
    """4096 pipelined READs of 256 KiB and 1 MiB (2.5 GiB of replies) from a
    client that never reads: the server stops reading requests once its
    replies fill the socket, and what it allocates meanwhile (Python
    allocations of every thread, traced) stays within a few MiB: queued
    replies are capped at 1 MiB (views of the memory backend's chunks, not
    copies), file READs over 256 KiB run in at most max_inflight workers."""
    spec = ExportSpec("", 8 * MiB)
    if backend == "file":
        spec = ExportSpec("", 8 * MiB, backend="file", path=str(tmp_path / "disk.img"))
    srv = server_factory([spec], io_mode=io_mode, max_inflight_per_client=4)
    c = raw_client(srv.port, timeout=10)
    c.go("")
    if backend != "memory-holes":
        for i in range(8):
            c.request(P.NBD_CMD_WRITE, i, i * MiB, MiB, payload=os.urandom(MiB))
            assert c.simple_reply() == (0, i, b"")
    sizes = [MiB if i % 2 else 256 * 1024 for i in range(4096)]
    wire = b"".join(P.encode_request(P.NBD_CMD_READ, 100 + i, (i % 7) * MiB, n) for i, n in enumerate(sizes))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        c.sock.sendall(wire)
        # Wait until the server is stuck: the client's receive queue stops growing.
        last = -1
        for _ in range(200):
            time.sleep(0.1)
            now = _unread_bytes(c.sock)
            if now == last and now > 0:
                break
            last = now
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert _unread_bytes(c.sock) < sum(sizes) // 50  # the server is held up, not done
    assert peak < 16 * MiB, peak
    c.close()
    assert_alive(srv.port, raw_client)
