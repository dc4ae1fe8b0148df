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
context.

When the connection fails (3.5's NBD_DO_IT, drivers/block/nbd.c): the
receiver's nbd_read_stat fails and sets ``harderror``; NBD_DO_IT then stops
nbd_thread with kthread_stop, which first drains ``waiting_queue`` (each
request is sent on the dead socket and fails with -EIO), shuts the socket
down (sock_shutdown: ``nbd->sock = NULL``), and fails every request still
awaiting a reply (nbd_clear_que, which in 3.5 looks at ``queue_head`` only;
3.6 also purges ``waiting_queue`` there, a change outside the 16 patches
that matters only for NBD_CLEAR_SOCK, so every kernel here has 3.5's).
From then on do_nbd_request fails each new request at once ("Attempted send
on closed socket"). NBD_DO_IT returns to nbd-client, which exits or, with
``-persist``, reconnects (actors/nbdclient.py).

NBD_SET_TIMEOUT (``swap.timeout_s``, ``xmit_timeout``; 0, the default, is
none): sock_xmit arms a timer around each *send* (kernel_sendmsg); if it
fires, nbd_xmit_timeout sends SIGKILL to the sending task, and once the send
returns sock_xmit shuts the socket down, which fails the outstanding requests
as above. The signal ends only interruptible sleeps (sk_stream_wait_memory's);
a sender sleeping in the page allocator's direct reclaim is not broken out
of it (3.5's allocator has no fatal-signal exit there), and receives are
never timed.

Patch 14: nbd_do_it calls sk_set_memalloc on the socket, and sock_xmit runs,
for sending and receiving, with PF_MEMALLOC and sk_allocation = GFP_NOIO |
__GFP_MEMALLOC. Without it, sock_xmit sets sk_allocation = GFP_NOIO and
nothing else: the 3.5 sender may sleep in direct reclaim while it owns the
socket, and then no reply can be processed before it lets go.

Every byte goes through the emulated TCP socket (net/tcp.py): requests are
sent as skbs charged to emulated memory and held until TCP processes the
peer's ACK for them; replies arrive in skbs the NIC's receive path allocated.
The reply decoder is the sans-I/O ``TransmissionClient`` of nbdproto/.

Emulator accounting of the sender's stalls (sends during which it entered
direct reclaim) is drivers/block/nbd_sender_stalls.py's; the driver tells it when a send
begins and ends and when a reply leaves nothing in flight.

Errors: a reply with an error and a request the driver fails itself both end
the request with -EIO; the first are counted by command and NBD errno
(``errors``), the second by command (``failed``). Their messages are
rate-limited as printk_ratelimited would (emulator/printk.py); the counts
are exact.

Simplified: the handshake (done by the userspace nbd-client before
NBD_SET_SOCK in the kernel) is not charged to emulated memory; request
handles are counters, not request pointers.
"""

from __future__ import annotations

import errno
import itertools
import os
from array import array
from collections import Counter, deque
from typing import TYPE_CHECKING

import attrs
import structlog
import trio

import nbdproto as P
from drivers.block.nbd_sender_stalls import SenderStallMonitor, SenderStallSummary
from emulator.block import BLK_RW_ASYNC, BLK_RW_SYNC, READ, BlockDevice, Request
from emulator.flags import GFP, GFP_NOIO, PF
from emulator.patches import NBD_SOCK_MEMALLOC
from emulator.printk import debug_enabled
from emulator.task import Task
from emulator.wait import WaitQueue
from net.tcp import TcpSock

if TYPE_CHECKING:
    from emulator.kernel import Kernel

log = structlog.get_logger("swapnbd.nbd")

NBD_EIO = 5


def _cmd_name(req: Request) -> str:
    return "read" if req.bio.rw == READ else "write"


def _lost(sock: TcpSock | None) -> str:
    """Why a receive came back short, in words."""
    if sock is None or sock.shut_down:
        return "the socket was shut down"
    if sock.error:
        return f"{errno.errorcode.get(sock.error, sock.error)} ({os.strerror(sock.error)})"
    return "connection closed by the server (end of file)"


@attrs.frozen
class LatencySummary:
    """NBD request latencies (send to reply), seconds."""

    count: int
    p50_s: float | None
    p99_s: float | None
    max_s: float | None


@attrs.frozen
class InflightRequest:
    cookie: int
    cmd: str  #: "read" | "write"
    offset: int
    age_s: float  #: since it was sent


@attrs.frozen
class NBDStatistics:
    """The NBD device's queues and state, as the lockup diagnosis reads them."""

    queued: int  #: on waiting_queue, not yet sent
    inflight: int  #: sent, awaiting a reply (queue_head)
    requests_allocated: int
    requests_sync: int  #: swap-in reads
    requests_async: int  #: swap-out writes
    congested: bool  #: the bdi's write congestion
    oldest: tuple[InflightRequest, ...]  #: the oldest requests in flight (up to 8)
    active_req: int | None  #: the request being sent
    harderror: int
    connected: bool
    errors: dict  #: "cmd errno (server)" / "cmd (driver)" -> count
    sender_stalls: SenderStallSummary
    sender_exposed_s: float | None  #: how long the send in progress has had nothing in flight
    sender_send: dict | None  #: pages freed / taken below min since that send began


class NBDDevice(BlockDevice):
    name = "nbd0"

    def __init__(self, k: Kernel, sock: TcpSock | None, info: P.ExportInfo, mss: int) -> None:
        super().__init__(k)
        self.sock: TcpSock | None = sock  #: nbd->sock: None once shut down
        self.info = info
        self.mss = mss
        #: nbd->xmit_timeout, in kernel seconds (0: none); nbd-client's NBD_SET_TIMEOUT
        self.xmit_timeout = 0.0
        self.waiting_queue: deque[Request] = deque()
        self.waiting_wq = WaitQueue("nbd.waiting_wq")
        self.queue_head: dict[int, Request] = {}  #: sent, awaiting a reply
        self.tx = P.TransmissionClient()
        self._cookies = itertools.count(1)
        self.active_req: Request | None = None
        self.active_wq = WaitQueue("nbd.active_wq")
        self.harderror = 0  #: nbd->harderror: why the receiver stopped (sticky, as in 3.5)
        self.kthread_should_stop = False
        self.next_thread: Task | None = None  #: a task made ahead for the next nbd_thread
        #: error replies, by (command, NBD errno name)
        self.errors: Counter[tuple[str, str]] = Counter()
        #: requests the driver failed itself (no socket, send failed, queue cleared),
        #: by command
        self.failed: Counter[str] = Counter()
        self.connections = 1 if sock is not None else 0
        self.lost: list[dict] = []  #: each connection lost: t, reason
        self.latencies = array("d")
        self.requests = 0
        self.replies = 0
        self.sender_stalls = SenderStallMonitor(k)  #: emulator accounting (sender_stalls.py)

    # -- submission -------------------------------------------------------------------
    async def request_fn(self, req: Request, task: Task) -> None:
        """do_nbd_request: hand the request to nbd_thread, or fail it at once when
        there is no socket ("Attempted send on closed socket")."""
        if self.sock is None:
            self._fail(req, "no connection", task)
            return
        self.waiting_queue.append(req)
        self.k.vmstat["nbd_inflight"] = len(self.waiting_queue) + len(self.queue_head)
        self.waiting_wq.wake_up()

    async def nbd_thread(self, task: Task) -> None:
        """The nbd0 kernel thread: send queued requests one at a time, at nice -20
        (set_user_nice(current, -20), as nbd_thread has done since 2.6.26), until
        kthread_stop, and then until waiting_queue is empty."""
        task.set_user_nice(-20)
        while not self.kthread_should_stop or self.waiting_queue:
            await task.sleep_on(self.waiting_wq,
                                lambda: self.kthread_should_stop or bool(self.waiting_queue),
                                wchan="nbd_thread(waiting_wq)")
            if not self.waiting_queue:
                continue
            req = self.waiting_queue.popleft()
            await self.nbd_handle_req(req, task)
            await task.cond_resched()

    async def nbd_handle_req(self, req: Request, task: Task) -> None:
        """nbd_handle_req(): send the request (it owns nbd->tx_lock meanwhile, as
        active_req), then put it on the in-flight list; a send that fails ends the
        request with -EIO ("Request send failed") and nothing else."""
        k = self.k
        bio = req.bio
        cmd = P.NBD_CMD_READ if bio.rw == READ else P.NBD_CMD_WRITE
        cookie = next(self._cookies)
        req.cookie = cookie
        if self.sock is None:
            self._fail(req, "no connection", task)
            return
        wire = self.tx.send_request(cmd, cookie, bio.offset, bio.length, 0,
                                    bio.data if cmd == P.NBD_CMD_WRITE else b"")
        req.started = trio.current_time()
        self.active_req = req
        self.sender_stalls.send_begins(req, task, in_flight=bool(self.queue_head))
        try:
            await self.nbd_send_req(wire, cmd, task)
        except (ConnectionError, InterruptedError) as e:
            self._clear_active()
            self.sender_stalls.send_ends(req, task, accounted=False)
            self._fail(req, f"send failed: {e}", task)
            return
        self.sender_stalls.send_ends(req, task)
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

    def _sock_xmit_begin(self, task: Task) -> int:
        """sock_xmit(): sk_allocation GFP_NOIO; patch 14 adds __GFP_MEMALLOC and runs the
        whole call with PF_MEMALLOC. Returns the task's PF_MEMALLOC to restore."""
        patched = self.k.patches.has(NBD_SOCK_MEMALLOC)
        if self.sock is not None:
            self.sock.sk_allocation = GFP_NOIO | GFP.MEMALLOC if patched else GFP_NOIO
        saved = task.flags & PF.MEMALLOC
        if patched:
            task.flags |= PF.MEMALLOC
        return saved

    async def sock_xmit(self, task: Task, data: bytes, *, more: bool = False) -> None:
        """sock_xmit(send): one kernel_sendmsg (tcp_sendmsg), under the xmit timer
        when NBD_SET_TIMEOUT set one. A fatal signal pending when the send returns
        (the timer's SIGKILL) shuts the socket down: -EINTR."""
        sock = self.sock
        if sock is None:
            raise ConnectionError("Attempted send on closed socket in sock_xmit")
        saved = self._sock_xmit_begin(task)
        try:
            if self.xmit_timeout:
                # add_timer(): a timer outside the task
                timer = self.k.kthreadd.add_timer(lambda: self._xmit_timer(task, sock))
                try:
                    await sock.tcp_sendmsg(task, data, more)
                finally:
                    timer.cancel()  # del_timer_sync
            else:
                await sock.tcp_sendmsg(task, data, more)
        except InterruptedError:
            pass  # the signal is dealt with below
        finally:
            task.flags = (task.flags & ~PF.MEMALLOC) | saved
        if task.fatal_signal:
            signame = task.signal or "SIGKILL"
            task.fatal_signal = False  # dequeue_signal_lock
            task.signal = None
            log.warning("nbd_got_signal", pid=task.pid, comm=task.comm, signal=signame)
            self.sock_shutdown()
            raise InterruptedError(f"{signame} during the send (xmit timeout)")

    async def _xmit_timer(self, task: Task, sock: TcpSock) -> None:
        """nbd_xmit_timeout(): after xmit_timeout, "killing hung xmit": SIGKILL to the
        sender, which wakes it only where it sleeps interruptibly."""
        await trio.sleep(self.k.hz(self.xmit_timeout))
        self.k.vmstat["nbd_xmit_timeouts"] += 1
        log.warning("nbd_xmit_timeout", pid=task.pid, comm=task.comm,
                    timeout_s=self.xmit_timeout, wchan=task.wchan, activity=task.activity)
        task.fatal_signal = True  # force_sig(SIGKILL, task)
        task.signal = "SIGKILL"
        sock.sk_sleep.wake_up()  # signal_wake_up: an interruptible sleeper wakes

    async def sock_xmit_recv(self, task: Task, length: int) -> bytes:
        """sock_xmit(receive): one kernel_recvmsg (tcp_recvmsg, MSG_WAITALL)."""
        sock = self.sock
        if sock is None:
            return b""  # "Attempted recv on closed socket": -EINVAL, a short read
        saved = self._sock_xmit_begin(task)
        try:
            return await sock.tcp_recvmsg(task, length, waitall=True,
                                          wchan="nbd_read_stat(sk_wait_data)")
        finally:
            task.flags = (task.flags & ~PF.MEMALLOC) | saved

    # -- completion --------------------------------------------------------------------
    def nbd_set_timeout(self, seconds: float) -> None:
        """NBD_SET_TIMEOUT: the xmit timeout for every later send (0: none)."""
        self.xmit_timeout = seconds

    async def nbd_ioctl_do_it(self, task: Task) -> int:
        """NBD_DO_IT, in nbd-client's context: start nbd_thread (a new nbd0 kernel
        thread), receive replies until the connection fails, stop the thread (it
        drains waiting_queue first), sock_shutdown, nbd_clear_que. Returns
        harderror (0 if none), as the ioctl does."""
        k = self.k
        thread, self.next_thread = self.next_thread, None
        if thread is None:
            thread = k.new_task("nbd0", PF.KTHREAD)
        self.kthread_should_stop = False
        stopped = trio.Event()

        async def threadfn(t: Task) -> None:
            try:
                await self.nbd_thread(t)
            finally:
                stopped.set()

        self.k.kthreadd.kthread_run(thread, threadfn)  # kthread_create + wake_up_process
        await self.nbd_do_it(task)
        self.kthread_should_stop = True  # kthread_stop()
        self.waiting_wq.wake_up()
        await task.sleep_until(stopped.wait, wchan="kthread_stop(nbd0)")
        old = self.sock
        self.sock_shutdown()
        self.nbd_clear_que(task)
        if old is not None:  # fput(file): the socket's memory goes back
            old.release(task)
            if k.netdev is not None:
                k.netdev.detach(old)
            old.close()
        return self.harderror

    async def nbd_do_it(self, task: Task) -> None:
        """nbd_do_it(): the receiver in the nbd-client process: read replies until
        nbd_read_stat fails, which sets harderror."""
        if self.k.patches.has(NBD_SOCK_MEMALLOC) and self.sock is not None:
            self.sock.sk_set_memalloc()
        while True:
            try:
                ev, req = await self.nbd_read_stat(task)
            except (ConnectionError, P.ProtocolError) as e:
                self.harderror = NBD_EIO
                k = self.k
                k.vmstat["nbd_connection_lost"] += 1
                self.lost.append({"t": round(k.uptime(), 3),
                                  "reason": str(e)})
                log.error("nbd_connection_lost", reason=str(e), inflight=len(self.queue_head),
                          queued=len(self.waiting_queue))
                return
            self.nbd_end_request(ev, req, task)
            await task.cond_resched()

    def sock_shutdown(self) -> None:
        """sock_shutdown(): "shutting down socket": kernel_sock_shutdown(SHUT_RDWR),
        nbd->sock = NULL."""
        if self.sock is not None:
            self.sock.kernel_sock_shutdown()
            self.sock = None

    def nbd_clear_que(self, task: Task) -> None:
        """nbd_clear_que() (3.5): every request awaiting a reply ends with -EIO.
        (waiting_queue was drained by nbd_thread before kthread_stop returned.)"""
        for cookie, req in list(self.queue_head.items()):
            del self.queue_head[cookie]
            self._fail(req, "queue cleared", task)
        self.k.vmstat["nbd_inflight"] = len(self.waiting_queue)

    def nbd_set_sock(self, sock: TcpSock, info: P.ExportInfo) -> None:
        """NBD_SET_SOCK (and NBD_SET_SIZE, NBD_SET_TIMEOUT) for a new connection, as
        nbd-client issues them before the next NBD_DO_IT."""
        self.sock = sock
        self.info = info
        self.tx = P.TransmissionClient()
        self.connections += 1

    async def nbd_read_stat(self, task: Task) -> tuple:
        """nbd_read_stat(): the 16-byte reply; nbd_find_request; a read's data."""
        sock = self.sock
        hdr = await self.sock_xmit_recv(task, P.SIMPLE_REPLY_SIZE)
        if len(hdr) < P.SIMPLE_REPLY_SIZE:
            raise ConnectionError(f"Receive control failed: {_lost(sock)}")
        self.tx.receive_data(hdr)
        ev = self.tx.next_event()  # a protocol error (bad magic, unknown handle) raises
        req = await self.nbd_find_request(P.reply_cookie(hdr), task)
        if ev is P.NEED_DATA:  # a read reply: the data follows into the bio's page
            data = await self.sock_xmit_recv(task, req.bio.length)
            if len(data) < req.bio.length:
                # "Receive data failed": the request ends with -EIO; the next
                # nbd_read_stat finds the connection gone.
                self._fail(req, "receive data failed", task)
                raise ConnectionError(f"Receive data failed: {_lost(sock)}")
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
        """nbd_end_request(): a read's data into its bio, an error reply as -EIO,
        then __blk_end_request_all: the bio's completion (end_swap_bio_*) runs in
        this (nbd-client's) context."""
        k = self.k
        if not self.queue_head and self.active_req is not None:
            self.sender_stalls.exposed()  # the send in progress has nothing in flight
        latency = trio.current_time() - req.started
        self.latencies.append(latency)
        self.replies += 1
        k.vmstat["nbd_replies"] += 1
        k.vmstat["nbd_inflight"] = len(self.waiting_queue) + len(self.queue_head)
        error = 0
        if ev.error:
            # "Other side returned error (%d)": req->errors++, -EIO to the bio.
            error = NBD_EIO
            cmd = _cmd_name(req)
            errno_name = P.ERROR_NAMES.get(ev.error, str(ev.error))
            self.errors[(cmd, errno_name)] += 1
            self._count_error(cmd)
            k.printk.ratelimited("warning", "nbd_error", cookie=ev.cookie, cmd=cmd,
                                 error=errno_name, source="server")
        elif req.bio.rw == READ:
            req.bio.data = ev.data
        if debug_enabled():
            log.debug("nbd_reply", cookie=ev.cookie, error=ev.error, latency_s=round(latency, 6))
        self.end_request(req, error, task)

    def _count_error(self, cmd: str) -> None:
        vm = self.k.vmstat
        vm["nbd_errors"] += 1
        vm["nbd_read_errors" if cmd == "read" else "nbd_write_errors"] += 1

    def _fail(self, req: Request, reason: str, task: Task) -> None:
        """req->errors++; nbd_end_request(): the driver fails the request with -EIO."""
        cmd = _cmd_name(req)
        self.failed[cmd] += 1
        self._count_error(cmd)
        self.k.printk.ratelimited("warning", "nbd_error", cookie=req.cookie, cmd=cmd,
                                  error="EIO", source="driver", reason=reason)
        self.end_request(req, NBD_EIO, task)

    def error_summary(self) -> dict:
        """For run_end: error replies by command and errno, requests the driver
        failed by command, the connections made and lost."""
        errors: dict[str, dict[str, int]] = {}
        for (cmd, errno_name), n in sorted(self.errors.items()):
            errors.setdefault(cmd, {})[errno_name] = n
        return {"errors": errors, "failed": dict(sorted(self.failed.items())),
                "connections": self.connections, "lost": list(self.lost),
                "reconnects": self.k.vmstat["nbd_reconnects"],
                "xmit_timeouts": self.k.vmstat["nbd_xmit_timeouts"]}

    # -- introspection -----------------------------------------------------------------
    def latency_summary(self) -> LatencySummary:
        lat = sorted(self.latencies)
        if not lat:
            return LatencySummary(count=0, p50_s=None, p99_s=None, max_s=None)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 6)
        return LatencySummary(count=len(lat), p50_s=pct(0.50), p99_s=pct(0.99),
                              max_s=round(lat[-1], 6))

    def statistics(self) -> NBDStatistics:
        now = trio.current_time()
        inflight = sorted(self.queue_head.items())
        return NBDStatistics(
            queued=len(self.waiting_queue), inflight=len(inflight),
            requests_allocated=self.count, requests_sync=self.rl_count[BLK_RW_SYNC],
            requests_async=self.rl_count[BLK_RW_ASYNC], congested=self.congested,
            oldest=tuple(InflightRequest(cookie=c, cmd="read" if r.bio.rw == READ else "write",
                                         offset=r.bio.offset, age_s=round(now - r.started, 3))
                         for c, r in inflight[:8]),
            active_req=self.active_req.cookie if self.active_req else None,
            harderror=self.harderror, connected=self.sock is not None,
            errors={**{f"{cmd} {e} (server)": n for (cmd, e), n in sorted(self.errors.items())},
                    **{f"{cmd} (driver)": n for cmd, n in sorted(self.failed.items())}},
            sender_stalls=self.sender_stalls.summary(),
            sender_exposed_s=self.sender_stalls.exposed_s() if self.active_req else None,
            sender_send=self.sender_stalls.send_deltas() if self.active_req else None)
