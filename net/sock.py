"""struct sock: ownership, the backlog, buffers and SOCK_MEMALLOC.

Models include/net/sock.h, net/core/sock.c and net/core/stream.c (3.5; the
series' changes gated by their patches):

- The socket lock (socket_lock_t): ``lock_sock`` / ``release_sock`` /
  ``sock_owned_by_user``. lock_sock sleeps uninterruptibly (__lock_sock) as an
  exclusive waiter while another task owns the socket, and there is no
  fairness: a task that calls lock_sock while nobody owns it takes it, even
  if a woken waiter has not run yet. An owner that sleeps (in the page
  allocator, say) keeps the socket. release_sock runs the backlog
  (__release_sock) in the releasing task's context with softirqs disabled,
  then gives up ownership and wakes one waiter. The socket stays owned while
  its backlog is processed, so packets arriving meanwhile join it;
  sk_backlog.len is reset only once the backlog is empty.
- The backlog: sk_add_backlog, bounded by sk_rcvqueues_full (backlog.len +
  rmem_alloc > limit, the arriving skb not counted); sk_backlog_rcv, and
  patch 12's __sk_backlog_rcv, which sets PF_MEMALLOC while a pfmemalloc skb
  is processed. (In process context with softirqs disabled in_interrupt() is
  true, so that flag grants no reserves there, only in a softirq; this is
  the kernel's behaviour, kept.)
- SOCK_MEMALLOC: sk_set_memalloc / sk_clear_memalloc and the memalloc socket
  count behind sk_memalloc_socks() (patch 8), sk_gfp_atomic (patch 7), and
  sk_filter's first check that drops a pfmemalloc skb for a socket without
  SOCK_MEMALLOC (patch 9).
- Buffers: sk_rcvbuf, sk_sndbuf, sk_rmem_alloc, sk_wmem_queued;
  sk_stream_memory_free, sk_stream_wait_memory (which releases ownership while
  it sleeps: one random 2..HZ/5+1-jiffy nap when the wait is for memory, until
  write space otherwise; the sleep is interruptible: a pending fatal signal ends
  it with -EINTR), sk_stream_write_space, sk_stream_moderate_sndbuf,
  and sk_wait_data.

What a packet does once it reaches the socket, and how data is sent and
received, is the protocol's: net/tcp.py.

Simplified: no accounting against tcp_mem / sk_forward_alloc. The limits
(tcp_mem is 17-35 MB on a 192 MiB machine) are never approached by the
model's few sockets, so sk_rmem_schedule and sk_wmem_schedule always succeed,
and tcp_memory_pressure, which a failed transmit allocation sets, would be
cleared again at the socket's next sk_mem_reclaim: it is left out.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import attrs
import trio

from emulator.flags import GFP, GFP_KERNEL, PF
from emulator.patches import SK_GFP_ATOMIC, SKB_PF_MEMALLOC, SKB_RESERVES, SOCK_MEMALLOC
from emulator.task import Task
from emulator.wait import WaitQueue
from net.skbuff import SkBuff

if TYPE_CHECKING:
    from emulator.kernel import Kernel

SOCK_MIN_SNDBUF = 2048
#: Jiffies at HZ = 250, the tick the model's "2 jiffies" and HZ/5 assume (seconds).
JIFFY = 0.004


@attrs.frozen
class SockStatistics:
    """A snapshot of one socket (trio-style ``statistics()``)."""

    sock: str  #: the socket's name ("nbd0", "bg0", ...)
    memalloc: bool  #: SOCK_MEMALLOC
    sk_allocation: int  #: the GFP mask of the socket's own allocations
    owner: str | None  #: "comm/pid" of the task that owns the socket, or None
    owned_s: float | None  #: for how long it has owned it
    owner_wchan: str | None  #: what the owner sleeps on (None: it runs)
    lock_waiters: int  #: tasks asleep in lock_sock
    backlog_skbs: int  #: packets waiting in the backlog
    backlog_bytes: int  #: sk_backlog.len (truesize), reset when the backlog drains
    backlog_limit: int  #: sk_rcvbuf + sk_sndbuf, TCP's bound
    prequeue_skbs: int  #: packets parked for the reader (TCP's prequeue)
    rx_queued_skbs: int  #: the receive queue
    rmem_alloc: int
    sk_rcvbuf: int
    tx_unacked_skbs: int  #: the write queue: sent and not yet acknowledged (or unsent)
    wmem_queued: int
    sk_sndbuf: int
    drops: dict  #: reason -> packets dropped for this socket
    consecutive_drops: int  #: the peer's retransmission backoff count
    rto_s: float  #: the peer's next retransmission timeout
    rx_bytes: int
    tx_bytes: int


class Sock:
    """A struct sock. TCP (net/tcp.py) subclasses it with the protocol."""

    def __init__(self, k: Kernel, name: str) -> None:
        self.k = k
        self.name = name
        self.sk_allocation: GFP = GFP_KERNEL
        self.memalloc = False  #: SOCK_MEMALLOC
        # socket_lock_t
        self.owner: Task | None = None  #: sk_lock.owned, and by whom
        self.owned_since = 0.0
        self.lock_wq = WaitQueue(f"{name}.sk_lock.wq")
        # the backlog
        self.backlog: deque[SkBuff] = deque()
        self.backlog_len = 0  #: sk_backlog.len
        #: the batch __release_sock took off the backlog and is processing
        self.backlog_draining: deque[SkBuff] = deque()
        # buffers
        self.sk_rcvbuf = 0
        self.sk_sndbuf = 0
        self.receive_queue: deque[SkBuff] = deque()
        self.rmem_alloc = 0  #: sk_rmem_alloc: truesize of the receive queue
        self.write_queue: deque[SkBuff] = deque()
        self.wmem_queued = 0  #: sk_wmem_queued
        self.nospace = False  #: SOCK_NOSPACE: a writer waited for sndbuf
        self.sk_sleep = WaitQueue(f"{name}.sk_sleep")
        self.error = 0  #: sk_err
        self.eof = False  #: RCV_SHUTDOWN: the peer closed
        self.drops: dict[str, int] = {}

    # -- the socket lock ------------------------------------------------------------
    def sock_owned_by_user(self) -> bool:
        """sock_owned_by_user(): a task owns the socket (lock_sock)."""
        return self.owner is not None

    async def lock_sock(self, task: Task) -> None:
        """lock_sock(): own the socket, sleeping uninterruptibly while another task does."""
        while self.owner is not None:
            await task.sleep_on(self.lock_wq, None, wchan=f"lock_sock({self.name})")
        self.owner = task
        self.owned_since = trio.current_time()

    async def release_sock(self, task: Task) -> None:
        """release_sock(): process the backlog in this task's context, then give up
        ownership and wake one task waiting in lock_sock."""
        while self.backlog:  # __release_sock
            self.backlog_draining, self.backlog = self.backlog, deque()
            task.local_bh_disable()
            try:
                while self.backlog_draining:
                    await self.sk_backlog_rcv(self.backlog_draining.popleft(), task)
                    await task.cond_resched()  # cond_resched_softirq
            finally:
                task.local_bh_enable()
        self.backlog_len = 0
        self.owner = None
        self.lock_wq.wake_up(nr_exclusive=1)

    # -- the backlog ------------------------------------------------------------------
    def sk_rcvqueues_full(self, limit: int) -> bool:
        """sk_rcvqueues_full(): backlog and receive queue over ``limit`` (the arriving
        skb's own truesize is not counted)."""
        return self.backlog_len + self.rmem_alloc > limit

    def sk_add_backlog(self, skb: SkBuff, limit: int) -> bool:
        """sk_add_backlog(): False (-ENOBUFS) when the queues are full."""
        if self.sk_rcvqueues_full(limit):
            return False
        self.backlog.append(skb)
        self.backlog_len += skb.truesize
        return True

    async def sk_backlog_rcv(self, skb: SkBuff, task: Task) -> None:
        """sk_backlog_rcv(); with patch 12, __sk_backlog_rcv sets PF_MEMALLOC while a
        pfmemalloc skb is processed."""
        k = self.k
        if not (skb.pfmemalloc and k.sk_memalloc_socks() and k.patches.has(SKB_PF_MEMALLOC)):
            await self.backlog_rcv(skb, task)
            return
        assert self.memalloc, "__sk_backlog_rcv: a pfmemalloc skb on a socket without SOCK_MEMALLOC"
        saved = task.flags & PF.MEMALLOC
        task.flags |= PF.MEMALLOC
        try:
            await self.backlog_rcv(skb, task)
        finally:
            task.flags = (task.flags & ~PF.MEMALLOC) | saved

    async def backlog_rcv(self, skb: SkBuff, task: Task) -> None:  # pragma: no cover
        """sk->sk_backlog_rcv: the protocol's receive handler."""
        raise NotImplementedError

    # -- SOCK_MEMALLOC ----------------------------------------------------------------
    def sk_set_memalloc(self) -> None:
        """sk_set_memalloc (patch 8): SOCK_MEMALLOC and __GFP_MEMALLOC on sk_allocation."""
        if not self.k.patches.has(SOCK_MEMALLOC) or self.memalloc:
            return
        self.memalloc = True
        self.sk_allocation |= GFP.MEMALLOC
        self.k.memalloc_socks += 1

    def sk_clear_memalloc(self) -> None:
        """sk_clear_memalloc(): SOCK_MEMALLOC and __GFP_MEMALLOC off again."""
        if not self.memalloc:
            return
        self.memalloc = False
        self.sk_allocation &= ~GFP.MEMALLOC
        self.k.memalloc_socks -= 1

    def sk_gfp_atomic(self, gfp: GFP) -> GFP:
        """sk_gfp_atomic (patch 7): GFP_ATOMIC plus the socket's __GFP_MEMALLOC."""
        if self.k.patches.has(SK_GFP_ATOMIC):
            return gfp | (self.sk_allocation & GFP.MEMALLOC)
        return gfp

    def sk_filter(self, skb: SkBuff) -> bool:
        """sk_filter(): False (-ENOMEM, drop) for a pfmemalloc skb on a socket
        without SOCK_MEMALLOC."""
        if skb.pfmemalloc and not self.memalloc and self.k.patches.has(SKB_RESERVES):
            return False
        return True

    # -- the stream's buffers ---------------------------------------------------------
    def sk_stream_memory_free(self) -> bool:
        """sk_stream_memory_free(): the send buffer has room."""
        return self.wmem_queued < self.sk_sndbuf

    def sk_stream_wspace(self) -> int:
        """sk_stream_wspace(): sndbuf minus what is queued."""
        return self.sk_sndbuf - self.wmem_queued

    def sk_stream_write_space(self) -> None:
        """sk_stream_write_space(): wake writers once a third of sndbuf is free again."""
        if self.sk_stream_wspace() >= self.wmem_queued // 2:
            self.nospace = False
            self.sk_sleep.wake_up()

    def sk_stream_moderate_sndbuf(self) -> None:
        """sk_stream_moderate_sndbuf(): after a failed allocation, shrink sndbuf to
        half of what is queued (at least SOCK_MIN_SNDBUF)."""
        self.sk_sndbuf = max(min(self.sk_sndbuf, self.wmem_queued // 2), SOCK_MIN_SNDBUF)

    async def sk_stream_wait_memory(self, task: Task) -> None:
        """sk_stream_wait_memory(): called owning the socket after an allocation failed
        (send buffer not full: one nap of 2..HZ/5+1 jiffies) or with the send buffer
        full (until write space). Ownership is released for the sleep
        (sk_wait_event), so the backlog is processed on the way."""
        vm_wait = 0.0
        if self.sk_stream_memory_free():
            vm_wait = self.k.hz((self.k.rng.randrange(50) + 2) * JIFFY)
        while True:
            if self.error:
                raise ConnectionError(f"{self.name}: socket error {self.error}")
            if task.fatal_signal:  # signal_pending(): the sleep is TASK_INTERRUPTIBLE
                raise InterruptedError(f"{self.name}: {task.signal or 'SIGKILL'} while "
                                       "waiting for send buffer space")
            if self.sk_stream_memory_free() and not vm_wait:
                return
            self.nospace = True
            await self.sk_wait_event(task, lambda vm_wait=vm_wait: bool(self.error) or task.fatal_signal or (
                self.sk_stream_memory_free() and not vm_wait), vm_wait or None,
                wchan=f"sk_stream_wait_memory({self.name})")
            vm_wait = 0.0

    async def sk_wait_data(self, task: Task, wchan: str | None = None) -> None:
        """sk_wait_data(): release the socket, sleep until data (or the prequeue's
        wake-up, an error, end of stream), own it again."""
        await self.sk_wait_event(task, self.data_ready, None,
                                 wchan=wchan or f"sk_wait_data({self.name})")

    def data_ready(self) -> bool:
        return bool(self.receive_queue) or self.eof or bool(self.error)

    async def sk_wait_event(self, task: Task, condition, timeout: float | None, *,
                            wchan: str) -> None:
        """sk_wait_event(): release_sock, one sleep on sk_sleep (until a wake-up or the
        timeout) unless ``condition`` already holds, lock_sock."""
        await self.release_sock(task)
        if not condition():
            if timeout is None:
                await task.sleep_on(self.sk_sleep, condition, wchan=wchan)
            else:
                await task.sleep_on(self.sk_sleep, None, timeout=timeout, wchan=wchan)
        await self.lock_sock(task)

    def dropped(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
