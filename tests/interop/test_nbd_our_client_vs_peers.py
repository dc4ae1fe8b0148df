"""Our client (userspace.nbd.client) against real NBD servers: nbdkit, qemu-nbd, nbd-server."""

from __future__ import annotations

import os

import pytest
import trio

import nbdproto as P
from userspace.nbd.client import NBDClient, NBDHandshakeError

MiB = 1024 * 1024

pytestmark = pytest.mark.interop


async def exercise(url: str, structured: bool) -> P.ExportInfo:
    """Handshake, pipelined writes/reads, flush, trim, zero: data identical."""
    async with NBDClient.connect(url, structured_replies=structured) as c:
        info = c.info
        assert info.size == 64 * MiB
        blobs = [os.urandom(64 * 1024) for _ in range(16)]
        async with trio.open_nursery() as n:
            for i, b in enumerate(blobs):
                n.start_soon(c.pwrite, b, i * 128 * 1024)
        got = {}

        async def read(i):
            got[i] = await c.pread(i * 128 * 1024, 64 * 1024)

        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(read, i)
        assert all(got[i] == blobs[i] for i in range(16))
        big = os.urandom(3 * MiB)
        await c.pwrite(big, 8 * MiB, fua=True)
        await c.flush()
        assert await c.pread(8 * MiB, len(big)) == big
        await c.zero(8 * MiB, 4096)
        assert await c.pread(8 * MiB, 4096) == bytes(4096)
        await c.trim(9 * MiB, MiB)  # a hint: contents unspecified afterwards
        assert await c.pread(10 * MiB, 4096) == big[2 * MiB : 2 * MiB + 4096]
        return info


@pytest.mark.parametrize("structured", [False, True])
async def test_nbdkit_memory(nbdkit_factory, structured):
    peer = nbdkit_factory()
    info = await exercise(peer.url, structured)
    assert info.structured_replies == structured
    assert info.can_flush and info.can_fua and info.can_trim and info.can_multi_conn


async def test_nbdkit_without_structured_replies(nbdkit_factory):
    peer = nbdkit_factory("--no-sr")
    info = await exercise(peer.url, structured=True)
    assert not info.structured_replies  # ERR_UNSUP → simple replies


async def test_nbdkit_plain_newstyle_export_name_fallback(nbdkit_factory):
    """--mask-handshake=0: the server is not fixed-newstyle, so only EXPORT_NAME works."""
    peer = nbdkit_factory("--mask-handshake=0")
    info = await exercise(peer.url, structured=False)
    assert info.size == 64 * MiB


async def test_nbdkit_block_size_constraints(nbdkit_factory):
    peer = nbdkit_factory(
        "--filter=blocksize-policy",
        params=(
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=1M",
            "blocksize-error-policy=error",
        ),
    )
    async with NBDClient.connect(peer.url) as c:
        assert (c.info.min_block, c.info.preferred_block, c.info.max_block) == (512, 4096, MiB)
        data = os.urandom(3 * MiB)
        await c.pwrite(data, 0)  # split into 1 MiB requests by the client
        assert await c.pread(0, 3 * MiB) == data
        with pytest.raises(ValueError, match="minimum block size"):
            await c.pread(1, 100)


async def test_nbdkit_read_only(nbdkit_factory):
    peer = nbdkit_factory("-r")
    async with NBDClient.connect(peer.url) as c:
        assert c.info.read_only
        assert await c.pread(0, 4096) == bytes(4096)
        with pytest.raises(OSError):
            await c.pwrite(b"x", 0)


@pytest.mark.parametrize("structured", [False, True])
async def test_qemu_nbd_raw_file(qemu_nbd, structured):
    info = await exercise(qemu_nbd.url, structured)
    assert info.name == "disk" and info.max_block == 32 * MiB
    raw = qemu_nbd.image.read_bytes()
    assert raw[8 * MiB : 8 * MiB + 4096] == bytes(4096)


async def test_qemu_nbd_unknown_export(qemu_nbd):
    with pytest.raises(NBDHandshakeError, match="'nope' not found"):
        async with NBDClient.connect(qemu_nbd.url.rsplit("/", 1)[0] + "/nope"):
            pass


async def test_nbd_server_file(nbd_server_peer):
    info = await exercise(nbd_server_peer.url, structured=True)
    assert not info.structured_replies  # nbd-server 3.24 has no structured replies
    assert info.can_flush and info.can_fua and info.can_trim


async def test_nbd_server_unknown_export(nbd_server_peer):
    with pytest.raises(NBDHandshakeError, match="not found"):
        async with NBDClient.connect(nbd_server_peer.url.rsplit("/", 1)[0] + "/nope"):
            pass


async def test_nbd_server_read_only_export(nbd_server_peer):
    async with NBDClient.connect(nbd_server_peer.url.rsplit("/", 1)[0] + "/ro") as c:
        assert c.info.read_only and c.info.size == 64 * MiB
