"""The server over a non-socket trio Stream (the _StreamIO path): handshake and
a WRITE/READ round trip over an in-memory stream pair."""

import trio
import trio.testing

from userspace.nbd.client import NBDClient, nbd_handshake
from userspace.nbd.server import ExportSpec, NBDServer


async def test_transmission_over_memory_stream():
    srv = NBDServer([ExportSpec("x", 1 << 20)])
    srv.open_exports()
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(srv.handle_stream, server_side)
        info = await nbd_handshake(client_side, "x")
        assert info.size == 1 << 20
        c = NBDClient(client_side, info)
        async with trio.open_nursery() as inner:
            inner.start_soon(c._reader)
            await c.pwrite(b"swap" * 1024, 4096)
            assert await c.pread(4096, 4096) == b"swap" * 1024
            inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
