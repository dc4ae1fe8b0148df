"""Unit tests of the sans-I/O NBD codecs and state machines (no sockets).

The hypothesis tests at the end give every decoder (RequestParser,
ServerHandshake, TransmissionClient, ClientHandshake) the same oracles: a
valid stream's events survive any cutting into pieces; a stream with a
violation raises the documented error and leaves the decoder in its error
state; arbitrary bytes behave the same in one piece as in any cutting."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nbdproto as P


def pump(client: P.ClientHandshake, server: P.ServerHandshake):
    """Drive a client and a server handshake against each other in memory;
    return the first non-NEED_DATA event of each side (or NEED_DATA)."""
    client.receive_data(server.greeting())
    cev = sev = P.NEED_DATA
    for _ in range(20):
        if cev is P.NEED_DATA:
            cev = client.next_event()
        server.receive_data(client.data_to_send())
        if sev is P.NEED_DATA:
            sev = server.next_event()
        client.receive_data(server.data_to_send())
    return cev, sev


EXPORTS = {
    "": P.ServerExport("", 1 << 20, P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH, description="default"),
    "big": P.ServerExport(
        "big", 1 << 30, P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_READ_ONLY, min_block=512, max_block=1 << 20
    ),
}


def test_encode_request_layout():
    b = P.encode_request(P.NBD_CMD_WRITE, 0x1122334455667788, 4096, 512, P.NBD_CMD_FLAG_FUA)
    assert len(b) == 28
    assert struct.unpack(">IHHQQI", b) == (P.NBD_REQUEST_MAGIC, 1, 1, 0x1122334455667788, 4096, 512)


def test_constants_match_spec():
    assert P.NBD_REQUEST_MAGIC == 0x25609513
    assert P.NBD_SIMPLE_REPLY_MAGIC == 0x67446698
    assert P.NBD_STRUCTURED_REPLY_MAGIC == 0x668E33EF
    assert P.NBD_REP_ERR_UNSUP == 0x80000001
    assert (P.NBD_EPERM, P.NBD_EIO, P.NBD_EINVAL, P.NBD_ENOSPC, P.NBD_ESHUTDOWN) == (1, 5, 22, 28, 108)
    assert P.NBD_FLAG_SEND_WRITE_ZEROES == 64 and P.NBD_FLAG_CAN_MULTI_CONN == 256


def test_go_handshake_roundtrip():
    c = P.ClientHandshake("big", structured_replies=True)
    s = P.ServerHandshake(EXPORTS)
    cev, sev = pump(c, s)
    assert isinstance(cev, P.HandshakeDone) and isinstance(sev, P.HandshakeDone)
    info = cev.info
    assert (info.name, info.size, info.min_block, info.max_block) == ("big", 1 << 30, 512, 1 << 20)
    assert info.read_only and not info.can_flush and info.structured_replies
    assert sev.info.name == "big" and sev.structured_replies


def test_default_export_and_description():
    c = P.ClientHandshake("")
    cev, _ = pump(c, P.ServerHandshake(EXPORTS))
    assert cev.info.size == 1 << 20 and cev.info.description == "default" and cev.info.can_flush
    assert (cev.info.min_block, cev.info.preferred_block, cev.info.max_block) == (1, 4096, 32 << 20)


def test_list_and_info_modes():
    ev, _ = pump(P.ClientHandshake(mode="list"), P.ServerHandshake(EXPORTS))
    assert ev == P.ExportList((("", "default"), ("big", "")))
    c = P.ClientHandshake("big", mode="info")
    ev, sev = pump(c, P.ServerHandshake(EXPORTS))
    assert isinstance(ev, P.HandshakeDone) and ev.info.size == 1 << 30
    assert not isinstance(sev, P.HandshakeDone)  # INFO stays in haggling


def test_unknown_export_go_fails_with_clear_message():
    with pytest.raises(P.HandshakeFailed, match="'nope' not found"):
        pump(P.ClientHandshake("nope"), P.ServerHandshake(EXPORTS))


def test_export_name_fallback_when_go_unsupported():
    """An old server answers GO with ERR_UNSUP: the client falls back to EXPORT_NAME."""
    c = P.ClientHandshake("x")
    c.receive_data(P.encode_greeting(P.NBD_FLAG_FIXED_NEWSTYLE))  # no NO_ZEROES offered
    assert c.next_event() is P.NEED_DATA
    sent = c.data_to_send()
    assert struct.unpack(">I", sent[:4])[0] == P.NBD_FLAG_C_FIXED_NEWSTYLE
    assert struct.unpack(">QII", sent[4:20])[1] == P.NBD_OPT_GO
    c.receive_data(P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ERR_UNSUP))
    assert c.next_event() is P.NEED_DATA
    sent = c.data_to_send()
    assert struct.unpack(">QII", sent[:16])[1:] == (P.NBD_OPT_EXPORT_NAME, 1) and sent[16:] == b"x"
    c.receive_data(struct.pack(">QH", 12345, 3) + bytes(124))
    ev = c.next_event()
    assert isinstance(ev, P.HandshakeDone) and ev.info.size == 12345 and ev.info.flags == 3


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_fallback_reply_with_and_without_zeroes(no_zeroes):
    """The EXPORT_NAME reply is 10 bytes with NO_ZEROES (offered by the server,
    echoed by the client), else 134; bytes after it belong to transmission."""
    greeting_flags = P.NBD_FLAG_FIXED_NEWSTYLE | (P.NBD_FLAG_NO_ZEROES if no_zeroes else 0)
    c = P.ClientHandshake("x", structured_replies=True)
    c.receive_data(P.encode_greeting(greeting_flags))
    assert c.next_event() is P.NEED_DATA
    sent = c.data_to_send()
    assert struct.unpack(">I", sent[:4])[0] == greeting_flags  # the client's flags echo them
    c.receive_data(P.encode_option_reply(P.NBD_OPT_STRUCTURED_REPLY, P.NBD_REP_ERR_UNSUP)
                   + P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ERR_UNSUP))
    assert c.next_event() is P.NEED_DATA and not c.finished
    assert c.data_to_send().endswith(P.encode_option(P.NBD_OPT_EXPORT_NAME, b"x"))
    reply = struct.pack(">QH", 12345, 3) + (b"" if no_zeroes else bytes(124))
    c.receive_data(reply[:-1])
    assert c.next_event() is P.NEED_DATA  # one byte short
    c.receive_data(reply[-1:] + b"TX")
    ev = c.next_event()
    assert ev == P.HandshakeDone(P.ExportInfo("x", 12345, 3), structured_replies=False)
    assert ev.structured_replies is False and ev.info.structured_replies is False
    assert c.finished and c.trailing_data() == b"TX"
    assert [(r.option, r.reply_type) for r in c.option_replies] == [
        (P.NBD_OPT_STRUCTURED_REPLY, P.NBD_REP_ERR_UNSUP), (P.NBD_OPT_GO, P.NBD_REP_ERR_UNSUP)]


def test_option_reply_length_limit():
    """An option reply of exactly NBD_MAX_OPTION_DATA bytes is read; one more is refused."""
    big = struct.pack(">H", P.NBD_INFO_DESCRIPTION) + b"d" * (P.NBD_MAX_OPTION_DATA - 2)
    c = go_client("x")
    c.receive_data(P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_INFO, big) + info_export()
                   + P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ACK))
    assert len(c.next_event().info.description) == P.NBD_MAX_OPTION_DATA - 2
    c = go_client("x")
    c.receive_data(P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_INFO, big + b"d"))
    with pytest.raises(P.HandshakeFailed, match="too long"):
        c.next_event()


def test_plain_newstyle_server_uses_export_name():
    c = P.ClientHandshake("")
    c.receive_data(P.encode_greeting(0))
    assert c.next_event() is P.NEED_DATA
    sent = c.data_to_send()
    assert sent[:4] == bytes(4) and struct.unpack(">QII", sent[4:20])[1] == P.NBD_OPT_EXPORT_NAME


def test_server_export_name_with_and_without_zeroes():
    for cflags, tail in (
        (P.NBD_FLAG_C_FIXED_NEWSTYLE, 124),
        (P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES, 0),
    ):
        s = P.ServerHandshake(EXPORTS)
        s.receive_data(struct.pack(">I", cflags) + P.encode_option(P.NBD_OPT_EXPORT_NAME, b"big"))
        ev = s.next_event()
        assert isinstance(ev, P.HandshakeDone)
        out = s.data_to_send()
        assert len(out) == 10 + tail and struct.unpack(">QH", out[:10]) == (1 << 30, EXPORTS["big"].flags)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">I", 0x80000001),  # unknown client flag bit
        struct.pack(">I", 1) + struct.pack(">QII", 0x1234, 3, 0),  # bad option magic
        struct.pack(">I", 1) + P.encode_option(P.NBD_OPT_EXPORT_NAME, b"missing"),  # must close
        struct.pack(">I", 1) + struct.pack(">QII", P.IHAVEOPT, 99, 1 << 30),  # absurd option length
    ],
)
def test_server_handshake_hard_close_cases(data):
    s = P.ServerHandshake(EXPORTS)
    s.receive_data(data)
    with pytest.raises(P.ProtocolError):
        s.next_event()


def test_server_unknown_option_then_continues():
    s = P.ServerHandshake(EXPORTS)
    s.receive_data(struct.pack(">I", 1) + P.encode_option(0x55, b"junk") + P.encode_option(P.NBD_OPT_LIST))
    assert s.next_event() is P.NEED_DATA
    out = s.data_to_send()
    assert struct.unpack(">QIII", out[:20])[1:3] == (0x55, P.NBD_REP_ERR_UNSUP)
    assert [t for _, t in s.options_log] == [
        P.NBD_REP_ERR_UNSUP, P.NBD_REP_SERVER, P.NBD_REP_SERVER, P.NBD_REP_ACK
    ]


def test_server_option_errors():
    s = P.ServerHandshake(EXPORTS)
    s.receive_data(
        struct.pack(">I", 1)
        + P.encode_option(P.NBD_OPT_LIST, b"x")
        + P.encode_option(P.NBD_OPT_STARTTLS)
        + P.encode_option(P.NBD_OPT_GO, b"\x00\x00\x00\xff")  # truncated
        + P.encode_option(P.NBD_OPT_ABORT)
    )
    assert isinstance(s.next_event(), P.HandshakeAborted)
    assert [t for _, t in s.options_log] == [
        P.NBD_REP_ERR_INVALID,
        P.NBD_REP_ERR_POLICY,
        P.NBD_REP_ERR_INVALID,
        P.NBD_REP_ACK,
    ]


def test_server_shutdown_refuses_options():
    s = P.ServerHandshake(EXPORTS)
    s.shutting_down = True
    s.receive_data(struct.pack(">I", 1) + P.encode_option(P.NBD_OPT_GO, P.encode_info_request("")))
    assert s.next_event() is P.NEED_DATA
    assert s.options_log == [(P.NBD_OPT_GO, P.NBD_REP_ERR_SHUTDOWN)]


def test_client_rejects_bad_greeting_and_oldstyle():
    c = P.ClientHandshake()
    c.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(P.HandshakeFailed, match="not an NBD server"):
        c.next_event()
    c = P.ClientHandshake()
    c.receive_data(struct.pack(">QQ", P.NBDMAGIC, P.NBD_CLISERV_MAGIC) + bytes(8))
    with pytest.raises(P.HandshakeFailed, match="oldstyle"):
        c.next_event()


def test_client_rejects_invalid_block_size():
    c = P.ClientHandshake("")
    c.receive_data(P.encode_greeting())
    c.next_event()
    c.receive_data(
        P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_INFO, struct.pack(">HIII", 3, 3, 4096, 1 << 20))
    )
    with pytest.raises(P.HandshakeFailed, match="minimum block size"):
        c.next_event()


# -- client handshake against hand-made server replies (paths our own server never takes)


def go_client(name="x", **kw):
    """A client that has read the greeting and sent its first option."""
    c = P.ClientHandshake(name, **kw)
    c.receive_data(P.encode_greeting())
    assert c.next_event() is P.NEED_DATA
    c.data_to_send()
    return c


def info_export(size=1 << 20, flags=P.NBD_FLAG_HAS_FLAGS, opt=P.NBD_OPT_GO):
    return P.encode_option_reply(opt, P.NBD_REP_INFO,
                                 struct.pack(">HQH", P.NBD_INFO_EXPORT, size, flags))


def test_go_without_optional_infos_uses_the_defaults():
    c = go_client("x")
    c.receive_data(info_export() + P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ACK))
    ev = c.next_event()
    assert ev == P.HandshakeDone(info=P.ExportInfo("x", 1 << 20, P.NBD_FLAG_HAS_FLAGS),
                                 structured_replies=False)
    info = ev.info
    assert (info.min_block, info.preferred_block, info.max_block) == (1, 4096, 32 << 20)
    assert info.description == "" and not info.read_only and not info.can_flush
    assert c.data_to_send() == b""  # GO: nothing more to say


def test_go_with_name_description_and_block_sizes():
    c = go_client("x")
    reply = lambda payload: P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_INFO, payload)  # noqa: E731
    c.receive_data(reply(struct.pack(">H", P.NBD_INFO_NAME) + b"real")
                   + reply(struct.pack(">H", P.NBD_INFO_DESCRIPTION) + b"a disk")
                   + reply(struct.pack(">HIII", P.NBD_INFO_BLOCK_SIZE, 65536, 65536, 0xFFFFFFFF))
                   + info_export(flags=P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_READ_ONLY)
                   + P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ACK))
    info = c.next_event().info
    assert (info.name, info.description, info.read_only) == ("real", "a disk", True)
    assert (info.min_block, info.preferred_block, info.max_block) == (65536, 65536, 0xFFFFFFFF)


def test_info_mode_aborts_after_the_info():
    c = go_client("x", mode="info")
    c.receive_data(info_export(opt=P.NBD_OPT_INFO)
                   + P.encode_option_reply(P.NBD_OPT_INFO, P.NBD_REP_ACK))
    assert isinstance(c.next_event(), P.HandshakeDone)
    assert c.data_to_send() == P.encode_option(P.NBD_OPT_ABORT)


@pytest.mark.parametrize("reply, structured", [(P.NBD_REP_ACK, True), (P.NBD_REP_ERR_UNSUP, False)])
def test_structured_reply_negotiation_outcome(reply, structured):
    c = go_client("x", structured_replies=True)
    c.receive_data(P.encode_option_reply(P.NBD_OPT_STRUCTURED_REPLY, reply))
    assert c.next_event() is P.NEED_DATA
    assert struct.unpack(">QII", c.data_to_send()[:16])[1] == P.NBD_OPT_GO  # then GO either way
    c.receive_data(info_export() + P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ACK))
    ev = c.next_event()
    assert ev.structured_replies is structured and ev.info.structured_replies is structured


@pytest.mark.parametrize("block, message", [
    ((131072, 131072, 1 << 20), "invalid minimum block size 131072"),
    ((3, 4096, 1 << 20), "invalid minimum block size 3"),
    ((512, 256, 1 << 20), "invalid preferred block size 256"),
    ((512, 1536, 1 << 20), "invalid preferred block size 1536"),
    ((512, 0, 1 << 20), "invalid preferred block size 0"),
    ((512, 4096, 2048), "maximum block size 2048 below the preferred 4096"),
])
def test_client_rejects_each_invalid_block_size(block, message):
    c = go_client("x")
    c.receive_data(P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_INFO,
                                         struct.pack(">HIII", P.NBD_INFO_BLOCK_SIZE, *block)))
    with pytest.raises(P.HandshakeFailed, match=message):
        c.next_event()


@pytest.mark.parametrize("block", [(1, 1, 1), (512, 512, 512), (65536, 1 << 20, 1 << 25)])
def test_client_accepts_valid_block_sizes(block):
    c = go_client("x")
    c.receive_data(P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_INFO,
                                         struct.pack(">HIII", P.NBD_INFO_BLOCK_SIZE, *block))
                   + info_export() + P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ACK))
    info = c.next_event().info
    assert (info.min_block, info.preferred_block, info.max_block) == block


@pytest.mark.parametrize("rtype, payload, message", [
    (P.NBD_REP_ERR_UNKNOWN, b"gone", r"^export 'x' not found on server: gone$"),
    (P.NBD_REP_ERR_UNKNOWN, b"", r"^export 'x' not found on server$"),
    (P.NBD_REP_ERR_POLICY, b"no", r"^server refused export 'x': ERR_POLICY no$"),
    (P.NBD_REP_ERR_POLICY, b"", r"^server refused export 'x': ERR_POLICY$"),
    (P.NBD_REP_SERVER, b"", r"^unexpected option reply SERVER during NBD_OPT_GO$"),
    (P.NBD_REP_INFO, b"\x00", r"^short NBD_REP_INFO$"),
    (P.NBD_REP_INFO, struct.pack(">H", P.NBD_INFO_EXPORT) + bytes(9),
     r"^NBD_INFO_EXPORT of length 11 \(expected 12\)$"),
    (P.NBD_REP_INFO, struct.pack(">H", P.NBD_INFO_BLOCK_SIZE) + bytes(13),
     r"^NBD_INFO_BLOCK_SIZE of length 15 \(expected 14\)$"),
])
def test_client_go_failures_say_why(rtype, payload, message):
    c = go_client("x")
    c.receive_data(P.encode_option_reply(P.NBD_OPT_GO, rtype, payload))
    with pytest.raises(P.HandshakeFailed, match=message):
        c.next_event()


def list_reply(payload: bytes) -> bytes:
    return P.encode_option_reply(P.NBD_OPT_LIST, P.NBD_REP_SERVER, payload)


def test_client_list_entries_at_their_length_limits():
    c = go_client(mode="list")
    c.receive_data(list_reply(struct.pack(">I", 0))  # 4 bytes: an empty name
                   + list_reply(struct.pack(">I", 2) + b"ab")  # the name fills the entry
                   + list_reply(struct.pack(">I", 1) + b"c\xffd")  # name, then a description
                   + P.encode_option_reply(P.NBD_OPT_LIST, P.NBD_REP_ACK))
    assert c.next_event() == P.ExportList((("", ""), ("ab", ""), ("c", "\ufffdd")))
    assert c.data_to_send() == P.encode_option(P.NBD_OPT_ABORT)


@pytest.mark.parametrize("reply, message", [
    (list_reply(b"\x00\x00\x00"), r"^short NBD_REP_SERVER$"),
    (list_reply(struct.pack(">I", 3) + b"ab"), r"^bad NBD_REP_SERVER name length$"),
    (P.encode_option_reply(P.NBD_OPT_LIST, P.NBD_REP_ERR_POLICY, b"  no  "),
     r"^NBD_OPT_LIST refused: ERR_POLICY   no$"),
])
def test_client_list_failures_say_why(reply, message):
    c = go_client(mode="list")
    c.receive_data(reply)
    with pytest.raises(P.HandshakeFailed, match=message):
        c.next_event()


def test_client_structured_reply_answered_wrongly():
    c = go_client("x", structured_replies=True)
    c.receive_data(P.encode_option_reply(P.NBD_OPT_STRUCTURED_REPLY, P.NBD_REP_SERVER))
    with pytest.raises(P.HandshakeFailed,
                       match=r"^unexpected reply SERVER to NBD_OPT_STRUCTURED_REPLY$"):
        c.next_event()


def test_client_argument_checks():
    assert P.ClientHandshake("n" * 4096).export_name == "n" * 4096
    with pytest.raises(ValueError, match="longer than 4096"):
        P.ClientHandshake("n" * 4097)
    with pytest.raises(ValueError, match="mode must be go, info or list, not 'x'"):
        P.ClientHandshake(mode="x")
    assert P.ClientHandshake().export_name == ""
    c = P.ClientHandshake()
    c.receive_data(P.encode_greeting())
    c.next_event()
    types = struct.unpack(">QII", c.data_to_send()[4:20])
    assert types[1] == P.NBD_OPT_GO and types[2] == 4 + 0 + 2 + 2 * 3  # name, description, block


def test_wire_fields_hold_their_full_unsigned_range():
    """Offsets, lengths and errors are unsigned on the wire."""
    hole = P.encode_offset_hole(1, 2**64 - 1, 2**32 - 1)
    assert struct.unpack(">QI", hole[20:]) == (2**64 - 1, 2**32 - 1)
    err = P.encode_structured_error(1, 2**32 - 1, "m" * 5000)
    assert struct.unpack(">IH", err[20:26]) == (2**32 - 1, 4096) and len(err) == 26 + 4096


# -- transmission, client side


def test_transmission_client_simple_replies_any_order():
    tc = P.TransmissionClient()
    tc.send_request(P.NBD_CMD_READ, 1, 0, 4)
    tc.send_request(P.NBD_CMD_WRITE, 2, 0, 3, payload=b"abc")
    tc.send_request(P.NBD_CMD_FLUSH, 3, 0, 0)
    stream = (
        P.encode_simple_reply(3)
        + P.encode_simple_reply(2, P.NBD_ENOSPC)
        + P.encode_simple_reply(1, 0, b"DATA")
    )
    events = []
    for i in range(len(stream)):  # one byte at a time
        tc.receive_data(stream[i : i + 1])
        while (ev := tc.next_event()) is not P.NEED_DATA:
            events.append(ev)
    assert events == [P.Reply(3, 0, None), P.Reply(2, P.NBD_ENOSPC, None), P.Reply(1, 0, b"DATA")]
    assert tc.in_flight == 0


def test_transmission_client_errors():
    tc = P.TransmissionClient()
    tc.receive_data(P.encode_simple_reply(99))
    with pytest.raises(P.ProtocolError, match="unknown cookie"):
        tc.next_event()
    tc = P.TransmissionClient()
    tc.send_request(P.NBD_CMD_READ, 1, 0, 4)
    tc.receive_data(b"\xde\xad\xbe\xef" + bytes(12))
    with pytest.raises(P.ProtocolError, match="bad reply magic"):
        tc.next_event()
    with pytest.raises(ValueError):
        tc.send_request(P.NBD_CMD_READ, 1, 0, 4)  # cookie already in flight


def test_transmission_client_structured_read_assembly():
    tc = P.TransmissionClient(structured_replies=True)
    tc.send_request(P.NBD_CMD_READ, 7, 1000, 12)
    tc.send_request(P.NBD_CMD_READ, 8, 0, 4)
    tc.send_request(P.NBD_CMD_WRITE, 9, 0, 1, payload=b"x")
    stream = (
        P.encode_offset_data_header(7, 1008, 4, done=False)
        + b"TAIL"
        + P.encode_structured_error(8, P.NBD_EIO, "boom", done=False)
        + P.encode_offset_hole(7, 1004, 4, done=False)
        + P.encode_simple_reply(9)
        + P.encode_offset_data_header(7, 1000, 4, done=True)
        + b"HEAD"
        + P.encode_structured_chunk(8, P.NBD_REPLY_TYPE_NONE)
    )
    tc.receive_data(stream)
    events = []
    while (ev := tc.next_event()) is not P.NEED_DATA:
        events.append(ev)
    assert events == [
        P.Reply(9, 0, None), P.Reply(7, 0, b"HEAD" + bytes(4) + b"TAIL"), P.Reply(8, P.NBD_EIO, None)
    ]


def test_transmission_client_structured_overlapping_chunks_are_an_error():
    """Two chunks over the same half add up to the length, but leave the other
    half unread: the spec forbids overlapping chunks, so this is not a READ."""
    tc = P.TransmissionClient(structured_replies=True)
    tc.send_request(P.NBD_CMD_READ, 1, 100, 8)
    tc.receive_data(P.encode_offset_data_header(1, 100, 4, done=False) + b"abcd"
                    + P.encode_offset_data_header(1, 100, 4) + b"abcd")
    with pytest.raises(P.ProtocolError, match="overlapping data chunks"):
        tc.next_event()


def test_transmission_client_structured_chunk_boundaries():
    """Chunk offsets are relative to the READ's offset; a hole is exactly 12 bytes,
    a data chunk at least 8; an ERROR chunk without a value means EINVAL."""
    tc = P.TransmissionClient(structured_replies=True)
    tc.send_request(P.NBD_CMD_READ, 1, 100, 6)
    tc.send_request(P.NBD_CMD_READ, 2, 0, 0)
    tc.send_request(P.NBD_CMD_FLUSH, 3, 0, 0)
    tc.receive_data(P.encode_offset_hole(1, 102, 4, done=False)
                    + P.encode_offset_data_header(1, 100, 2) + b"ab"
                    + P.encode_structured_chunk(2, P.NBD_REPLY_TYPE_NONE)
                    + P.encode_structured_chunk(3, P.NBD_REPLY_TYPE_ERROR, b""))
    assert [tc.next_event() for _ in range(3)] == [
        P.Reply(1, 0, b"ab" + bytes(4)), P.Reply(2, 0, b""), P.Reply(3, P.NBD_EINVAL, None)]
    for chunk, message in [
        (P.encode_structured_chunk(4, P.NBD_REPLY_TYPE_OFFSET_DATA, bytes(7)), "malformed"),
        (P.encode_structured_chunk(4, P.NBD_REPLY_TYPE_OFFSET_HOLE, bytes(13)), "malformed"),
        (P.encode_structured_chunk(4, P.NBD_REPLY_TYPE_NONE, b"x"), "NONE chunk with a payload"),
        (P.encode_structured_chunk(4, P.NBD_REPLY_TYPE_NONE), "without any data chunk"),
        (P.encode_offset_data_header(4, 99, 1) + b"x", "outside the requested range"),
        (P.encode_offset_data_header(4, 100, 9) + bytes(9), "outside the requested range"),
    ]:
        tc = P.TransmissionClient(structured_replies=True)
        tc.send_request(P.NBD_CMD_READ, 4, 100, 8)
        tc.receive_data(chunk)
        with pytest.raises(P.ProtocolError, match=message):
            tc.next_event()
    tc = P.TransmissionClient(structured_replies=True)
    tc.send_request(P.NBD_CMD_READ, 5, 0, 8)
    tc.receive_data(P.encode_offset_data_header(5, 0, 0, done=False)
                    + P.encode_offset_data_header(5, 0, 8)
                    + bytes(8))  # an empty data chunk is allowed (8 bytes: the offset)
    assert tc.next_event() == P.Reply(5, 0, bytes(8))


def test_transmission_client_structured_incomplete_read_is_error():
    tc = P.TransmissionClient(structured_replies=True)
    tc.send_request(P.NBD_CMD_READ, 1, 0, 8)
    tc.receive_data(P.encode_offset_data_header(1, 0, 4) + b"half")
    with pytest.raises(P.ProtocolError, match="cover 4 of 8"):
        tc.next_event()


# -- transmission, server side


def test_request_parser_roundtrip_and_split():
    reqs = [
        P.encode_request(P.NBD_CMD_WRITE, 1, 0, 5) + b"hello",
        P.encode_request(P.NBD_CMD_READ, 2, 4096, 512),
        P.encode_request(P.NBD_CMD_DISC, 3, 0, 0),
    ]
    stream = b"".join(reqs)
    p = P.RequestParser()
    got = []
    for i in range(0, len(stream), 7):
        p.receive_data(stream[i : i + 7])
        while (ev := p.next_event()) is not P.NEED_DATA:
            got.append(ev)
    assert got == [
        P.Request(P.NBD_CMD_WRITE, 0, 1, 0, 5, b"hello"),
        P.Request(P.NBD_CMD_READ, 0, 2, 4096, 512),
        P.Request(P.NBD_CMD_DISC, 0, 3, 0, 0),
    ]
    assert not p.partial


def test_request_parser_drains_oversized_write():
    p = P.RequestParser(max_payload=1024)
    p.receive_data(P.encode_request(P.NBD_CMD_WRITE, 1, 0, 5000) + bytes(3000))
    assert p.next_event() is P.NEED_DATA and p.partial
    p.receive_data(bytes(2000) + P.encode_request(P.NBD_CMD_READ, 2, 0, 1))
    ev = p.next_event()
    assert ev.oversized and ev.payload is None and ev.cookie == 1
    assert p.next_event() == P.Request(P.NBD_CMD_READ, 0, 2, 0, 1)
    assert len(p._buf) < 100  # never buffered the 5000 bytes


def test_request_parser_bad_magic():
    p = P.RequestParser()
    p.receive_data(b"\x00" * 28)
    with pytest.raises(P.ProtocolError, match="bad request magic"):
        p.next_event()


def test_request_parser_large_payload_in_place():
    data = bytes(range(256)) * 1024  # 256 KiB
    p = P.RequestParser()
    p.receive_data(P.encode_request(P.NBD_CMD_WRITE, 5, 0, len(data)) + data[:1000])
    assert p.next_event() is P.NEED_DATA and p.partial
    view = p.payload_buffer()
    assert len(view) == len(data) - 1000
    view[:50000] = data[1000:51000]  # as recv_into would
    p.payload_received(50000)
    del view
    p.receive_data(data[51000:] + P.encode_request(P.NBD_CMD_FLUSH, 6, 0, 0))
    assert p.payload_buffer() is None
    req = p.next_event()
    assert (req.cookie, bytes(req.payload)) == (5, data)
    assert p.next_event() == P.Request(P.NBD_CMD_FLUSH, 0, 6, 0, 0)
    assert not p.partial


# -- fuzz tests with oracles
#
# Every decoder is fed its input twice: in one piece, and cut into arbitrary
# pieces. The oracles:
#   * a valid stream yields exactly the events it encodes, however it is cut;
#   * a stream with a protocol violation yields the events before it, then
#     raises the documented error (ProtocolError / HandshakeFailed, with its
#     message), after which the decoder is in its error state: ``error`` is
#     that exception and next_event() raises it again, even for valid bytes;
#   * arbitrary bytes give the same events, output and error in one piece as
#     in any cutting.

#: Examples per test: fewer under mutation testing (mutmut sets MUTANT_UNDER_TEST),
#: where every surviving mutant of the codec reruns all of these tests.
FUZZ = settings(max_examples=30 if os.environ.get("MUTANT_UNDER_TEST") else 200, deadline=None)
#: Piece sizes, used in turn: mostly small, sometimes large (whole payloads).
CUTS = st.lists(st.one_of(st.integers(1, 40), st.integers(41, 100_000)), min_size=1, max_size=12)


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in pieces of the given sizes, taken in turn (the last one shorter)."""
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        pieces.append(data[pos : pos + n])
        pos += n
        i += 1
    return pieces


