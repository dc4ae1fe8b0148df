"""Emulated kernel sockets over real TCP sockets.

Models include/net/sock.h and net/core/sock.c (3.6): ``sk_allocation`` (the
GFP mask for the socket's own allocations, GFP_KERNEL by default),
SOCK_MEMALLOC with sk_set_memalloc / sk_clear_memalloc and the global
memalloc-socket count behind sk_memalloc_socks() (patch 8), sk_gfp_atomic
(patch 7), sk_filter's first check that drops a pfmemalloc skb for a socket
without SOCK_MEMALLOC (the series' change; here gated by patch 9), the
receive queue bounded by sk_rcvbuf (TCP's advertised window keeps the peer
from sending more, so a full queue stops the receive handler rather than
dropping), and tcp_sendmsg's transmit path: data cut into MSS-sized skbs
(one per call on a GSO route) whose linear part comes from kmalloc and whose
remaining payload is copied into page fragments of ``sk_sndmsg_page`` (3.6's
per-socket send page, allocated with sk_allocation), sk_stream_wait_memory when
an allocation fails, and the write queue that keeps every sent skb (and its
page fragments) charged until the peer acknowledges it.

The real bytes travel over a real, non-blocking TCP socket on loopback. The
receive side never reads a byte before an skb exists for it (actors/softirq.py
peeks, allocates, then consumes), so a failed allocation or an sk_filter drop
leaves the bytes in the real socket: the peer "retransmits" them when the
emulated retransmission timer fires.

Simplified: acknowledgements are not separate packets on the wire. For the
NBD socket, a request's transmit skbs are acknowledged by the request's reply;
a receiving socket's ACKs are skbs allocated with sk_gfp_atomic and freed at
once (an ACK that cannot be allocated is counted in ``tcp_ack_nomem`` and has
no further effect, because the real peer's TCP already acknowledged). No
Nagle, no congestion window, no send-buffer limit (swap writes are bounded by
the block queue's 128 requests), no receive-buffer autotuning.
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from typing import TYPE_CHECKING

import trio

from emulator.flags import GFP, GFP_ATOMIC, GFP_KERNEL
from emulator.task import Task
from emulator.wait import WaitQueue
from emulator.mm.page import PAGE_SIZE, Owner
from net.skbuff import SKB_SHARED_INFO, SKB_DATA_ALIGN, SkBuff

if TYPE_CHECKING:
    from emulator.kernel import Kernel

TCP_RTO_MIN = 0.2  # HZ/5
TCP_RTO_MAX = 120.0
MAX_TCP_HEADER = 320  # MAX_TCP_HEADER on x86_64: TCP + IP + link headers and options, aligned
#: select_size() on a GSO route: SKB_WITH_OVERHEAD(2048 - MAX_TCP_HEADER).
SELECT_SIZE = 2048 - MAX_TCP_HEADER - SKB_DATA_ALIGN(SKB_SHARED_INFO)
TCP_RMEM_DEFAULT = 87380  # tcp_rmem[1]
ACK_SIZE = 0  # an ACK carries no payload, only MAX_TCP_HEADER of headroom


class Sock:
    """A struct sock bound to one real TCP socket."""

    def __init__(self, k: Kernel, raw: socket.socket, name: str) -> None:
        self.k = k
        self.raw = raw
        self.name = name
        self.sk_allocation: GFP = GFP_KERNEL
        self.memalloc = False  #: SOCK_MEMALLOC
        self.sk_rcvbuf = TCP_RMEM_DEFAULT * 2
        self.receive_queue: deque[SkBuff] = deque()
        self.rmem_alloc = 0  # truesize of queued RX skbs
        self.write_queue: deque[SkBuff] = deque()  # sent, not yet acknowledged
        self.wmem_queued = 0
        self.sk_sleep = WaitQueue(f"{name}.sk_sleep")
        self.rcv_space = WaitQueue(f"{name}.rcv_space")
        self.eof = False
        self.error = 0
        # The peer's retransmission state for packets we dropped.
        self.rto = TCP_RTO_MIN
        self.consecutive_drops = 0
        self.drops = {"nomem": 0, "pfmemalloc": 0}
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.sndmsg_page = None  #: sk->sk_sndmsg_page
        self.sndmsg_off = 0

    # -- SOCK_MEMALLOC -------------------------------------------------------------
    def sk_set_memalloc(self) -> None:
        """sk_set_memalloc (patch 8): SOCK_MEMALLOC and __GFP_MEMALLOC on sk_allocation."""
        if not self.k.patches.has(8) or self.memalloc:
            return
        self.memalloc = True
        self.sk_allocation |= GFP.MEMALLOC
        self.k.memalloc_socks += 1

    def sk_clear_memalloc(self) -> None:
        if not self.memalloc:
            return
        self.memalloc = False
        self.sk_allocation &= ~GFP.MEMALLOC
        self.k.memalloc_socks -= 1

    def sk_gfp_atomic(self, gfp: GFP) -> GFP:
        """sk_gfp_atomic (patch 7): GFP_ATOMIC plus the socket's __GFP_MEMALLOC."""
        if self.k.patches.has(7):
            return gfp | (self.sk_allocation & GFP.MEMALLOC)
        return gfp

    def sk_filter(self, skb: SkBuff) -> bool:
        """sk_filter(): False (-ENOMEM, drop) for a pfmemalloc skb on a socket
        without SOCK_MEMALLOC."""
        if skb.pfmemalloc and not self.memalloc and self.k.patches.has(9):
            return False
        return True

    # -- receive side (called by the NET_RX handler) -------------------------------------
    def rcv_space_ok(self) -> bool:
        return self.rmem_alloc < self.sk_rcvbuf or self.eof

    def queue_rcv_skb(self, skb: SkBuff, data: bytes) -> None:
        skb.data = data
        skb.sk = self
        self.receive_queue.append(skb)
        self.rmem_alloc += skb.truesize
        self.rx_bytes += len(data)
        self.k.vmstat["skb_rx_queued"] += 1
        self.sk_sleep.wake_up()  # sk_data_ready

    def rx_dropped(self, reason: str) -> float:
        """A packet for this socket was dropped: the peer will retransmit after its RTO
        (which doubles with every consecutive loss, up to TCP_RTO_MAX)."""
        self.drops[reason] += 1
        self.consecutive_drops += 1
        rto = self.rto
        self.rto = min(self.rto * 2, TCP_RTO_MAX)
        self.k.vmstat["tcp_retransmit_timeouts"] += 1
        return rto

    def rx_delivered(self) -> None:
        self.consecutive_drops = 0
        self.rto = TCP_RTO_MIN

    async def tcp_send_ack(self, task: Task) -> None:
        """An ACK for received data: an skb with sk_gfp_atomic(GFP_ATOMIC), freed once sent."""
        skb = await self.k.skb.alloc_skb(MAX_TCP_HEADER, self.sk_gfp_atomic(GFP_ATOMIC), 0, task)
        if skb is None:
            self.k.vmstat["tcp_ack_nomem"] += 1
            return
        self.k.skb.kfree_skb(skb, task)

    # -- the consumer ---------------------------------------------------------------------
    async def recvmsg(self, task: Task, wchan: str = "sk_wait_data") -> bytes:
        """Take the next skb's data off the receive queue and free the skb.
        Returns b"" at end of stream."""
        if not self.receive_queue:
            await task.sleep_on(self.sk_sleep, lambda: bool(self.receive_queue) or self.eof,
                                wchan=wchan)
        if not self.receive_queue:
            return b""
        skb = self.receive_queue.popleft()
        data = skb.data
        self.rmem_alloc -= skb.truesize
        self.k.vmstat["skb_rx_queued"] -= 1
        self.k.skb.kfree_skb(skb, task)
        self.rcv_space.wake_up()
        return data

    # -- transmit ----------------------------------------------------------------------------
    async def sendmsg(self, task: Task, data: bytes) -> list[SkBuff]:
        """tcp_sendmsg (3.6) on a GSO-capable route (loopback): one skb per call
        (size_goal exceeds any NBD request), its linear area from select_size()
        = SKB_WITH_OVERHEAD(2048 - MAX_TCP_HEADER) so the head's data lands in
        kmalloc-2048, the rest copied into page fragments of the socket's
        sk_sndmsg_page (order-0 pages from sk_stream_alloc_page with
        sk_allocation). A failed allocation waits in sk_stream_wait_memory and
        retries. The skbs stay charged until ``ack``."""
        k = self.k
        while True:
            skb = await k.skb.alloc_skb(SELECT_SIZE + MAX_TCP_HEADER, self.sk_allocation, 0, task)
            if skb is not None:
                break
            await self._wait_memory(task)
        skb.sk = self
        skb.frags = []
        linear = min(len(data), SELECT_SIZE)
        rest = len(data) - linear
        try:
            while rest:
                page = self.sndmsg_page
                if page is None or self.sndmsg_off >= PAGE_SIZE:
                    if page is not None:
                        self._put_sndmsg_page()
                    page = await self._alloc_sndmsg_page(task)
                copy = min(rest, PAGE_SIZE - self.sndmsg_off)
                page.private[0] += 1  # get_page() for the skb's fragment
                skb.frags.append(page)
                skb.truesize += copy
                self.sndmsg_off += copy
                rest -= copy
        except BaseException:
            self._free_tx_skb(skb, task)
            raise
        await self._send_all(task, data)
        self.write_queue.append(skb)
        self.wmem_queued += skb.truesize
        k.vmstat["skb_tx_queued"] += 1
        k.vmstat["net_bytes_in_flight"] += len(data)
        self.tx_bytes += len(data)
        return [skb]

    async def _alloc_sndmsg_page(self, task: Task):
        """sk_stream_alloc_page(): alloc_pages(sk->sk_allocation, 0), waiting for memory."""
        k = self.k
        while True:
            page = await k.page_alloc.alloc_page(self.sk_allocation, task, owner=Owner.SKB)
            if page is not None:
                break
            await self._wait_memory(task)
        page.private = [1]  # page_count: the socket's own reference
        self.sndmsg_page = page
        self.sndmsg_off = 0
        return page

    def _put_sndmsg_page(self) -> None:
        page = self.sndmsg_page
        self.sndmsg_page = None
        self._put_page(page)

    def _put_page(self, page) -> None:
        page.private[0] -= 1
        if not page.private[0]:
            self.k.page_alloc.free_page(page)

    async def _wait_memory(self, task: Task) -> None:
        """sk_stream_wait_memory: a short random sleep (2 jiffies .. HZ/5) before
        retrying; fails the send if the socket broke meanwhile."""
        k = self.k
        await task.sleep(k.hz(0.008 + k.rng.random() * 0.192),
                         wchan=f"sk_stream_wait_memory({self.name})")
        if self.error:
            raise ConnectionError(f"{self.name}: socket error {self.error}")

    def _free_tx_skb(self, skb: SkBuff, task: Task) -> None:
        for page in skb.frags or ():
            self._put_page(page)
        skb.frags = None
        self.k.skb.kfree_skb(skb, task)

    def ack(self, skbs: list[SkBuff], nbytes: int, task: Task) -> None:
        """tcp_clean_rtx_queue: the peer acknowledged these skbs; free them."""
        k = self.k
        for s in skbs:
            try:
                self.write_queue.remove(s)
            except ValueError:
                continue
            self.wmem_queued -= s.truesize
            k.vmstat["skb_tx_queued"] -= 1
            self._free_tx_skb(s, task)
        k.vmstat["net_bytes_in_flight"] -= nbytes

    async def _send_all(self, task: Task, data: bytes) -> None:
        view = memoryview(data)
        raw = self.raw
        while view:
            try:
                n = raw.send(view)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.error = e.errno or errno.EPIPE
                raise ConnectionError(f"{self.name}: send failed: {e}") from None
            view = view[n:]
            if view:
                # The real socket's buffer is full: sleep (off the CPU) until writable.
                task._sleep_begin(f"sk_stream_wait_sndbuf({self.name})", False)
                try:
                    await trio.lowlevel.wait_writable(raw)
                finally:
                    task._sleep_end(False)
                await task.cpu.acquire(task, wakeup=True)

    # -- teardown --------------------------------------------------------------------------
    def release(self, task: Task) -> None:
        """Free every skb the socket still holds (sock_release at shutdown)."""
        k = self.k
        while self.receive_queue:
            skb = self.receive_queue.popleft()
            self.rmem_alloc -= skb.truesize
            k.vmstat["skb_rx_queued"] -= 1
            k.skb.kfree_skb(skb, task)
        while self.write_queue:
            skb = self.write_queue.popleft()
            self.wmem_queued -= skb.truesize
            k.vmstat["skb_tx_queued"] -= 1
            self._free_tx_skb(skb, task)
        if self.sndmsg_page is not None:
            self._put_sndmsg_page()
        self.sk_clear_memalloc()

    def statistics(self) -> dict:
        return {"sock": self.name, "memalloc": self.memalloc,
                "sk_allocation": int(self.sk_allocation),
                "rx_queued_skbs": len(self.receive_queue), "rmem_alloc": self.rmem_alloc,
                "tx_unacked_skbs": len(self.write_queue), "wmem_queued": self.wmem_queued,
                "drops": dict(self.drops), "consecutive_drops": self.consecutive_drops,
                "rto_s": self.rto, "rx_bytes": self.rx_bytes, "tx_bytes": self.tx_bytes}


async def connect_raw(host: str, port: int) -> socket.socket:
    """A connected, non-blocking stdlib TCP socket (trio does the connect)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: Exception | None = None
    for family, type_, proto, _, addr in infos:
        raw = socket.socket(family, type_, proto)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tsock = trio.socket.from_stdlib_socket(raw)
        try:
            await tsock.connect(addr)
            return raw
        except OSError as e:
            last = e
            raw.close()
    raise ConnectionError(f"cannot connect to {host}:{port}: {last}")
