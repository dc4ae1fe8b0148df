"""Sans-I/O NBD protocol: constants, codecs and state machines (h11 style).

Counterpart: the NBD protocol specification, NetworkBlockDevice/nbd
``doc/proto.md`` ("fixed newstyle" negotiation and the transmission phase),
and what nbdkit, qemu-nbd, nbd-server and libnbd do on the wire.

Nothing here does I/O or knows about trio: every machine is fed bytes with
``receive_data(data)`` and is asked for events with ``next_event()``, which
returns a small frozen event object or the sentinel :data:`NEED_DATA`.  Bytes
to send are returned by the methods that produce them, or collected with
``data_to_send()``.

Errors: a machine that raises :class:`ProtocolError` (:class:`HandshakeFailed`
for the client handshake) is in its error state from then on, as an h11
connection is once the peer's state is ERROR: its ``error`` attribute holds
that exception and every later ``next_event()`` raises it again, whatever
bytes are fed after it.  (``error`` is None until then.)  The connection
cannot continue; nothing more is parsed.

Contents:

* constants with the spec's names (``NBD_CMD_*``, ``NBD_FLAG_*``,
  ``NBD_OPT_*``, ``NBD_REP_*``, ``NBD_INFO_*``, error values ``NBD_E*``);
* codecs: :func:`encode_request`, :func:`encode_simple_reply`,
  :func:`encode_structured_chunk` and friends;
* :class:`ClientHandshake` and :class:`ServerHandshake`: option haggling
  (``EXPORT_NAME``, ``ABORT``, ``LIST``, ``INFO``, ``GO`` with
  ``NBD_INFO_EXPORT/NAME/DESCRIPTION/BLOCK_SIZE``, ``STRUCTURED_REPLY``;
  unknown options get ``NBD_REP_ERR_UNSUP``; ``NO_ZEROES``);
* :class:`TransmissionClient`: the client side of the transmission phase
  (cookies, simple and structured replies), written for the hot path;
* :class:`RequestParser`: the server side's request framing, which drains
  the payload of a WRITE that is too large instead of buffering it.

Simplified / not implemented: TLS (``STARTTLS`` is answered with
``NBD_REP_ERR_POLICY``), oldstyle negotiation (a client treats it as
unsupported), meta contexts and ``BLOCK_STATUS`` (``ERR_UNSUP`` / ``EINVAL``),
extended headers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import attrs

# --------------------------------------------------------------------------
# Constants (names as in doc/proto.md)
# --------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_OPTS_MAGIC = IHAVEOPT
NBD_CLISERV_MAGIC = 0x00420281861253  # oldstyle second magic
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_REPLY_MAGIC = NBD_SIMPLE_REPLY_MAGIC
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

NBD_DEFAULT_PORT = 10809

# Handshake flags (server) and client flags
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = NBD_FLAG_FIXED_NEWSTYLE
NBD_FLAG_C_NO_ZEROES = NBD_FLAG_NO_ZEROES

# Transmission flags
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# Options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# Option reply types
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9

# Info types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# Commands
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

# Command flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and chunk types
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# Error values (the only ones allowed on the wire)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108
NBD_ERRORS = frozenset(
    {NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN}
)

# Sizes
NBD_DEFAULT_MIN_BLOCK = 1
NBD_DEFAULT_PREFERRED_BLOCK = 4096
NBD_DEFAULT_MAX_BLOCK = 32 * 1024 * 1024
NBD_MAX_STRING = 4096
# Largest option payload a server accepts before it considers the client hostile.
NBD_MAX_OPTION_DATA = 64 * 1024

CMD_NAMES = {
    NBD_CMD_READ: "READ",
    NBD_CMD_WRITE: "WRITE",
    NBD_CMD_DISC: "DISC",
    NBD_CMD_FLUSH: "FLUSH",
    NBD_CMD_TRIM: "TRIM",
    NBD_CMD_CACHE: "CACHE",
    NBD_CMD_WRITE_ZEROES: "WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "BLOCK_STATUS",
    NBD_CMD_RESIZE: "RESIZE",
}
ERROR_NAMES = {
    0: "OK",
    NBD_EPERM: "EPERM",
    NBD_EIO: "EIO",
    NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC",
    NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP",
    NBD_ESHUTDOWN: "ESHUTDOWN",
}
REP_NAMES = {
    NBD_REP_ACK: "ACK",
    NBD_REP_SERVER: "SERVER",
    NBD_REP_INFO: "INFO",
    NBD_REP_META_CONTEXT: "META_CONTEXT",
    NBD_REP_ERR_UNSUP: "ERR_UNSUP",
    NBD_REP_ERR_POLICY: "ERR_POLICY",
    NBD_REP_ERR_INVALID: "ERR_INVALID",
    NBD_REP_ERR_PLATFORM: "ERR_PLATFORM",
    NBD_REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    NBD_REP_ERR_UNKNOWN: "ERR_UNKNOWN",
    NBD_REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    NBD_REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}
OPT_NAMES = {
    NBD_OPT_EXPORT_NAME: "EXPORT_NAME",
    NBD_OPT_ABORT: "ABORT",
    NBD_OPT_LIST: "LIST",
    NBD_OPT_PEEK_EXPORT: "PEEK_EXPORT",
    NBD_OPT_STARTTLS: "STARTTLS",
    NBD_OPT_INFO: "INFO",
    NBD_OPT_GO: "GO",
    NBD_OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    NBD_OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}
TFLAG_NAMES = [
    "HAS_FLAGS",
    "READ_ONLY",
    "SEND_FLUSH",
    "SEND_FUA",
    "ROTATIONAL",
    "SEND_TRIM",
    "SEND_WRITE_ZEROES",
    "SEND_DF",
    "CAN_MULTI_CONN",
    "SEND_RESIZE",
    "SEND_CACHE",
    "SEND_FAST_ZERO",
]


def decode_transmission_flags(flags: int) -> list[str]:
    """Names of the transmission flag bits set in ``flags``."""
    return [name for i, name in enumerate(TFLAG_NAMES) if flags & (1 << i)]


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


def encode_structured_chunk(cookie: int, chunk_type: int, payload: bytes = b"", *, done: bool = True) -> bytes:
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return _chunk_pack(NBD_STRUCTURED_REPLY_MAGIC, flags, chunk_type, cookie, len(payload)) + payload


def encode_offset_data_header(cookie: int, offset: int, data_length: int, *, done: bool = True) -> bytes:
    """Header of an OFFSET_DATA chunk; the caller appends ``data_length`` bytes."""
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return _chunk_pack(NBD_STRUCTURED_REPLY_MAGIC, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_length) + _U64.pack(
        offset
    )


def encode_offset_hole(cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
    return encode_structured_chunk(cookie, NBD_REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", offset, length), done=done)


def encode_structured_error(cookie: int, error: int, message: str = "", *, done: bool = True) -> bytes:
    msg = message.encode()[:NBD_MAX_STRING]
    return encode_structured_chunk(cookie, NBD_REPLY_TYPE_ERROR, struct.pack(">IH", error, len(msg)) + msg, done=done)


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


# --------------------------------------------------------------------------
# Client handshake
# --------------------------------------------------------------------------


def _rep_name(t: int) -> str:
    return REP_NAMES.get(t, f"0x{t:x}")


class ClientHandshake:
    """Client side of fixed newstyle negotiation.

    ``mode`` is ``"go"`` (enter transmission: NBD_OPT_GO, falling back to
    NBD_OPT_EXPORT_NAME on ERR_UNSUP), ``"info"`` (NBD_OPT_INFO then
    NBD_OPT_ABORT; yields :class:`HandshakeDone` with the info, but the
    connection then ends), or ``"list"`` (NBD_OPT_LIST then ABORT; yields
    :class:`ExportList`).

    Usage: ``receive_data(bytes)``; ``next_event()`` → NEED_DATA,
    :class:`HandshakeDone` or :class:`ExportList`; after every call send
    ``data_to_send()``.  Errors raise :class:`HandshakeFailed` (then the
    error state: module docstring).  After
    HandshakeDone, ``trailing_data()`` returns bytes received beyond the
    handshake (belonging to the transmission phase).
    """

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = False,
        request_block_size: bool = True,
        mode: str = "go",
    ) -> None:
        if mode not in ("go", "info", "list"):
            raise ValueError(f"mode must be go, info or list, not {mode!r}")
        name = export_name.encode()
        if len(name) > NBD_MAX_STRING:
            raise ValueError("export name longer than 4096 bytes")
        self.export_name = export_name
        self.want_structured = structured_replies
        self.request_block_size = request_block_size
        self.mode = mode
        self._in = _Buffer()
        self._out = bytearray()
        self._state = "greeting"
        self._no_zeroes = False
        self._fixed = False
        self.structured_replies = False
        self._info: dict[str, object] = {}
        self._exports: list[tuple[str, str]] = []
        self.option_replies: list[OptionReply] = []
        self.error: HandshakeFailed | None = None

    # -- plumbing
    def receive_data(self, data: bytes) -> None:
        self._in.feed(data)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        return self._in.take(self._in.available())

    @property
    def finished(self) -> bool:
        return self._state == "done"

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._out += encode_option(option, data)
        self._current_option = option

    def _info_types(self) -> list[int]:
        types = [NBD_INFO_NAME, NBD_INFO_DESCRIPTION]
        if self.request_block_size:
            types.append(NBD_INFO_BLOCK_SIZE)
        return types

    def _start_options(self) -> None:
        if self.mode == "list":
            self._send_option(NBD_OPT_LIST)
            self._state = "list"
        elif self.want_structured and self.mode == "go":
            self._send_option(NBD_OPT_STRUCTURED_REPLY)
            self._state = "structured"
        else:
            self._send_go()

    def _send_go(self) -> None:
        opt = NBD_OPT_GO if self.mode == "go" else NBD_OPT_INFO
        self._send_option(opt, encode_info_request(self.export_name, self._info_types()))
        self._info = {}
        self._state = "go"

    def _send_export_name(self) -> None:
        self._send_option(NBD_OPT_EXPORT_NAME, self.export_name.encode())
        self._state = "export_name"

    def _fail(self, msg: str) -> HandshakeFailed:
        """The error state (next_event raises ``error`` from now on)."""
        self.error = HandshakeFailed(msg)
        return self.error

    def next_event(self):
        if self.error is not None:
            raise self.error
        while True:
            st = self._state
            buf = self._in
            if st == "greeting":
                if buf.available() >= 8:  # judge the first magic as soon as it is there
                    head = bytes(buf.buf[buf.pos:buf.pos + 8])
                    if int.from_bytes(head, "big") != NBDMAGIC:
                        text = head.decode("ascii", "replace")
                        seen = f" (it sent {text!r}...)" if text.isprintable() else ""
                        raise self._fail(f"not an NBD server: bad greeting magic "
                                         f"0x{head.hex()}{seen}")
                if buf.available() < 18:
                    return NEED_DATA
                magic, magic2, hflags = _GREETING.unpack_from(buf.buf, buf.pos)
                buf.pos += 18
                if magic2 == NBD_CLISERV_MAGIC:
                    raise self._fail("server speaks oldstyle negotiation (no export names), which "
                                     "is not supported; run it newstyle (e.g. nbdkit without -o)")
                if magic2 != IHAVEOPT:
                    raise self._fail(f"bad handshake: unexpected second magic 0x{magic2:016x}")
                self._fixed = bool(hflags & NBD_FLAG_FIXED_NEWSTYLE)
                self._no_zeroes = bool(hflags & NBD_FLAG_NO_ZEROES)
                cflags = (NBD_FLAG_C_FIXED_NEWSTYLE if self._fixed else 0) | (
                    NBD_FLAG_C_NO_ZEROES if self._no_zeroes else 0
                )
                self._out += _U32.pack(cflags)
                if not self._fixed:
                    # Plain newstyle: only NBD_OPT_EXPORT_NAME is possible.
                    if self.mode != "go":
                        raise self._fail("server does not speak fixed newstyle; cannot query it")
                    self._send_export_name()
                else:
                    self._start_options()
                continue
            if st == "export_name":
                need = 10 if self._no_zeroes else 134
                if buf.available() < need:
                    return NEED_DATA
                size, flags = _EXPORT_NAME_REPLY.unpack_from(buf.buf, buf.pos)
                buf.pos += need
                self._state = "done"
                info = ExportInfo(name=self.export_name, size=size, flags=flags, structured_replies=self.structured_replies)
                return HandshakeDone(info=info, structured_replies=self.structured_replies)
            if st == "done":
                return NEED_DATA
            # All remaining states read option replies.
            if buf.available() < 20:
                return NEED_DATA
            magic, opt, rtype, length = _OPT_REPLY.unpack_from(buf.buf, buf.pos)
            if magic != NBD_REP_MAGIC:
                raise self._fail(f"bad option reply magic 0x{magic:016x}")
            if length > NBD_MAX_OPTION_DATA:
                raise self._fail(f"option reply too long ({length} bytes)")
            if buf.available() < 20 + length:
                return NEED_DATA
            buf.pos += 20
            data = buf.take(length)
            self.option_replies.append(OptionReply(opt, rtype, data))
            if opt != self._current_option:
                raise self._fail(
                    f"server answered option {OPT_NAMES.get(opt, opt)} while {OPT_NAMES.get(self._current_option)} was asked"
                )
            ev = self._handle_reply(rtype, data)
            if ev is not None:
                return ev

    def _handle_reply(self, rtype: int, data: bytes):
        st = self._state
        msg = data.decode(errors="replace") if rtype & NBD_REP_FLAG_ERROR else ""
        if st == "structured":
            if rtype == NBD_REP_ACK:
                self.structured_replies = True
            elif not rtype & NBD_REP_FLAG_ERROR:
                raise self._fail(f"unexpected reply {_rep_name(rtype)} to NBD_OPT_STRUCTURED_REPLY")
            self._send_go()
            return None
        if st == "list":
            if rtype == NBD_REP_SERVER:
                if len(data) < 4:
                    raise self._fail("short NBD_REP_SERVER")
                (n,) = _U32.unpack_from(data)
                if n > len(data) - 4:
                    raise self._fail("bad NBD_REP_SERVER name length")
                self._exports.append((data[4 : 4 + n].decode(errors="replace"), data[4 + n :].decode(errors="replace")))
                return None
            if rtype == NBD_REP_ACK:
                self._send_option(NBD_OPT_ABORT)
                self._state = "done"
                return ExportList(tuple(self._exports))
            raise self._fail(f"NBD_OPT_LIST refused: {_rep_name(rtype)} {msg}".rstrip())
        if st == "go":
            if rtype == NBD_REP_INFO:
                self._parse_info(data)
                return None
            if rtype == NBD_REP_ACK:
                if "size" not in self._info:
                    raise self._fail("server acknowledged NBD_OPT_GO without sending NBD_INFO_EXPORT")
                info = ExportInfo(
                    name=str(self._info.get("name", self.export_name)),
                    size=int(self._info["size"]),  # type: ignore[arg-type]
                    flags=int(self._info["flags"]),  # type: ignore[arg-type]
                    min_block=int(self._info.get("min_block", NBD_DEFAULT_MIN_BLOCK)),  # type: ignore[arg-type]
                    preferred_block=int(self._info.get("preferred_block", NBD_DEFAULT_PREFERRED_BLOCK)),  # type: ignore[arg-type]
                    max_block=int(self._info.get("max_block", NBD_DEFAULT_MAX_BLOCK)),  # type: ignore[arg-type]
                    description=str(self._info.get("description", "")),
                    structured_replies=self.structured_replies,
                )
                if self.mode == "info":
                    self._send_option(NBD_OPT_ABORT)
                self._state = "done"
                return HandshakeDone(info=info, structured_replies=self.structured_replies)
            if rtype == NBD_REP_ERR_UNSUP and self.mode == "go":
                # Old server: fall back to NBD_OPT_EXPORT_NAME.  Structured
                # replies cannot have been negotiated by a server without GO
                # (spec: a server that supports SR must support GO).
                self._send_export_name()
                return None
            if rtype == NBD_REP_ERR_UNKNOWN:
                raise self._fail(f"export {self.export_name!r} not found on server" + (f": {msg}" if msg else ""))
            if rtype & NBD_REP_FLAG_ERROR:
                raise self._fail(f"server refused export {self.export_name!r}: {_rep_name(rtype)}" + (f" {msg}" if msg else ""))
            raise self._fail(f"unexpected option reply {_rep_name(rtype)} during NBD_OPT_GO")
        raise self._fail(f"unexpected option reply {_rep_name(rtype)} in state {st}")

    def _parse_info(self, data: bytes) -> None:
        if len(data) < 2:
            raise self._fail("short NBD_REP_INFO")
        (itype,) = _U16.unpack_from(data)
        if itype == NBD_INFO_EXPORT:
            if len(data) != 12:
                raise self._fail(f"NBD_INFO_EXPORT of length {len(data)} (expected 12)")
            _, size, flags = _INFO_EXPORT.unpack(data)
            self._info["size"] = size
            self._info["flags"] = flags
        elif itype == NBD_INFO_NAME:
            self._info["name"] = data[2:].decode(errors="replace")
        elif itype == NBD_INFO_DESCRIPTION:
            self._info["description"] = data[2:].decode(errors="replace")
        elif itype == NBD_INFO_BLOCK_SIZE:
            if len(data) != 14:
                raise self._fail(f"NBD_INFO_BLOCK_SIZE of length {len(data)} (expected 14)")
            _, mn, pref, mx = _INFO_BLOCK.unpack(data)
            if mn == 0 or mn & (mn - 1) or mn > 65536:
                raise self._fail(f"server advertised an invalid minimum block size {mn}")
            if pref == 0 or pref & (pref - 1) or pref < mn:
                raise self._fail(f"server advertised an invalid preferred block size {pref}")
            if mx < pref and mx != 0xFFFFFFFF:
                raise self._fail(f"server advertised a maximum block size {mx} below the preferred {pref}")
            self._info["min_block"] = mn
            self._info["preferred_block"] = pref
            self._info["max_block"] = mx
        # Unknown info types are ignored (spec).


# --------------------------------------------------------------------------
# Server handshake
# --------------------------------------------------------------------------


@attrs.frozen
class ServerExport:
    """What the server handshake needs to know about one export."""

    name: str
    size: int
    flags: int
    description: str = ""
    min_block: int = NBD_DEFAULT_MIN_BLOCK
    preferred_block: int = NBD_DEFAULT_PREFERRED_BLOCK
    max_block: int = NBD_DEFAULT_MAX_BLOCK


class ServerHandshake:
    """Server side of fixed newstyle negotiation.

    ``exports`` maps names to :class:`ServerExport`.  The empty name selects
    the export named ``""`` if there is one, else the first export (the
    "default export").  Call ``greeting()`` once and send it; then feed bytes
    with ``receive_data``, and after each ``next_event()`` send
    ``data_to_send()``.  Events: NEED_DATA, :class:`HandshakeDone` (info =
    the selected export, as an :class:`ExportInfo`), :class:`HandshakeAborted`.
    Raises :class:`ProtocolError` when the spec says the server must (or may)
    hard-close: unknown client flags, bad option magic, EXPORT_NAME of an
    unknown export, oversized option data, too many options; it is then in
    its error state (module docstring).
    """

    def __init__(
        self,
        exports: Mapping[str, ServerExport],
        *,
        allow_no_zeroes: bool = True,
        max_options: int = 256,
    ) -> None:
        self.exports = dict(exports)
        self._in = _Buffer()
        self._out = bytearray()
        self._state = "client_flags"
        self._hflags = NBD_FLAG_FIXED_NEWSTYLE | (NBD_FLAG_NO_ZEROES if allow_no_zeroes else 0)
        self.no_zeroes = False
        self.structured_replies = False
        self.shutting_down = False
        self._options_seen = 0
        self.max_options = max_options
        self.options_log: list[tuple[int, int]] = []  # (option, reply type)
        self.error: ProtocolError | None = None

    def greeting(self) -> bytes:
        return encode_greeting(self._hflags)

    def receive_data(self, data: bytes) -> None:
        self._in.feed(data)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def trailing_data(self) -> bytes:
        return self._in.take(self._in.available())

    def lookup(self, name: str) -> ServerExport | None:
        exp = self.exports.get(name)
        if exp is None and name == "" and self.exports:
            exp = next(iter(self.exports.values()))
        return exp

    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self.options_log.append((option, rtype))
        self._out += encode_option_reply(option, rtype, data)

    def _err(self, option: int, rtype: int, message: str) -> None:
        self._reply(option, rtype, message.encode()[:NBD_MAX_STRING])

    def _fail(self, msg: str) -> ProtocolError:
        """Hard close: the error state (next_event raises ``error`` from now on)."""
        self.error = ProtocolError(msg)
        return self.error

    def _export_info(self, exp: ServerExport) -> ExportInfo:
        flags = exp.flags
        if not self.structured_replies:
            flags &= ~NBD_FLAG_SEND_DF
        return ExportInfo(
            name=exp.name,
            size=exp.size,
            flags=flags,
            min_block=exp.min_block,
            preferred_block=exp.preferred_block,
            max_block=exp.max_block,
            description=exp.description,
            structured_replies=self.structured_replies,
        )

    def next_event(self):
        if self.error is not None:
            raise self.error
        while True:
            buf = self._in
            st = self._state
            if st == "client_flags":
                if buf.available() < 4:
                    return NEED_DATA
                (cflags,) = _U32_unpack_from(buf.buf, buf.pos)
                buf.pos += 4
                if cflags & ~self._hflags:
                    raise self._fail(f"client sent unknown or unoffered flags 0x{cflags:08x}")
                self.no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
                self._state = "options"
                continue
            if st != "options":
                return NEED_DATA
            if buf.available() < 16:
                return NEED_DATA
            magic, opt, length = _OPT.unpack_from(buf.buf, buf.pos)
            if magic != IHAVEOPT:
                raise self._fail(f"bad option magic 0x{magic:016x}")
            if length > NBD_MAX_OPTION_DATA:
                raise self._fail(f"option {opt} data too long ({length} bytes)")
            if buf.available() < 16 + length:
                return NEED_DATA
            buf.pos += 16
            data = buf.take(length)
            self._options_seen += 1
            if self._options_seen > self.max_options:
                raise self._fail("too many options in the handshake")
            ev = self._handle_option(opt, data)
            if ev is not None:
                return ev

    def _handle_option(self, opt: int, data: bytes):
        if opt == NBD_OPT_EXPORT_NAME:
            try:
                name = data.decode()
            except UnicodeDecodeError:
                raise self._fail("NBD_OPT_EXPORT_NAME with a name that is not UTF-8") from None
            exp = self.lookup(name)
            if exp is None or self.shutting_down:
                raise self._fail(f"NBD_OPT_EXPORT_NAME for unknown export {name!r}")
            info = self._export_info(exp)
            self._out += _EXPORT_NAME_REPLY.pack(info.size, info.flags)
            if not self.no_zeroes:
                self._out += bytes(124)
            self._state = "transmission"
            return HandshakeDone(info=info, structured_replies=self.structured_replies)
        if opt == NBD_OPT_ABORT:
            self._reply(opt, NBD_REP_ACK)
            self._state = "closed"
            return HandshakeAborted()
        if self.shutting_down:
            self._err(opt, NBD_REP_ERR_SHUTDOWN, "server is shutting down")
            return None
        if opt == NBD_OPT_LIST:
            if data:
                self._err(opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST must not carry data")
                return None
            for exp in self.exports.values():
                n = exp.name.encode()
                self._reply(opt, NBD_REP_SERVER, _U32.pack(len(n)) + n + exp.description.encode()[:NBD_MAX_STRING])
            self._reply(opt, NBD_REP_ACK)
            return None
        if opt in (NBD_OPT_INFO, NBD_OPT_GO):
            return self._handle_info_go(opt, data)
        if opt == NBD_OPT_STRUCTURED_REPLY:
            if data:
                self._err(opt, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY must not carry data")
            else:
                self.structured_replies = True
                self._reply(opt, NBD_REP_ACK)
            return None
        if opt == NBD_OPT_STARTTLS:
            self._err(opt, NBD_REP_ERR_POLICY, "TLS is not configured on this server")
            return None
        self._err(opt, NBD_REP_ERR_UNSUP, f"option {OPT_NAMES.get(opt, opt)} is not supported")
        return None

    def _handle_info_go(self, opt: int, data: bytes):
        if len(data) < 6:
            self._err(opt, NBD_REP_ERR_INVALID, "option data too short")
            return None
        (nlen,) = _U32_unpack_from(data, 0)
        if nlen > NBD_MAX_STRING or 4 + nlen + 2 > len(data):
            self._err(opt, NBD_REP_ERR_INVALID, "bad export name length")
            return None
        raw_name = data[4 : 4 + nlen]
        (count,) = _U16.unpack_from(data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * count:
            self._err(opt, NBD_REP_ERR_INVALID, "bad information request count")
            return None
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            self._err(opt, NBD_REP_ERR_INVALID, "export name is not UTF-8")
            return None
        requested = {t for (t,) in struct.iter_unpack(">H", data[4 + nlen + 2 :])}
        exp = self.lookup(name)
        if exp is None:
            self._err(opt, NBD_REP_ERR_UNKNOWN, f"unknown export {name!r}")
            return None
        info = self._export_info(exp)
        self._reply(opt, NBD_REP_INFO, _INFO_EXPORT.pack(NBD_INFO_EXPORT, info.size, info.flags))
        if NBD_INFO_NAME in requested:
            self._reply(opt, NBD_REP_INFO, _U16.pack(NBD_INFO_NAME) + exp.name.encode())
        if NBD_INFO_DESCRIPTION in requested and exp.description:
            self._reply(opt, NBD_REP_INFO, _U16.pack(NBD_INFO_DESCRIPTION) + exp.description.encode()[:NBD_MAX_STRING])
        # Block sizes are sent even when not asked (allowed by the spec).
        self._reply(
            opt,
            NBD_REP_INFO,
            _INFO_BLOCK.pack(NBD_INFO_BLOCK_SIZE, exp.min_block, exp.preferred_block, exp.max_block),
        )
        self._reply(opt, NBD_REP_ACK)
        if opt == NBD_OPT_GO:
            self._state = "transmission"
            return HandshakeDone(info=info, structured_replies=self.structured_replies)
        return None


# --------------------------------------------------------------------------
# Transmission phase: client
# --------------------------------------------------------------------------


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

    __slots__ = ("_buf", "_pos", "_pending", "structured_replies", "_chunks", "_perr", "_roff",
                 "error")

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

    def send_request(self, cmd: int, cookie: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> bytes:
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

    def next_event(self):
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
                raise ProtocolError("simple reply with data for a READ after structured replies were negotiated")
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

    __slots__ = ("_buf", "_pos", "max_payload", "_drain", "_drain_req", "_payload", "_pfill", "_preq",
                 "error")

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

    def next_event(self):
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