def run(decoder, pieces, use_view: bool = False):
    """Feed ``pieces``; after each, take every event (and, for handshakes, the
    bytes to send). Returns (events, bytes sent, exception or None)."""
    events, sent = [], bytearray()
    flush = getattr(decoder, "data_to_send", lambda: b"")
    try:
        for piece in pieces:
            view = decoder.payload_buffer() if use_view else None
            if view is not None:  # the server's recv_into path
                n = min(len(view), len(piece))
                view[:n] = piece[:n]
                view.release()
                decoder.payload_received(n)
                piece = piece[n:]
            if piece:
                decoder.receive_data(piece)
            while (ev := decoder.next_event()) is not P.NEED_DATA:
                sent += flush()
                events.append(ev)
            sent += flush()
    except P.ProtocolError as exc:
        sent += flush()
        return events, bytes(sent), exc
    return events, bytes(sent), None


def assert_error_state(decoder, exc: P.ProtocolError, more: bytes) -> None:
    """The error is sticky: recorded, and raised again whatever comes next."""
    assert decoder.error is exc
    decoder.receive_data(more)
    for _ in range(2):
        with pytest.raises(type(exc)) as again:
            decoder.next_event()
        assert again.value is exc


def same_run(make, data: bytes, sizes: list[int], use_view: bool = False):
    """Run a fresh decoder on ``data`` in one piece and one cut into ``sizes``;
    both must agree. Returns the cut run's (decoder, events, sent, exception)."""
    ev1, out1, exc1 = run(make(), [data])
    d = make()
    ev2, out2, exc2 = run(d, cut(data, sizes), use_view)
    assert ev2 == ev1
    assert out2 == out1
    assert (None if exc2 is None else (type(exc2), str(exc2))) == \
        (None if exc1 is None else (type(exc1), str(exc1)))
    return d, ev2, out2, exc2


