"""Client <-> server round trips over loopback, server semantics, shutdown."""

from __future__ import annotations

import functools
import os
import struct
import threading

import pytest
import trio

import nbdproto as P
from userspace.nbd import server as S
from userspace.nbd.client import (
    NBDClient,
    NBDError,
    NBDHandshakeError,
    nbd_handshake,
    nbd_list_exports,
    parse_nbd_url,
)
from userspace.nbd.server import ExportSpec, NBDServer

MiB = 1024 * 1024


@pytest.mark.parametrize("structured", [False, True])
async def test_roundtrip_memory_export(nbd_server, structured):
    async with NBDClient.connect(nbd_server.url(""), structured_replies=structured) as c:
        assert c.info.size == 64 * MiB and c.info.structured_replies == structured
        assert c.info.can_flush and c.info.can_fua and c.info.can_trim and not c.info.read_only
        data = os.urandom(3 * MiB + 123)
        await c.pwrite(data, 5 * MiB + 7)
        assert await c.pread(5 * MiB + 7, len(data)) == data
        assert await c.pread(60 * MiB, 8192) == bytes(8192)  # never written: zeroes (a hole)
        await c.pwrite(b"x" * 4096, 0, fua=True)
        await c.flush()
        await c.trim(5 * MiB + 7, 100)
        await c.zero(5 * MiB + 200, 50, no_hole=True)
        back = await c.pread(5 * MiB + 7, 300)
        assert back[:100] == bytes(100) and back[193:243] == bytes(50) and back[100:193] == data[100:193]


async def test_pipelined_concurrent_requests(nbd_server):
    async with NBDClient.connect(nbd_server.url()) as c:
        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(c.pwrite, bytes([i]) * 4096, i * 4096)
        results = {}

        async def read(i):
            results[i] = await c.pread(i * 4096, 4096)

        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(read, i)
        assert all(results[i] == bytes([i]) * 4096 for i in range(64))


async def test_exports_are_shared_between_connections(nbd_server):
    async with NBDClient.connect(nbd_server.url()) as a, NBDClient.connect(nbd_server.url()) as b:
        assert a.info.can_multi_conn
        await a.pwrite(b"shared", 1000)
        assert await b.pread(1000, 6) == b"shared"


