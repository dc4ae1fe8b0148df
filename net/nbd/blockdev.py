"""The kernel's NBD block driver (drivers/block/nbd.c, 3.5/3.6) on an emulated socket.

Models: do_nbd_request putting requests on ``waiting_queue`` and waking the
``nbd0`` kernel thread (nbd_thread, PF_KTHREAD, nice -20), which sends each
request (nbd_handle_req -> nbd_send_req: the 28-byte header with MSG_MORE for
a write, then the write's data, two sock_xmit calls, each a tcp_sendmsg that
owns the socket) and moves it to the in-flight list (``queue_head``); the
receiver running nbd_do_it in the nbd-client process's context, which reads
each 16-byte reply (nbd_read_stat: sock_xmit(receive), a tcp_recvmsg with
MSG_WAITALL), finds its request by handle (nbd_find_request, which first waits
on active_wq while that request is still being sent), reads a read's data,
and completes it (nbd_end_request), so writeback completes in nbd-client's
context; a socket error fails every queued and in-flight request with -EIO
(nbd_clear_que).

Patch 14: nbd_do_it calls sk_set_memalloc on the socket, and sock_xmit runs,
for sending and receiving, with PF_MEMALLOC and sk_allocation = GFP_NOIO |
__GFP_MEMALLOC. Without it, sock_xmit sets sk_allocation = GFP_NOIO and
nothing else: the 3.5 sender may sleep in direct reclaim while it owns the
socket, and then no reply can be processed before it lets go.

Every byte goes through the emulated TCP socket (net/tcp.py): requests are
sent as skbs charged to emulated memory and held until TCP processes the
peer's ACK for them; replies arrive in skbs the NIC's receive path allocated.
The reply decoder is the sans-I/O ``TransmissionClient`` of net/nbd/protocol.py.

Emulator accounting (not a kernel counter): every send during which the
sender entered direct reclaim is a *sender stall*. While a stall lasts with no
request awaiting a reply, it is *exposed*: no reply can arrive to make a page
clean, so only memory freed by others can end it. An exposed stall in which
the sender's own reclaim freed nothing is a *near miss*: it ended only because
another task freed memory in time. A 3.5 lockup is a near miss that nobody
rescues, an exposure that never ends; the numbers of both say how close a
completed run came (``SenderStalls``). Each stall's event also says where the
memory went meanwhile: how many pages anyone freed (``pgfree``, and by whom:
``freed_by``), how many drain_all_pages moved from the per-cpu lists, where
the watermark check does not see them (``pcp_drained``), and how many atomic
callers took at or below the min watermark (``pgalloc_below_min``), a band
the vanilla sender may not enter.

Simplified: the handshake (done by the userspace nbd-client before
NBD_SET_SOCK in the kernel) is not charged to emulated memory; there is no
xmit timeout (3.6's default is none); request handles are counters, not
request pointers.
"""

from __future__ import annotations

import itertools
from array import array
from collections import deque
from typing import TYPE_CHECKING

import structlog
import trio

from emulator.block import BLK_RW_ASYNC, BLK_RW_SYNC, READ, BlockDevice, Request
from emulator.flags import GFP_NOIO, GFP, PF
from emulator.logs import debug_enabled
from emulator.task import Task
from emulator.wait import WaitQueue
from net.nbd import protocol as P
from net.tcp import TcpSock

if TYPE_CHECKING:
    from emulator.kernel import Kernel

log = structlog.get_logger("swapnbd.nbd")

NBD_EIO = 5


class SenderStalls:
    """Sends during which the NBD sender entered direct reclaim (see the module
    docstring). The counts live in vmstat (``nbd_sender_reclaim``,
    ``nbd_sender_reclaim_exposed``, ``nbd_sender_near_miss``); this keeps the
    durations beside them."""

    __slots__ = ("vmstat", "total_s", "longest_s", "longest_exposed_s")

    def __init__(self, vmstat: dict) -> None:
        self.vmstat = vmstat
        self.total_s = 0.0
        self.longest_s = 0.0
        self.longest_exposed_s = 0.0

    def record(self, seconds: float, exposed_s: float | None, reclaimed: int) -> None:
        """A stall of ``seconds``, the last ``exposed_s`` of them with nothing in
        flight (None: never exposed), in which the sender reclaimed ``reclaimed`` pages."""
        vm = self.vmstat
        vm["nbd_sender_reclaim"] += 1
        self.total_s += seconds
        self.longest_s = max(self.longest_s, seconds)
        if exposed_s is not None:
            vm["nbd_sender_reclaim_exposed"] += 1
            vm["nbd_sender_near_miss"] += reclaimed == 0
            self.longest_exposed_s = max(self.longest_exposed_s, exposed_s)

    def summary(self) -> dict:
        vm = self.vmstat
        return {"stalls": vm["nbd_sender_reclaim"], "exposed": vm["nbd_sender_reclaim_exposed"],
                "near_misses": vm["nbd_sender_near_miss"],
                "total_s": round(self.total_s, 4), "longest_s": round(self.longest_s, 4),
                "longest_exposed_s": round(self.longest_exposed_s, 4)}


