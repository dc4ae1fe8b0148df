"""NET_RX buffer allocation against memory levels, per kernel and socket kind.

The kernel's outcome for one received frame (reference §2.2, §6.2-6.4):

* above the low watermark, or between min and low: an ordinary buffer;
* below min but above GFP_ATOMIC's floor is the same for both kernels in
  that the first attempt fails only below min/2 (a __GFP_NOMEMALLOC attempt
  has ALLOC_HIGH but not ALLOC_HARDER); the test uses a quarter of min, where:
  - vanilla: GFP_ATOMIC (HIGH|HARDER, floor 3/8 min) fails -> dropped for nomem;
  - swapnbd (a SOCK_MEMALLOC socket exists, so RX carries __GFP_MEMALLOC):
    the reserves serve it and mark it pfmemalloc -> delivered to the memalloc
    socket, dropped by sk_filter for an ordinary socket;
* at zero free pages: dropped for nomem everywhere.

Slab caches start empty (a fresh kernel), so every buffer needs slab pages.

The matrix runs under both RX buffer kinds (``network.rx_buffers``): "kmalloc"
(__alloc_skb: the data area from kmalloc_reserve, marked by patch 9) and
"page_frag" (__netdev_alloc_skb from the per-CPU page-fragment cache: the skb
is marked pfmemalloc when its fragment's page came from the reserves, patch
11). The outcomes are the same: with "page_frag" this is the test that fails if
net/skbuff.py never marks a fragment skb pfmemalloc (the ordinary socket would
then take a reserve-backed skb, and the memalloc socket's skb would not be
marked).
"""

from __future__ import annotations

import pytest

from actors.softirq import netif_receive
from emulator.flags import GFP_ATOMIC, GFP_NOIO, GFP, PF
from net.sock import Sock
from netmem_helpers import FakeRaw, hold_free_at, kernel, release

LEVELS = ["above_low", "min_to_low", "quarter_min", "zero"]
FRAME = bytes(range(256)) * 4  # 1 KiB of payload


def level_pages(k, level: str) -> int:
    mn, lo, hi = k.pgdat.zone.watermark
    return {"above_low": hi + 64, "min_to_low": (mn + lo) // 2, "quarter_min": mn // 4,
            "zero": 0}[level]


EXPECTED = {
    # (kernel, socket) -> outcome per level
    ("vanilla", "memalloc"): ["delivered", "delivered", "nomem", "nomem"],
    ("vanilla", "ordinary"): ["delivered", "delivered", "nomem", "nomem"],
    ("swapnbd", "memalloc"): ["delivered", "delivered", "delivered_pfmemalloc", "nomem"],
    ("swapnbd", "ordinary"): ["delivered", "delivered", "sk_filter", "nomem"],
}


@pytest.mark.parametrize("rx_buffers", ["kmalloc", "page_frag"])
@pytest.mark.parametrize("slab", ["slub", "slab"])
@pytest.mark.parametrize("patches", ["vanilla", "swapnbd"])
@pytest.mark.parametrize("kind", ["memalloc", "ordinary"])
@pytest.mark.parametrize("level", LEVELS)
async def test_rx_frame_outcome(level, kind, patches, slab, rx_buffers):
    """Targets (page_frag): a fragment skb whose page came from the reserves not
    being marked pfmemalloc (patch 11 in net/skbuff.py's netdev_alloc_skb);
    (kmalloc): the same for kmalloc_reserve's second attempt (patch 9)."""
    k = kernel(patches, slab, f'network.rx_buffers="{rx_buffers}"')
    # The NBD socket exists in every case; with the patches it is SOCK_MEMALLOC.
    nbd = Sock(k, FakeRaw(), "nbd0")
    nbd.sk_set_memalloc()
    sock = nbd if kind == "memalloc" else Sock(k, FakeRaw(), "bg0")
    sock.raw = FakeRaw(FRAME)
    ctx = k.new_task("ksoftirqd", cpu=0, in_softirq=True)
    await ctx.cpu.acquire(ctx)
    warm = await warm_head_cache(k, ctx) if rx_buffers == "page_frag" else None
    held = hold_free_at(k, level_pages(k, level))
    backoff = await netif_receive(k, sock, ctx, FRAME)
    vm = k.vmstat
    if backoff == 0:
        skb = sock.receive_queue[0]
        outcome = "delivered_pfmemalloc" if skb.pfmemalloc else "delivered"
        assert skb.data == FRAME
        assert (skb.frag is not None) == (rx_buffers == "page_frag")  # the path under test
        assert not sock.raw.data  # consumed from the real socket only once accepted
    elif vm["skb_drop_pfmemalloc"]:
        outcome = "sk_filter"
        assert sock.raw.data == FRAME  # the bytes wait for the retransmission
    else:
        outcome = "nomem"
        assert vm["skb_drop_nomem"] == 1
        assert sock.raw.data == FRAME
    assert outcome == EXPECTED[(patches, kind)][LEVELS.index(level)]
    # The softirq context never keeps PF_MEMALLOC after the packet.
    assert not ctx.flags & PF.MEMALLOC
    # Drops raise the retransmission timeout exponentially.
    if backoff:
        assert sock.rto == 2 * backoff
    while sock.receive_queue:
        await sock.recvmsg(ctx)
    release(k, held)
    if warm is not None:
        k.slab.kmem_cache_free(k.slab.skbuff_head_cache, warm, ctx)
    assert k.skb.live == 0
    k.slab.check()


