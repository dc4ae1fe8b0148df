"""NBD transmission phase (sans-I/O): client request/reply tracking and the
server's request framing.

Counterpart: NetworkBlockDevice/nbd ``doc/proto.md`` "Transmission"
(request and reply messages, "Structured reply chunk message").

Simplified: no BLOCK_STATUS / meta contexts, no extended headers.
"""

from __future__ import annotations

from .codec import (
    NEED_DATA,
    NeedData,
    ProtocolError,
    Reply,
    Request,
    _chunk_unpack_from,
    _req_pack,
    _req_unpack_from,
    _simple_unpack_from,
    _U32_unpack_from,
    _U64_unpack_from,
)
from .constants import (
    NBD_CMD_DISC,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_DEFAULT_MAX_BLOCK,
    NBD_EINVAL,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
)

# --------------------------------------------------------------------------
# Transmission phase: client
# --------------------------------------------------------------------------


#: What ``TransmissionClient.next_event()`` returns.
ClientTransmissionEvent = Reply | NeedData
#: What ``RequestParser.next_event()`` returns.
ServerTransmissionEvent = Request | NeedData


class TransmissionClient:
    """Client side of the transmission phase.

    ``send_request`` returns the bytes to send and records the cookie (and,
    for READ, the length to expect).  ``receive_data`` feeds received bytes;
    ``next_event`` returns :class:`Reply` or NEED_DATA.  With structured
    replies, READ chunks are assembled into one Reply at the DONE chunk
    (holes read as zeroes; the first ERROR chunk's value becomes ``error``).
    Raises :class:`ProtocolError` on bad magic, unknown cookies or malformed
    chunks, and from then on is in its error state (module docstring).
    """

    __slots__ = ("_buf", "_pos", "_pending", "structured_replies", "_chunks", "_perr", "_roff", "error")

    def __init__(self, structured_replies: bool = False) -> None:
        self._buf = bytearray()
        self._pos = 0
        # cookie -> READ length, or -1 for commands without reply data
        self._pending: dict[int, int] = {}
        self.structured_replies = structured_replies
        self._chunks: dict[int, list] = {}
        self._roff: dict[int, int] = {}  # READ offsets (structured replies only)
        self._perr: dict[int, int] = {}
        self.error: ProtocolError | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def send_request(
        self, cmd: int, cookie: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> bytes:
        if cookie in self._pending:
            raise ValueError(f"cookie {cookie} is already in flight")
        if cmd == NBD_CMD_WRITE:
            if len(payload) != length:
                raise ValueError("WRITE payload length does not match the request length")
            self._pending[cookie] = -1
            return _req_pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload
        if payload:
            raise ValueError("only WRITE carries a payload")
        if cmd == NBD_CMD_READ:
            self._pending[cookie] = length
            if self.structured_replies:
                self._roff[cookie] = offset
        elif cmd != NBD_CMD_DISC:
            self._pending[cookie] = -1
        return _req_pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def receive_data(self, data: bytes) -> None:
        buf = self._buf
        pos = self._pos
        if pos:
            if pos == len(buf):
                buf.clear()
            else:
                del buf[:pos]
            self._pos = 0
        buf += data

    def next_event(self) -> ClientTransmissionEvent:
        if self.error is not None:
            raise self.error
        try:
            buf = self._buf
            pos = self._pos
            avail = len(buf) - pos
            if avail < 16:
                return NEED_DATA
            (magic,) = _U32_unpack_from(buf, pos)
            if magic == NBD_SIMPLE_REPLY_MAGIC:
                return self._simple(buf, pos, avail)
            while magic == NBD_STRUCTURED_REPLY_MAGIC:
                if not self.structured_replies:
                    raise ProtocolError("structured reply without NBD_OPT_STRUCTURED_REPLY")
                if avail < 20:
                    return NEED_DATA
                _, cflags, ctype, cookie, plen = _chunk_unpack_from(buf, pos)
                if avail < 20 + plen:
                    if plen > (1 << 26):
                        raise ProtocolError(f"structured reply chunk too long ({plen})")
                    return NEED_DATA
                self._pos = pos + 20 + plen
                ev = self._chunk(cflags, ctype, cookie, pos + 20, plen)
                if ev is not None:
                    return ev
                pos = self._pos
                avail = len(buf) - pos
                if avail < 16:
                    return NEED_DATA
                (magic,) = _U32_unpack_from(buf, pos)
                if magic == NBD_SIMPLE_REPLY_MAGIC:
                    return self._simple(buf, pos, avail)
            raise ProtocolError(f"bad reply magic 0x{magic:08x}")
        except ProtocolError as exc:
            self.error = exc  # the error state
            raise

    def _simple(self, buf: bytearray, pos: int, avail: int):
        _, error, cookie = _simple_unpack_from(buf, pos)
        length = self._pending.get(cookie)
        if length is None:
            raise ProtocolError(f"reply for unknown cookie {cookie:#x}")
        if length > 0 and error == 0:
            if self.structured_replies:
                raise ProtocolError(
                    "simple reply with data for a READ after structured replies were negotiated"
                )
            if avail < 16 + length:
                return NEED_DATA
            data = bytes(buf[pos + 16 : pos + 16 + length])
            self._pos = pos + 16 + length
            del self._pending[cookie]
            return Reply(cookie, 0, data)
        self._pos = pos + 16
        del self._pending[cookie]
        if length == 0 and error == 0:
            return Reply(cookie, 0, b"")
        return Reply(cookie, error, None)

    def _chunk(self, cflags: int, ctype: int, cookie: int, p: int, plen: int):
        length = self._pending.get(cookie)
        if length is None:
            raise ProtocolError(f"structured reply for unknown cookie {cookie:#x}")
        buf = self._buf
        if ctype == NBD_REPLY_TYPE_OFFSET_DATA or ctype == NBD_REPLY_TYPE_OFFSET_HOLE:
            if length < 0:
                raise ProtocolError("data chunk for a command that is not READ")
            if plen < 8 or (ctype == NBD_REPLY_TYPE_OFFSET_HOLE and plen != 12):
                raise ProtocolError("malformed data chunk")
            (off,) = _U64_unpack_from(buf, p)
            chunks = self._chunks.get(cookie)
            if chunks is None:
                chunks = self._chunks[cookie] = []
            if ctype == NBD_REPLY_TYPE_OFFSET_DATA:
                chunks.append((off, bytes(buf[p + 8 : p + plen])))
            else:
                (hole,) = _U32_unpack_from(buf, p + 8)
                chunks.append((off, hole))
        elif ctype == NBD_REPLY_TYPE_NONE:
            if plen != 0:
                raise ProtocolError("NONE chunk with a payload")
        elif ctype & 0x8000:
            err = NBD_EINVAL
            if plen >= 4:
                (err,) = _U32_unpack_from(buf, p)
                if err == 0:
                    raise ProtocolError("ERROR chunk with error value 0")
            self._perr.setdefault(cookie, err)
        elif ctype == NBD_REPLY_TYPE_BLOCK_STATUS:
            pass
        else:
            raise ProtocolError(f"unknown structured reply chunk type {ctype}")
        if not cflags & NBD_REPLY_FLAG_DONE:
            return None
        # DONE: assemble.
        del self._pending[cookie]
        err = self._perr.pop(cookie, 0)
        chunks = self._chunks.pop(cookie, None)
        roff = self._roff.pop(cookie, None)
        if err:
            return Reply(cookie, err, None)
        if length < 0:
            return Reply(cookie, 0, None)
        if not chunks:
            if length == 0:
                return Reply(cookie, 0, b"")
            raise ProtocolError("READ finished without any data chunk")
        base = roff if roff is not None else min(off for off, _ in chunks)
        out = bytearray(length)
        covered = 0
        spans = []
        for off, item in chunks:
            rel = off - base
            n = item if isinstance(item, int) else len(item)
            if rel < 0 or rel + n > length:
                raise ProtocolError("data chunk outside the requested range")
            if not isinstance(item, int):
                out[rel : rel + n] = item
            spans.append((rel, n))
            covered += n
        end = 0
        for rel, n in sorted(spans):  # the spec: chunks MUST NOT overlap
            if rel < end:
                raise ProtocolError("overlapping data chunks")
            end = rel + n
        if covered != length:
            raise ProtocolError(f"READ chunks cover {covered} of {length} bytes")
        return Reply(cookie, 0, bytes(out))


# --------------------------------------------------------------------------
# Transmission phase: server request parser
# --------------------------------------------------------------------------


class RequestParser:
    """Server side request framing.

    ``receive_data(data)``; ``next_event()`` → :class:`Request` or NEED_DATA.
    A WRITE longer than ``max_payload`` is not buffered: its payload is
    consumed and discarded as it arrives, then a Request with
    ``oversized=True`` and ``payload=None`` is returned.  Raises
    :class:`ProtocolError` on a bad request magic (framing is lost), and from
    then on is in its error state (module docstring).
    ``partial`` tells whether a request is half received (for timeouts).

    Large WRITE payloads (≥ ``LARGE_PAYLOAD``) are assembled in their own
    bytearray; while one is incomplete, ``payload_buffer()`` returns a
    memoryview of its missing part so that the I/O layer can ``recv_into``
    it directly (then call ``payload_received(n)``), saving a copy.
    """

    LARGE_PAYLOAD = 65536

    __slots__ = (
        "_buf",
        "_pos",
        "max_payload",
        "_drain",
        "_drain_req",
        "_payload",
        "_pfill",
        "_preq",
        "error",
    )

    def __init__(self, max_payload: int = NBD_DEFAULT_MAX_BLOCK) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_payload = max_payload
        self._drain = 0
        self._drain_req: Request | None = None
        self._payload: bytearray | None = None
        self._pfill = 0
        self._preq: tuple | None = None
        self.error: ProtocolError | None = None

    @property
    def partial(self) -> bool:
        return self._drain > 0 or self._payload is not None or len(self._buf) > self._pos

    def payload_buffer(self) -> memoryview | None:
        if self._payload is None or self._pfill == len(self._payload):
            return None
        return memoryview(self._payload)[self._pfill :]

    def payload_received(self, n: int) -> None:
        self._pfill += n

    def receive_data(self, data) -> None:
        if self._drain:
            n = min(self._drain, len(data))
            self._drain -= n
            data = data[n:]
            if not data:
                return
        payload = self._payload
        if payload is not None:
            fill = self._pfill
            n = min(len(payload) - fill, len(data))
            if n:
                payload[fill : fill + n] = data[:n]
                self._pfill = fill + n
                data = data[n:]
            if not data:
                return
        buf = self._buf
        pos = self._pos
        if pos:
            if pos == len(buf):
                buf.clear()
            else:
                del buf[:pos]
            self._pos = 0
        buf += data

    def next_event(self) -> ServerTransmissionEvent:
        if self.error is not None:
            raise self.error
        try:
            if self._drain_req is not None:
                if self._drain:
                    return NEED_DATA
                req = self._drain_req
                self._drain_req = None
                return req
            if self._payload is not None:
                if self._pfill < len(self._payload):
                    return NEED_DATA
                flags, cmd, cookie, offset, length = self._preq  # type: ignore[misc]
                req = Request(cmd, flags, cookie, offset, length, self._payload)
                self._payload = None
                self._preq = None
                return req
            buf = self._buf
            pos = self._pos
            avail = len(buf) - pos
            if avail < 28:
                return NEED_DATA
            magic, flags, cmd, cookie, offset, length = _req_unpack_from(buf, pos)
            if magic != NBD_REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic 0x{magic:08x}")
            if cmd == NBD_CMD_WRITE:
                if length > self.max_payload:
                    # Drain without buffering.
                    have = min(avail - 28, length)
                    self._pos = pos + 28 + have
                    self._drain = length - have
                    req = Request(cmd, flags, cookie, offset, length, None, True)
                    if self._drain:
                        self._drain_req = req
                        return NEED_DATA
                    return req
                if avail < 28 + length:
                    if length >= self.LARGE_PAYLOAD:
                        # Assemble in place; the rest of the buffer is all payload.
                        have = avail - 28
                        payload = bytearray(length)
                        with memoryview(buf) as mv:
                            payload[:have] = mv[pos + 28 : pos + 28 + have]
                        self._pos = len(buf)
                        self._payload = payload
                        self._pfill = have
                        self._preq = (flags, cmd, cookie, offset, length)
                    return NEED_DATA
                with memoryview(buf) as mv:
                    payload = bytes(mv[pos + 28 : pos + 28 + length])
                self._pos = pos + 28 + length
                return Request(cmd, flags, cookie, offset, length, payload)
            self._pos = pos + 28
            return Request(cmd, flags, cookie, offset, length)
        except ProtocolError as exc:
            self.error = exc  # the error state
            raise
