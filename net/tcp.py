"""TCP: where a connection's memory is allocated and freed, over a real TCP stream.

Models the 3.5 code paths that decide when a socket holds memory and who
runs them (the series' changes gated by their patches):

- net/ipv4/tcp.c: tcp_sendmsg (owns the socket from lock_sock to
  release_sock across every allocation: sk_stream_alloc_skb's fast-clone
  head and kmalloc'ed linear area, and sk_stream_alloc_page's order-0
  pages for the rest, all with sk_allocation; it lets go only in
  sk_stream_wait_memory; MSG_MORE corks a segment so the next call appends
  to it; size_goal and select_size on a GSO route); tcp_recvmsg (owns the
  socket except while sk_wait_data sleeps; installs itself as the prequeue
  reader, sysctl_tcp_low_latency being 0, and processes the prequeue in its
  own context with softirqs disabled; copies segments it processes itself
  straight to its buffer); tcp_cleanup_rbuf (an ACK, or a window update,
  once the reader has drained enough).
- net/ipv4/tcp_ipv4.c: tcp_v4_rcv (sk_filter, then: owned by a task -> the
  backlog, bounded by sk_rcvbuf + sk_sndbuf, or dropped (TCPBacklogDrop);
  not owned -> the prequeue if a reader waits, else processed in the
  softirq); tcp_v4_do_rcv.
- net/ipv4/tcp_input.c: tcp_rcv_established (ACK part then data part);
  tcp_ack -> tcp_clean_rtx_queue, which frees fully acknowledged transmit
  skbs, then tcp_check_space -> tcp_new_space (send-buffer growth with the
  congestion window, and sk_stream_write_space) for a writer that waited;
  tcp_data_queue with tcp_try_rmem_schedule / tcp_prune_queue (tcp_clamp_window
  raises sk_rcvbuf, up to tcp_rmem[2]; past that the segment is dropped);
  __tcp_ack_snd_check (an ACK at once after more than one full segment, else
  a delayed ACK in 40 ms).
- net/ipv4/tcp_output.c: tcp_send_ack (alloc_skb(MAX_TCP_HEADER) with
  GFP_ATOMIC, sk_gfp_atomic with patch 7; on failure the ACK is retried by
  the delayed-ACK timer in HZ/5), tcp_select_window; every segment we send
  carries an ACK and a window update.
- net/ipv4/tcp_timer.c (3.5): the delayed-ACK timer, which while the socket is
  owned only marks the ACK "blocked" and re-arms in HZ/25 (DelayedACKLocked);
  when it fires on an unowned socket it processes a prequeue the reader left.
  3.6 deferred timers to tcp_release_cb; the series was tested on 3.5, so
  every kernel here has 3.5's timers.
- tcp_init: tcp_wmem[2] and tcp_rmem[2] from the machine's memory;
  tcp_init_sock and tcp_init_buffer_space (tcp_fixup_sndbuf): sk_rcvbuf =
  87380, sk_sndbuf = 10 x SKB_TRUESIZE(mss_clamp + MAX_TCP_HEADER).

The real stream under it. Every byte crosses a real TCP connection on
loopback, and that real kernel decides what is on the wire; this module
decides what the emulated kernel does with it:

- Receiving: the NIC (net/dev.py) takes the next segment of up to one MSS
  from the real socket, within the window this socket last advertised. A
  segment dropped anywhere (no RX buffer, sk_filter, a full backlog, an
  overflowing receive queue) is "lost": its bytes go back to the peer, which
  retransmits them (selectively, as with SACK) after its retransmission
  timeout, 200 ms doubling per consecutive loss up to 120 s (TCP_RTO_MIN /
  TCP_RTO_MAX). Segments processed after a gap (a loss, or a backlog drained
  before the prequeue that holds earlier data) wait on the out-of-order
  queue (tcp_data_queue_ofo / tcp_ofo_queue).
- Acknowledgements from the peer are the real peer's: how much of what we
  wrote it has acknowledged is ``ioctl(SIOCOUTQ)`` on the real socket. A
  segment carries the cumulative acknowledgement known when the NIC takes it;
  an acknowledgement that arrives with no data is a pure ACK frame. A lost
  ACK is recovered by our retransmission timer (RTO_MIN doubling), which in
  3.5 does not run while the socket is owned.
- Sending: a pushed segment's bytes go to the real socket; what it cannot
  take yet waits in ``wire`` for the NIC's transmit side (actors/softirq.py).
  A transmit skb stays on the write queue, charged to the socket, until the
  ACK covering it is processed.

Simplified: segments are TSO skbs acknowledged whole (tcp_tso_acked's partial
trimming is left out); no Nagle (nbd-client sets TCP_NODELAY, the background
streams only receive); no retransmissions of our own data (the real kernel
delivers it) and so no allocations for them; the congestion window only
sizes the send buffer (tcp_new_space) and grows by slow start; receive
autotuning (tcp_rcv_space_adjust) and rcv_ssthresh are left out (the window
is the free receive space, up to window_clamp), and tcp_collapse is not
modelled (tcp_clamp_window raises sk_rcvbuf first; the model's sockets never
reach tcp_rmem[2]). No quick-ACK mode or pingpong: a data segment is
acknowledged by the next segment we send, by the every-second-segment rule,
or by the delayed-ACK timer.

Figures: sk_rcvbuf 87380; sk_sndbuf 16384 raised by tcp_fixup_sndbuf to about
23,400; sk_add_backlog's limit is sk_rcvbuf + sk_sndbuf (past it
TCPBacklogDrop). The window is free space with tcp_adv_win_scale 1, never
shrinking (rcv_wup/rcv_wnd), and the peer sends only up to the right edge last
advertised. No tcp_mem accounting (never approached).
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import socket
import struct
import termios
from bisect import insort
from collections import deque
from typing import TYPE_CHECKING

import attrs
import structlog
import trio

from emulator.flags import GFP_ATOMIC
from emulator.mm.page import PAGE_SIZE, Owner
from emulator.task import Task
from net.skbuff import SKB_DATA_ALIGN, SKB_SHARED_INFO, SKB_TRUESIZE, SkBuff
from net.sock import Sock, SockStatistics

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from net.dev import NetDevice

log = structlog.get_logger("swapnbd.net")

TCP_RTO_MIN = 0.2  #: HZ/5
TCP_RTO_MAX = 120.0
TCP_DELACK_MIN = 0.04  #: HZ/25
TCP_DELACK_MAX = 0.2  #: HZ/5
TCP_INIT_CWND = 10
TCP_RMEM_DEFAULT = 87380  #: tcp_rmem[1]
TCP_WMEM_DEFAULT = 16384  #: tcp_wmem[1]
#: MAX_TCP_HEADER = 128 + MAX_HEADER on a distribution config (x86_64).
MAX_TCP_HEADER = 304
TCPOLEN_TSTAMP_ALIGNED = 12
#: select_size() on a GSO route: SKB_WITH_OVERHEAD(2048 - MAX_TCP_HEADER).
SELECT_SIZE = 2048 - MAX_TCP_HEADER - SKB_DATA_ALIGN(SKB_SHARED_INFO)
#: sk_gso_max_size: an skb carries at most 64 KiB minus headers (tcp_xmit_size_goal).
GSO_MAX_SIZE = 65536
#: sysctl_tcp_low_latency = 0: a waiting reader gets segments on its prequeue.
SYSCTL_TCP_LOW_LATENCY = False

_OUTQ = struct.Struct("i")


def tcp_win_from_space(space: int) -> int:
    """tcp_win_from_space() with sysctl_tcp_adv_win_scale = 1: half the space is window."""
    return space - (space >> 1)


@attrs.frozen
class TcpLimits:
    """tcp_init()'s per-socket limits for a machine of ``nr_pages``."""

    wmem_max: int  #: tcp_wmem[2]
    rmem_max: int  #: tcp_rmem[2]

    @classmethod
    def for_pages(cls, nr_pages: int) -> TcpLimits:
        # nr_free_buffer_pages() << (PAGE_SHIFT - 7): 1/128 of the pressure threshold
        limit = nr_pages << 5
        return cls(wmem_max=max(64 * 1024, min(4 << 20, limit)),
                   rmem_max=max(TCP_RMEM_DEFAULT, min(6 << 20, limit)))


