"""READ replies of the server: views of the memory backend, holes, ordering
against later pipelined writes, and the scatter-gather sender."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from net.nbd import protocol as P
from net.nbd import server as S
from net.nbd.server import ExportSpec

MiB = 1024 * 1024


def _read_reply(c, structured: bool, cookie: int, offset: int, length: int) -> bytes:
    """The data of a successful READ reply (holes read as zeroes)."""
    if not structured:
        err, got_cookie, data = c.simple_reply(length)
        assert (err, got_cookie) == (0, cookie)
        return data
    flags, ctype, got_cookie, payload = c.structured_chunk()
    assert got_cookie == cookie and flags & P.NBD_REPLY_FLAG_DONE
    if ctype == P.NBD_REPLY_TYPE_OFFSET_HOLE:
        assert struct.unpack(">QI", payload) == (offset, length)
        return bytes(length)
    assert ctype == P.NBD_REPLY_TYPE_OFFSET_DATA, ctype
    assert struct.unpack(">Q", payload[:8])[0] == offset
    return payload[8:]


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
@pytest.mark.parametrize("structured", [False, True])
def test_read_reply_is_not_changed_by_a_later_pipelined_write(server_factory, raw_client, io_mode, structured):
    """Large READ replies are sent from views of the backend's chunks; a WRITE
    pipelined right behind the READ (same receive buffer) must not change the
    bytes of the READ's reply, whether it rewrites chunks in place or replaces
    them."""
    srv = server_factory([ExportSpec("", 8 * MiB)], io_mode=io_mode)
    c = raw_client(srv.port)
    c.go("", structured=structured)
    size = 256 * 1024  # a view-sized READ, well under the 1 MiB that forces a send
    old = os.urandom(size)
    c.request(P.NBD_CMD_WRITE, 1, 4096, size, payload=old)  # straddles chunks: partial ones at both ends
    assert c.simple_reply() == (0, 1, b"")
    # All in one receive buffer, so the server handles them in one batch.
    c.sock.sendall(
        P.encode_request(P.NBD_CMD_READ, 2, 4096, size)
        + P.encode_request(P.NBD_CMD_WRITE, 3, 8192, 4096)
        + b"n" * 4096
        + P.encode_request(P.NBD_CMD_WRITE_ZEROES, 4, 100_000, 5000)
        + P.encode_request(P.NBD_CMD_READ, 5, 4096, size)
        + P.encode_request(P.NBD_CMD_WRITE, 6, 4096 + 65536, 1000)
        + b"m" * 1000
        + P.encode_request(P.NBD_CMD_TRIM, 7, 0, MiB)
        + P.encode_request(P.NBD_CMD_READ, 8, 4096, size)
    )
    assert _read_reply(c, structured, 2, 4096, size) == old
    assert c.simple_reply() == (0, 3, b"")
    assert c.simple_reply() == (0, 4, b"")
    new = bytearray(old)
    new[4096 : 4096 + 4096] = b"n" * 4096
    new[100_000 - 4096 : 100_000 - 4096 + 5000] = bytes(5000)
    assert _read_reply(c, structured, 5, 4096, size) == new
    assert c.simple_reply() == (0, 6, b"")
    assert c.simple_reply() == (0, 7, b"")
    assert _read_reply(c, structured, 8, 4096, size) == bytes(size)


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
def test_large_reads_over_holes(server_factory, raw_client, io_mode):
    """A large READ over partly written chunks is data with zeroes in the
    gaps; over chunks never written it is one OFFSET_HOLE chunk (structured)
    or zeroes (simple)."""
    srv = server_factory([ExportSpec("", 8 * MiB)], io_mode=io_mode)
    c = raw_client(srv.port)
    c.go("", structured=True)
    c.request(P.NBD_CMD_WRITE, 1, 70000, 5, payload=b"hello")
    assert c.simple_reply() == (0, 1, b"")
    c.request(P.NBD_CMD_READ, 2, 1000, 256 * 1024)
    _, ctype, cookie, payload = c.structured_chunk()
    assert (ctype, cookie) == (P.NBD_REPLY_TYPE_OFFSET_DATA, 2)
    expect = bytearray(256 * 1024)
    expect[69000:69005] = b"hello"
    assert payload == struct.pack(">Q", 1000) + expect
    c.request(P.NBD_CMD_READ, 3, 2 * MiB + 5, MiB + 7)
    assert c.structured_chunk() == (P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_HOLE, 3, struct.pack(">QI", 2 * MiB + 5, MiB + 7))

    s = raw_client(srv.port)
    s.go("")
    s.request(P.NBD_CMD_READ, 4, 2 * MiB + 5, MiB + 7)
    assert s.simple_reply(MiB + 7) == (0, 4, bytes(MiB + 7))


class _ShortSender:
    """A fake ``sendmsg`` that takes at most a given number of bytes per call."""

    def __init__(self, limits):
        self.limits = list(limits)
        self.data = bytearray()
        self.calls = 0

    def __call__(self, buffers):
        total = sum(len(b) for b in buffers)
        assert len(buffers) <= S._SEND_IOV
        limit = self.limits[self.calls % len(self.limits)] if self.limits else total
        self.calls += 1
        n = min(total, max(1, limit))
        self.data += b"".join(bytes(b) for b in buffers)[:n]
        return n


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=300), st.integers(0, 700_000)), max_size=40),
    st.lists(st.integers(1, 400_000), max_size=5),
)
def test_send_parts_sends_every_byte_in_order(pieces, limits):
    """_send_parts sends the concatenation of its buffers exactly, whatever
    their number and sizes (empty, tiny, large) and however short each
    sendmsg call is."""
    parts = []
    for p in pieces:
        if isinstance(p, int):
            parts.append(memoryview(os.urandom(p)) if p % 2 else bytearray(os.urandom(p)))
        else:
            parts.append(p)
    expect = b"".join(bytes(p) for p in parts)
    sender = _ShortSender(limits)
    S._send_parts(sender, list(parts))
    assert sender.data == expect


def test_busy_poll_serves_one_then_two_clients(server_factory, raw_client):
    """With busy polling on, the sole client's requests (QD1 and pipelined)
    are answered; a second client connecting meanwhile is served too (the
    first connection then sleeps in recv instead of spinning); a client that
    disconnects ends its connection."""
    srv = server_factory([ExportSpec("", 8 * MiB)], busy_poll_us=500)
    a = raw_client(srv.port)
    a.go("", structured=True)
    for i in range(50):
        data = os.urandom(4096)
        a.request(P.NBD_CMD_WRITE, i, i * 4096, 4096, payload=data)
        assert a.simple_reply() == (0, i, b"")
        a.request(P.NBD_CMD_READ, 1000 + i, i * 4096, 4096)
        assert _read_reply(a, True, 1000 + i, i * 4096, 4096) == data
    b = raw_client(srv.port)
    b.go("")
    b.sock.sendall(b"".join(P.encode_request(P.NBD_CMD_READ, 2000 + i, i * 4096, 4096) for i in range(50)))
    a.request(P.NBD_CMD_READ, 3000, 0, 8192)
    got_b = [b.simple_reply(4096) for _ in range(50)]
    assert [r[1] for r in got_b] == [2000 + i for i in range(50)]
    assert len(_read_reply(a, True, 3000, 0, 8192)) == 8192
    b.request(P.NBD_CMD_DISC, 0, 0, 0)
    assert b.is_closed()
    a.request(P.NBD_CMD_READ, 3001, 0, 4)
    assert len(_read_reply(a, True, 3001, 0, 4)) == 4


def test_send_parts_more_buffers_than_one_sendmsg_takes():
    """More buffers than IOV_MAX allows in one call go out in several calls, in order."""
    parts = [bytes([i % 251]) * (1 + i % 7) for i in range(3 * S._SEND_IOV + 5)]
    sender = _ShortSender([1000, 5, 100_000])
    S._send_parts(sender, list(parts))
    assert sender.data == b"".join(parts)