# -- server side: RequestParser

REQUEST_CMDS = [P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_DISC, P.NBD_CMD_FLUSH, P.NBD_CMD_TRIM,
                P.NBD_CMD_CACHE, P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_BLOCK_STATUS]
LARGE = P.RequestParser.LARGE_PAYLOAD
U64 = st.integers(0, 2**64 - 1)


def request_stream(max_payload: int, specs) -> tuple[int, bytes, list]:
    """(max_payload, wire bytes, the Requests they encode) for (cmd, flags, cookie,
    offset, length) specs; a WRITE's payload is made from its cookie."""
    wire, expected = bytearray(), []
    for cmd, flags, cookie, offset, length in specs:
        wire += P.encode_request(cmd, cookie, offset, length, flags)
        if cmd != P.NBD_CMD_WRITE:
            expected.append(P.Request(cmd, flags, cookie, offset, length))
            continue
        payload = random.Random(cookie).randbytes(length)
        wire += payload
        if length > max_payload:
            expected.append(P.Request(cmd, flags, cookie, offset, length, None, True))
        else:
            expected.append(P.Request(cmd, flags, cookie, offset, length, payload))
    return max_payload, bytes(wire), expected


@st.composite
def request_streams(draw):
    """Request streams. WRITE payloads are small, or around LARGE_PAYLOAD
    (assembled in place, or drained when over max_payload)."""
    max_payload = draw(st.sampled_from([256, 1 << 20]))
    specs = []
    for _ in range(draw(st.integers(0, 6))):
        cmd = draw(st.sampled_from(REQUEST_CMDS))
        if cmd == P.NBD_CMD_WRITE:
            length = draw(st.one_of(st.integers(0, 300), st.integers(LARGE - 4, LARGE + 4)))
        else:
            length = draw(st.integers(0, 2**32 - 1))
        specs.append((cmd, draw(st.integers(0, 0xFFFF)), draw(U64), draw(U64), length))
    return request_stream(max_payload, specs)


