"""Unit tests of the sans-I/O NBD codecs and state machines (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from net.nbd import protocol as P


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
    "big": P.ServerExport("big", 1 << 30, P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_READ_ONLY, min_block=512, max_block=1 << 20),
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


def test_plain_newstyle_server_uses_export_name():
    c = P.ClientHandshake("")
    c.receive_data(P.encode_greeting(0))
    assert c.next_event() is P.NEED_DATA
    sent = c.data_to_send()
    assert sent[:4] == bytes(4) and struct.unpack(">QII", sent[4:20])[1] == P.NBD_OPT_EXPORT_NAME


def test_server_export_name_with_and_without_zeroes():
    for cflags, tail in ((P.NBD_FLAG_C_FIXED_NEWSTYLE, 124), (P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES, 0)):
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
    assert [t for _, t in s.options_log] == [P.NBD_REP_ERR_UNSUP, P.NBD_REP_SERVER, P.NBD_REP_SERVER, P.NBD_REP_ACK]


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
    c.receive_data(P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_INFO, struct.pack(">HIII", 3, 3, 4096, 1 << 20)))
    with pytest.raises(P.HandshakeFailed, match="minimum block size"):
        c.next_event()


# -- transmission, client side


def test_transmission_client_simple_replies_any_order():
    tc = P.TransmissionClient()
    tc.send_request(P.NBD_CMD_READ, 1, 0, 4)
    tc.send_request(P.NBD_CMD_WRITE, 2, 0, 3, payload=b"abc")
    tc.send_request(P.NBD_CMD_FLUSH, 3, 0, 0)
    stream = P.encode_simple_reply(3) + P.encode_simple_reply(2, P.NBD_ENOSPC) + P.encode_simple_reply(1, 0, b"DATA")
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
    assert events == [P.Reply(9, 0, None), P.Reply(7, 0, b"HEAD" + bytes(4) + b"TAIL"), P.Reply(8, P.NBD_EIO, None)]


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


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=10))
def test_request_parser_fuzz_never_crashes(data, cuts):
    p = P.RequestParser(max_payload=256)
    pos = 0
    pieces = []
    for c in cuts:
        pieces.append(data[pos : pos + c])
        pos += c
    pieces.append(data[pos:])
    try:
        for piece in pieces:
            p.receive_data(piece)
            while (ev := p.next_event()) is not P.NEED_DATA:
                assert isinstance(ev, P.Request)
    except P.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_server_handshake_fuzz_never_crashes(data):
    s = P.ServerHandshake(EXPORTS)
    s.receive_data(data)
    try:
        for _ in range(50):
            ev = s.next_event()
            s.data_to_send()
            if ev is P.NEED_DATA or isinstance(ev, (P.HandshakeDone, P.HandshakeAborted)):
                break
    except P.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_client_fuzz_never_crashes(data):
    for structured in (False, True):
        tc = P.TransmissionClient(structured_replies=structured)
        for cookie in range(4):
            tc.send_request(P.NBD_CMD_READ if cookie % 2 else P.NBD_CMD_FLUSH, cookie, 0, 16 if cookie % 2 else 0)
        tc.receive_data(data)
        try:
            for _ in range(20):
                if tc.next_event() is P.NEED_DATA:
                    break
        except P.ProtocolError:
            pass
    c = P.ClientHandshake("x")
    c.receive_data(P.encode_greeting() + data)
    try:
        for _ in range(20):
            if c.next_event() is P.NEED_DATA:
                break
    except P.HandshakeFailed:
        pass


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
