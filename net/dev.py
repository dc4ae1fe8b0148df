"""The NIC and the receive path up to the protocol: net/core/dev.c and an e1000.

Models the one network interface every socket's traffic crosses (3.5's e1000,
drivers/net/ethernet/intel/e1000/e1000_main.c) and net/core/dev.c's
__netif_receive_skb:

- The RX ring: ``network.rx_ring`` descriptors (E1000_DEFAULT_RXD = 256), at
  most ring - 1 of them with a posted buffer (E1000_DESC_UNUSED), each an
  skb of rx_buffer_len = 1522 from __netdev_alloc_skb with GFP_ATOMIC
  (e1000_alloc_rx_buffers). The ring is filled when the interface comes up
  and refilled from the NAPI poll every E1000_RX_BUFFER_WRITE = 16 cleaned
  buffers and at the end of the poll; a failed allocation leaves the ring
  short ("better luck next round", alloc_rx_buff_failed). A frame that
  arrives with no posted buffer is dropped by the hardware (rx_no_buffer):
  only an empty ring drops.
- e1000_clean_rx_irq: a frame of at most copybreak = 256 bytes (every pure
  ACK and every NBD write reply) is copied into a new small skb (GFP_ATOMIC)
  and its ring buffer is reused; if that allocation fails the ring buffer
  itself goes up. A larger frame takes its ring buffer up the stack.
- A NAPI poll handles at most NAPI_POLL_WEIGHT = 64 frames. Any interrupt
  (a received frame, a transmit completion, e1000_watchdog every 2 s while
  buffers are missing) schedules one.
- __netif_receive_skb: with patch 12, PF_MEMALLOC on the softirq context
  while a pfmemalloc skb is handled (patch 4 makes that flag count in
  softirq), then the protocol (tcp_v4_rcv).

What is on the wire is decided by the real TCP connections under the sockets
(net/tcp.py): a "frame" is the next segment a socket's peer has for us. The
NAPI poll itself runs in actors/softirq.py, on the CPU that takes the NIC's
interrupt.

Simplified: one RX queue; frames from several sockets are taken round robin
(their real arrival order is not observable); no GRO, no taps, no protocols
but TCP; transmit completions free nothing here (the transmit skb's fast clone
shares the original's memory, which TCP frees on ACK); the wire's headers are
66 bytes (Ethernet, IPv4, TCP with timestamps).

Details: NAPI weight 64; 66 bytes of headers per frame; a pure ACK frame is
looked for every 2 ms while data is unacknowledged; a frame is dropped
(skb_drop_nomem) only when no buffer is posted, and its bytes go back to the
peer (resend).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import attrs
import trio

from emulator.flags import GFP_ATOMIC, PF
from emulator.patches import SKB_PF_MEMALLOC
from emulator.task import Task
from net.skbuff import SkBuff

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from net.tcp import TcpSock

NAPI_POLL_WEIGHT = 64
E1000_DEFAULT_RXD = 256
E1000_RX_BUFFER_WRITE = 16
E1000_COPYBREAK = 256
RX_BUFFER_LEN = 1522  #: MAXIMUM_ETHERNET_VLAN_SIZE at MTU 1500
FRAME_HEADERS = 66  #: Ethernet 14 + IPv4 20 + TCP 20 + timestamps 12
#: e1000_watchdog: every 2 s it forces an interrupt, so a short ring is refilled.
E1000_WATCHDOG_S = 2.0
#: How often the NIC looks for acknowledgements the real peers sent without data
#: (a pure ACK's interrupt): an emulator sampling interval, not a kernel parameter.
ACK_POLL_S = 0.002


@attrs.frozen
class NetDeviceStatistics:
    ring_size: int  #: descriptors (one always stays empty)
    posted: int  #: buffers posted and waiting for frames
    rx_no_buffer: int  #: frames dropped because no buffer was posted
    alloc_rx_buff_failed: int  #: refill allocations that failed


class NetDevice:
    """eth0: one RX ring and the NAPI poll that empties it."""

    def __init__(self, k: Kernel, ring_size: int = E1000_DEFAULT_RXD) -> None:
        self.k = k
        self.ring_size = ring_size
        self.ring: deque[SkBuff] = deque()  #: posted buffers
        self.socks: list[TcpSock] = []
        self._next = 0  # round robin over the sockets
        self.irq = trio.Event()  #: a pending interrupt: the softirq should poll
        self.last_watchdog = 0.0

    def attach(self, sock: TcpSock) -> None:
        sock.nic = self
        self.socks.append(sock)
        self.kick()

    def detach(self, sock: TcpSock) -> None:
        if sock in self.socks:
            self.socks.remove(sock)
        sock.nic = None

    def kick(self) -> None:
        """Raise the interrupt: the NAPI poll will run."""
        self.irq.set()

    def desc_unused(self) -> int:
        """E1000_DESC_UNUSED(): descriptors without a buffer (one always stays empty)."""
        return self.ring_size - 1 - len(self.ring)

    # -- the ring ------------------------------------------------------------------------
    async def e1000_alloc_rx_buffers(self, ctx: Task, count: int) -> None:
        """Post up to ``count`` new buffers; stop at the first failed allocation."""
        vm = self.k.vmstat
        for _ in range(count):
            skb = await self.k.skb.netdev_alloc_skb(RX_BUFFER_LEN, GFP_ATOMIC, ctx)
            if skb is None:
                vm["alloc_rx_buff_failed"] += 1
                return
            self.ring.append(skb)
        vm["nic_rx_posted"] = len(self.ring)

    async def e1000_open(self, task: Task) -> None:
        """e1000_configure: fill the ring when the interface comes up."""
        await self.e1000_alloc_rx_buffers(task, self.desc_unused())

    # -- NAPI ----------------------------------------------------------------------------
    async def napi_poll(self, ctx: Task) -> int:
        """e1000_clean(): the timers that fell due, then up to NAPI_POLL_WEIGHT frames
        (e1000_clean_rx_irq), then the refill. Returns the frames handled."""
        now = trio.current_time()
        if now - self.last_watchdog >= E1000_WATCHDOG_S:
            self.last_watchdog = now  # e1000_watchdog's forced interrupt
        for sock in list(self.socks):
            if sock.delack_at is not None and sock.delack_at <= now:
                await sock.tcp_delack_timer(ctx)
        work = cleaned = 0
        idle = 0
        while work < NAPI_POLL_WEIGHT and idle < len(self.socks):
            sock = self.socks[self._next % len(self.socks)]
            self._next += 1
            frame = sock.peek_frame(now)
            if frame is None:
                idle += 1
                continue
            idle = 0
            work += 1
            cleaned += await self.e1000_receive(sock, frame, ctx)
            if cleaned >= E1000_RX_BUFFER_WRITE:
                await self.e1000_alloc_rx_buffers(ctx, self.desc_unused())
                cleaned = 0
        if self.desc_unused():
            await self.e1000_alloc_rx_buffers(ctx, self.desc_unused())
        self.k.vmstat["nic_rx_posted"] = len(self.ring)
        return work

    async def e1000_receive(self, sock: TcpSock, frame, ctx: Task) -> int:
        """One frame: into a posted buffer (or dropped), copybreak, up the stack.
        Returns 1 if a ring buffer was used up (needs a refill), else 0."""
        k = self.k
        if not self.ring:
            k.vmstat["skb_drop_nomem"] += 1  # rx_no_buffer_count
            sock.lose_frame(frame, "nomem")
            return 0
        buf = self.ring.popleft()
        skb, used = buf, 1
        length = frame.len + FRAME_HEADERS
        if length <= E1000_COPYBREAK:
            small = await k.skb.netdev_alloc_skb(length, GFP_ATOMIC, ctx)
            if small is not None:
                self.ring.appendleft(buf)  # the ring buffer is reused
                skb, used = small, 0
                k.vmstat["rx_copybreak"] += 1
        sock.take_frame(frame, skb)
        await self.netif_receive_skb(skb, sock, ctx)
        return used

    async def netif_receive_skb(self, skb: SkBuff, sock: TcpSock, ctx: Task) -> None:
        """__netif_receive_skb(): patch 12's PF_MEMALLOC for a pfmemalloc skb, then
        the protocol."""
        k = self.k
        saved = ctx.flags & PF.MEMALLOC
        if skb.pfmemalloc and k.sk_memalloc_socks() and k.patches.has(SKB_PF_MEMALLOC):
            ctx.flags |= PF.MEMALLOC
        try:
            await sock.tcp_v4_rcv(skb, ctx)
        finally:
            ctx.flags = (ctx.flags & ~PF.MEMALLOC) | saved

    # -- when to poll next -----------------------------------------------------------------
    def next_deadline(self, now: float) -> float:
        """The next time the softirq must poll without an interrupt: a socket's timer,
        the acknowledgement poll while data is unacknowledged, the watchdog while the
        ring is short."""
        t = min((s.next_timer() for s in self.socks), default=float("inf"))
        if any(s.ack_hint < s.raw_sent and now >= s.ack_retry_at for s in self.socks):
            t = min(t, now + ACK_POLL_S)
        if self.desc_unused():
            t = min(t, self.last_watchdog + E1000_WATCHDOG_S)
        return t

    def statistics(self) -> NetDeviceStatistics:
        vm = self.k.vmstat
        return NetDeviceStatistics(ring_size=self.ring_size, posted=len(self.ring),
                                   rx_no_buffer=vm["skb_drop_nomem"],
                                   alloc_rx_buff_failed=vm["alloc_rx_buff_failed"])

    def release(self, task: Task) -> None:
        """Free the posted buffers (interface down)."""
        while self.ring:
            self.k.skb.kfree_skb(self.ring.popleft(), task)