#: Always tried, however few examples run: a payload at max_payload and one over
#: it, and one assembled in place, each between two other requests.
W, R = P.NBD_CMD_WRITE, P.NBD_CMD_READ
REQUEST_EXAMPLES = [
    request_stream(256, [(R, 1, 2, 3, 4), (W, 5, 6, 7, 256), (W, 8, 9, 10, 257), (R, 11, 12, 13, 14)]),
    request_stream(1 << 20, [(R, 1, 2, 3, 4), (W, 5, 6, 7, LARGE), (R, 8, 9, 10, 11)]),
]


def not_request_magic(junk: bytes) -> bytes:
    if junk[:4] == struct.pack(">I", P.NBD_REQUEST_MAGIC):
        junk = b"\x00" + junk[1:]
    return junk


@FUZZ
@given(request_streams(), CUTS, st.booleans())
@example(REQUEST_EXAMPLES[0], [7, 100, 3], False)
@example(REQUEST_EXAMPLES[1], [40, 1000, 100_000], True)
@example(REQUEST_EXAMPLES[1], [40, 1000, 100_000], False)
def test_request_parser_valid_stream_any_cutting(stream, sizes, use_view):
    max_payload, wire, expected = stream
    p, events, _, exc = same_run(lambda: P.RequestParser(max_payload), wire, sizes, use_view)
    assert exc is None and p.error is None
    assert events == expected
    assert not p.partial


