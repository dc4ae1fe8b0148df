"""The NIC's RX ring refilled at memory levels, per kernel, buffer kind and socket kind.

The driver posts its buffers ahead of time (e1000_alloc_rx_buffers, GFP_ATOMIC
in the NAPI softirq): a frame that arrives takes a posted buffer whatever
memory looks like then, and what memory decides is whether the ring could be
refilled. Here the ring has one descriptor, the kernel is fresh (its slab
caches and page-fragment cache are cold, so a buffer needs new pages), memory
is held at a level, the NAPI poll refills the ring, and one full-size frame
arrives (reference §6.2-6.4, net/dev.py, net/skbuff.py):

* above the low watermark, or between min and low: refilled, delivered;
* at a quarter of min (below GFP_ATOMIC's floor of 3/8 min):
  - vanilla: the refill fails, the ring stays empty, the frame is dropped;
  - swapnbd (a SOCK_MEMALLOC socket exists, so the refill carries
    __GFP_MEMALLOC): a kmalloc'ed buffer (__alloc_skb with SKB_ALLOC_RX: head
    and data may use the reserves; kmalloc_reserve marks it) is pfmemalloc:
    delivered to the memalloc socket, dropped by sk_filter for an ordinary one.
    A page-fragment buffer gets its page from the reserves but build_skb takes
    its head with plain GFP_ATOMIC, which a cold slab cannot serve there: the
    refill fails and the frame is dropped (a 3.6 hole; on a machine that has
    been receiving, freed heads usually wait in the cache);
* at zero free pages: nothing can refill: dropped everywhere.
"""

from __future__ import annotations

import pytest
import trio
from netmem_helpers import hold_free_at, release
from tcp_helpers import tcp_on_nic

from emulator.flags import PF

LEVELS = ["above_low", "min_to_low", "quarter_min", "zero"]
FRAME = bytes(range(256)) * 4  # 1 KiB of payload: above copybreak, takes a ring buffer
RING = 2  # one descriptor can hold a buffer


def level_pages(k, level: str) -> int:
    mn, lo, hi = k.pgdat.zone.watermark
    return {"above_low": hi + 64, "min_to_low": (mn + lo) // 2, "quarter_min": mn // 4,
            "zero": 0}[level]


EXPECTED = {
    # (kernel, buffers, socket) -> outcome of the frame after the refill, per level
    ("vanilla", "page_frag", "memalloc"): ["delivered", "delivered", "no_rx_buffer", "no_rx_buffer"],
    ("vanilla", "page_frag", "ordinary"): ["delivered", "delivered", "no_rx_buffer", "no_rx_buffer"],
    ("vanilla", "kmalloc", "memalloc"): ["delivered", "delivered", "no_rx_buffer", "no_rx_buffer"],
    ("vanilla", "kmalloc", "ordinary"): ["delivered", "delivered", "no_rx_buffer", "no_rx_buffer"],
    ("swapnbd", "page_frag", "memalloc"): ["delivered", "delivered", "no_rx_buffer",
                                           "no_rx_buffer"],
    ("swapnbd", "page_frag", "ordinary"): ["delivered", "delivered", "no_rx_buffer",
                                           "no_rx_buffer"],
    ("swapnbd", "kmalloc", "memalloc"): ["delivered", "delivered", "delivered_pfmemalloc",
                                         "no_rx_buffer"],
    ("swapnbd", "kmalloc", "ordinary"): ["delivered", "delivered", "sk_filter", "no_rx_buffer"],
}


