"""The handshake transition table (nbdproto/handshake.py): every entry is
taken by a real handshake, and every (state, trigger) pair outside it is refused."""

from __future__ import annotations

import struct

import pytest

import nbdproto as P
from nbdproto import handshake as H

EXPORTS = {"": P.ServerExport("", 1 << 20, P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH)}

TRIGGERS = {trigger for (_, _, trigger) in P.TRANSITIONS}


def states_of(role):
    out = {P.INITIAL_STATE[role]}
    for (r, state, _), nxt in P.TRANSITIONS.items():
        if r is role:
            out |= {state, nxt}
    return out


@pytest.fixture
def taken(monkeypatch):
    """Record every (role, state, trigger) the machines look up."""
    seen: set = set()
    real = H.next_state

    def recording(role, state, trigger):
        nxt = real(role, state, trigger)
        seen.add((role, state, trigger))
        return nxt

    monkeypatch.setattr(H, "next_state", recording)
    return seen


def converse(client: P.ClientHandshake, server: P.ServerHandshake):
    """Run both handshakes against each other in memory; return the client's event."""
    client.receive_data(server.greeting())
    for _ in range(50):
        ev = client.next_event()
        server.receive_data(client.data_to_send())
        sev = server.next_event()
        client.receive_data(server.data_to_send())
        if ev is not P.NEED_DATA:
            server.receive_data(client.data_to_send())
            server.next_event()
            return ev, sev
    raise AssertionError("handshake did not finish")


def test_every_state_is_reachable_from_the_initial_state():
    for role in (P.CLIENT, P.SERVER):
        reached = {P.INITIAL_STATE[role]}
        frontier = list(reached)
        while frontier:
            state = frontier.pop()
            for (r, s, _), nxt in P.TRANSITIONS.items():
                if r is role and s is state and nxt not in reached:
                    reached.add(nxt)
                    frontier.append(nxt)
        assert reached == states_of(role)


def test_real_handshakes_take_every_transition_in_the_table(taken):
    # Client and server, GO with structured replies; LIST; INFO.
    ev, _ = converse(P.ClientHandshake("", structured_replies=True), P.ServerHandshake(EXPORTS))
    assert isinstance(ev, P.HandshakeDone) and ev.structured_replies
    ev, _ = converse(P.ClientHandshake(mode="list"), P.ServerHandshake(EXPORTS))
    assert isinstance(ev, P.ExportList)
    ev, sev = converse(P.ClientHandshake(mode="info"), P.ServerHandshake(EXPORTS))
    assert isinstance(ev, P.HandshakeDone) and isinstance(sev, P.HandshakeAborted)
    # A server without GO: the client falls back to EXPORT_NAME.
    s = P.ServerHandshake(EXPORTS)
    c = P.ClientHandshake("")
    c.receive_data(s.greeting())
    assert c.next_event() is P.NEED_DATA
    s.receive_data(c.data_to_send()[:4])  # client flags; the GO is lost, answered below as unknown
    assert s.next_event() is P.NEED_DATA
    c.receive_data(P.encode_option_reply(P.NBD_OPT_GO, P.NBD_REP_ERR_UNSUP))
    assert c.next_event() is P.NEED_DATA
    assert c.state is P.AWAIT_EXPORT_NAME_REPLY
    s.receive_data(c.data_to_send())
    sev = s.next_event()
    assert isinstance(sev, P.HandshakeDone) and s.state is P.TRANSMISSION
    c.receive_data(s.data_to_send())
    assert isinstance(c.next_event(), P.HandshakeDone) and c.state is P.DONE
    # A plain (not fixed) newstyle server: EXPORT_NAME straight after the greeting.
    c = P.ClientHandshake("")
    c.receive_data(P.encode_greeting(0))
    assert c.next_event() is P.NEED_DATA and c.state is P.AWAIT_EXPORT_NAME_REPLY
    c.receive_data(struct.pack(">QH", 4096, 1) + bytes(124))
    assert isinstance(c.next_event(), P.HandshakeDone)
    # A refused client (over the server's cap) sending EXPORT_NAME: no error reply is possible.
    s = P.ServerHandshake(EXPORTS)
    s.refusal = "full"
    s.receive_data(struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE) + P.encode_option(P.NBD_OPT_EXPORT_NAME))
    assert s.next_event() == P.HandshakeRefused(P.NBD_OPT_EXPORT_NAME, "full")
    assert s.state is P.CLOSED and s.data_to_send() == b""
    assert taken == set(P.TRANSITIONS)


@pytest.mark.parametrize("role", [P.CLIENT, P.SERVER], ids=repr)
def test_every_trigger_outside_the_table_raises_in_every_state(role):
    machine = P.ClientHandshake("") if role is P.CLIENT else P.ServerHandshake(EXPORTS)
    for state in states_of(role) | {P.ERROR}:
        for trigger in TRIGGERS:
            machine.state = state
            if (role, state, trigger) in P.TRANSITIONS:
                machine._to(trigger)
                assert machine.state is P.TRANSITIONS[role, state, trigger]
            else:
                with pytest.raises(P.LocalProtocolError, match=repr(trigger)):
                    machine._to(trigger)
                assert machine.state is state


def test_a_remote_violation_is_the_error_state():
    s = P.ServerHandshake(EXPORTS)
    s.receive_data(struct.pack(">I", 0x80))  # a client flag the server did not offer
    with pytest.raises(P.RemoteProtocolError):
        s.next_event()
    assert s.state is P.ERROR
    c = P.ClientHandshake("")
    c.receive_data(b"NOTNBD!!" + bytes(10))
    with pytest.raises(P.HandshakeFailed):
        c.next_event()
    assert c.state is P.ERROR


def test_a_refused_client_gets_err_policy_on_every_option_and_may_abort():
    s = P.ServerHandshake(EXPORTS)
    s.refusal = "server has reached its limit of 1 client"
    s.receive_data(struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE))
    for opt, data in [
        (P.NBD_OPT_STRUCTURED_REPLY, b""),
        (P.NBD_OPT_LIST, b""),
        (P.NBD_OPT_INFO, P.encode_info_request("")),
        (P.NBD_OPT_GO, P.encode_info_request("")),
    ]:
        s.receive_data(P.encode_option(opt, data))
        assert s.next_event() is P.NEED_DATA and s.state is P.OPTIONS
        assert s.data_to_send() == P.encode_option_reply(
            opt, P.NBD_REP_ERR_POLICY, b"server has reached its limit of 1 client"
        )
    s.receive_data(P.encode_option(P.NBD_OPT_ABORT))
    assert isinstance(s.next_event(), P.HandshakeAborted)
    assert s.data_to_send() == P.encode_option_reply(P.NBD_OPT_ABORT, P.NBD_REP_ACK)
    # Our client reports the server's message.
    c = P.ClientHandshake("", structured_replies=True)
    s = P.ServerHandshake(EXPORTS)
    s.refusal = "server has reached its limit of 1 client"
    c.receive_data(s.greeting())
    with pytest.raises(P.HandshakeFailed, match="ERR_POLICY server has reached its limit of 1 client"):
        for _ in range(10):
            c.next_event()
            s.receive_data(c.data_to_send())
            s.next_event()
            c.receive_data(s.data_to_send())
