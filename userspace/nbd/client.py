"""Userspace NBD client (trio I/O shell over :mod:`nbdproto`).

Counterpart: libnbd's ``nbd_connect_uri`` + ``nbd_pread/pwrite/flush/trim/
zero`` (the API nbdsh exposes), and the handshake half of the kernel's
``nbd-client``.  Used by tests, benchmarks and the emulated kernel's NBD
driver (which calls :func:`nbd_handshake` and then drives
:class:`~nbdproto.TransmissionClient` itself).

* :func:`nbd_handshake`: fixed newstyle, ``NBD_OPT_GO`` (asking for
  ``NBD_INFO_NAME``/``DESCRIPTION``/``BLOCK_SIZE``), optional
  ``NBD_OPT_STRUCTURED_REPLY``, fallback to ``NBD_OPT_EXPORT_NAME`` when GO
  gets ``ERR_UNSUP``; raises :class:`NBDHandshakeError` with a readable
  message on any failure.
* :func:`parse_nbd_url`: ``nbd://host[:port]/name`` (re-exported from :mod:`nbdproto`).
* :class:`NBDClient`: a pipelined client (cookies; one reader task; any
  number of concurrent callers) that honours the export's block-size
  constraints (splits at ``max_block``, refuses misaligned requests) and
  flags (no FLUSH unless ``SEND_FLUSH``; FUA emulated with FLUSH; TRIM
  skipped and WRITE_ZEROES emulated with WRITE when not offered).

Simplified: no TLS, no Unix sockets (``nbd+unix://``), no meta contexts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
import trio

import nbdproto as P
from nbdproto import NEED_DATA, ExportInfo, parse_nbd_url

log = structlog.get_logger("userspace.nbd.client")


class NBDHandshakeError(Exception):
    """The NBD handshake failed (the message says why)."""


class NBDError(OSError):
    """A request was answered with an NBD error value."""

    def __init__(self, error: int, what: str) -> None:
        name = P.ERROR_NAMES.get(error, f"error {error}")
        super().__init__(error, f"{what}: {name}")
        self.nbd_error = error


async def _run_handshake(stream: trio.abc.Stream, hs: P.ClientHandshake):
    while True:
        try:
            ev = hs.next_event()
        except P.HandshakeFailed as exc:
            raise NBDHandshakeError(str(exc)) from None
        out = hs.data_to_send()
        if out:
            try:
                await stream.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise NBDHandshakeError(f"connection lost during the NBD handshake: {exc}") from None
        if ev is not NEED_DATA:
            return ev
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise NBDHandshakeError(f"connection lost during the NBD handshake: {exc}") from None
        if not data:
            if hs.mode == "go" and hs.state is P.AWAIT_EXPORT_NAME_REPLY:
                raise NBDHandshakeError(
                    f"server closed the connection after NBD_OPT_EXPORT_NAME {hs.export_name!r}"
                    " (no such export?)"
                )
            raise NBDHandshakeError("server closed the connection during the NBD handshake")
        hs.receive_data(data)


async def nbd_handshake(
    stream: trio.abc.Stream, export_name: str = "", *, structured_replies: bool = False
) -> ExportInfo:
    """Negotiate ``export_name`` on ``stream`` and return its :class:`ExportInfo`
    (``info.structured_replies`` says whether structured replies are on).
    Leaves the stream in the transmission phase."""
    hs = P.ClientHandshake(export_name, structured_replies=structured_replies)
    ev = await _run_handshake(stream, hs)
    assert isinstance(ev, P.HandshakeDone)
    return ev.info


async def nbd_list_exports(stream: trio.abc.Stream) -> list[tuple[str, str]]:
    """NBD_OPT_LIST then NBD_OPT_ABORT: [(name, description), ...]."""
    hs = P.ClientHandshake(mode="list")
    ev = await _run_handshake(stream, hs)
    assert isinstance(ev, P.ExportList)
    return list(ev.exports)


class NBDClient:
    """A pipelined NBD client.  Use ``async with NBDClient.connect(url) as c``."""

    def __init__(self, stream: trio.abc.Stream, info: ExportInfo) -> None:
        self.stream = stream
        self.info = info
        self._tc = P.TransmissionClient(structured_replies=info.structured_replies)
        self._outbuf = bytearray()
        self._sending = False
        self._waiters: dict[int, list] = {}
        self._next_cookie = 1
        self._closed = False
        self._error: BaseException | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, url: str, *, structured_replies: bool = False, timeout: float = 10.0
    ) -> AsyncIterator[NBDClient]:
        host, port, name = parse_nbd_url(url)
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise NBDHandshakeError(f"cannot connect to {host}:{port}: {exc}") from None
        except trio.TooSlowError:
            raise NBDHandshakeError(f"cannot connect to {host}:{port}: timed out after {timeout} s") from None
        async with stream:
            try:
                with trio.fail_after(timeout):
                    info = await nbd_handshake(stream, name, structured_replies=structured_replies)
            except trio.TooSlowError:
                raise NBDHandshakeError(
                    f"NBD handshake with {host}:{port} timed out after {timeout} s"
                ) from None
            client = cls(stream, info)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    yield client
                finally:
                    await client._disconnect()
                    nursery.cancel_scope.cancel()

    @property
    def size(self) -> int:
        return self.info.size

    # -- plumbing
    async def _reader(self) -> None:
        tc = self._tc
        waiters = self._waiters
        try:
            while True:
                data = await self.stream.receive_some(262144)
                if not data:
                    raise trio.BrokenResourceError("server closed the connection")
                tc.receive_data(data)
                while True:
                    ev = tc.next_event()
                    if ev is NEED_DATA:
                        break
                    w = waiters.pop(ev.cookie, None)
                    if w is not None:
                        w[1] = ev
                        w[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, P.ProtocolError) as exc:
            if not self._closed:
                log.warning("nbd_client_connection_lost", error=str(exc))
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        self._error = exc
        for w in self._waiters.values():
            w[1] = exc
            w[0].set()
        self._waiters.clear()

    async def _request(
        self, cmd: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> P.Reply:
        if self._error is not None:
            raise NBDError(P.NBD_EIO, f"connection is down ({self._error})")
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        w = [trio.Event(), None]
        self._waiters[cookie] = w
        self._outbuf += self._tc.send_request(cmd, cookie, offset, length, flags, payload)
        if not self._sending:
            # Become the sender: flush everything queued, including requests
            # that other tasks add while this send is in progress (batching).
            self._sending = True
            try:
                while self._outbuf:
                    buf = self._outbuf
                    self._outbuf = bytearray()
                    await self.stream.send_all(buf)
            finally:
                self._sending = False
        await w[0].wait()
        rep = w[1]
        if isinstance(rep, BaseException):
            raise NBDError(P.NBD_EIO, f"connection lost ({rep})")
        if rep.error:
            raise NBDError(rep.error, f"NBD {P.CMD_NAMES.get(cmd, cmd)} offset={offset} length={length}")
        return rep

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.info.size:
            raise ValueError(
                f"range [{offset}, {offset + length}) is outside the export (size {self.info.size})"
            )
        mb = self.info.min_block
        if mb > 1 and (offset % mb or length % mb):
            raise ValueError(
                f"offset {offset} / length {length} not aligned to the export's minimum block size {mb}"
            )

    def _pieces(self, offset: int, length: int):
        step = self.info.max_block
        if step <= 0 or step == 0xFFFFFFFF:
            step = P.NBD_DEFAULT_MAX_BLOCK
        step = min(step, P.NBD_DEFAULT_MAX_BLOCK)
        if self.info.min_block > 1:
            step -= step % self.info.min_block
        pos = 0
        while pos < length:
            n = min(step, length - pos)
            yield offset + pos, pos, n
            pos += n

    # -- public API
    async def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        parts = []
        for off, _, n in self._pieces(offset, length):
            rep = await self._request(P.NBD_CMD_READ, off, n)
            parts.append(rep.data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def pwrite(self, data: bytes, offset: int, fua: bool = False) -> None:
        length = len(data)
        self._check(offset, length)
        if self.info.read_only:
            raise NBDError(P.NBD_EPERM, "export is read-only")
        if length == 0:
            return
        flags = P.NBD_CMD_FLAG_FUA if fua and self.info.can_fua else 0
        mv = memoryview(data)
        for off, rel, n in self._pieces(offset, length):
            await self._request(P.NBD_CMD_WRITE, off, n, flags, bytes(mv[rel : rel + n]))
        if fua and not self.info.can_fua:
            await self.flush()

    async def flush(self) -> None:
        if not self.info.can_flush:
            return  # the server did not offer FLUSH: never send it
        await self._request(P.NBD_CMD_FLUSH, 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if not self.info.can_trim or length == 0:
            return  # TRIM is a hint
        for off, _, n in self._pieces(offset, length):
            await self._request(P.NBD_CMD_TRIM, off, n)

    async def zero(self, offset: int, length: int, no_hole: bool = False) -> None:
        self._check(offset, length)
        if length == 0:
            return
        if not self.info.can_write_zeroes:
            for off, _, n in self._pieces(offset, length):
                await self._request(P.NBD_CMD_WRITE, off, n, 0, bytes(n))
            return
        flags = P.NBD_CMD_FLAG_NO_HOLE if no_hole else 0
        for off, _, n in self._pieces(offset, length):
            await self._request(P.NBD_CMD_WRITE_ZEROES, off, n, flags)

    async def _disconnect(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            with (
                trio.move_on_after(2),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                while self._sending:
                    await trio.sleep(0.001)
                self._outbuf += P.encode_request(P.NBD_CMD_DISC, 0, 0, 0)
                buf, self._outbuf = self._outbuf, bytearray()
                await self.stream.send_all(buf)
