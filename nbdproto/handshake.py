"""NBD fixed newstyle handshake, client and server side (sans-I/O).

Counterpart: NetworkBlockDevice/nbd ``doc/proto.md`` "Handshake" ->
"Fixed newstyle negotiation" and the option haggling (EXPORT_NAME, ABORT,
LIST, INFO, GO, STRUCTURED_REPLY).

Simplified: no TLS (STARTTLS answered with NBD_REP_ERR_POLICY), no oldstyle
negotiation, no meta contexts, no extended headers.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import attrs

from .codec import (
    _EXPORT_NAME_REPLY,
    _GREETING,
    _INFO_BLOCK,
    _INFO_EXPORT,
    _OPT,
    _OPT_REPLY,
    _U16,
    _U32,
    NEED_DATA,
    ExportInfo,
    ExportList,
    HandshakeAborted,
    HandshakeDone,
    HandshakeFailed,
    HandshakeRefused,
    NeedData,
    OptionReply,
    ProtocolError,
    _Buffer,
    _U32_unpack_from,
    encode_greeting,
    encode_info_request,
    encode_option,
    encode_option_reply,
)
from .constants import (
    IHAVEOPT,
    NBD_CLISERV_MAGIC,
    NBD_DEFAULT_MAX_BLOCK,
    NBD_DEFAULT_MIN_BLOCK,
    NBD_DEFAULT_PREFERRED_BLOCK,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_SEND_DF,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_MAX_OPTION_DATA,
    NBD_MAX_STRING,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_SHUTDOWN,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_SERVER,
    NBDMAGIC,
    OPT_NAMES,
    REP_NAMES,
)

# --------------------------------------------------------------------------
# Client handshake
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# The state machine: states, triggers, and the transition table
# --------------------------------------------------------------------------


class _SentinelBase(type):
    """Metaclass of the sentinels: a class that is its own type, shown by name (as in h11)."""

    def __repr__(self) -> str:
        return self.__name__


def _make_sentinel(name: str) -> type:
    cls = _SentinelBase(name, (_SentinelBase,), {})
    cls.__class__ = cls
    return cls


# Roles.
CLIENT = _make_sentinel("CLIENT")
SERVER = _make_sentinel("SERVER")

# Client states: what the client is waiting for from the server.
AWAIT_GREETING = _make_sentinel("AWAIT_GREETING")  # NBDMAGIC, IHAVEOPT, handshake flags
AWAIT_STRUCTURED_REPLY = _make_sentinel("AWAIT_STRUCTURED_REPLY")  # reply to NBD_OPT_STRUCTURED_REPLY
AWAIT_LIST = _make_sentinel("AWAIT_LIST")  # NBD_REP_SERVER* then NBD_REP_ACK to NBD_OPT_LIST
AWAIT_GO = _make_sentinel("AWAIT_GO")  # NBD_REP_INFO* then NBD_REP_ACK to NBD_OPT_GO / NBD_OPT_INFO
AWAIT_EXPORT_NAME_REPLY = _make_sentinel("AWAIT_EXPORT_NAME_REPLY")  # size, flags (, 124 zeroes)
DONE = _make_sentinel("DONE")  # handshake over (transmission, or ABORT sent)

# Server states.
AWAIT_CLIENT_FLAGS = _make_sentinel("AWAIT_CLIENT_FLAGS")  # greeting sent, 32-bit client flags next
OPTIONS = _make_sentinel("OPTIONS")  # option haggling
TRANSMISSION = _make_sentinel("TRANSMISSION")  # EXPORT_NAME answered or GO acknowledged
CLOSED = _make_sentinel("CLOSED")  # NBD_OPT_ABORT acknowledged

# Either side, after a ProtocolError (entered from any state, as h11's ERROR).
ERROR = _make_sentinel("ERROR")

# Triggers: the messages that move a machine (sent by the client, or received by it).
SEND_STRUCTURED_REPLY = _make_sentinel("SEND_STRUCTURED_REPLY")
SEND_LIST = _make_sentinel("SEND_LIST")
SEND_GO = _make_sentinel("SEND_GO")  # NBD_OPT_GO or NBD_OPT_INFO
SEND_EXPORT_NAME = _make_sentinel("SEND_EXPORT_NAME")
SEND_ABORT = _make_sentinel("SEND_ABORT")
RECV_REP_SERVER = _make_sentinel("RECV_REP_SERVER")
RECV_REP_INFO = _make_sentinel("RECV_REP_INFO")
RECV_EXPORT_NAME_REPLY = _make_sentinel("RECV_EXPORT_NAME_REPLY")
# Server triggers: what it received (and acted on).
RECV_CLIENT_FLAGS = _make_sentinel("RECV_CLIENT_FLAGS")
RECV_OPTION = _make_sentinel("RECV_OPTION")  # any option answered with replies, staying in OPTIONS
RECV_EXPORT_NAME = _make_sentinel("RECV_EXPORT_NAME")
RECV_EXPORT_NAME_REFUSED = _make_sentinel("RECV_EXPORT_NAME_REFUSED")  # EXPORT_NAME from a refused client
RECV_GO = _make_sentinel("RECV_GO")  # NBD_OPT_GO answered with NBD_REP_ACK
RECV_ABORT = _make_sentinel("RECV_ABORT")

#: The single source of truth for both handshakes: (role, state, trigger) -> next state.
#: ERROR is not listed: a ProtocolError moves a machine there from any state.
TRANSITIONS: dict[tuple[type, type, type], type] = {
    # Client: after the greeting, the first option (or EXPORT_NAME if the server is not fixed newstyle).
    (CLIENT, AWAIT_GREETING, SEND_STRUCTURED_REPLY): AWAIT_STRUCTURED_REPLY,
    (CLIENT, AWAIT_GREETING, SEND_LIST): AWAIT_LIST,
    (CLIENT, AWAIT_GREETING, SEND_GO): AWAIT_GO,
    (CLIENT, AWAIT_GREETING, SEND_EXPORT_NAME): AWAIT_EXPORT_NAME_REPLY,
    # STRUCTURED_REPLY answered (ACK or an error reply): ask for the export.
    (CLIENT, AWAIT_STRUCTURED_REPLY, SEND_GO): AWAIT_GO,
    (CLIENT, AWAIT_LIST, RECV_REP_SERVER): AWAIT_LIST,
    (CLIENT, AWAIT_LIST, SEND_ABORT): DONE,  # after the list's NBD_REP_ACK
    (CLIENT, AWAIT_GO, RECV_REP_INFO): AWAIT_GO,
    (CLIENT, AWAIT_GO, SEND_EXPORT_NAME): AWAIT_EXPORT_NAME_REPLY,  # GO unsupported: fall back
    (CLIENT, AWAIT_GO, RECV_GO): DONE,  # NBD_REP_ACK to GO: transmission
    (CLIENT, AWAIT_GO, SEND_ABORT): DONE,  # NBD_REP_ACK to INFO: abort
    (CLIENT, AWAIT_EXPORT_NAME_REPLY, RECV_EXPORT_NAME_REPLY): DONE,
    # Server.
    (SERVER, AWAIT_CLIENT_FLAGS, RECV_CLIENT_FLAGS): OPTIONS,
    (SERVER, OPTIONS, RECV_OPTION): OPTIONS,
    (SERVER, OPTIONS, RECV_EXPORT_NAME): TRANSMISSION,
    (SERVER, OPTIONS, RECV_GO): TRANSMISSION,
    (SERVER, OPTIONS, RECV_ABORT): CLOSED,
    (SERVER, OPTIONS, RECV_EXPORT_NAME_REFUSED): CLOSED,  # no error reply possible: hard close
}

INITIAL_STATE: dict[type, type] = {CLIENT: AWAIT_GREETING, SERVER: AWAIT_CLIENT_FLAGS}


class LocalProtocolError(ProtocolError):
    """A machine was asked to take a transition the table does not have (a bug on our
    side, as h11's LocalProtocolError); the peer's violations raise ProtocolError
    (the "remote" error, :data:`RemoteProtocolError`)."""


RemoteProtocolError = ProtocolError


def next_state(role: type, state: type, trigger: type) -> type:
    """Look ``(role, state, trigger)`` up in :data:`TRANSITIONS`."""
    try:
        return TRANSITIONS[role, state, trigger]
    except KeyError:
        raise LocalProtocolError(f"{role!r}: can't handle {trigger!r} in state {state!r}") from None


#: What ``ClientHandshake.next_event()`` returns.
ClientHandshakeEvent = HandshakeDone | ExportList | NeedData
#: What ``ServerHandshake.next_event()`` returns.
ServerHandshakeEvent = HandshakeDone | HandshakeAborted | HandshakeRefused | NeedData


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
        self.state: type = AWAIT_GREETING
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
        return self.state is DONE

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
            self._to(SEND_LIST)
        elif self.want_structured and self.mode == "go":
            self._send_option(NBD_OPT_STRUCTURED_REPLY)
            self._to(SEND_STRUCTURED_REPLY)
        else:
            self._send_go()

    def _send_go(self) -> None:
        opt = NBD_OPT_GO if self.mode == "go" else NBD_OPT_INFO
        self._send_option(opt, encode_info_request(self.export_name, self._info_types()))
        self._info = {}
        self._to(SEND_GO)

    def _send_export_name(self) -> None:
        self._send_option(NBD_OPT_EXPORT_NAME, self.export_name.encode())
        self._to(SEND_EXPORT_NAME)

    def _to(self, trigger: type) -> None:
        self.state = next_state(CLIENT, self.state, trigger)

    def _fail(self, msg: str) -> HandshakeFailed:
        """The error state (next_event raises ``error`` from now on)."""
        self.state = ERROR
        self.error = HandshakeFailed(msg)
        return self.error

    def next_event(self) -> ClientHandshakeEvent:
        if self.error is not None:
            raise self.error
        while True:
            st = self.state
            buf = self._in
            if st is AWAIT_GREETING:
                if buf.available() >= 8:  # judge the first magic as soon as it is there
                    head = bytes(buf.buf[buf.pos : buf.pos + 8])
                    if int.from_bytes(head, "big") != NBDMAGIC:
                        text = head.decode("ascii", "replace")
                        seen = f" (it sent {text!r}...)" if text.isprintable() else ""
                        raise self._fail(f"not an NBD server: bad greeting magic 0x{head.hex()}{seen}")
                if buf.available() < 18:
                    return NEED_DATA
                magic, magic2, hflags = _GREETING.unpack_from(buf.buf, buf.pos)
                buf.pos += 18
                if magic2 == NBD_CLISERV_MAGIC:
                    raise self._fail(
                        "server speaks oldstyle negotiation (no export names), which "
                        "is not supported; run it newstyle (e.g. nbdkit without -o)"
                    )
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
            if st is AWAIT_EXPORT_NAME_REPLY:
                need = 10 if self._no_zeroes else 134
                if buf.available() < need:
                    return NEED_DATA
                size, flags = _EXPORT_NAME_REPLY.unpack_from(buf.buf, buf.pos)
                buf.pos += need
                self._to(RECV_EXPORT_NAME_REPLY)
                info = ExportInfo(
                    name=self.export_name, size=size, flags=flags, structured_replies=self.structured_replies
                )
                return HandshakeDone(info=info, structured_replies=self.structured_replies)
            if st is DONE:
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
                    f"server answered option {OPT_NAMES.get(opt, opt)} "
                    f"while {OPT_NAMES.get(self._current_option)} was asked"
                )
            ev = self._handle_reply(rtype, data)
            if ev is not None:
                return ev

    def _handle_reply(self, rtype: int, data: bytes):
        st = self.state
        msg = data.decode(errors="replace") if rtype & NBD_REP_FLAG_ERROR else ""
        if st is AWAIT_STRUCTURED_REPLY:
            if rtype == NBD_REP_ACK:
                self.structured_replies = True
            elif not rtype & NBD_REP_FLAG_ERROR:
                raise self._fail(f"unexpected reply {_rep_name(rtype)} to NBD_OPT_STRUCTURED_REPLY")
            self._send_go()
            return None
        if st is AWAIT_LIST:
            if rtype == NBD_REP_SERVER:
                if len(data) < 4:
                    raise self._fail("short NBD_REP_SERVER")
                (n,) = _U32.unpack_from(data)
                if n > len(data) - 4:
                    raise self._fail("bad NBD_REP_SERVER name length")
                self._exports.append(
                    (data[4 : 4 + n].decode(errors="replace"), data[4 + n :].decode(errors="replace"))
                )
                self._to(RECV_REP_SERVER)
                return None
            if rtype == NBD_REP_ACK:
                self._send_option(NBD_OPT_ABORT)
                self._to(SEND_ABORT)
                return ExportList(tuple(self._exports))
            raise self._fail(f"NBD_OPT_LIST refused: {_rep_name(rtype)} {msg}".rstrip())
        if st is AWAIT_GO:
            if rtype == NBD_REP_INFO:
                self._parse_info(data)
                self._to(RECV_REP_INFO)
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
                    self._to(SEND_ABORT)
                else:
                    self._to(RECV_GO)
                return HandshakeDone(info=info, structured_replies=self.structured_replies)
            if rtype == NBD_REP_ERR_UNSUP and self.mode == "go":
                # Old server: fall back to NBD_OPT_EXPORT_NAME.  Structured
                # replies cannot have been negotiated by a server without GO
                # (spec: a server that supports SR must support GO).
                self._send_export_name()
                return None
            if rtype == NBD_REP_ERR_UNKNOWN:
                raise self._fail(
                    f"export {self.export_name!r} not found on server" + (f": {msg}" if msg else "")
                )
            if rtype & NBD_REP_FLAG_ERROR:
                raise self._fail(
                    f"server refused export {self.export_name!r}: {_rep_name(rtype)}"
                    + (f" {msg}" if msg else "")
                )
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
    the selected export, as an :class:`ExportInfo`), :class:`HandshakeAborted`,
    :class:`HandshakeRefused`.
    Raises :class:`ProtocolError` when the spec says the server must (or may)
    hard-close: unknown client flags, bad option magic, EXPORT_NAME of an
    unknown export, oversized option data, too many options; it is then in
    its error state (module docstring).

    ``shutting_down`` and ``refusal`` are set by the I/O shell.  While
    ``shutting_down``, options other than ABORT get ``NBD_REP_ERR_SHUTDOWN``.
    ``refusal`` (a message) refuses this client by server policy, such as a
    cap on clients: every option but ABORT is answered ``NBD_REP_ERR_POLICY``
    with that message, so a client learns why on its first option; an
    ``NBD_OPT_EXPORT_NAME`` (no error reply possible) yields
    :class:`HandshakeRefused` and the server must hard-close.
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
        self.state: type = AWAIT_CLIENT_FLAGS
        self._hflags = NBD_FLAG_FIXED_NEWSTYLE | (NBD_FLAG_NO_ZEROES if allow_no_zeroes else 0)
        self.no_zeroes = False
        self.structured_replies = False
        self.shutting_down = False
        self.refusal: str | None = None
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

    def _to(self, trigger: type) -> None:
        self.state = next_state(SERVER, self.state, trigger)

    def _fail(self, msg: str) -> ProtocolError:
        """Hard close: the error state (next_event raises ``error`` from now on)."""
        self.state = ERROR
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

    def next_event(self) -> ServerHandshakeEvent:
        if self.error is not None:
            raise self.error
        while True:
            buf = self._in
            st = self.state
            if st is AWAIT_CLIENT_FLAGS:
                if buf.available() < 4:
                    return NEED_DATA
                (cflags,) = _U32_unpack_from(buf.buf, buf.pos)
                buf.pos += 4
                if cflags & ~self._hflags:
                    raise self._fail(f"client sent unknown or unoffered flags 0x{cflags:08x}")
                self.no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
                self._to(RECV_CLIENT_FLAGS)
                continue
            if st is not OPTIONS:
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
            self._to(RECV_OPTION)

    def _handle_option(self, opt: int, data: bytes):
        if opt == NBD_OPT_EXPORT_NAME and self.refusal is not None and not self.shutting_down:
            self._to(RECV_EXPORT_NAME_REFUSED)
            return HandshakeRefused(option=opt, message=self.refusal)
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
            self._to(RECV_EXPORT_NAME)
            return HandshakeDone(info=info, structured_replies=self.structured_replies)
        if opt == NBD_OPT_ABORT:
            self._reply(opt, NBD_REP_ACK)
            self._to(RECV_ABORT)
            return HandshakeAborted()
        if self.shutting_down:
            self._err(opt, NBD_REP_ERR_SHUTDOWN, "server is shutting down")
            return None
        if self.refusal is not None:
            # ERR_POLICY: the option is known and valid, but the server's
            # configuration forbids it (spec).  Not ERR_SHUTDOWN (the server is
            # not going down; that reply obliges the client to give up), not
            # ERR_TOO_BIG (the size of a request or reply), not ERR_UNKNOWN (the
            # export exists).  nbd-server answers NBD_OPT_GO over an export's
            # maxconnections the same way.
            self._err(opt, NBD_REP_ERR_POLICY, self.refusal)
            return None
        if opt == NBD_OPT_LIST:
            if data:
                self._err(opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST must not carry data")
                return None
            for exp in self.exports.values():
                n = exp.name.encode()
                self._reply(
                    opt, NBD_REP_SERVER, _U32.pack(len(n)) + n + exp.description.encode()[:NBD_MAX_STRING]
                )
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
            self._reply(
                opt, NBD_REP_INFO, _U16.pack(NBD_INFO_DESCRIPTION) + exp.description.encode()[:NBD_MAX_STRING]
            )
        # Block sizes are sent even when not asked (allowed by the spec).
        self._reply(
            opt,
            NBD_REP_INFO,
            _INFO_BLOCK.pack(NBD_INFO_BLOCK_SIZE, exp.min_block, exp.preferred_block, exp.max_block),
        )
        self._reply(opt, NBD_REP_ACK)
        if opt == NBD_OPT_GO:
            self._to(RECV_GO)
            return HandshakeDone(info=info, structured_replies=self.structured_replies)
        return None
