"""NBD wire codecs: pure encode functions, struct layouts, and the frozen
attrs event/value classes the decoders produce.

Counterpart: NetworkBlockDevice/nbd ``doc/proto.md`` sections "Newstyle
negotiation" (option and option-reply layout) and "Transmission" (request,
simple reply and structured reply chunk layouts).

Simplified: no extended headers (64-bit lengths), no BLOCK_STATUS payloads.
Also holds :class:`ProtocolError` and the :data:`NEED_DATA` sentinel.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import attrs

from .constants import (
    IHAVEOPT,
    NBD_DEFAULT_MAX_BLOCK,
    NBD_DEFAULT_MIN_BLOCK,
    NBD_DEFAULT_PREFERRED_BLOCK,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_MAX_STRING,
    NBD_REP_MAGIC,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
)

# --------------------------------------------------------------------------
# Structs
# --------------------------------------------------------------------------

_REQ = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_GREETING = struct.Struct(">QQH")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")

_req_pack = _REQ.pack
_req_unpack_from = _REQ.unpack_from
_simple_pack = _SIMPLE.pack
_simple_unpack_from = _SIMPLE.unpack_from
_chunk_pack = _CHUNK.pack
_data_header_pack = struct.Struct(">IHHQIQ").pack  # an OFFSET_DATA chunk's header and offset
_chunk_unpack_from = _CHUNK.unpack_from
_U32_unpack_from = _U32.unpack_from
_U64_unpack_from = _U64.unpack_from

REQUEST_HEADER_SIZE = _REQ.size  # 28
SIMPLE_REPLY_SIZE = _SIMPLE.size  # 16
CHUNK_HEADER_SIZE = _CHUNK.size  # 20


# --------------------------------------------------------------------------
# Errors and events
# --------------------------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue."""


class HandshakeFailed(ProtocolError):
    """The handshake did not lead to transmission (message says why)."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

#: The type of :data:`NEED_DATA`, for annotations (h11 has PAUSED too; NBD needs no pause:
#: the transmission parsers take any number of pipelined messages).
NeedData = _NeedData


def reply_cookie(header: bytes) -> int:
    """The cookie (handle) of a simple reply's 16-byte header, as a kernel driver
    reads it to find the request before the reply's data arrives."""
    return _simple_unpack_from(header)[2]


def _transmission_flag(bit: int) -> property:
    """A read-only ``bool`` property: is ``bit`` set in ``self.flags``?"""

    def is_set(self) -> bool:
        return bool(self.flags & bit)

    return property(is_set)


@attrs.frozen
class ExportInfo:
    """What a client knows about an export after the handshake."""

    name: str
    size: int
    flags: int  # transmission flags
    min_block: int = NBD_DEFAULT_MIN_BLOCK
    preferred_block: int = NBD_DEFAULT_PREFERRED_BLOCK
    max_block: int = NBD_DEFAULT_MAX_BLOCK
    description: str = ""
    structured_replies: bool = False

    can_flush = _transmission_flag(NBD_FLAG_SEND_FLUSH)
    can_fua = _transmission_flag(NBD_FLAG_SEND_FUA)
    can_trim = _transmission_flag(NBD_FLAG_SEND_TRIM)
    can_write_zeroes = _transmission_flag(NBD_FLAG_SEND_WRITE_ZEROES)
    can_multi_conn = _transmission_flag(NBD_FLAG_CAN_MULTI_CONN)
    read_only = _transmission_flag(NBD_FLAG_READ_ONLY)


@attrs.frozen
class Reply:
    """A complete reply to one request (transmission phase, client side)."""

    cookie: int
    error: int
    data: bytes | None = None


@attrs.frozen
class Request:
    """A request parsed by the server.  ``payload`` is set for WRITE only;
    ``oversized`` means a WRITE longer than the server's maximum whose payload
    was drained and discarded (answer it with an error)."""

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: bytes | None = None
    oversized: bool = False


@attrs.frozen
class HandshakeDone:
    """Transmission begins.  Client side: ``info`` is the export; server
    side: ``info`` is the export the client selected."""

    info: ExportInfo
    structured_replies: bool


@attrs.frozen
class HandshakeAborted:
    """The client sent NBD_OPT_ABORT (soft disconnect)."""


@attrs.frozen
class HandshakeRefused:
    """Server side: the server had refused this client (``ServerHandshake.refusal``)
    and the client sent NBD_OPT_EXPORT_NAME, which cannot be answered with an
    error: the server must hard-close (spec, "Termination of the session during
    option haggling")."""

    option: int
    message: str


@attrs.frozen
class ExportList:
    """Client side, ``mode="list"``: the export names (with descriptions)."""

    exports: tuple[tuple[str, str], ...]


@attrs.frozen
class OptionReply:
    """One raw option reply (client side), for tools and tests."""

    option: int
    reply_type: int
    data: bytes


# --------------------------------------------------------------------------
# Codecs
# --------------------------------------------------------------------------


def encode_request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    """The 28-byte request header (a WRITE's payload is appended by the caller)."""
    return _req_pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def encode_simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    """A simple reply header (+ READ data when ``error == 0``)."""
    if data:
        return _simple_pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie) + data
    return _simple_pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def encode_structured_chunk(
    cookie: int, chunk_type: int, payload: bytes = b"", *, done: bool = True
) -> bytes:
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return _chunk_pack(NBD_STRUCTURED_REPLY_MAGIC, flags, chunk_type, cookie, len(payload)) + payload


def encode_offset_data_header(cookie: int, offset: int, data_length: int, *, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk; the caller appends ``data_length`` bytes."""
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return _data_header_pack(
        NBD_STRUCTURED_REPLY_MAGIC, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_length, offset
    )


def encode_offset_hole(cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
    return encode_structured_chunk(
        cookie, NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset, length), done=done
    )


def encode_structured_error(cookie: int, error: int, message: str = "", *, done: bool = True) -> bytes:
    msg = message.encode()[:NBD_MAX_STRING]
    return encode_structured_chunk(
        cookie, NBD_REPLY_TYPE_ERROR, struct.pack(">IH", error, len(msg)) + msg, done=done
    )


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPT.pack(IHAVEOPT, option, len(data)) + data


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPT_REPLY.pack(NBD_REP_MAGIC, option, reply_type, len(data)) + data


def encode_info_request(name: str, info_types: Iterable[int] = ()) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO."""
    n = name.encode()
    types = list(info_types)
    return _U32.pack(len(n)) + n + _U16.pack(len(types)) + b"".join(_U16.pack(t) for t in types)


def encode_greeting(flags: int = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES) -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


# --------------------------------------------------------------------------
# Small buffer helper
# --------------------------------------------------------------------------


class _Buffer:
    """A bytearray with a read offset; compacts lazily."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> None:
        if self.pos and self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        elif self.pos > 1 << 20:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def available(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int) -> bytes:
        p = self.pos
        out = bytes(self.buf[p : p + n])
        self.pos = p + n
        return out
