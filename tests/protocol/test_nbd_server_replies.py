"""READ replies of the server: views of the memory backend, holes, ordering
against later pipelined writes, and the scatter-gather sender."""

from __future__ import annotations

import os
import random
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdproto as P
from userspace.nbd import server as S
from userspace.nbd.server import ExportSpec

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
def test_read_reply_is_not_changed_by_a_later_pipelined_write(
    server_factory, raw_client, io_mode, structured
):
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
    assert c.structured_chunk() == (
        P.NBD_REPLY_FLAG_DONE,
        P.NBD_REPLY_TYPE_OFFSET_HOLE,
        3,
        struct.pack(">QI", 2 * MiB + 5, MiB + 7),
    )

    s = raw_client(srv.port)
    s.go("")
    s.request(P.NBD_CMD_READ, 4, 2 * MiB + 5, MiB + 7)
    assert s.simple_reply(MiB + 7) == (0, 4, bytes(MiB + 7))


class _ShortSender:
    """A fake ``sendmsg`` that takes at most ``limits[i]`` bytes in its i-th
    call (cycling through ``limits`` when ``cycle``, else taking everything
    once they are used up)."""

    def __init__(self, limits, cycle: bool = True):
        self.limits = list(limits)
        self.cycle = cycle
        self.data = bytearray()
        self.calls = 0

    def __call__(self, buffers):
        assert len(buffers) <= S._SEND_IOV
        total = sum(len(b) for b in buffers)
        if self.cycle and self.limits:
            limit = self.limits[self.calls % len(self.limits)]
        elif self.calls < len(self.limits):
            limit = self.limits[self.calls]
        else:
            limit = total
        self.calls += 1
        n = left = min(total, max(1, limit))
        for b in buffers:
            if not left:
                break
            take = memoryview(b).cast("B")[:left]
            self.data += take
            left -= len(take)
        return n


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=300), st.integers(0, 700_000)), max_size=40),
    st.lists(st.integers(1, 400_000), max_size=20),
)
def test_send_parts_sends_every_byte_in_order(pieces, limits):
    """_send_parts sends the concatenation of its buffers exactly, whatever
    their number and sizes (empty, tiny, large) and wherever sendmsg calls
    stop short."""
    parts = []
    for p in pieces:
        if isinstance(p, int):
            parts.append(memoryview(os.urandom(p)) if p % 2 else bytearray(os.urandom(p)))
        else:
            parts.append(p)
    expect = b"".join(bytes(p) for p in parts)
    sender = _ShortSender(limits, cycle=False)
    S._send_parts(sender, list(parts))
    assert sender.data == expect
    # The same when the caller passes the total (the one-call fast path).
    sender = _ShortSender(limits, cycle=False)
    S._send_parts(sender, list(parts), len(expect))
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


# -- zero-copy READ replies from the memory backend


def test_read_views_alias_the_chunks_and_pread_copies():
    """read_views hands out views of the backend's chunks (a later write shows
    through them), zero views for chunks never written, None for a range
    never written; pread returns copies."""
    b = S.MemoryBackend(4 * MiB)
    assert b.read_views(0, 300_000) is None
    assert b.pread(5, 100) is None
    b.write(70_000, b"x" * 10)
    parts = b.read_views(0, 3 * S.CHUNK)
    assert [len(p) for p in parts] == [S.CHUNK] * 3
    assert parts[0].obj is S._ZERO_CHUNK and parts[2].obj is S._ZERO_CHUNK
    assert parts[1].obj is b.chunks[1]
    small = b.pread(70_000, 10)
    b.write(70_000, b"y" * 10)
    assert small == b"x" * 10  # a copy
    assert bytes(parts[1][70_000 - S.CHUNK : 70_000 - S.CHUNK + 10]) == b"y" * 10  # a view


def test_large_write_payload_is_read_back_without_a_copy():
    """A large WRITE's bytearray payload is adopted by the backend, and a
    large READ of it queues views of that same buffer: no copy between the
    socket that received the data and the socket that sends it back."""
    srv = S.NBDServer([ExportSpec("", 8 * MiB)])
    srv.open_exports()
    exp = srv._exports[""]
    payload = bytearray(os.urandom(MiB))
    out: list = []
    n = srv._answer_inline(out, P.Request(P.NBD_CMD_WRITE, 0, 1, 2 * S.CHUNK, MiB, payload), exp, False)
    assert n == 16 and out == [struct.pack(">IIQ", P.NBD_SIMPLE_REPLY_MAGIC, 0, 1)]
    for structured in (False, True):
        out = []
        n = srv._answer_inline(
            out, P.Request(P.NBD_CMD_READ, 0, 2, 2 * S.CHUNK + 100, 300_000), exp, structured
        )
        header, *parts = out
        assert len(header) == (28 if structured else 16) and n == len(header) + 300_000
        assert all(isinstance(p, memoryview) and p.obj is payload for p in parts)
        assert b"".join(parts) == payload[100:300_100]
    # Below the threshold the reply is a copy.
    out = []
    srv._answer_inline(out, P.Request(P.NBD_CMD_READ, 0, 3, 2 * S.CHUNK, S._VIEW_MIN - 1), exp, False)
    assert not any(isinstance(p, memoryview) for p in out[1:])
    srv._executor.shutdown()


