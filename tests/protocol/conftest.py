"""Shared fixtures for the NBD protocol / server tests."""

from __future__ import annotations

import socket
import struct

import pytest

import nbdproto as P
from userspace.nbd.server import ExportSpec
from userspace.nbd.thread import NBDServerThread

MiB = 1024 * 1024


@pytest.fixture
def server_factory(tmp_path):
    """Start NBDServerThreads with short timeouts; every one is stopped at teardown."""
    started: list[NBDServerThread] = []

    def make(exports=None, **kwargs) -> NBDServerThread:
        if exports is None:
            exports = [
                ExportSpec("", 64 * MiB),
                ExportSpec("ro", 1 * MiB, read_only=True, description="read-only"),
                ExportSpec("file", 8 * MiB, backend="file", path=str(tmp_path / "disk.img")),
            ]
        opts = dict(handshake_timeout=2.0, request_timeout=2.0, shutdown_grace=0.5)
        opts.update(kwargs)
        srv = NBDServerThread(exports, **opts)
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(params=["thread", "trio"])
def nbd_server(server_factory, request) -> NBDServerThread:
    """The default exports, served in both transmission I/O modes."""
    return server_factory(io_mode=request.param)


class RawClient:
    """A blocking stdlib-socket NBD client for byte-exact tests."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def recvn(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)}/{n} bytes")
            buf += chunk
        return bytes(buf)

    def go(self, name: str = "", structured: bool = False) -> tuple[int, int]:
        magic, opt, hflags = struct.unpack(">QQH", self.recvn(18))
        assert magic == P.NBDMAGIC and opt == P.IHAVEOPT
        self.sock.sendall(struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES))
        if structured:
            self.sock.sendall(P.encode_option(P.NBD_OPT_STRUCTURED_REPLY))
            assert self.option_reply()[1] == P.NBD_REP_ACK
        self.sock.sendall(P.encode_option(P.NBD_OPT_GO, P.encode_info_request(name)))
        size = flags = None
        while True:
            _, rtype, data = self.option_reply()
            if rtype == P.NBD_REP_INFO and struct.unpack(">H", data[:2])[0] == P.NBD_INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", data)
            elif rtype == P.NBD_REP_ACK:
                return size, flags
            elif rtype & P.NBD_REP_FLAG_ERROR:
                raise AssertionError(f"GO failed: {P.REP_NAMES.get(rtype)} {data!r}")

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self.recvn(20))
        assert magic == P.NBD_REP_MAGIC
        return opt, rtype, self.recvn(length)

    def request(self, cmd, cookie, offset, length, flags=0, payload=b"") -> None:
        self.sock.sendall(P.encode_request(cmd, cookie, offset, length, flags) + payload)

    def simple_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack(">IIQ", self.recvn(16))
        assert magic == P.NBD_SIMPLE_REPLY_MAGIC, hex(magic)
        data = self.recvn(read_length) if (read_length and error == 0) else b""
        return error, cookie, data

    def structured_chunk(self) -> tuple[int, int, int, bytes]:
        """One structured reply chunk: (flags, type, cookie, payload)."""
        magic, flags, ctype, cookie, length = struct.unpack(">IHHQI", self.recvn(20))
        assert magic == P.NBD_STRUCTURED_REPLY_MAGIC, hex(magic)
        return flags, ctype, cookie, self.recvn(length)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_client():
    clients: list[RawClient] = []

    def make(port: int, timeout: float = 5.0) -> RawClient:
        c = RawClient(port, timeout)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