class SendMarks:
    """The counters a send began with, for its stall's event: the machine's
    (pgfree, pgalloc_below_min, pcp_drained, the allocator's pgfree_by, free
    pages) and the sender's (direct reclaims, those of them for order > 0, pages
    reclaimed)."""

    __slots__ = ("pgfree", "below_min", "pcp_drained", "freed_by", "free",
                 "allocstall", "high_order", "reclaimed")

    def __init__(self, k: Kernel, task: Task | None) -> None:
        vm = k.vmstat
        self.pgfree = vm["pgfree"]
        self.below_min = vm["pgalloc_below_min"]
        self.pcp_drained = vm["pcp_drained"]
        self.freed_by = dict(k.page_alloc.pgfree_by)
        self.free = k.pgdat.zone.nr_free_pages
        self.allocstall = task.allocstall if task else 0
        self.high_order = task.allocstall_high_order if task else 0
        self.reclaimed = task.direct_reclaimed if task else 0


class NBDDevice(BlockDevice):
    name = "nbd0"

    def __init__(self, k: Kernel, sock: TcpSock, info: P.ExportInfo, mss: int) -> None:
        super().__init__(k)
        self.sock = sock
        self.info = info
        self.mss = mss
        self.waiting_queue: deque[Request] = deque()
        self.waiting_wq = WaitQueue("nbd.waiting_wq")
        self.queue_head: dict[int, Request] = {}  #: sent, awaiting a reply
        self.tx = P.TransmissionClient()
        self._cookies = itertools.count(1)
        self.active_req: Request | None = None
        self.active_wq = WaitQueue("nbd.active_wq")
        self.harderror = 0
        self.latencies = array("d")
        self.requests = 0
        self.replies = 0
        self.sender_stalls = SenderStalls(k.vmstat)
        #: when the send in progress last saw nothing in flight (None: not since it began)
        self._exposed_since: float | None = None
        #: the counters as the send in progress began
        self._send_marks = SendMarks(k, None)

    # -- submission -------------------------------------------------------------------
    async def request_fn(self, req: Request, task: Task) -> None:
        """do_nbd_request: hand the request to nbd_thread."""
        if self.harderror:
            self.k.vmstat["nbd_errors"] += 1
            self.end_request(req, NBD_EIO, task)
            return
        self.waiting_queue.append(req)
        self.k.vmstat["nbd_inflight"] = len(self.waiting_queue) + len(self.queue_head)
        self.waiting_wq.wake_up()

    async def nbd_thread(self, task: Task) -> None:
        """The nbd0 kernel thread: send queued requests one at a time, at nice -20
        (set_user_nice(current, -20), as nbd_thread has done since 2.6.26)."""
        task.set_user_nice(-20)
        while True:
            await task.sleep_on(self.waiting_wq, lambda: bool(self.waiting_queue),
                                wchan="nbd_thread(waiting_wq)")
            req = self.waiting_queue.popleft()
            await self.nbd_handle_req(req, task)
            await task.cond_resched()

    async def nbd_handle_req(self, req: Request, task: Task) -> None:
        k = self.k
        bio = req.bio
        cmd = P.NBD_CMD_READ if bio.rw == READ else P.NBD_CMD_WRITE
        cookie = next(self._cookies)
        req.cookie = cookie
        if self.harderror:
            self.end_request(req, NBD_EIO, task)
            return
        wire = self.tx.send_request(cmd, cookie, bio.offset, bio.length, 0,
                                    bio.data if cmd == P.NBD_CMD_WRITE else b"")
        req.started = trio.current_time()
        self.active_req = req
        self._send_marks = SendMarks(k, task)
        self._exposed_since = None if self.queue_head else req.started
        try:
            await self.nbd_send_req(wire, cmd, task)
        except ConnectionError as e:
            self._clear_active()
            self._harderror(str(e), task)
            self.end_request(req, NBD_EIO, task)
            return
        if task.allocstall != self._send_marks.allocstall:
            self._account_stall(req, task)
        self._exposed_since = None
        self.queue_head[cookie] = req
        self._clear_active()
        self.requests += 1
        k.vmstat["nbd_requests"] += 1
        k.vmstat["nbd_inflight"] = len(self.waiting_queue) + len(self.queue_head)
        if debug_enabled():
            log.debug("nbd_request", cookie=cookie, cmd="read" if cmd == P.NBD_CMD_READ else "write",
                      offset=bio.offset, length=bio.length, pid=task.pid, comm=task.comm,
                      cpu=task.cpu.id)

    def _clear_active(self) -> None:
        """active_req = NULL; wake_up_all(&nbd->active_wq)."""
        self.active_req = None
        self.active_wq.wake_up()

    async def nbd_send_req(self, wire: bytes, cmd: int, task: Task) -> None:
        """nbd_send_req(): the 28-byte request header (with MSG_MORE for a write), then
        a write's data: two sock_xmit calls, each a tcp_sendmsg of its own."""
        header, data = wire[:P.REQUEST_HEADER_SIZE], wire[P.REQUEST_HEADER_SIZE:]
        await self.sock_xmit(task, header, more=cmd == P.NBD_CMD_WRITE)
        if data:
            await self.sock_xmit(task, data)

    def _account_stall(self, req: Request, task: Task) -> None:
        """The send of ``req`` entered direct reclaim: a sender stall (module docstring)."""
        now = trio.current_time()
        marks = self._send_marks
        reclaimed = task.direct_reclaimed - marks.reclaimed
        exposed_s = None if self._exposed_since is None else now - self._exposed_since
        self.sender_stalls.record(now - req.started, exposed_s, reclaimed)
        freed_by = self.k.page_alloc.pgfree_by
        log.info("nbd_sender_stall", cookie=req.cookie, stall_s=round(now - req.started, 6),
                 exposed_s=None if exposed_s is None else round(exposed_s, 6),
                 allocstall=task.allocstall - marks.allocstall,
                 high_order=task.allocstall_high_order - marks.high_order,
                 reclaimed=reclaimed, **self._send_deltas(),
                 pcp_drained=self.k.vmstat["pcp_drained"] - marks.pcp_drained,
                 freed_by={c: n - marks.freed_by.get(c, 0) for c, n in freed_by.items()
                           if n != marks.freed_by.get(c, 0)},
                 free_before=marks.free, free_after=self.k.pgdat.zone.nr_free_pages)

    def _send_deltas(self) -> dict[str, int]:
        """Pages freed by anyone, and taken below min by atomic callers, since the
        send in progress began."""
        vm = self.k.vmstat
        marks = self._send_marks
        return {"pgfree": vm["pgfree"] - marks.pgfree,
                "pgalloc_below_min": vm["pgalloc_below_min"] - marks.below_min}

    def _sock_xmit_begin(self, task: Task) -> int:
        """sock_xmit(): sk_allocation GFP_NOIO; patch 14 adds __GFP_MEMALLOC and runs the
        whole call with PF_MEMALLOC. Returns the task's PF_MEMALLOC to restore."""
        patched = self.k.patches.has(14)
        self.sock.sk_allocation = GFP_NOIO | GFP.MEMALLOC if patched else GFP_NOIO
        saved = task.flags & PF.MEMALLOC
        if patched:
            task.flags |= PF.MEMALLOC
        return saved

    async def sock_xmit(self, task: Task, data: bytes, *, more: bool = False) -> None:
        """sock_xmit(send): one kernel_sendmsg (tcp_sendmsg)."""
        saved = self._sock_xmit_begin(task)
        try:
            await self.sock.tcp_sendmsg(task, data, more)
        finally:
            task.flags = (task.flags & ~PF.MEMALLOC) | saved

    async def sock_xmit_recv(self, task: Task, length: int) -> bytes:
        """sock_xmit(receive): one kernel_recvmsg (tcp_recvmsg, MSG_WAITALL)."""
        saved = self._sock_xmit_begin(task)
        try:
            return await self.sock.tcp_recvmsg(task, length, waitall=True,
                                               wchan="nbd_read_stat(sk_wait_data)")
        finally:
            task.flags = (task.flags & ~PF.MEMALLOC) | saved

    # -- completion --------------------------------------------------------------------
    async def nbd_do_it(self, task: Task) -> None:
        """The receiver, in the nbd-client process (NBD_DO_IT): read replies forever."""
        if self.k.patches.has(14):
            self.sock.sk_set_memalloc()
        while True:
            try:
                ev, req = await self.nbd_read_stat(task)
            except (ConnectionError, P.ProtocolError) as e:
                self._harderror(str(e), task)
                return
            self.nbd_end_request(ev, req, task)
            await task.cond_resched()

    async def nbd_read_stat(self, task: Task) -> tuple:
        """nbd_read_stat(): the 16-byte reply; nbd_find_request; a read's data."""
        sock = self.sock
        hdr = await self.sock_xmit_recv(task, P.SIMPLE_REPLY_SIZE)
        if len(hdr) < P.SIMPLE_REPLY_SIZE:
            raise ConnectionError(f"connection closed by the server ({sock.error or 'EOF'})")
        self.tx.receive_data(hdr)
        ev = self.tx.next_event()  # a protocol error (bad magic, unknown handle) raises
        req = await self.nbd_find_request(P.reply_cookie(hdr), task)
        if ev is P.NEED_DATA:  # a read reply: the data follows into the bio's page
            data = await self.sock_xmit_recv(task, req.bio.length)
            if len(data) < req.bio.length:
                raise ConnectionError(f"connection closed by the server ({sock.error or 'EOF'})")
            self.tx.receive_data(data)
            ev = self.tx.next_event()
        return ev, req

    async def nbd_find_request(self, cookie: int, task: Task) -> Request:
        """nbd_find_request(): wait while the request is still being sent
        (active_req), then take it off the in-flight list."""
        if self.active_req is not None and self.active_req.cookie == cookie:
            await task.sleep_on(self.active_wq, lambda: self.active_req is None
                                or self.active_req.cookie != cookie,
                                wchan="nbd_find_request(active_wq)")
        req = self.queue_head.pop(cookie, None)
        if req is None:
            raise P.ProtocolError(f"reply for unknown handle {cookie}")
        return req

    def nbd_end_request(self, ev: P.Reply, req: Request, task: Task) -> None:
        k = self.k
        if not self.queue_head and self.active_req is not None:
            self._exposed_since = trio.current_time()  # the send in progress is exposed
        latency = trio.current_time() - req.started
        self.latencies.append(latency)
        self.replies += 1
        k.vmstat["nbd_replies"] += 1
        k.vmstat["nbd_inflight"] = len(self.waiting_queue) + len(self.queue_head)
        error = 0
        if ev.error:
            error = NBD_EIO
            k.vmstat["nbd_errors"] += 1
            log.warning("nbd_error", cookie=ev.cookie, error=ev.error)
        elif req.bio.rw == READ:
            req.bio.data = ev.data
        if debug_enabled():
            log.debug("nbd_reply", cookie=ev.cookie, error=ev.error, latency_s=round(latency, 6))
        self.end_request(req, error, task)

    def _harderror(self, why: str, task: Task) -> None:
        """nbd_clear_que: fail everything with -EIO."""
        if self.harderror:
            return
        self.harderror = NBD_EIO
        log.error("nbd_error", error="harderror", reason=why,
                  inflight=len(self.queue_head), queued=len(self.waiting_queue))
        for cookie, req in list(self.queue_head.items()):
            del self.queue_head[cookie]
            self.k.vmstat["nbd_errors"] += 1
            self.end_request(req, NBD_EIO, task)
        while self.waiting_queue:
            self.k.vmstat["nbd_errors"] += 1
            self.end_request(self.waiting_queue.popleft(), NBD_EIO, task)
        self.k.vmstat["nbd_inflight"] = 0

    # -- introspection -----------------------------------------------------------------
    def latency_summary(self) -> dict:
        lat = sorted(self.latencies)
        if not lat:
            return {"count": 0, "p50_s": None, "p99_s": None, "max_s": None}
        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 6)
        return {"count": len(lat), "p50_s": pct(0.50), "p99_s": pct(0.99),
                "max_s": round(lat[-1], 6)}

    def statistics(self) -> dict:
        now = trio.current_time()
        inflight = sorted(self.queue_head.items())
        return {
            "queued": len(self.waiting_queue),
            "inflight": len(inflight),
            "requests_allocated": self.count,
            "requests_sync": self.rl_count[BLK_RW_SYNC],
            "requests_async": self.rl_count[BLK_RW_ASYNC],
            "congested": self.congested,
            "oldest": [
                {"cookie": c, "cmd": "read" if r.bio.rw == READ else "write",
                 "offset": r.bio.offset, "age_s": round(now - r.started, 3)}
                for c, r in inflight[:8]
            ],
            "active_req": self.active_req.cookie if self.active_req else None,
            "harderror": self.harderror,
            "sender_stalls": self.sender_stalls.summary(),
            "sender_exposed_s": (None if self._exposed_since is None or self.active_req is None
                                 else round(now - self._exposed_since, 3)),
            "sender_send": None if self.active_req is None else self._send_deltas(),
        }