async def test_file_backend_persists_and_fsyncs(nbd_server, tmp_path, monkeypatch):
    calls = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(S.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(S.os, "fdatasync", lambda fd: (calls.append("fdatasync"), real_fdatasync(fd))[1])
    async with NBDClient.connect(nbd_server.url("file")) as c:
        assert c.info.size == 8 * MiB
        data = os.urandom(300_000)
        await c.pwrite(data, 4096)
        await c.flush()
        assert "fsync" in calls
        await c.pwrite(b"fua!", 0, fua=True)
        assert "fdatasync" in calls
        assert await c.pread(4096, len(data)) == data
        await c.zero(4096, 65536)
        await c.trim(4096 + 65536, 4096)
        assert await c.pread(4096, 65536 + 4096) == bytes(65536 + 4096)
    with open(tmp_path / "disk.img", "rb") as f:
        raw = f.read()
    assert len(raw) == 8 * MiB and raw[:4] == b"fua!" and raw[4096 + 69632 : 4096 + 300_000] == data[69632:]


async def test_read_only_export(nbd_server):
    async with NBDClient.connect(nbd_server.url("ro")) as c:
        assert c.info.read_only and c.info.description == "read-only"
        assert await c.pread(0, 4096) == bytes(4096)
        with pytest.raises(NBDError) as exc:
            await c._request(P.NBD_CMD_WRITE, 0, 4, payload=b"nope")
        assert exc.value.nbd_error == P.NBD_EPERM
        with pytest.raises(NBDError) as exc:
            await c._request(P.NBD_CMD_TRIM, 0, 4096)
        assert exc.value.nbd_error == P.NBD_EPERM


async def test_error_values(nbd_server):
    async with NBDClient.connect(nbd_server.url()) as c:
        size = c.info.size
        cases = [
            ((P.NBD_CMD_READ, size, 1), P.NBD_EINVAL),
            ((P.NBD_CMD_READ, size - 512, 4096), P.NBD_EINVAL),
            ((P.NBD_CMD_WRITE, size, 4, 0, b"abcd"), P.NBD_ENOSPC),
            ((P.NBD_CMD_WRITE_ZEROES, size, 4096), P.NBD_ENOSPC),
            ((P.NBD_CMD_TRIM, size, 4096), P.NBD_EINVAL),
            ((P.NBD_CMD_READ, 0, 64 * MiB), P.NBD_EINVAL),  # over the 32 MiB maximum
            ((P.NBD_CMD_READ, 0, 512, 0x8000), P.NBD_EINVAL),  # unknown flag
            ((P.NBD_CMD_READ, 0, 512, P.NBD_CMD_FLAG_DF), P.NBD_EINVAL),  # DF without structured replies
            ((99, 0, 0), P.NBD_EINVAL),  # unknown command
            ((P.NBD_CMD_BLOCK_STATUS, 0, 4096), P.NBD_EINVAL),  # no meta context
        ]
        for args, err in cases:
            with pytest.raises(NBDError) as exc:
                await c._request(*args)
            assert exc.value.nbd_error == err, (args, exc.value)
        assert (await c._request(P.NBD_CMD_READ, 0, 0)).data == b""  # length 0: OK, stays up
        await c._request(P.NBD_CMD_CACHE, 0, 4096)
        assert await c.pread(0, 4) == bytes(4)


async def test_structured_read_hole_and_error(nbd_server):
    async with trio.open_nursery():
        stream = await trio.open_tcp_stream("127.0.0.1", nbd_server.port)
        async with stream:
            info = await nbd_handshake(stream, "", structured_replies=True)
            assert info.structured_replies and info.flags & P.NBD_FLAG_SEND_DF
            await stream.send_all(P.encode_request(P.NBD_CMD_READ, 1, 0, 4096, P.NBD_CMD_FLAG_DF))
            hdr = await _recv_exact(stream, 20)
            _, flags, ctype, cookie, length = struct.unpack(">IHHQI", hdr)
            assert (flags, ctype, cookie, length) == (
                P.NBD_REPLY_FLAG_DONE,
                P.NBD_REPLY_TYPE_OFFSET_HOLE,
                1,
                12,
            )
            await _recv_exact(stream, 12)
            await stream.send_all(P.encode_request(P.NBD_CMD_READ, 2, info.size, 1))
            _, flags, ctype, cookie, length = struct.unpack(">IHHQI", await _recv_exact(stream, 20))
            assert ctype == P.NBD_REPLY_TYPE_ERROR and cookie == 2
            assert struct.unpack(">I", (await _recv_exact(stream, length))[:4])[0] == P.NBD_EINVAL


async def _recv_exact(stream, n):
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        assert chunk
        buf += chunk
    return buf


async def test_handshake_errors_are_clear(nbd_server):
    with pytest.raises(NBDHandshakeError, match="'missing' not found"):
        async with NBDClient.connect(nbd_server.url("missing")):
            pass

    # Not an NBD server at all: a listener that sends HTTP.
    async def fake(stream):
        await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, fake, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(NBDHandshakeError, match="not an NBD server"):
            async with NBDClient.connect(f"nbd://127.0.0.1:{port}/"):
                pass
        n.cancel_scope.cancel()


async def test_list_exports(nbd_server):
    stream = await trio.open_tcp_stream("127.0.0.1", nbd_server.port)
    async with stream:
        assert await nbd_list_exports(stream) == [("", ""), ("ro", "read-only"), ("file", "")]


async def test_client_does_not_send_flush_when_not_offered():
    """A fake server without SEND_FLUSH: flush() must not put anything on the wire."""
    received = []
    finished = trio.Event()

    async def fake(stream):
        await stream.send_all(P.encode_greeting())
        hs_done = False
        buf = b""
        while not hs_done:
            buf += await stream.receive_some(4096)
            if len(buf) >= 4 + 16 and len(buf) >= 4 + 16 + struct.unpack(">I", buf[16:20])[0]:
                hs_done = True
        await stream.send_all(
            P.encode_option_reply(
                P.NBD_OPT_GO, P.NBD_REP_INFO, struct.pack(">HQH", 0, 1 << 20, P.NBD_FLAG_HAS_FLAGS)
            )
            + P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ACK)
        )
        while data := await stream.receive_some(4096):
            received.append(data)
        finished.set()

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, fake, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with NBDClient.connect(f"nbd://127.0.0.1:{port}/") as c:
            assert not c.info.can_flush
            await c.flush()
            await c.trim(0, 4096)
        with trio.fail_after(10):
            await finished.wait()  # the fake server saw the client close
        n.cancel_scope.cancel()
    wire = b"".join(received)
    assert wire == P.encode_request(P.NBD_CMD_DISC, 0, 0, 0)  # only the DISC