async def warm_head_cache(k, ctx):
    """build_skb takes the skb head with plain GFP_ATOMIC (no __GFP_MEMALLOC), so
    below min it can only come from a skbuff_head_cache slab that has free
    objects, as a running NIC's does. Give the cache a slab with free objects
    (two heads allocated, one freed; the other is returned to be freed at the
    end), so that the page_frag outcomes are decided by the fragment's page."""
    cache = k.slab.skbuff_head_cache
    a = await k.slab.kmem_cache_alloc(cache, GFP_ATOMIC, ctx)
    b = await k.slab.kmem_cache_alloc(cache, GFP_ATOMIC, ctx)
    k.slab.kmem_cache_free(cache, a, ctx)
    return b


@pytest.mark.parametrize("patches", ["vanilla", "swapnbd"])
async def test_ack_carries_memalloc_only_with_patch_7(patches):
    k = kernel(patches)
    nbd = Sock(k, FakeRaw(), "nbd0")
    nbd.sk_set_memalloc()
    assert bool(nbd.sk_gfp_atomic(GFP.HIGH) & GFP.MEMALLOC) == (patches == "swapnbd")
    # An ordinary socket's ACKs never get the reserves, whatever the kernel.
    other = Sock(k, FakeRaw(), "bg0")
    assert other.sk_gfp_atomic(GFP.HIGH) == GFP.HIGH


@pytest.mark.parametrize("patches,task_flags,memalloc_bit,expect", [
    # 3.6's sock_xmit: sk_allocation GFP_NOIO|__GFP_MEMALLOC under PF_MEMALLOC.
    ("swapnbd", PF.KTHREAD | PF.MEMALLOC, True, "reserves"),
    # PF_MEMALLOC alone grants the reserves, whatever the mask and kernel.
    ("swapnbd", PF.KTHREAD | PF.MEMALLOC, False, "reserves"),
    ("vanilla", PF.KTHREAD | PF.MEMALLOC, True, "reserves"),
])
async def test_tx_alloc_below_min_with_reserve_rights(patches, task_flags, memalloc_bit, expect):
    """An NBD-sender-like allocation below the min watermark. (Without PF_MEMALLOC,
    __kmalloc_reserve's first, __GFP_NOMEMALLOC attempt with a __GFP_WAIT mask would
    enter direct reclaim and loop: 3.6 relies on sock_xmit's PF_MEMALLOC.)"""
    k = kernel(patches)
    task = k.new_task("nbd0", task_flags)
    await task.cpu.acquire(task)
    held = hold_free_at(k, k.pgdat.zone.watermark[0] // 4)
    before = k.vmstat["pgalloc_pfmemalloc"]
    gfp = GFP_NOIO | (GFP.MEMALLOC if memalloc_bit else GFP(0))
    skb = await k.skb.alloc_skb(1408, gfp, 0, task)
    assert skb is not None and expect == "reserves"
    assert k.vmstat["pgalloc_pfmemalloc"] > before
    k.skb.kfree_skb(skb, task)
    release(k, held)


@pytest.mark.parametrize("memalloc_bit", [False, True])
async def test_vanilla_nbd_sender_below_min_loops_in_direct_reclaim(memalloc_bit):
    """3.5's sock_xmit: GFP_NOIO without PF_MEMALLOC (and __GFP_MEMALLOC means nothing
    without patch 3). Below min the allocation enters direct reclaim, which cannot
    start I/O, and retries forever (order 0, and GFP_NOIO never OOM-kills)."""
    import trio

    k = kernel("vanilla")
    task = k.new_task("nbd0", PF.KTHREAD)
    await task.cpu.acquire(task)
    held = hold_free_at(k, k.pgdat.zone.watermark[0] // 4)
    gfp = GFP_NOIO | (GFP.MEMALLOC if memalloc_bit else GFP(0))
    before = k.vmstat["pgalloc_pfmemalloc"]
    with trio.move_on_after(0.5) as scope:
        await k.skb.alloc_skb(1408, gfp, 0, task)
    assert scope.cancelled_caught
    assert k.vmstat["allocstall"] > 1  # it kept reclaiming
    assert k.vmstat["pgalloc_pfmemalloc"] == before  # never touched the reserves
    release(k, held)