@attrs.frozen
class Frame:
    """A segment the NIC is about to take: ``len`` bytes at ``seq`` (0 for a pure
    ACK) carrying the cumulative acknowledgement ``ack_seq`` of what we sent.
    ``resent``: it comes from the peer's retransmission."""

    seq: int
    len: int
    ack_seq: int
    resent: bool


class TcpSock(Sock):
    """A tcp_sock bound to one real, non-blocking TCP socket."""

    def __init__(self, k: Kernel, raw: socket.socket, name: str, mss: int) -> None:
        super().__init__(k, name)
        self.raw = raw
        self.mss = mss  #: mss_cache = rcv_mss: the model's MTU-1500 MSS
        self.nic: NetDevice | None = None
        self.limits = TcpLimits.for_pages(k.nr_pages)
        # tcp_init_sock, then tcp_init_buffer_space at connect (tcp_fixup_sndbuf)
        self.sk_rcvbuf = TCP_RMEM_DEFAULT
        mss_clamp = mss + TCPOLEN_TSTAMP_ALIGNED
        self.sk_sndbuf = min(max(TCP_WMEM_DEFAULT,
                                 TCP_INIT_CWND * SKB_TRUESIZE(mss_clamp + MAX_TCP_HEADER)),
                             self.limits.wmem_max)
        self.window_clamp = tcp_win_from_space(self.sk_rcvbuf)
        # -- receive sequence space (bytes from the peer) --
        self.rcv_nxt = 0  #: next byte TCP expects
        self.copied_seq = 0  #: next byte the reader takes
        self.rq_off = 0  #: bytes already read from the head of the receive queue
        self.rcv_wup = 0  #: rcv_nxt when the window was last advertised
        self.rcv_wnd = self.window_clamp
        self.ofo: list[SkBuff] = []  #: out_of_order_queue, by seq
        self.raw_seq = 0  #: bytes taken from the real socket
        self.resend: list[tuple[int, bytes]] = []  #: lost segments, by seq: the peer resends them
        self.peer_rto = TCP_RTO_MIN  #: the peer's retransmission timeout
        self.peer_resume_at = -math.inf  #: when the peer's retransmission timer fires
        self.consecutive_drops = 0
        # -- ACKs we owe the peer --
        self.ack_sched = False  #: inet_csk_ack_scheduled
        self.ack_blocked = False  #: icsk_ack.blocked: the timer found the socket owned
        self.delack_at: float | None = None  #: the delayed-ACK timer
        # -- the prequeue (tp->ucopy) --
        self.ucopy_task: Task | None = None
        self.ucopy_buf: bytearray | None = None
        self.ucopy_want = 0  #: the length the reader asked for (ucopy.len + what it has)
        self.prequeue: deque[SkBuff] = deque()
        self.ucopy_memory = 0
        # -- send sequence space --
        self.write_seq = 0  #: bytes queued by tcp_sendmsg
        self.snd_nxt = 0  #: bytes pushed to the wire
        self.snd_una = 0  #: bytes whose ACK TCP has processed
        self.snd_cwnd = TCP_INIT_CWND
        self.packets_out = 0
        self.wire = bytearray()  #: pushed bytes the real socket has not taken yet
        self.wire_ready = trio.Event()
        self.raw_sent = 0  #: bytes the real socket took
        self.ack_hint = 0  #: the highest acknowledgement a segment taken by the NIC carried
        self.rto = TCP_RTO_MIN  #: our retransmission timeout (recovers lost ACKs)
        self.ack_retry_at = -math.inf
        self.sndmsg_page = None  #: sk->sk_sndmsg_page
        self.sndmsg_off = 0
        self.size_goal = (GSO_MAX_SIZE - 1 - 20 - 32) // mss * mss  #: tcp_xmit_size_goal
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.shut_down = False  #: kernel_sock_shutdown() was called on it

    # ====================================================================================
    # The peer and the wire: what the NIC takes, and what the real socket carries.
    # ====================================================================================
    def acked_real(self) -> int:
        """How much of what we wrote the real peer has acknowledged (SIOCOUTQ)."""
        if self.raw_sent == self.snd_una:
            return self.snd_una
        try:
            outq = _OUTQ.unpack(fcntl.ioctl(self.raw.fileno(), termios.TIOCOUTQ,
                                            b"\0" * _OUTQ.size))[0]
        except (OSError, ValueError):
            return self.snd_una
        return self.raw_sent - outq

    def window_edge(self) -> int:
        return self.rcv_wup + self.rcv_wnd

    def peek_frame(self, now: float) -> Frame | None:
        """The next segment the peer has for us, if any: a lost segment the peer
        retransmits (once its timer fired), new data within our window, or a pure
        ACK. Nothing is taken yet."""
        if self.eof or self.error:
            return None
        if now >= self.peer_resume_at:
            if self.resend:
                seq, data = self.resend[0]
                return Frame(seq, len(data), self.acked_real(), True)
            room = min(self.mss, self.window_edge() - self.raw_seq)
            if room > 0:
                try:
                    n = len(self.raw.recv(room, socket.MSG_PEEK))
                except BlockingIOError:
                    n = -1
                except OSError as e:
                    self._set_error(e.errno or 1)
                    return None
                if n == 0:
                    self._set_eof()
                    return None
                if n > 0:
                    return Frame(self.raw_seq, n, self.acked_real(), False)
        if now >= self.ack_retry_at and self.snd_una < self.raw_sent:
            ack = self.acked_real()
            if ack > self.ack_hint:
                return Frame(self.raw_seq, 0, ack, False)
        return None

    def take_frame(self, frame: Frame, skb: SkBuff) -> None:
        """The NIC took ``frame`` into ``skb``: consume its bytes."""
        if frame.len:
            if frame.resent:
                seq, data = self.resend.pop(0)
            else:
                data = self.raw.recv(frame.len)
                self.raw_seq += len(data)
            skb.data = data
        skb.seq = frame.seq
        skb.end_seq = frame.seq + frame.len
        skb.ack_seq = frame.ack_seq
        skb.sk = self
        self.ack_hint = max(self.ack_hint, frame.ack_seq)

    def lose_frame(self, frame: Frame, reason: str) -> None:
        """A segment was dropped before the NIC took it (no RX buffer): the peer sends
        it again after its retransmission timeout."""
        if frame.len:
            self._peer_backoff()
        else:
            self._ack_lost()
        self._log_drop(reason)

    def tcp_lose(self, skb: SkBuff, reason: str, task: Task) -> None:
        """A segment taken by the NIC was dropped: free it; its data goes back to the
        peer, to be retransmitted."""
        self.k.skb.kfree_skb(skb, task)
        if skb.end_seq > skb.seq:
            insort(self.resend, (skb.seq, skb.data))
            self._peer_backoff()
        if skb.ack_seq >= self.ack_hint:
            self._ack_lost()
        self._log_drop(reason)

    def _log_drop(self, reason: str) -> None:
        self.dropped(reason)
        now = trio.current_time()
        log.info("skb_drop", reason=reason, sock=self.name,
                 free=self.k.pgdat.zone.nr_free_pages, consecutive=self.consecutive_drops,
                 rto_s=round(max(0.0, self.peer_resume_at - now), 3))

    def _peer_backoff(self) -> None:
        now = trio.current_time()
        k = self.k
        if now >= self.peer_resume_at:  # a new timeout, not one already running
            self.consecutive_drops += 1
            self.peer_resume_at = now + k.hz(self.peer_rto)
            self.peer_rto = min(self.peer_rto * 2, TCP_RTO_MAX)
            k.vmstat["tcp_retransmit_timeouts"] += 1
            if self.nic is not None:
                self.nic.kick()

    def _ack_lost(self) -> None:
        """An ACK frame was lost: our retransmission timer elicits another."""
        now = trio.current_time()
        self.ack_hint = self.snd_una
        if now >= self.ack_retry_at:
            self.ack_retry_at = now + self.k.hz(self.rto)
            self.rto = min(self.rto * 2, TCP_RTO_MAX)

    def _delivered(self) -> None:
        """A segment got through: the peer's backoff ends."""
        self.consecutive_drops = 0
        self.peer_rto = TCP_RTO_MIN

    def _set_eof(self) -> None:
        self.eof = True
        self.sk_sleep.wake_up()

    def _set_error(self, err: int) -> None:
        self.error = err
        self.sk_sleep.wake_up()

    def flush_wire(self) -> None:
        """Hand pushed bytes to the real socket, as much as it takes now."""
        while self.wire and not self.error:
            try:
                n = self.raw.send(self.wire)
            except BlockingIOError:
                break
            except OSError as e:
                self._set_error(e.errno or 1)
                break
            self.raw_sent += n
            del self.wire[:n]
        if self.wire:
            self.wire_ready.set()

    def next_timer(self) -> float:
        """When this socket next needs the NIC's softirq: a delayed ACK, the peer's
        retransmission, our ACK-recovery timer."""
        t = math.inf
        if self.delack_at is not None:
            t = self.delack_at
        if self.resend or self.peer_resume_at > trio.current_time():
            t = min(t, self.peer_resume_at)
        if self.snd_una < self.raw_sent and self.ack_retry_at > trio.current_time():
            t = min(t, self.ack_retry_at)
        return t

    def rx_blocked(self) -> bool:
        """Is new data from the real socket held back (window closed, the peer backing
        off, lost segments to resend first)? Then readiness needs no interrupt."""
        return (bool(self.resend) or self.peer_resume_at > trio.current_time()
                or self.window_edge() <= self.raw_seq)

    # ====================================================================================
    # Receive: tcp_v4_rcv and what follows.
    # ====================================================================================
    async def tcp_v4_rcv(self, skb: SkBuff, ctx: Task) -> None:
        """tcp_v4_rcv() in the NET_RX softirq."""
        k = self.k
        if not self.sk_filter(skb):
            k.vmstat["skb_drop_pfmemalloc"] += 1
            self.tcp_lose(skb, "pfmemalloc", ctx)
            return
        if not self.sock_owned_by_user():
            self._delivered()
            if not self.tcp_prequeue(skb):
                await self.tcp_v4_do_rcv(skb, ctx)
            else:
                await self._prequeue_overflow(ctx)
        elif self.sk_add_backlog(skb, self.sk_rcvbuf + self.sk_sndbuf):
            self._delivered()
            k.vmstat["tcp_backlog_queued"] += 1
        else:
            k.vmstat["tcp_backlog_drop"] += 1  # TCPBacklogDrop
            self.tcp_lose(skb, "backlog", ctx)

    def tcp_prequeue(self, skb: SkBuff) -> bool:
        """tcp_prequeue(): park the segment for the reader waiting in tcp_recvmsg."""
        if SYSCTL_TCP_LOW_LATENCY or self.ucopy_task is None:
            return False
        self.prequeue.append(skb)
        self.ucopy_memory += skb.truesize
        self.k.vmstat["tcp_prequeued"] += 1
        if len(self.prequeue) == 1 and self.ucopy_memory <= self.sk_rcvbuf:
            self.sk_sleep.wake_up()
            if not self.ack_sched:
                self.delack_at = trio.current_time() + self.k.hz(3 * TCP_RTO_MIN / 4)
        return True

    async def _prequeue_overflow(self, ctx: Task) -> None:
        """tcp_prequeue() past sk_rcvbuf: the softirq processes the whole prequeue."""
        if self.ucopy_memory <= self.sk_rcvbuf:
            return
        while self.prequeue:
            self.k.vmstat["tcp_prequeue_dropped"] += 1  # TCPPrequeueDropped: processed here
            await self.sk_backlog_rcv(self.prequeue.popleft(), ctx)
        self.ucopy_memory = 0

    async def tcp_prequeue_process(self, task: Task) -> None:
        """tcp_prequeue_process(): the reader runs the prequeue, softirqs disabled."""
        task.local_bh_disable()
        try:
            while self.prequeue:
                await self.sk_backlog_rcv(self.prequeue.popleft(), task)
        finally:
            task.local_bh_enable()
        self.ucopy_memory = 0

    async def backlog_rcv(self, skb: SkBuff, task: Task) -> None:
        await self.tcp_v4_do_rcv(skb, task)

    async def tcp_v4_do_rcv(self, skb: SkBuff, task: Task) -> None:
        """tcp_v4_do_rcv() -> tcp_rcv_established(): the ACK, then the data."""
        if skb.ack_seq > self.snd_una:
            self.tcp_ack(skb.ack_seq, task)
        if skb.end_seq == skb.seq:
            self.k.skb.kfree_skb(skb, task)  # a pure ACK
            return
        if skb.seq != self.rcv_nxt:
            await self.tcp_data_queue_ofo(skb, task)
            return
        if not self._tcp_copy_to_user(skb, task):
            if not self.tcp_data_queue(skb, task):
                return
        self.rx_bytes += skb.end_seq - skb.seq
        self.tcp_ofo_queue(task)
        self.ack_sched = True  # tcp_event_data_recv
        await self.tcp_ack_snd_check(task)

    def _tcp_copy_to_user(self, skb: SkBuff, task: Task) -> bool:
        """The fast path's direct copy: the reader itself, owning the socket and waiting
        for exactly this data, processes the segment; it goes straight to its buffer."""
        n = skb.end_seq - skb.seq
        if not (self.ucopy_task is task and self.owner is task
                and self.copied_seq == self.rcv_nxt
                and n <= self.ucopy_want - len(self.ucopy_buf)):
            return False
        self.ucopy_buf += skb.data
        self.copied_seq += n
        self.rcv_nxt += n
        self.k.skb.kfree_skb(skb, task)
        return True

    def tcp_data_queue(self, skb: SkBuff, task: Task) -> bool:
        """tcp_data_queue(): onto the receive queue, after tcp_try_rmem_schedule."""
        if not self.tcp_try_rmem_schedule():
            self.tcp_lose(skb, "rcvbuf", task)
            return False
        self.receive_queue.append(skb)
        self.rmem_alloc += skb.truesize
        self.rcv_nxt = skb.end_seq
        self.k.vmstat["skb_rx_queued"] += 1
        self.sk_sleep.wake_up()  # sk_data_ready
        return True

    async def tcp_data_queue_ofo(self, skb: SkBuff, task: Task) -> None:
        """tcp_data_queue_ofo(): a segment beyond a gap waits, charged to the socket,
        on the out-of-order queue; the gap makes us ACK at once (a duplicate ACK).
        One that overlaps what we have is a duplicate: freed."""
        if skb.end_seq <= self.rcv_nxt or any(o.seq == skb.seq for o in self.ofo):
            self.k.skb.kfree_skb(skb, task)
            return
        if not self.tcp_try_rmem_schedule():
            self.tcp_lose(skb, "rcvbuf", task)
            return
        insort(self.ofo, skb, key=lambda o: o.seq)
        self.rmem_alloc += skb.truesize
        self.k.vmstat["tcp_ofo_queued"] += 1
        self.ack_sched = True
        await self.tcp_send_ack(task)

    def tcp_ofo_queue(self, task: Task) -> None:
        """tcp_ofo_queue(): segments the new data made contiguous join the receive queue."""
        while self.ofo and self.ofo[0].seq <= self.rcv_nxt:
            skb = self.ofo.pop(0)
            self.rmem_alloc -= skb.truesize
            if skb.end_seq <= self.rcv_nxt:  # covered meanwhile: a duplicate
                self.k.skb.kfree_skb(skb, task)
                continue
            self.receive_queue.append(skb)
            self.rmem_alloc += skb.truesize
            self.rcv_nxt = skb.end_seq
            self.rx_bytes += skb.end_seq - skb.seq
            self.k.vmstat["skb_rx_queued"] += 1
            self.sk_sleep.wake_up()

    def tcp_try_rmem_schedule(self) -> bool:
        """tcp_try_rmem_schedule(): over sk_rcvbuf, tcp_prune_queue; False: drop."""
        if self.rmem_alloc > self.sk_rcvbuf and not self.tcp_prune_queue():
            self.k.vmstat["tcp_rcv_pruned"] += 1  # RcvPruned
            return False
        return True

    def tcp_prune_queue(self) -> bool:
        """tcp_prune_queue() -> tcp_clamp_window(): raise sk_rcvbuf to what is queued,
        up to tcp_rmem[2] (never under memory pressure here). False if still over."""
        if self.sk_rcvbuf < self.limits.rmem_max:
            self.sk_rcvbuf = min(self.rmem_alloc, self.limits.rmem_max)
        return self.rmem_alloc <= self.sk_rcvbuf

    # -- ACKs we send --------------------------------------------------------------------
    def tcp_select_window(self) -> int:
        """tcp_select_window(): the free receive space as window, never shrinking the
        right edge already advertised."""
        free = min(tcp_win_from_space(self.sk_rcvbuf - self.rmem_alloc), self.window_clamp)
        new = 0 if free < self.mss else free // self.mss * self.mss
        cur = max(0, self.window_edge() - self.rcv_nxt)
        return max(new, cur)

    def tcp_event_ack_sent(self) -> None:
        """Whatever we send acknowledges rcv_nxt and advertises the window."""
        self.rcv_wnd = self.tcp_select_window()
        self.rcv_wup = self.rcv_nxt
        self.ack_sched = False
        self.ack_blocked = False
        self.delack_at = None
        if self.nic is not None and self.window_edge() > self.raw_seq:
            self.nic.kick()  # the peer may send again

    async def tcp_ack_snd_check(self, task: Task) -> None:
        """__tcp_ack_snd_check(): ACK now after more than one full segment if the window
        would not shrink, else a delayed ACK (tcp_send_delayed_ack)."""
        if not self.ack_sched:
            return
        if (self.rcv_nxt - self.rcv_wup > self.mss
                and self.tcp_select_window() >= self.rcv_wnd):
            await self.tcp_send_ack(task)
        elif self.delack_at is None:
            self.delack_at = trio.current_time() + self.k.hz(TCP_DELACK_MIN)
        elif self.ack_blocked:
            await self.tcp_send_ack(task)

    async def tcp_send_ack(self, task: Task) -> None:
        """tcp_send_ack(): an skb of MAX_TCP_HEADER, GFP_ATOMIC (sk_gfp_atomic with
        patch 7); transmitted and freed. On failure the delayed-ACK timer retries in
        TCP_DELACK_MAX and the window is not updated."""
        skb = await self.k.skb.alloc_skb(MAX_TCP_HEADER, self.sk_gfp_atomic(GFP_ATOMIC), 0, task)
        if skb is None:
            self.k.vmstat["tcp_ack_nomem"] += 1
            self.ack_sched = True
            self.delack_at = trio.current_time() + self.k.hz(TCP_DELACK_MAX)
            return
        self.k.skb.kfree_skb(skb, task)
        self.tcp_event_ack_sent()

    async def tcp_delack_timer(self, ctx: Task) -> None:
        """tcp_delack_timer() (3.5), in the timer softirq."""
        k = self.k
        if self.sock_owned_by_user():
            self.ack_blocked = True
            k.vmstat["delayed_ack_locked"] += 1  # DelayedACKLocked
            self.delack_at = trio.current_time() + k.hz(TCP_DELACK_MIN)
            return
        self.delack_at = None
        if self.prequeue:
            while self.prequeue:  # TCPSchedulerFailed: the reader did not get to it
                await self.sk_backlog_rcv(self.prequeue.popleft(), ctx)
            self.ucopy_memory = 0
        if self.ack_sched:
            k.vmstat["delayed_acks"] += 1
            await self.tcp_send_ack(ctx)

    # -- ACKs we receive -----------------------------------------------------------------
    def tcp_ack(self, ack: int, task: Task) -> None:
        """tcp_ack(): tcp_clean_rtx_queue frees every transmit skb the ACK covers;
        slow start grows the congestion window; tcp_check_space wakes a writer that
        waited for the send buffer."""
        k = self.k
        cwnd_limited = self.packets_out >= self.snd_cwnd
        acked = 0
        wq = self.write_queue
        while wq and wq[0].sent and wq[0].end_seq <= ack:
            skb = wq.popleft()
            segs = self._segs(skb)
            acked += segs
            self.packets_out -= segs
            self.wmem_queued -= skb.truesize
            k.vmstat["skb_tx_queued"] -= 1
            self._free_tx_skb(skb, task)
        self.snd_una = max(self.snd_una, ack)
        self.rto = TCP_RTO_MIN
        self.ack_retry_at = -math.inf
        if acked:
            if cwnd_limited:
                self.snd_cwnd += acked  # tcp_slow_start
            if self.nospace:  # tcp_check_space -> tcp_new_space
                self.tcp_new_space()

    def tcp_new_space(self) -> None:
        """tcp_new_space(): grow sndbuf with the congestion window, then wake writers."""
        if self.packets_out < self.snd_cwnd:  # tcp_should_expand_sndbuf
            sndmem = (2 * max(self.snd_cwnd, 4)
                      * SKB_TRUESIZE(self.mss + TCPOLEN_TSTAMP_ALIGNED + MAX_TCP_HEADER))
            if sndmem > self.sk_sndbuf:
                self.sk_sndbuf = min(sndmem, self.limits.wmem_max)
        self.sk_stream_write_space()

    def _segs(self, skb: SkBuff) -> int:
        return max(1, -(-(skb.end_seq - skb.seq) // self.mss))

    # ====================================================================================
    # Send: tcp_sendmsg.
    # ====================================================================================
    async def tcp_sendmsg(self, task: Task, data: bytes, more: bool = False) -> None:
        """tcp_sendmsg(): queue ``data`` in transmit skbs, owning the socket throughout;
        push them unless ``more`` (MSG_MORE) corks the last one."""
        await self.lock_sock(task)
        try:
            if self.error:
                raise ConnectionError(f"{self.name}: socket error {self.error}")
            copied = 0
            while copied < len(data):
                skb = self.write_queue[-1] if self.write_queue else None
                if skb is None or skb.sent or skb.end_seq - skb.seq >= self.size_goal:
                    skb = await self._new_segment(task, copied)
                    if skb is None:
                        continue
                copied += await self._copy_to_skb(task, skb, data, copied)
            self.tcp_push(more)
        finally:
            if self.owner is task:  # (not after a cancellation inside sk_wait_event)
                await self.release_sock(task)

    async def _new_segment(self, task: Task, copied: int) -> SkBuff | None:
        """new_segment: sk_stream_alloc_skb, or wait (None: try again)."""
        if not self.sk_stream_memory_free():
            await self._wait_for_memory(task, copied)  # wait_for_sndbuf
            return None
        skb = await self.k.skb.alloc_skb_fclone(SELECT_SIZE + MAX_TCP_HEADER,
                                                self.sk_allocation, task)
        if skb is None:
            self.sk_stream_moderate_sndbuf()
            await self._wait_for_memory(task, copied)
            return None
        # skb_entail
        skb.sk = self
        skb.frags = []
        skb.seq = skb.end_seq = self.write_seq
        skb.data = b""
        self.write_queue.append(skb)
        self.wmem_queued += skb.truesize
        self.k.vmstat["skb_tx_queued"] += 1
        return skb

    async def _copy_to_skb(self, task: Task, skb: SkBuff, data: bytes, copied: int) -> int:
        """Copy into the skb's linear room, else into a page fragment of the socket's
        sk_sndmsg_page. Returns the bytes copied (0: had to wait for memory)."""
        n = min(len(data) - copied, self.size_goal - (skb.end_seq - skb.seq))
        linear_room = SELECT_SIZE - len(skb.data) if not skb.frags else 0
        if linear_room > 0:
            n = min(n, linear_room)
        else:
            page = self.sndmsg_page
            if page is not None and page.private[0] == 1:
                self.sndmsg_off = 0  # every skb that used it is gone: reuse from the start
            if page is not None and self.sndmsg_off == PAGE_SIZE:
                self._put_sndmsg_page()
                page = None
            if page is None:
                page = await self.k.page_alloc.alloc_page(self.sk_allocation, task,
                                                          owner=Owner.SKB)
                if page is None:  # sk_stream_alloc_page failed
                    self.sk_stream_moderate_sndbuf()
                    await self._wait_for_memory(task, copied)
                    return 0
                page.private = [1]  # the socket's reference
                self.sndmsg_page = page
                self.sndmsg_off = 0
            n = min(n, PAGE_SIZE - self.sndmsg_off)
            if not skb.frags or skb.frags[-1] is not page:
                page.private[0] += 1  # get_page() for the skb's fragment
                skb.frags.append(page)
            self.sndmsg_off += n
            skb.truesize += n
            self.wmem_queued += n
        skb.data += data[copied:copied + n]
        skb.end_seq += n
        skb.len = skb.end_seq - skb.seq
        self.write_seq += n
        return n

    async def _wait_for_memory(self, task: Task, copied: int) -> None:
        """wait_for_memory: push what is queued, then sk_stream_wait_memory."""
        if copied:
            self.tcp_push(False)
        await self.sk_stream_wait_memory(task)

    def tcp_push(self, more: bool) -> None:
        """tcp_push(): transmit the unsent segments unless MSG_MORE corks them."""
        if more:
            return
        for skb in self.write_queue:
            if not skb.sent:
                self.tcp_transmit_skb(skb)

    def tcp_transmit_skb(self, skb: SkBuff) -> None:
        """The segment goes to the wire (its fast clone to the device: no allocation);
        it carries our ACK and window."""
        skb.sent = True
        self.snd_nxt = skb.end_seq
        self.packets_out += self._segs(skb)
        self.tx_bytes += skb.end_seq - skb.seq
        self.wire += skb.data
        self.flush_wire()
        self.tcp_event_ack_sent()
        if self.nic is not None:
            self.nic.kick()  # the transmit completion interrupt schedules NAPI

    def _put_sndmsg_page(self) -> None:
        page, self.sndmsg_page = self.sndmsg_page, None
        self._put_page(page)

    def _put_page(self, page) -> None:
        page.private[0] -= 1
        if not page.private[0]:
            self.k.page_alloc.free_page(page)

    def _free_tx_skb(self, skb: SkBuff, task: Task) -> None:
        for page in skb.frags or ():
            self._put_page(page)
        skb.frags = None
        self.k.skb.kfree_skb(skb, task)

    # ====================================================================================
    # Receive: tcp_recvmsg.
    # ====================================================================================
    def data_ready(self) -> bool:
        return (bool(self.receive_queue) or bool(self.prequeue) or self.eof
                or bool(self.error))

    async def tcp_recvmsg(self, task: Task, length: int, *, waitall: bool,
                          wchan: str | None = None) -> bytes:
        """tcp_recvmsg(): up to ``length`` bytes (all of them with ``waitall``,
        MSG_WAITALL), b"" at end of stream."""
        await self.lock_sock(task)
        buf = bytearray()
        target = length if waitall else 1
        try:
            while True:
                self._copy_from_queue(task, buf, length)
                if len(buf) >= target and not self.backlog:
                    break
                if self.error or (self.eof and not self.receive_queue):
                    break
                await self.tcp_cleanup_rbuf(task, len(buf))
                if not SYSCTL_TCP_LOW_LATENCY and self.ucopy_task is None:
                    self.ucopy_task, self.ucopy_buf, self.ucopy_want = task, buf, length
                    if self.prequeue:
                        await self.tcp_prequeue_process(task)
                if len(buf) >= target:
                    await self.release_sock(task)  # run the backlog without sleeping
                    await self.lock_sock(task)
                else:
                    await self.sk_wait_data(task, wchan)
                if self.ucopy_task is task and self.rcv_nxt == self.copied_seq and self.prequeue:
                    await self.tcp_prequeue_process(task)
                if len(buf) >= length:
                    break
            if self.ucopy_task is task:
                if self.prequeue:
                    await self.tcp_prequeue_process(task)
                self.ucopy_task, self.ucopy_buf, self.ucopy_want = None, None, 0
            await self.tcp_cleanup_rbuf(task, len(buf))
        finally:
            if self.ucopy_task is task:
                self.ucopy_task, self.ucopy_buf, self.ucopy_want = None, None, 0
            if self.owner is task:  # (not after a cancellation inside sk_wait_event)
                await self.release_sock(task)
        assert len(buf) <= length, f"tcp_recvmsg({length}) took {len(buf)} bytes"
        return bytes(buf)

    def _copy_from_queue(self, task: Task, buf: bytearray, length: int) -> None:
        """Copy from the receive queue; free each skb once read (sk_eat_skb)."""
        rq = self.receive_queue
        while rq and len(buf) < length:
            skb = rq[0]
            take = min(len(skb.data) - self.rq_off, length - len(buf))
            buf += skb.data[self.rq_off:self.rq_off + take]
            self.rq_off += take
            self.copied_seq += take
            if self.rq_off == len(skb.data):
                rq.popleft()
                self.rq_off = 0
                self.rmem_alloc -= skb.truesize
                self.k.vmstat["skb_rx_queued"] -= 1
                self.k.skb.kfree_skb(skb, task)

    async def tcp_cleanup_rbuf(self, task: Task, copied: int) -> None:
        """tcp_cleanup_rbuf(): send the ACK now if it is blocked or more than a segment
        is unacknowledged; or a window update if reading opened the window twofold."""
        time_to_ack = self.ack_sched and (self.ack_blocked
                                          or self.rcv_nxt - self.rcv_wup > self.mss)
        if not time_to_ack and copied > 0 and not self.eof:
            now_wnd = max(0, self.window_edge() - self.rcv_nxt)
            if 2 * now_wnd <= self.window_clamp:
                new = self.tcp_select_window()
                time_to_ack = new >= 2 * now_wnd and new > now_wnd
        if time_to_ack:
            await self.tcp_send_ack(task)

    # ====================================================================================
    # Teardown and introspection.
    # ====================================================================================
    def kernel_sock_shutdown(self) -> None:
        """kernel_sock_shutdown(SHUT_RDWR), as the NBD driver's sock_shutdown does: the
        real connection is shut down both ways (the peer sees end of file); here a
        sender gets EPIPE and a receiver end of stream at once."""
        try:
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.shut_down = True
        self.eof = True
        self._set_error(self.error or errno.EPIPE)

    def close(self) -> None:
        """Close the real socket (the last fput of the socket file): wake whatever
        waits on it first (trio's notify_closing), so that the NIC's interrupt
        sources for it end."""
        if self.raw.fileno() < 0:
            return
        if not self.error:
            self._set_error(errno.EBADF)
        trio.lowlevel.notify_closing(self.raw)
        self.raw.close()

    def release(self, task: Task) -> None:
        """Free every skb the socket still holds (sock_release at shutdown)."""
        k = self.k
        for q in (self.receive_queue, self.backlog, self.backlog_draining, self.prequeue):
            while q:
                skb = q.popleft()
                if q is self.receive_queue:
                    self.rmem_alloc -= skb.truesize
                    k.vmstat["skb_rx_queued"] -= 1
                k.skb.kfree_skb(skb, task)
        while self.ofo:
            skb = self.ofo.pop()
            self.rmem_alloc -= skb.truesize
            k.skb.kfree_skb(skb, task)
        while self.write_queue:
            skb = self.write_queue.popleft()
            self.wmem_queued -= skb.truesize
            k.vmstat["skb_tx_queued"] -= 1
            self._free_tx_skb(skb, task)
        if self.sndmsg_page is not None:
            self._put_sndmsg_page()
        self.sk_clear_memalloc()

    def statistics(self) -> SockStatistics:
        now = trio.current_time()
        owner = self.owner
        return SockStatistics(
            sock=self.name, memalloc=self.memalloc, sk_allocation=int(self.sk_allocation),
            owner=None if owner is None else f"{owner.comm}/{owner.pid}",
            owned_s=None if owner is None else round(now - self.owned_since, 3),
            owner_wchan=None if owner is None else owner.wchan,
            lock_waiters=len(self.lock_wq),
            backlog_skbs=len(self.backlog) + len(self.backlog_draining),
            backlog_bytes=self.backlog_len, backlog_limit=self.sk_rcvbuf + self.sk_sndbuf,
            prequeue_skbs=len(self.prequeue), rx_queued_skbs=len(self.receive_queue),
            rmem_alloc=self.rmem_alloc, sk_rcvbuf=self.sk_rcvbuf,
            tx_unacked_skbs=len(self.write_queue), wmem_queued=self.wmem_queued,
            sk_sndbuf=self.sk_sndbuf, drops=dict(self.drops),
            consecutive_drops=self.consecutive_drops,
            rto_s=round(max(0.0, self.peer_resume_at - now), 3) if self.consecutive_drops
            else self.peer_rto,
            rx_bytes=self.rx_bytes, tx_bytes=self.tx_bytes)


async def connect_raw(host: str, port: int) -> socket.socket:
    """A connected, non-blocking stdlib TCP socket (trio does the connect), with
    TCP_NODELAY as nbd-client sets it."""
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
    code = getattr(last, "errno", None)
    why = os.strerror(code) if code else str(last)
    raise ConnectionError(code or 0, f"cannot connect to {host}:{port}: {why}")