@pytest.mark.parametrize("slab", ["slub", "slab"])
@pytest.mark.parametrize("patches", ["vanilla", "swapnbd"])
@pytest.mark.parametrize("buffers", ["page_frag", "kmalloc"])
@pytest.mark.parametrize("kind", ["memalloc", "ordinary"])
@pytest.mark.parametrize("level", LEVELS)
async def test_rx_frame_outcome(level, kind, buffers, patches, slab):
    name = "nbd0" if kind == "memalloc" else "bg0"
    async with tcp_on_nic(patches, slab, f"network.rx_buffers={buffers}", name=name,
                          open_ring=False) as n:
        k, sock, nic = n.k, n.sock, n.nic
        nic.ring_size = RING
        # With the patches the NBD socket is SOCK_MEMALLOC, whichever socket receives.
        memalloc_socks = int(patches == "swapnbd")
        k.memalloc_socks += memalloc_socks
        sock.memalloc = kind == "memalloc" and patches == "swapnbd"
        held = hold_free_at(k, level_pages(k, level))
        await n.poll()  # nothing has arrived: the poll refills the ring
        refill_failed = k.vmstat["alloc_rx_buff_failed"] > 0
        assert len(nic.ring) == (not refill_failed)
        n.peer_send(FRAME)
        await n.poll()
        vm = k.vmstat
        if sock.rcv_nxt == len(FRAME):
            skb = sock.receive_queue[-1]
            outcome = "delivered_pfmemalloc" if skb.pfmemalloc else "delivered"
            assert skb.data == FRAME
        elif vm["skb_drop_pfmemalloc"]:
            outcome = "sk_filter"
            assert sock.drops == {"pfmemalloc": 1}
        else:
            outcome = "no_rx_buffer"
            assert vm["skb_drop_nomem"] >= 1 and refill_failed and not nic.ring
            assert sock.drops["nomem"] >= 1
        assert outcome == EXPECTED[(patches, buffers, kind)][LEVELS.index(level)]
        if not outcome.startswith("delivered"):
            # Lost frames are the peer's to retransmit: their bytes are not consumed.
            assert sock.rcv_nxt == 0
            assert n.pending_bytes() + sum(len(d) for _, d in sock.resend) == len(FRAME)
        # The softirq context never keeps PF_MEMALLOC after the packet.
        assert not n.ctx.flags & PF.MEMALLOC
        release(k, held)
        sock.release(n.ctx)
        nic.release(n.ctx)
        k.memalloc_socks -= memalloc_socks
        k.skb.drain(n.ctx)
        assert k.skb.live == 0
        k.slab.check()


async def test_copybreak_keeps_the_ring_buffer():
    """A frame of at most 256 bytes is copied into a small skb (truesize 768) and its
    ring buffer stays posted; if that allocation fails the ring buffer goes up."""
    async with tcp_on_nic("vanilla", "slub", name="bg0") as n:
        k, sock, nic = n.k, n.sock, n.nic
        posted = len(nic.ring)
        n.peer_send(b"a" * 16)
        await n.poll()
        assert len(nic.ring) == posted and k.vmstat["rx_copybreak"] == 1
        assert sock.receive_queue[-1].truesize == 768
        held = hold_free_at(k, 0)
        n.peer_send(b"b" * 16)
        await n.poll()  # the copy fails: the ring buffer itself goes up, refill fails too
        assert k.vmstat["rx_copybreak"] == 1 and len(nic.ring) == posted - 1
        assert sock.receive_queue[-1].truesize == 2176  # a 1920-byte page fragment
        release(k, held)


async def test_the_ring_drops_only_when_empty():
    """With refills failing, frames still arrive in the buffers already posted; only
    once none is left does the NIC drop (rx_no_buffer), and the next successful
    refill lets the peer's retransmission through."""
    async with tcp_on_nic("vanilla", "slub", "time.hz_scale=0.1", name="bg0",
                          open_ring=False) as n:
        k, sock, nic = n.k, n.sock, n.nic
        nic.ring_size = 4
        await n.poll()  # three buffers posted at ample memory
        assert len(nic.ring) == 3
        k.skb.drain(n.ctx)  # no half-used page left in the fragment cache
        held = hold_free_at(k, 0)
        for i in range(3):
            n.peer_send(FRAME)
            await n.poll()
            assert sock.rcv_nxt == (i + 1) * len(FRAME) and len(nic.ring) == 2 - i
        assert k.vmstat["alloc_rx_buff_failed"] == 3 and k.vmstat["skb_drop_nomem"] == 0
        n.peer_send(FRAME)
        await n.poll()
        assert k.vmstat["skb_drop_nomem"] == 1 and sock.rcv_nxt == 3 * len(FRAME)
        release(k, held)
        await n.poll()  # refilled; the frame waits for the peer's retransmission
        assert nic.ring and sock.rcv_nxt == 3 * len(FRAME)
        await trio.sleep_until(sock.peer_resume_at)
        await n.poll()
        assert sock.rcv_nxt == 4 * len(FRAME)