@FUZZ
@given(request_streams(), st.binary(min_size=28, max_size=60), st.integers(0, 27), CUTS,
       st.booleans())
def test_request_parser_bad_magic_is_a_sticky_error(stream, junk, short, sizes, use_view):
    """Valid requests, then bytes that are not a request header: the requests and
    a partial request while fewer than 28 bytes of it are there; then "bad
    request magic"."""
    max_payload, wire, expected = stream
    junk = not_request_magic(junk)
    make = lambda: P.RequestParser(max_payload)  # noqa: E731
    p, events, _, exc = same_run(make, wire + junk[:short], sizes, use_view)
    assert exc is None and events == expected and p.partial == bool(short)
    p, events, _, exc = same_run(make, wire + junk, sizes, use_view)
    assert events == expected
    assert isinstance(exc, P.ProtocolError) and "bad request magic" in str(exc)
    assert_error_state(p, exc, P.encode_request(P.NBD_CMD_FLUSH, 1, 0, 0))


# -- server side: ServerHandshake

ACK, INVALID = P.NBD_REP_ACK, P.NBD_REP_ERR_INVALID


@st.composite
def client_options(draw):
    """One option that does not end the handshake: (bytes, the final reply type
    the server must send for it, the option it answers)."""
    kind = draw(st.sampled_from(["list", "list_data", "sr", "sr_data", "tls", "unknown",
                                 "info", "info_unknown", "go_short", "go_unknown",
                                 "go_name_length", "go_count", "go_not_utf8"]))
    name = draw(st.sampled_from(["", "big"]))
    types = draw(st.lists(st.sampled_from([P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION,
                                           P.NBD_INFO_BLOCK_SIZE, 77]), max_size=4))
    data = draw(st.binary(min_size=1, max_size=40))
    unknown = draw(st.integers(12, 2**32 - 1))
    go = P.encode_info_request("big", types)
    opt, payload, final = {
        "list": (P.NBD_OPT_LIST, b"", ACK),
        "list_data": (P.NBD_OPT_LIST, data, INVALID),
        "sr": (P.NBD_OPT_STRUCTURED_REPLY, b"", ACK),
        "sr_data": (P.NBD_OPT_STRUCTURED_REPLY, data, INVALID),
        "tls": (P.NBD_OPT_STARTTLS, b"", P.NBD_REP_ERR_POLICY),
        "unknown": (unknown, data, P.NBD_REP_ERR_UNSUP),
        "info": (P.NBD_OPT_INFO, P.encode_info_request(name, types), ACK),
        "info_unknown": (P.NBD_OPT_INFO, P.encode_info_request("nope", types), P.NBD_REP_ERR_UNKNOWN),
        "go_short": (P.NBD_OPT_GO, data[:5], INVALID),
        "go_unknown": (P.NBD_OPT_GO, P.encode_info_request("nope"), P.NBD_REP_ERR_UNKNOWN),
        # a name length running past the data; a count that does not match; bad UTF-8
        "go_name_length": (P.NBD_OPT_GO, struct.pack(">I", 4) + b"big" + bytes(2), INVALID),
        "go_count": (P.NBD_OPT_GO, go[:-2] if types else go + bytes(2), INVALID),
        "go_not_utf8": (P.NBD_OPT_GO, struct.pack(">I", 2) + b"\xff\xfe" + bytes(2), INVALID),
    }[kind]
    return P.encode_option(opt, payload), final, opt


#: How a client stream ends: (bytes, final reply type or None, event class or None).
ENDINGS = {
    "go": (P.encode_option(P.NBD_OPT_GO, P.encode_info_request("big")), ACK, P.HandshakeDone),
    "export_name": (P.encode_option(P.NBD_OPT_EXPORT_NAME, b"big"), None, P.HandshakeDone),
    "abort": (P.encode_option(P.NBD_OPT_ABORT), ACK, P.HandshakeAborted),
    "none": (b"", None, None),
}
#: Hard-close violations after valid options: (bytes, the documented message).
SERVER_FAULTS = {
    "magic": (struct.pack(">QII", 0x1234, P.NBD_OPT_GO, 0), "bad option magic"),
    "length": (struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_LIST, P.NBD_MAX_OPTION_DATA + 1),
               "data too long"),
    "export_name": (P.encode_option(P.NBD_OPT_EXPORT_NAME, b"nope"), "unknown export"),
    "export_name_utf8": (P.encode_option(P.NBD_OPT_EXPORT_NAME, b"\xff\xfe"), "not UTF-8"),
}


def final_replies(s: P.ServerHandshake) -> list[tuple[int, int]]:
    """The reply that ends each option's answer (ACK or an error), with its option."""
    return [(o, t) for o, t in s.options_log if t == P.NBD_REP_ACK or t & P.NBD_REP_FLAG_ERROR]


@FUZZ
@given(st.booleans(), st.lists(client_options(), max_size=6), st.sampled_from(sorted(ENDINGS)),
       st.binary(max_size=40), CUTS)
def test_server_handshake_valid_stream_any_cutting(no_zeroes, options, ending, trailing, sizes):
    cflags = P.NBD_FLAG_C_FIXED_NEWSTYLE | (P.NBD_FLAG_C_NO_ZEROES if no_zeroes else 0)
    end_bytes, end_reply, end_event = ENDINGS[ending]
    stream = struct.pack(">I", cflags) + b"".join(o for o, _, _ in options) + end_bytes
    if end_event is not None:
        stream += trailing  # transmission-phase bytes, not the handshake's
    s, events, _, exc = same_run(lambda: P.ServerHandshake(EXPORTS), stream, sizes)
    assert exc is None and s.error is None
    assert [type(e) for e in events] == ([end_event] if end_event else [])
    expected = [(o, r) for _, r, o in options]
    if end_reply:
        expected.append((P.NBD_OPT_GO if ending == "go" else P.NBD_OPT_ABORT, end_reply))
    assert final_replies(s) == expected
    assert s.no_zeroes == no_zeroes
    if end_event is P.HandshakeDone:
        assert events[0].info.name == "big"
        assert s.trailing_data() == trailing


@FUZZ
@given(st.lists(client_options(), max_size=4), st.sampled_from(sorted(SERVER_FAULTS)), CUTS)
def test_server_handshake_violation_is_a_sticky_error(options, fault, sizes):
    fault_bytes, message = SERVER_FAULTS[fault]
    stream = struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE) + b"".join(o for o, _, _ in options)
    s, events, _, exc = same_run(lambda: P.ServerHandshake(EXPORTS), stream + fault_bytes, sizes)
    assert events == []
    assert final_replies(s) == [(o, r) for _, r, o in options]  # every option was answered
    assert isinstance(exc, P.ProtocolError) and message in str(exc)
    assert_error_state(s, exc, P.encode_option(P.NBD_OPT_LIST))
    assert s.data_to_send() == b""  # no answer to the LIST after the error