# -- pipelined batches against a model of the disk

_SIZE = 2 * MiB
_ops = st.one_of(
    st.tuples(st.just(P.NBD_CMD_WRITE), st.integers(0, _SIZE - 1), st.integers(1, 300_000)),
    st.tuples(
        st.just(P.NBD_CMD_READ),
        st.integers(0, _SIZE - 1),
        st.sampled_from([1, 4096, S._VIEW_MIN - 1, S._VIEW_MIN, 200_000, MiB]),
    ),
    st.tuples(st.just(P.NBD_CMD_READ), st.integers(0, _SIZE - 1), st.integers(1, 400_000)),
    st.tuples(st.just(P.NBD_CMD_TRIM), st.integers(0, _SIZE - 1), st.integers(1, 400_000)),
    st.tuples(st.just(P.NBD_CMD_WRITE_ZEROES), st.integers(0, _SIZE - 1), st.integers(1, 400_000)),
    st.tuples(st.just(P.NBD_CMD_FLUSH), st.just(0), st.just(0)),
)


def _reply_any(c, structured: bool, reads: dict[int, tuple[int, int]]) -> tuple[int, bytes | None]:
    """The next reply, simple or structured: (cookie, data of a READ or None)."""
    magic = struct.unpack(">I", c.recvn(4))[0]
    if magic == P.NBD_SIMPLE_REPLY_MAGIC:
        error, cookie = struct.unpack(">IQ", c.recvn(12))
        assert error == 0, (cookie, error)
        return cookie, (c.recvn(reads[cookie][1]) if cookie in reads else None)
    assert magic == P.NBD_STRUCTURED_REPLY_MAGIC and structured, hex(magic)
    flags, ctype, cookie, length = struct.unpack(">HHQI", c.recvn(16))
    payload = c.recvn(length)
    # Our server answers every READ in one chunk.
    assert flags & P.NBD_REPLY_FLAG_DONE and cookie in reads
    offset, rlen = reads[cookie]
    if ctype == P.NBD_REPLY_TYPE_OFFSET_HOLE:
        assert struct.unpack(">QI", payload) == (offset, rlen)
        return cookie, bytes(rlen)
    assert ctype == P.NBD_REPLY_TYPE_OFFSET_DATA and struct.unpack(">Q", payload[:8])[0] == offset
    return cookie, payload[8:]


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_batches_match_a_model(server_factory, raw_client, io_mode, structured):
    """Random batches of WRITE / READ / TRIM / WRITE_ZEROES / FLUSH, each sent
    in one piece so that the server answers it as one batch (large READs as
    views of the chunks that later requests of the batch change), every
    READ's data equal to a model disk that applies the requests one by one
    in order.  Sizes straddle the view threshold and the 64 KiB chunks."""
    srv = server_factory([ExportSpec("", _SIZE)], io_mode=io_mode)
    c = raw_client(srv.port)
    c.go("", structured=structured)
    model = bytearray(_SIZE)
    cookies = iter(range(1, 1 << 60))

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(st.lists(_ops, min_size=1, max_size=12))
    def batch(ops):
        wire = bytearray()
        expect: dict[int, bytes | None] = {}
        reads: dict[int, tuple[int, int]] = {}
        for cmd, offset, length in ops:
            length = min(length, _SIZE - offset)
            cookie = next(cookies)
            wire += P.encode_request(cmd, cookie, offset, length)
            if cmd == P.NBD_CMD_WRITE:
                data = os.urandom(length)
                wire += data
                model[offset : offset + length] = data
                expect[cookie] = None
            elif cmd == P.NBD_CMD_READ:
                reads[cookie] = (offset, length)
                expect[cookie] = bytes(model[offset : offset + length])
            elif cmd in (P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES):
                model[offset : offset + length] = bytes(length)
                expect[cookie] = None
            else:
                expect[cookie] = None
        c.sock.sendall(wire)
        got = dict(_reply_any(c, structured, reads) for _ in expect)
        assert got == expect

    batch()


# -- busy poll: only while it can pay off


