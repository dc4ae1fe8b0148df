"""A page's ``contents`` word (emulator/mm/page.py) and its bytes on the wire
(emulator/mm/page_io.py): (pid, vpn, gen) packs into one int and back, the
4096 bytes swap_writepage sends decode to the same word, and bytes that are
not an intact page of this machine (bad CRC, or fields wider than a word
holds) decode to None rather than to another page's word.
"""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emulator.mm.page import (
    CONTENTS_GEN_LIMIT,
    CONTENTS_PID_LIMIT,
    CONTENTS_VPN_LIMIT,
    PAGE_SIZE,
    pack_contents,
    unpack_contents,
)
from emulator.mm.page_io import decode_page, encode_page

PIDS = st.integers(0, CONTENTS_PID_LIMIT - 1)
VPNS = st.integers(0, CONTENTS_VPN_LIMIT - 1)
GENS = st.integers(0, CONTENTS_GEN_LIMIT - 1)


@given(PIDS, VPNS, GENS)
def test_contents_round_trip_through_the_word_and_the_wire(pid, vpn, gen):
    word = pack_contents(pid, vpn, gen)
    assert unpack_contents(word) == (pid, vpn, gen)
    assert word < 1 << 60  # two 30-bit digits: the point of packing
    data = encode_page(word)
    assert len(data) == PAGE_SIZE
    assert decode_page(data) == word
    if gen:  # the workload compares with word - 1: the same page, one generation back
        assert word - 1 == pack_contents(pid, vpn, gen - 1)


@given(PIDS, VPNS, GENS, PIDS, VPNS, GENS)
def test_distinct_contents_are_distinct_words(p1, v1, g1, p2, v2, g2):
    assert (pack_contents(p1, v1, g1) == pack_contents(p2, v2, g2)) == ((p1, v1, g1) == (p2, v2, g2))


@pytest.mark.parametrize("pid, vpn, gen", [
    (CONTENTS_PID_LIMIT, 0, 0), (0, CONTENTS_VPN_LIMIT, 0), (0, 0, CONTENTS_GEN_LIMIT), (-1, 0, 0),
])
def test_contents_outside_the_widths_are_refused(pid, vpn, gen):
    with pytest.raises(ValueError, match="out of range"):
        pack_contents(pid, vpn, gen)


def test_bytes_of_no_page_of_this_machine_decode_to_none():
    good = encode_page(pack_contents(7, 12345, 3))
    flipped = bytearray(good)
    flipped[100] ^= 0xFF
    assert decode_page(bytes(flipped)) is None  # the CRC fails
    # A well-formed page (valid CRC) whose generation no word can hold: it would
    # alias another page's word if it were packed.
    body = bytearray(good[8:])
    struct.pack_into(">QQQ", body, 0, 7, 12345, CONTENTS_GEN_LIMIT + 3)
    wide = good[:4] + zlib.crc32(body).to_bytes(4, "big") + bytes(body)
    assert decode_page(wide) is None