@FUZZ
@given(st.binary(max_size=400), CUTS)
def test_server_handshake_arbitrary_bytes(data, sizes):
    """Unknown client flags are the only error 4 bytes can give; anything else is
    answered, however it is cut."""
    s, events, _, exc = same_run(lambda: P.ServerHandshake(EXPORTS), data, sizes)
    if len(data) >= 4 and struct.unpack(">I", data[:4])[0] & ~(
            P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES):
        assert isinstance(exc, P.ProtocolError) and "unknown or unoffered flags" in str(exc)
        assert events == []
    if exc is not None:
        assert_error_state(s, exc, P.encode_option(P.NBD_OPT_ABORT))


# -- client side: TransmissionClient

REPLY_ERRORS = st.sampled_from([P.NBD_EPERM, P.NBD_EIO, P.NBD_EINVAL, P.NBD_ENOSPC])


@st.composite
def reply_streams(draw, structured: bool):
    """(requests to send, reply bytes, the Replies they must give). Replies come
    in any order; with structured replies, a READ's chunks (data and holes, in
    any order, maybe an error) interleave with other replies' chunks."""
    n = draw(st.integers(0, 5))
    cookies = draw(st.lists(U64, min_size=n, max_size=n, unique=True))
    requests, pieces, finals = [], [], []
    for cookie in cookies:
        cmd = draw(st.sampled_from([P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_FLUSH,
                                    P.NBD_CMD_TRIM]))
        offset = draw(st.integers(0, 2**40))
        length = draw(st.integers(0, 64)) if cmd in (P.NBD_CMD_READ, P.NBD_CMD_WRITE) else 0
        payload = bytes(length) if cmd == P.NBD_CMD_WRITE else b""
        requests.append((cmd, cookie, offset, length, payload))
        error = draw(st.one_of(st.just(0), REPLY_ERRORS))
        if cmd != P.NBD_CMD_READ:
            if structured and draw(st.booleans()):
                chunk = (P.encode_structured_error(cookie, error, "x") if error
                         else P.encode_structured_chunk(cookie, P.NBD_REPLY_TYPE_NONE))
            else:
                chunk = P.encode_simple_reply(cookie, error)
            pieces.append([chunk])
            finals.append(P.Reply(cookie, error, None))
            continue
        data = draw(st.binary(min_size=length, max_size=length))
        if not structured:
            pieces.append([P.encode_simple_reply(cookie, error, b"" if error else data)])
            finals.append(P.Reply(cookie, error, None if error else data))
            continue
        # Structured READ: the range cut into data and hole chunks, in any order.
        bounds = sorted(set(draw(st.lists(st.integers(1, max(length - 1, 1)), max_size=4))))
        bounds = [0] + [b for b in bounds if 0 < b < length] + [length]
        chunks = []
        expect = bytearray(data)
        for a, b in zip(bounds, bounds[1:], strict=False):
            if draw(st.booleans()):
                chunks.append(lambda done, a=a, b=b, cookie=cookie, offset=offset, data=data:
                              P.encode_offset_data_header(cookie, offset + a, b - a, done=done) + data[a:b])
            else:
                expect[a:b] = bytes(b - a)
                chunks.append(lambda done, a=a, b=b, cookie=cookie, offset=offset: P.encode_offset_hole(
                    cookie, offset + a, b - a, done=done))
        chunks = draw(st.permutations(chunks))
        if error:
            at = draw(st.integers(0, len(chunks)))
            chunks.insert(at, lambda done, cookie=cookie, error=error: P.encode_structured_error(
                cookie, error, "boom", done=done))
        if chunks and draw(st.booleans()):
            wire = [c(False) for c in chunks[:-1]] + [chunks[-1](True)]
        else:
            wire = [c(False) for c in chunks] + [
                P.encode_structured_chunk(cookie, P.NBD_REPLY_TYPE_NONE)]
        pieces.append(wire)
        finals.append(P.Reply(cookie, error, None if error else bytes(expect)))
    # Interleave: each request's chunks stay in order; a reply is complete at its last.
    order = draw(st.permutations([i for i, p in enumerate(pieces) for _ in p]))
    stream, expected, taken = bytearray(), [], [0] * len(pieces)
    for i in order:
        stream += pieces[i][taken[i]]
        taken[i] += 1
        if taken[i] == len(pieces[i]):
            expected.append(finals[i])
    return requests, bytes(stream), expected


def transmission_client(structured: bool, requests, extra_flush: int | None = None):
    def make():
        tc = P.TransmissionClient(structured_replies=structured)
        for cmd, cookie, offset, length, payload in requests:
            tc.send_request(cmd, cookie, offset, length, payload=payload)
        if extra_flush is not None:  # one more request, still in flight after the stream
            tc.send_request(P.NBD_CMD_FLUSH, extra_flush, 0, 0)
        return tc
    return make


@FUZZ
@given(st.data(), st.booleans(), CUTS)
def test_transmission_client_valid_stream_any_cutting(data, structured, sizes):
    requests, stream, expected = data.draw(reply_streams(structured))
    tc, events, _, exc = same_run(transmission_client(structured, requests), stream, sizes)
    assert exc is None and tc.error is None
    assert events == expected
    assert tc.in_flight == 0


#: Violations: (bytes given the in-flight cookie, structured?, the documented message).
CLIENT_FAULTS = {
    "unknown_cookie": (lambda c: P.encode_simple_reply(c + 1), None, "unknown cookie"),
    "bad_magic": (lambda c: b"\xde\xad\xbe\xef" + bytes(12), None, "bad reply magic"),
    "structured_not_negotiated": (lambda c: P.encode_structured_chunk(c, P.NBD_REPLY_TYPE_NONE),
                                  False, "without NBD_OPT_STRUCTURED_REPLY"),
    "unknown_chunk_type": (lambda c: P.encode_structured_chunk(c, 77), True,
                           "unknown structured reply chunk type"),
    "chunk_unknown_cookie": (lambda c: P.encode_structured_chunk(c + 1, P.NBD_REPLY_TYPE_NONE),
                             True, "structured reply for unknown cookie"),
    "error_zero": (lambda c: P.encode_structured_chunk(c, P.NBD_REPLY_TYPE_ERROR, bytes(6)),
                   True, "error value 0"),
    "data_for_flush": (lambda c: P.encode_offset_data_header(c, 0, 1) + b"x", True,
                       "not READ"),
}


@FUZZ
@given(st.data(), st.sampled_from(sorted(CLIENT_FAULTS)), CUTS)
def test_transmission_client_violation_is_a_sticky_error(data, fault, sizes):
    """Valid replies, then a violation while one FLUSH is still in flight: the
    replies, the documented error, and the error state (the FLUSH's own valid
    reply, fed afterwards, is not taken)."""
    make_fault, needs, message = CLIENT_FAULTS[fault]
    structured = data.draw(st.booleans()) if needs is None else needs
    requests, stream, expected = data.draw(reply_streams(structured))
    used = {r[1] for r in requests}  # the FLUSH's cookie and cookie + 1 are unused
    flush = data.draw(st.integers(0, 2**64 - 2).filter(lambda c: not {c, c + 1} & used))
    make = transmission_client(structured, requests, extra_flush=flush)
    tc, events, _, exc = same_run(make, stream + make_fault(flush), sizes)
    assert events == expected
    assert isinstance(exc, P.ProtocolError) and message in str(exc)
    assert_error_state(tc, exc, P.encode_simple_reply(flush))


@FUZZ
@given(st.booleans(), st.binary(max_size=400), CUTS)
def test_transmission_client_arbitrary_bytes(structured, data, sizes):
    requests = [(P.NBD_CMD_READ if c % 2 else P.NBD_CMD_FLUSH, c, 0, 16 if c % 2 else 0, b"")
                for c in range(4)]
    tc, events, _, exc = same_run(transmission_client(structured, requests), data, sizes)
    assert all(isinstance(e, P.Reply) and e.cookie in range(4) for e in events)
    assert len({e.cookie for e in events}) == len(events)  # each request answered once
    if exc is not None:
        assert_error_state(tc, exc, P.encode_simple_reply(0))


# -- client side: ClientHandshake


def server_stream(client_kwargs: dict, allow_no_zeroes: bool) -> bytes:
    """Everything our ServerHandshake sends to a ClientHandshake made with
    ``client_kwargs``, talking in memory: a valid server byte stream."""
    c = P.ClientHandshake(**client_kwargs)
    s = P.ServerHandshake(EXPORTS, allow_no_zeroes=allow_no_zeroes)
    sent = bytearray(s.greeting())
    c.receive_data(s.greeting())
    for _ in range(20):
        try:
            c.next_event()
        except P.HandshakeFailed:
            break
        s.receive_data(c.data_to_send())
        try:
            s.next_event()
        except P.ProtocolError:
            break
        out = s.data_to_send()
        sent += out
        c.receive_data(out)
    return bytes(sent)