class _YieldCounter:
    """Stands in for ``os.sched_yield`` (the busy poll calls it between tries)."""

    def __init__(self):
        self.calls = 0
        self._real = os.sched_yield

    def __call__(self):
        self.calls += 1
        self._real()

    def settled(self, quiet: float = 0.2, timeout: float = 5.0) -> int:
        """Wait until no call came for ``quiet`` seconds; the count then."""
        deadline = time.monotonic() + timeout
        last = self.calls
        while time.monotonic() < deadline:
            time.sleep(quiet)
            if self.calls == last:
                return last
            last = self.calls
        raise AssertionError("still spinning")


@pytest.fixture
def yields(monkeypatch):
    counter = _YieldCounter()
    monkeypatch.setattr(os, "sched_yield", counter)
    return counter


def test_busy_poll_ends_when_the_client_goes_quiet(server_factory, raw_client, yields):
    """After a reply the connection spins for the next request for at most
    ``busy_poll_us``, then sleeps in recv: an idle client costs nothing."""
    srv = server_factory([ExportSpec("", 8 * MiB)], busy_poll_us=50_000)
    a = raw_client(srv.port)
    a.go("")
    a.request(P.NBD_CMD_READ, 1, 0, 4096)
    assert a.simple_reply(4096) == (0, 1, bytes(4096))
    spun = yields.settled()
    assert spun > 0  # it did spin after the reply
    time.sleep(0.5)
    assert yields.calls == spun  # and then slept


def test_busy_poll_off_with_other_connections_or_busy_workers(
    server_factory, raw_client, yields, tmp_path, monkeypatch
):
    """No spinning while another client is connected (the spinning thread
    would hold up the other's threads), nor while one of the connection's own
    requests is still running in a worker; the sole connection spins again
    once the other has gone."""
    release = threading.Event()
    real_flush = S.FileBackend.flush

    def slow_flush(self):
        release.wait(10)
        real_flush(self)

    monkeypatch.setattr(S.FileBackend, "flush", slow_flush)
    srv = server_factory(
        [ExportSpec("", 8 * MiB), ExportSpec("file", 8 * MiB, backend="file", path=str(tmp_path / "d.img"))],
        busy_poll_us=50_000,
    )
    a = raw_client(srv.port)
    a.go("")
    b = raw_client(srv.port)
    b.go("file")
    base = yields.settled()
    for i in range(20):
        a.request(P.NBD_CMD_WRITE, i, i * 4096, 4096, payload=bytes([i]) * 4096)
        assert a.simple_reply() == (0, i, b"")
    assert yields.settled() == base
    a.request(P.NBD_CMD_DISC, 0, 0, 0)
    assert a.is_closed()
    assert wait_until(lambda: srv.server._connections == 1)
    # b alone now, but its FLUSH is running in a worker: no spinning.
    b.request(P.NBD_CMD_FLUSH, 100, 0, 0)
    time.sleep(0.3)
    assert yields.settled() == base
    release.set()
    assert b.simple_reply() == (0, 100, b"")
    b.request(P.NBD_CMD_READ, 101, 0, 4096)
    assert b.simple_reply(4096) == (0, 101, bytes(4096))
    assert yields.settled() > base  # the sole connection, no worker busy: it spins again


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("io_mode", ["thread", "trio"])
@pytest.mark.parametrize("structured", [False, True])
def test_worker_replies_never_split_inline_ones(server_factory, raw_client, tmp_path, io_mode, structured):
    """File export: READs over 256 KiB and FLUSHes run in worker threads and
    send their own replies while the connection sends the inline ones; with
    3 workers at most, 300 pipelined requests of mixed sizes all come back
    whole (every reply's header and payload contiguous), each with its data."""
    path = tmp_path / "disk.img"
    disk = os.urandom(4 * MiB)
    path.write_bytes(disk)
    srv = server_factory(
        [ExportSpec("", 4 * MiB, backend="file", path=str(path))], io_mode=io_mode, max_inflight_per_client=3
    )
    c = raw_client(srv.port, timeout=20)
    c.go("", structured=structured)
    rng = random.Random(7)
    wire = bytearray()
    reads: dict[int, tuple[int, int]] = {}
    for cookie in range(1, 301):
        if cookie % 25 == 0:
            wire += P.encode_request(P.NBD_CMD_FLUSH, cookie, 0, 0)
            continue
        length = rng.choice([512, 4096, 200_000, 300_000, MiB])
        offset = rng.randrange(0, 4 * MiB - length)
        reads[cookie] = (offset, length)
        wire += P.encode_request(P.NBD_CMD_READ, cookie, offset, length)
    c.sock.sendall(wire)
    got = dict(_reply_any(c, structured, reads) for _ in range(300))
    assert sorted(got) == list(range(1, 301))
    for cookie, (offset, length) in reads.items():
        assert got[cookie] == disk[offset : offset + length], cookie