@pytest.mark.parametrize(
    "url,expected",
    [
        ("nbd://127.0.0.1:20001/disk", ("127.0.0.1", 20001, "disk")),
        ("nbd://localhost/", ("localhost", 10809, "")),
        ("nbd://localhost", ("localhost", 10809, "")),
        ("nbd://[::1]:99/a%20b", ("::1", 99, "a b")),
    ],
)
def test_parse_nbd_url(url, expected):
    assert parse_nbd_url(url) == expected


@pytest.mark.parametrize(
    "url", ["", "http://x/", "nbd+unix:///?socket=/s", "nbd://:10/", "nbd://h:99999/", "nbd://h:x/"]
)
def test_parse_nbd_url_errors(url):
    with pytest.raises(ValueError):
        parse_nbd_url(url)


async def test_replies_out_of_order_and_graceful_shutdown(tmp_path, monkeypatch):
    """A blocked FLUSH on the file export does not hold back a later READ
    (its reply overtakes); on shutdown the in-flight FLUSH completes, new
    requests get ESHUTDOWN, and serve() returns after DISC."""
    release = threading.Event()
    real_flush = S.FileBackend.flush

    def slow_flush(self):
        assert release.wait(10)
        real_flush(self)

    monkeypatch.setattr(S.FileBackend, "flush", slow_flush)
    server = NBDServer(
        [ExportSpec("f", MiB, backend="file", path=str(tmp_path / "f.img"))],
        shutdown_grace=5.0,
        handshake_timeout=5,
    )
    async with trio.open_nursery() as n:
        port = await n.start(server.serve, "127.0.0.1", 0)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        info = await nbd_handshake(stream, "f")
        tc = P.TransmissionClient()

        async def next_reply():
            while True:
                ev = tc.next_event()
                if ev is not P.NEED_DATA:
                    return ev
                data = await stream.receive_some(65536)
                assert data
                tc.receive_data(data)

        await stream.send_all(
            tc.send_request(P.NBD_CMD_FLUSH, 1, 0, 0) + tc.send_request(P.NBD_CMD_READ, 2, 0, 512)
        )
        assert await next_reply() == P.Reply(2, 0, bytes(512))  # overtook the FLUSH
        server.request_shutdown()
        await trio.sleep(0.05)
        await stream.send_all(tc.send_request(P.NBD_CMD_READ, 3, 0, 512))
        assert await next_reply() == P.Reply(3, P.NBD_ESHUTDOWN, None)
        release.set()
        assert await next_reply() == P.Reply(1, 0, None)  # in-flight request finished normally
        await stream.send_all(P.encode_request(P.NBD_CMD_DISC, 9, 0, 0))
        assert await stream.receive_some(10) == b""
        await stream.aclose()
    assert info.size == MiB and server.shutting_down


async def test_trio_io_mode_roundtrip(server_factory):
    srv = server_factory([ExportSpec("", 8 * MiB)], io_mode="trio")
    async with NBDClient.connect(srv.url()) as c:
        data = os.urandom(1 * MiB)
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(c.pwrite, data, i * MiB)
        assert await c.pread(3 * MiB, MiB) == data


def test_export_spec_validation():
    with pytest.raises(ValueError):
        ExportSpec("x", -1)
    with pytest.raises(ValueError):
        ExportSpec("x", 10, backend="disk")
    with pytest.raises(ValueError):
        ExportSpec("x", 10, backend="file")
    with pytest.raises(ValueError):
        NBDServer([ExportSpec("a", 1), ExportSpec("a", 2)])
    with pytest.raises(ValueError):
        NBDServer([])


def test_server_thread_start_failure_raises():
    from userspace.nbd.thread import NBDServerThread

    with NBDServerThread([ExportSpec("", MiB)]) as srv:
        with pytest.raises(RuntimeError, match="failed to start"):
            NBDServerThread([ExportSpec("", MiB)], port=srv.port).start()


async def test_client_handshake_timeout_and_refused():
    async def silent(stream):
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(NBDHandshakeError, match="timed out"):
            async with NBDClient.connect(f"nbd://127.0.0.1:{port}/", timeout=0.3):
                pass
        n.cancel_scope.cancel()
    with pytest.raises(NBDHandshakeError, match="cannot connect"):
        async with NBDClient.connect(f"nbd://127.0.0.1:{port}/"):
            pass


@pytest.mark.parametrize("host,port,name", [("127.0.0.1", 10809, "swap"), ("::1", 4000, ""),
                                             ("localhost", 1, "a b/c")])
def test_nbd_url_is_the_inverse_of_parse_nbd_url(host, port, name):
    from nbdproto import nbd_url, parse_nbd_url

    assert parse_nbd_url(nbd_url(host, port, name)) == (host, port, name)