CLIENT_CONFIGS = st.fixed_dictionaries({
    "export_name": st.sampled_from(["", "big", "nope"]),
    "mode": st.sampled_from(["go", "info", "list"]),
    "structured_replies": st.booleans(),
    "request_block_size": st.booleans(),
})


@FUZZ
@given(CLIENT_CONFIGS, st.booleans(), CUTS)
def test_client_handshake_valid_stream_any_cutting(kwargs, no_zeroes, sizes):
    stream = server_stream(kwargs, no_zeroes)
    c, events, _, exc = same_run(lambda: P.ClientHandshake(**kwargs), stream, sizes)
    if kwargs["mode"] == "list":
        assert exc is None and events == [P.ExportList((("", "default"), ("big", "")))]
    elif kwargs["export_name"] == "nope":
        assert isinstance(exc, P.HandshakeFailed) and "'nope' not found" in str(exc)
        assert_error_state(c, exc, stream)
    else:
        assert exc is None and c.error is None and len(events) == 1
        info = events[0].info
        assert info.size == EXPORTS[kwargs["export_name"]].size
        assert info.structured_replies == (kwargs["structured_replies"] and kwargs["mode"] == "go")


#: Violations right after a valid greeting: (server bytes, the documented message).
HANDSHAKE_FAULTS = {
    "greeting_magic": (b"HTTP/1.1 200 OK\r\n\r\n", "not an NBD server"),
    "oldstyle": (struct.pack(">QQ", P.NBDMAGIC, P.NBD_CLISERV_MAGIC) + bytes(8), "oldstyle"),
    "reply_magic": (P.encode_greeting() + bytes(20), "bad option reply magic"),
    "reply_too_long": (P.encode_greeting() + struct.pack(
        ">QIII", P.NBD_REP_MAGIC, P.NBD_OPT_GO, P.NBD_REP_INFO, 1 << 30), "too long"),
    "other_option": (P.encode_greeting() + P.encode_option_reply(P.NBD_OPT_LIST, P.NBD_REP_ACK),
                     "while GO was asked"),
    "ack_without_export": (P.encode_greeting() + P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ACK),
                           "without sending NBD_INFO_EXPORT"),
}


@FUZZ
@given(st.sampled_from(sorted(HANDSHAKE_FAULTS)), st.binary(max_size=40), CUTS)
def test_client_handshake_violation_is_a_sticky_error(fault, tail, sizes):
    stream, message = HANDSHAKE_FAULTS[fault]
    c, events, _, exc = same_run(lambda: P.ClientHandshake("big"), stream + tail, sizes)
    assert events == []
    assert isinstance(exc, P.HandshakeFailed) and message in str(exc)
    assert_error_state(c, exc, server_stream({"export_name": "big"}, True))


@FUZZ
@given(st.binary(max_size=400), CUTS)
def test_client_handshake_arbitrary_bytes_after_greeting(data, sizes):
    c, events, _, exc = same_run(lambda: P.ClientHandshake("x"), P.encode_greeting() + data, sizes)
    assert len(events) <= 1
    if exc is not None:
        assert isinstance(exc, P.HandshakeFailed)
        assert_error_state(c, exc, b"")


# -- rules mutation testing found unguarded (docs/TESTING.md, "Triage of the
#    survivors"): each docstring names the nbdproto mutants the test kills.

DF_EXPORTS = {"df": P.ServerExport("df", 1 << 20, P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_DF,
                                   preferred_block=8192, description="with DF")}


def server_after_flags(exports=EXPORTS, cflags=P.NBD_FLAG_C_FIXED_NEWSTYLE, **kw) -> P.ServerHandshake:
    """A server that has read the client's flags and waits for options."""
    s = P.ServerHandshake(exports, **kw)
    s.receive_data(struct.pack(">I", cflags))
    assert s.next_event() is P.NEED_DATA
    return s


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of each option reply in ``data``."""
    out, pos = [], 0
    while pos < len(data):
        magic, opt, rtype, n = struct.unpack_from(">QIII", data, pos)
        assert magic == P.NBD_REP_MAGIC
        out.append((opt, rtype, data[pos + 20 : pos + 20 + n]))
        pos += 20 + n
    return out


@pytest.mark.parametrize("exports, name, structured", [
    (EXPORTS, "big", True), (EXPORTS, "", False), (DF_EXPORTS, "df", True), (DF_EXPORTS, "df", False),
])
def test_server_event_describes_the_export_the_client_was_given(exports, name, structured):
    """The server's HandshakeDone carries the export as the client received it:
    block sizes, description, flags (SEND_DF only with structured replies) and
    whether structured replies were negotiated. Kills ServerHandshake
    _export_info 2, 9-21, __init__ 15, 16 and _handle_option 37."""
    cev, sev = pump(P.ClientHandshake(name, structured_replies=structured), P.ServerHandshake(exports))
    assert isinstance(sev, P.HandshakeDone)
    assert sev.info == cev.info
    assert sev.structured_replies is cev.structured_replies is structured
    if exports is DF_EXPORTS:
        assert bool(sev.info.flags & P.NBD_FLAG_SEND_DF) is structured


def test_greeting_offers_no_zeroes_only_when_allowed():
    """ServerHandshake.__init__ 11, 12: the handshake flags of the greeting."""
    flags = lambda s: struct.unpack(">QQH", s.greeting())[2]  # noqa: E731
    assert flags(P.ServerHandshake(EXPORTS)) == P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES
    assert flags(P.ServerHandshake(EXPORTS, allow_no_zeroes=False)) == P.NBD_FLAG_FIXED_NEWSTYLE


def test_server_takes_max_options_and_no_more():
    """The default cap is 256 options: the 256th is answered, the 257th
    hard-closes. Kills ServerHandshake.next_event 44-47 and __init__ 2."""
    s = server_after_flags()
    s.receive_data(P.encode_option(0x55) * 256)
    assert s.next_event() is P.NEED_DATA
    assert len(s.options_log) == 256
    s.receive_data(P.encode_option(0x55))
    with pytest.raises(P.ProtocolError, match="too many options"):
        s.next_event()


def infos_per_option(replies) -> list[list[int]]:
    """The NBD_INFO types each option's NBD_REP_INFO replies carried, up to its ACK."""
    out, cur = [], []
    for _, rtype, data in replies:
        if rtype == P.NBD_REP_INFO:
            cur.append(struct.unpack(">H", data[:2])[0])
        elif rtype == P.NBD_REP_ACK:
            assert data == b""  # an ACK carries nothing
            out.append(cur)
            cur = []
    return out


def test_server_reads_the_info_requests_after_the_name():
    """NBD_OPT_INFO's request list follows the name; NBD_INFO_NAME and
    NBD_INFO_DESCRIPTION are answered only when requested; an ACK has no data.
    Kills ServerHandshake._handle_info_go 76, 77, 103, 112 and _reply 1."""
    exports = {"": P.ServerExport("", 4096, P.NBD_FLAG_HAS_FLAGS, description="default"),
               "ab": P.ServerExport("ab", 4096, P.NBD_FLAG_HAS_FLAGS, description="two")}
    s = server_after_flags(exports)
    s.receive_data(P.encode_option(P.NBD_OPT_INFO, P.encode_info_request("ab", [P.NBD_INFO_NAME]))
                   + P.encode_option(P.NBD_OPT_INFO, P.encode_info_request("ab", [P.NBD_INFO_DESCRIPTION]))
                   + P.encode_option(P.NBD_OPT_INFO, P.encode_info_request("")))
    assert s.next_event() is P.NEED_DATA
    replies = option_replies(s.data_to_send())
    E, N, D, B = P.NBD_INFO_EXPORT, P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE
    assert infos_per_option(replies) == [[E, N, B], [E, D, B], [E, B]]
    payloads = [data[2:] for _, rtype, data in replies
                if rtype == P.NBD_REP_INFO and data[:2] in (struct.pack(">H", N), struct.pack(">H", D))]
    assert payloads == [b"ab", b"two"]


def test_server_error_replies_say_why():
    """An error reply carries its message; a refused client's options get
    NBD_REP_ERR_POLICY with the refusal. Kills ServerHandshake._err 6 and
    _handle_option 56, 59."""
    s = server_after_flags()
    s.receive_data(P.encode_option(P.NBD_OPT_INFO, P.encode_info_request("nope")))
    s.next_event()
    assert option_replies(s.data_to_send()) == [(P.NBD_OPT_INFO, P.NBD_REP_ERR_UNKNOWN,
                                                 b"unknown export 'nope'")]
    s = server_after_flags()
    s.refusal = "server full"
    s.receive_data(P.encode_option(P.NBD_OPT_GO, P.encode_info_request("")))
    s.next_event()
    assert option_replies(s.data_to_send()) == [(P.NBD_OPT_GO, P.NBD_REP_ERR_POLICY, b"server full")]


