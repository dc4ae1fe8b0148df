"""NET_RX: the receive softirq, one handler per socket, running on a CPU.

Models net/core/dev.c's receive path as a NIC driver and NAPI poll would run
it (3.6): the driver refills its RX buffer with an atomic allocation
(__netdev_alloc_skb: GFP_ATOMIC, plus __GFP_MEMALLOC through SKB_ALLOC_RX when
sk_memalloc_socks()); a failed refill drops the frame; __netif_receive_skb
sets PF_MEMALLOC while it handles a pfmemalloc skb (patch 12) so that
everything done for that packet may use the reserves (patch 4 makes that
count in softirq); tcp_v4_rcv calls sk_filter, which drops a pfmemalloc skb
for a socket without SOCK_MEMALLOC; accepted data is queued on the socket and
an ACK is sent.

Over a real TCP stream, "a frame" is up to one MSS of the bytes waiting in the
real socket. The handler peeks at them, allocates the buffer, and consumes
them only once an skb holds them and the socket accepted it. A drop (no
memory, or sk_filter) leaves them in the real socket, and the handler retries
after the peer's retransmission timeout: 200 ms, doubling per consecutive loss
up to 120 s (TCP_RTO_MIN / TCP_RTO_MAX), scaled by ``time.hz_scale``. A full
receive queue stops the handler (TCP's window) until the reader drains it.

Each socket's handler has its own softirq context (a Task with ``in_softirq``)
bound to one CPU, like a NIC queue's interrupt affinity; it holds the CPU only
while it processes packets (a NAPI budget of 64 frames per poll).

Simplified: no NIC ring of preallocated buffers (one buffer is allocated just
before each frame is taken), no GRO, no backlog queue (the socket is never
owned by a user task when a packet arrives), no taps.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import structlog
import trio

from emulator.flags import GFP_ATOMIC, PF
from emulator.task import Task, current
from net.sock import Sock

if TYPE_CHECKING:
    from emulator.kernel import Kernel

log = structlog.get_logger("swapnbd.net")

NAPI_POLL_WEIGHT = 64
RX_BUFFER_LEN = 1536  # a driver's rx_buffer_len for a 1500-byte MTU


async def net_rx_action(k: Kernel, sock: Sock, ctx: Task, mss: int) -> None:
    """The receive handler of one socket, forever (until the socket closes)."""
    raw = sock.raw
    cpu = ctx.cpu
    current.set(ctx)  # this trio task runs only the softirq context's code
    while not sock.eof:
        await trio.lowlevel.wait_readable(raw)
        if not sock.rcv_space_ok():
            await sock.rcv_space.wait_event(sock.rcv_space_ok)
            continue
        await cpu.acquire(ctx)
        backoff = 0.0
        try:
            for _ in range(NAPI_POLL_WEIGHT):
                if not sock.rcv_space_ok():
                    break
                try:
                    peek = raw.recv(mss, socket.MSG_PEEK)
                except BlockingIOError:
                    break
                except OSError as e:
                    sock.error = e.errno or 1
                    sock.eof = True
                    sock.sk_sleep.wake_up()
                    break
                if not peek:
                    sock.eof = True
                    sock.sk_sleep.wake_up()
                    break
                backoff = await netif_receive(k, sock, ctx, peek)
                if backoff:
                    break
        finally:
            cpu.release(ctx)
        if backoff:
            # The peer retransmits after its RTO; nothing arrives before that.
            await trio.sleep(k.hz(backoff))


async def netif_receive(k: Kernel, sock: Sock, ctx: Task, peek: bytes) -> float:
    """One frame: buffer allocation, __netif_receive_skb, sk_filter, queueing.
    Returns 0 when delivered, else the retransmission delay before a retry."""
    length = len(peek)
    skb = await k.skb.netdev_alloc_skb(max(length, RX_BUFFER_LEN), GFP_ATOMIC, ctx)
    if skb is None:
        k.vmstat["skb_drop_nomem"] += 1
        rto = sock.rx_dropped("nomem")
        log.info("skb_drop", reason="nomem", sock=sock.name, cpu=ctx.cpu.id,
                 free=k.pgdat.nr_free_pages(), consecutive=sock.consecutive_drops, rto_s=rto)
        return rto
    saved = ctx.flags & PF.MEMALLOC
    if skb.pfmemalloc and k.sk_memalloc_socks() and k.patches.has(12):
        ctx.flags |= PF.MEMALLOC  # __netif_receive_skb, patch 12
    try:
        if not sock.sk_filter(skb):
            k.skb.kfree_skb(skb, ctx)
            k.vmstat["skb_drop_pfmemalloc"] += 1
            rto = sock.rx_dropped("pfmemalloc")
            log.info("skb_drop", reason="pfmemalloc", sock=sock.name, cpu=ctx.cpu.id,
                     free=k.pgdat.nr_free_pages(), consecutive=sock.consecutive_drops, rto_s=rto)
            return rto
        data = sock.raw.recv(length)  # the bytes are there: we just peeked at them
        sock.queue_rcv_skb(skb, data)
        sock.rx_delivered()
        await sock.tcp_send_ack(ctx)
    finally:
        ctx.flags = (ctx.flags & ~PF.MEMALLOC) | saved
    return 0.0