@pytest.mark.parametrize("structured", [False, True])
def test_export_name_event_says_whether_structured_replies_were_negotiated(structured):
    """Kills ServerHandshake._handle_option 37."""
    s = server_after_flags()
    s.receive_data((P.encode_option(P.NBD_OPT_STRUCTURED_REPLY) if structured else b"")
                   + P.encode_option(P.NBD_OPT_EXPORT_NAME, b""))
    ev = s.next_event()
    assert isinstance(ev, P.HandshakeDone) and ev.structured_replies is structured


def test_option_data_of_the_maximum_length_is_answered():
    """64 KiB of option data is allowed; one byte more hard-closes. Kills
    ServerHandshake.next_event 34."""
    s = server_after_flags()
    s.receive_data(P.encode_option(0x55, bytes(P.NBD_MAX_OPTION_DATA)))
    assert s.next_event() is P.NEED_DATA
    assert s.options_log == [(0x55, P.NBD_REP_ERR_UNSUP)]
    s = server_after_flags()
    s.receive_data(P.encode_option(0x55, bytes(P.NBD_MAX_OPTION_DATA + 1)))
    with pytest.raises(P.ProtocolError, match="too long"):
        s.next_event()


def test_client_judges_a_non_nbd_server_by_its_first_eight_bytes():
    """Eight bytes that are not NBDMAGIC are enough to give up, non-ASCII ones
    included. Kills ClientHandshake.next_event 6, 7 and 23."""
    c = P.ClientHandshake()
    c.receive_data(b"HTTP/1.1")
    with pytest.raises(P.HandshakeFailed, match="not an NBD server"):
        c.next_event()
    c = P.ClientHandshake()
    c.receive_data(b"\xff\xfe\x00binary")
    with pytest.raises(P.HandshakeFailed, match="not an NBD server"):
        c.next_event()


def test_client_decodes_names_and_descriptions_that_are_not_utf8():
    """A server's name and description are shown with replacement characters,
    not refused. Kills ClientHandshake._parse_info 27, 28, 35, 36."""
    c = go_client("x")
    reply = lambda payload: P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_INFO, payload)  # noqa: E731
    c.receive_data(reply(struct.pack(">H", P.NBD_INFO_NAME) + b"n\xff")
                   + reply(struct.pack(">H", P.NBD_INFO_DESCRIPTION) + b"d\xfe")
                   + info_export() + P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ACK))
    info = c.next_event().info
    assert (info.name, info.description) == ("n\ufffd", "d\ufffd")


def test_export_name_reply_after_option_replies_in_the_same_bytes():
    """The fallback's EXPORT_NAME reply is read where it starts, after the GO
    refusal that came in the same read. Kills ClientHandshake.next_event 87, 88."""
    c = go_client("x")
    c.receive_data(P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ERR_UNSUP)
                   + struct.pack(">QH", 12345, 3) + bytes(124))
    ev = c.next_event()
    assert isinstance(ev, P.HandshakeDone) and (ev.info.size, ev.info.flags) == (12345, 3)


def test_one_byte_read_reply_is_consumed_whole():
    """A simple reply to a 1-byte READ carries that byte; the next reply starts
    after it. Kills TransmissionClient._simple 12."""
    c = P.TransmissionClient()
    c.send_request(P.NBD_CMD_READ, 1, 0, 1)
    c.send_request(P.NBD_CMD_FLUSH, 2, 0, 0)
    c.receive_data(P.encode_simple_reply(1, 0, b"z") + P.encode_simple_reply(2))
    assert c.next_event() == P.Reply(1, 0, b"z")
    assert c.next_event() == P.Reply(2, 0, None)


def test_simple_reply_right_after_a_structured_chunk_is_an_event():
    """A 16-byte simple reply that ends the bytes received, after a chunk that
    was not the last of its reply, comes out at once. Kills
    TransmissionClient.next_event 62, 63."""
    c = P.TransmissionClient(structured_replies=True)
    c.send_request(P.NBD_CMD_READ, 1, 0, 4)
    c.send_request(P.NBD_CMD_FLUSH, 2, 0, 0)
    c.receive_data(P.encode_structured_chunk(1, P.NBD_REPLY_TYPE_OFFSET_DATA,
                                             struct.pack(">Q", 0) + b"abcd", done=False)
                   + P.encode_simple_reply(2))
    assert c.next_event() == P.Reply(2, 0, None)


def test_empty_name_selects_the_first_export_when_none_is_named_empty():
    """lookup(""): the export named "" if any, else the first one. Kills
    ServerHandshake.lookup 5, 7-10."""
    exports = {"a": P.ServerExport("a", 4096, P.NBD_FLAG_HAS_FLAGS),
               "b": P.ServerExport("b", 8192, P.NBD_FLAG_HAS_FLAGS)}
    s = P.ServerHandshake(exports)
    assert s.lookup("").name == "a" and s.lookup("b").name == "b" and s.lookup("c") is None
    assert P.ServerHandshake(EXPORTS).lookup("").name == ""
    assert P.ServerHandshake({}).lookup("") is None


def test_refused_export_name_says_which_option_and_why():
    """A refused client's NBD_OPT_EXPORT_NAME yields HandshakeRefused with the
    option and the server's message. Kills ServerHandshake._handle_option 7-10."""
    s = server_after_flags()
    s.refusal = "too many clients"
    s.receive_data(P.encode_option(P.NBD_OPT_EXPORT_NAME, b""))
    assert s.next_event() == P.HandshakeRefused(option=P.NBD_OPT_EXPORT_NAME, message="too many clients")


def test_handshake_buffer_compacts_lazily_and_keeps_what_is_unread():
    """The handshake's input buffer drops what was read only once more than
    1 MiB of it has piled up (lazily: not on every feed), and keeps the unread
    rest. Kills codec _Buffer.feed 6-10 (5, compacting at exactly 1 MiB as
    well, is equivalent)."""
    b = P._Buffer()
    b.feed(bytes(range(256)) * 8)
    b.take(100)
    b.feed(b"more")
    assert b.pos == 100  # small reads are not compacted
    b = P._Buffer()
    b.feed(bytes(range(256)) * 4097)  # 1 MiB + 256 bytes
    b.take((1 << 20) + 1)
    rest = bytes(b.buf[b.pos :])
    b.feed(b"tail")
    assert b.pos == 0 and bytes(b.buf) == rest + b"tail"


def test_a_complete_message_is_an_event_without_more_bytes():
    """A reply or request that has arrived exactly, nothing after it, is an
    event at once. Kills TransmissionClient.next_event 62, 63 (a bare 16-byte
    reply) and RequestParser.next_event 67, 69 (a WRITE with its payload)."""
    c = P.TransmissionClient()
    c.send_request(P.NBD_CMD_FLUSH, 1, 0, 0)
    c.receive_data(P.encode_simple_reply(1))
    assert c.next_event() == P.Reply(1, 0, None)
    r = P.RequestParser()
    r.receive_data(P.encode_request(P.NBD_CMD_WRITE, 2, 0, 8) + b"12345678")
    ev = r.next_event()
    assert isinstance(ev, P.Request) and bytes(ev.payload) == b"12345678"


def test_a_structured_chunk_over_64_mib_is_refused_before_it_arrives():
    """A chunk that announces more than 64 MiB (1 << 26) is a protocol error as
    soon as its header is read; one of exactly 64 MiB is waited for. Kills
    TransmissionClient.next_event 36, 38, 39."""
    def client_with_header(plen):
        c = P.TransmissionClient(structured_replies=True)
        c.send_request(P.NBD_CMD_READ, 1, 0, 1 << 26)
        c.receive_data(struct.pack(">IHHQI", P.NBD_STRUCTURED_REPLY_MAGIC, P.NBD_REPLY_FLAG_DONE,
                                   P.NBD_REPLY_TYPE_OFFSET_DATA, 1, plen))
        return c
    assert client_with_header(1 << 26).next_event() is P.NEED_DATA
    with pytest.raises(P.ProtocolError, match="too long"):
        client_with_header((1 << 26) + 1).next_event()


def test_requests_carry_no_flags_unless_given():
    """Kills TransmissionClient.send_request 1 (a default of flags=1, FUA)."""
    c = P.TransmissionClient()
    assert struct.unpack(">IHH", c.send_request(P.NBD_CMD_READ, 1, 0, 512)[:8])[1] == 0
