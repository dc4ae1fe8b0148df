"""The 3.5 TCP socket: ownership, the backlog and its bound, ACKs, the send buffer,
the prequeue and the delayed-ACK timer (net/sock.py, net/tcp.py), over a real
loopback connection whose peer the test drives.

Each test asserts a rule that would break if the mechanism were wrong; the
timeouts only bound how long a test waits for something that must happen.
"""

from __future__ import annotations

import pytest
import trio
from netmem_helpers import hold_free_at, release
from tcp_helpers import MSS, run_as, tcp_on_nic, wait_until

from emulator.flags import GFP_ATOMIC, GFP_NOIO, PF
from emulator.mm.page_alloc import gfp_pfmemalloc_allowed
from net.tcp import TCP_RTO_MIN

REPLY = b"r" * 16  # an NBD simple reply: one small frame
HZ_FAST = "time.hz_scale=0.1"  # retransmission timeouts of 20 ms


async def test_a_sender_in_direct_reclaim_keeps_the_socket():
    """3.5's GFP_NOIO sender stalls in the allocator inside tcp_sendmsg: it keeps
    ownership, the reader sleeps in lock_sock, a reply that arrives meanwhile goes to
    the backlog and is processed by the sender's release_sock, in the sender's
    context with softirqs disabled (in_interrupt, not serving a softirq)."""
    async with tcp_on_nic("vanilla") as n:
        k, sock = n.k, n.sock
        sender = k.new_task("nbd0", PF.KTHREAD, cpu=1)
        reader = k.new_task("nbd-client", cpu=0)
        sock.sk_allocation = GFP_NOIO
        seen = []
        do_rcv = sock.tcp_v4_do_rcv

        async def recording(skb, task):
            seen.append((task.comm, task.in_interrupt(), task.in_serving_softirq()))
            await do_rcv(skb, task)

        sock.tcp_v4_do_rcv = recording
        held = hold_free_at(k, k.pgdat.zone.watermark[0] // 4)
        got = []

        async def read(task):
            got.append(await sock.tcp_recvmsg(task, len(REPLY), waitall=True))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_as, sender, sock.tcp_sendmsg, b"w" * 4096)
            await wait_until(lambda: sender.allocstall > 0)
            assert sock.owner is sender
            nursery.start_soon(run_as, reader, read)
            await wait_until(lambda: reader.wchan == "lock_sock(nbd0)")
            n.peer_send(REPLY)
            await n.poll()
            assert len(sock.backlog) == 1 and not sock.receive_queue and not seen
            assert k.vmstat["tcp_backlog_queued"] == 1
            await trio.sleep(0.2)
            assert sock.owner is sender and not got  # still stalled, still owning
            release(k, held)
        assert got == [REPLY]
        assert seen[0] == ("nbd0", True, False)


async def test_backlog_past_its_bound_drops_and_the_peer_retransmits():
    """While the socket is owned, frames join the backlog until backlog + receive
    queue exceed sk_rcvbuf + sk_sndbuf (the arriving frame not counted); the next
    is dropped (TCPBacklogDrop), its bytes go back to the peer, which retransmits
    after its RTO (doubling while the drops go on); after release_sock the
    retransmission gets through."""
    async with tcp_on_nic("vanilla", "slub", HZ_FAST) as n:
        k, sock = n.k, n.sock
        holder = k.new_task("holder", cpu=1)
        await sock.lock_sock(holder)
        limit = sock.sk_rcvbuf + sock.sk_sndbuf
        while k.vmstat["tcp_backlog_drop"] == 0:
            n.peer_send(REPLY)
            await n.poll()
        queued = len(sock.backlog)
        assert sock.backlog_len > limit - 768 and sock.backlog_len - 768 <= limit
        assert sock.drops == {"backlog": 1}
        # The lost frame goes back to the peer, which sends it again first.
        assert sock.resend == [(queued * len(REPLY), REPLY)]
        t0 = trio.current_time()
        assert sock.peer_resume_at - t0 == pytest.approx(k.hz(TCP_RTO_MIN), abs=0.01)
        await n.poll()
        assert len(sock.backlog) == queued  # nothing before the retransmission
        await trio.sleep(k.hz(TCP_RTO_MIN))
        await n.poll()  # retransmitted, still owned and full: lost again
        assert sock.drops["backlog"] == 2
        assert sock.peer_resume_at - trio.current_time() == pytest.approx(
            k.hz(2 * TCP_RTO_MIN), abs=0.01)
        await run_as(holder, sock.release_sock)
        assert not sock.backlog and sock.backlog_len == 0
        assert len(sock.receive_queue) == queued  # processed by release_sock
        await trio.sleep(k.hz(2 * TCP_RTO_MIN))
        await n.poll()
        assert sock.rcv_nxt == (queued + 1) * len(REPLY)
        assert sock.consecutive_drops == 0


async def test_acks_free_transmit_skbs_not_while_owned():
    """A transmit skb stays charged until the peer's ACK is processed by TCP, which
    needs no reply: a pure ACK frame frees it. While the socket is owned the ACK
    waits in the backlog, and the skb with it."""
    async with tcp_on_nic("vanilla") as n:
        k, sock = n.k, n.sock
        writer = k.new_task("nbd0", PF.KTHREAD, cpu=1)
        await run_as(writer, sock.tcp_sendmsg, b"w" * 4096)
        assert len(sock.write_queue) == 1 and sock.wmem_queued > 4096
        await n.wait_acked()  # the real peer acknowledged it (SIOCOUTQ)
        holder = k.new_task("holder", cpu=1)
        await sock.lock_sock(holder)
        await n.poll()  # a pure ACK frame (no data: the peer sent no reply)
        assert len(sock.backlog) == 1 and sock.backlog[0].end_seq == sock.backlog[0].seq
        assert len(sock.write_queue) == 1  # not freed while owned
        await run_as(holder, sock.release_sock)
        assert not sock.write_queue and sock.wmem_queued == 0
        assert sock.snd_una == sock.raw_sent == 4096
        # The next send's ACK arrives unowned: processed in the softirq at once.
        await run_as(writer, sock.tcp_sendmsg, b"w" * 100)
        await n.wait_acked()
        await n.poll()
        assert not sock.write_queue and not sock.backlog


async def test_a_write_is_one_corked_skb_sent_by_the_second_call():
    """nbd_send_req: the 28-byte header with MSG_MORE stays corked in a new skb; the
    data call appends to that skb (linear room first, then a page fragment) and
    pushes it: one fast-clone skb of 4124 bytes, truesize 2304 + 2700."""
    async with tcp_on_nic("swapnbd") as n:
        k, sock = n.k, n.sock
        t = k.new_task("nbd0", PF.KTHREAD, cpu=1)
        await run_as(t, sock.tcp_sendmsg, b"h" * 28, True)
        assert len(sock.write_queue) == 1 and not sock.write_queue[0].sent
        assert sock.raw_sent == 0  # corked: nothing on the wire
        await run_as(t, sock.tcp_sendmsg, b"d" * 4096)
        (skb,) = sock.write_queue
        assert skb.sent and skb.end_seq - skb.seq == 4124
        assert skb.head_cache is k.slab.skbuff_fclone_cache
        assert skb.truesize == 2304 + (4124 - 1424)
        assert len(skb.frags) == 1 and sock.sndmsg_page is skb.frags[0]
        data = b""
        while len(data) < 4124:
            data += n.peer.recv(8192)
        assert data == b"h" * 28 + b"d" * 4096


async def test_a_full_send_buffer_waits_with_the_socket_released():
    """sk_stream_wait_memory: a writer that fills sk_sndbuf sleeps with ownership
    released (others may lock the socket); the ACKs that free its skbs wake it
    through tcp_new_space, which also grows sk_sndbuf with the congestion window."""
    async with tcp_on_nic("vanilla") as n:
        k, sock = n.k, n.sock
        writer = k.new_task("nbd0", PF.KTHREAD, cpu=1)
        sndbuf0 = sock.sk_sndbuf
        chunks = sndbuf0 // 4096 + 2
        async with trio.open_nursery() as nursery:
            async def write_all(task):
                for _ in range(chunks):
                    await sock.tcp_sendmsg(task, b"w" * 4096)

            nursery.start_soon(run_as, writer, write_all)
            await wait_until(lambda: writer.wchan == "sk_stream_wait_memory(nbd0)")
            assert sock.owner is None and sock.nospace
            assert sock.wmem_queued >= sndbuf0
            other = k.new_task("other", cpu=0)
            await sock.lock_sock(other)  # the socket is free to take
            await run_as(other, sock.release_sock)
            while writer.wchan is not None or len(sock.write_queue) < chunks - 1:
                await n.wait_acked()
                await n.poll()
                await trio.sleep(0.001)
                if sock.write_seq == chunks * 4096:
                    break
        assert sock.write_seq == chunks * 4096
        assert sock.sk_sndbuf > sndbuf0  # tcp_new_space grew it


async def test_a_waiting_reader_gets_segments_on_its_prequeue():
    """tcp_prequeue: while the reader sleeps in tcp_recvmsg, a segment for the
    unowned socket is not processed in the softirq but parked for the reader,
    which processes it in its own context (softirqs disabled) and copies it
    straight to its buffer."""
    async with tcp_on_nic("vanilla", "slub", name="bg0") as n:
        k, sock = n.k, n.sock
        reader = k.new_task("netreader", cpu=1)
        seen = []
        do_rcv = sock.tcp_v4_do_rcv

        async def recording(skb, task):
            seen.append((task.comm, task.in_interrupt(), task.in_serving_softirq()))
            await do_rcv(skb, task)

        sock.tcp_v4_do_rcv = recording
        got = []
        async with trio.open_nursery() as nursery:
            async def read(task):
                got.append(await sock.tcp_recvmsg(task, 100, waitall=False))

            nursery.start_soon(run_as, reader, read)
            await wait_until(lambda: reader.wchan is not None and sock.ucopy_task is reader)
            n.peer_send(b"x" * 100)
            await n.poll()
            assert len(sock.prequeue) == 1 and not seen  # parked, not processed here
            assert k.vmstat["tcp_prequeued"] == 1
        assert got == [b"x" * 100]
        assert seen == [("netreader", True, False)]
        assert not sock.receive_queue and sock.rmem_alloc == 0  # copied straight to the user


@pytest.mark.parametrize("patches,expect_memalloc", [("swapnbd", True),
                                                     ("[1,2,3,4,5,6,7,8,9,10,11,13,14,15,16]",
                                                      False)])
async def test_patch_12_backlog_pf_memalloc(patches, expect_memalloc):
    """__sk_backlog_rcv (patch 12): a pfmemalloc skb from the backlog of a
    SOCK_MEMALLOC socket is processed with PF_MEMALLOC set, restored after. In
    process context with softirqs disabled in_interrupt() is true, so the flag
    grants no reserves there, as in the kernel."""
    async with tcp_on_nic("swapnbd", "slub", f"kernel.patches={patches}") as n:
        k, sock = n.k, n.sock
        sock.sk_set_memalloc()
        for skb in n.nic.ring:
            skb.pfmemalloc = True  # buffers the driver refilled from the reserves
        holder = k.new_task("nbd-client", cpu=1)
        await sock.lock_sock(holder)
        n.peer_send(b"x" * 1000)  # a full-size frame: it goes up in its ring buffer
        await n.poll()
        (skb,) = sock.backlog
        assert skb.pfmemalloc
        flags = []
        do_rcv = sock.tcp_v4_do_rcv

        async def recording(skb, task):
            flags.append((bool(task.flags & PF.MEMALLOC),
                          gfp_pfmemalloc_allowed(GFP_ATOMIC, task, k.patches)))
            await do_rcv(skb, task)

        sock.tcp_v4_do_rcv = recording
        await run_as(holder, sock.release_sock)
        assert flags == [(expect_memalloc, False)]
        assert not holder.flags & PF.MEMALLOC


async def test_the_delayed_ack_timer_on_an_owned_socket_is_blocked_and_rearmed():
    """3.5's tcp_delack_timer: on an owned socket it only marks the ACK blocked
    (DelayedACKLocked) and re-arms in TCP_DELACK_MIN; once unowned it sends the ACK,
    which advertises the window the peer may use."""
    async with tcp_on_nic("vanilla", "slub", HZ_FAST, name="bg0") as n:
        k, sock = n.k, n.sock
        n.peer_send(b"x" * 100)  # less than a segment: the ACK is delayed
        await n.poll()
        assert sock.ack_sched and sock.delack_at is not None
        holder = k.new_task("holder", cpu=1)
        await sock.lock_sock(holder)
        await trio.sleep_until(sock.delack_at)
        await n.poll()
        assert k.vmstat["delayed_ack_locked"] == 1 and sock.ack_blocked
        assert sock.ack_sched and sock.delack_at > trio.current_time()
        await run_as(holder, sock.release_sock)
        await trio.sleep_until(sock.delack_at)
        await n.poll()
        assert k.vmstat["delayed_acks"] == 1 and not sock.ack_sched
        assert sock.rcv_wup == sock.rcv_nxt == 100


async def test_our_window_bounds_what_the_peer_may_send():
    """The NIC takes only what fits the window we last advertised; the window
    reopens with the ACK we send once the reader has drained the queue."""
    async with tcp_on_nic("vanilla", "slub", name="bg0") as n:
        k, sock = n.k, n.sock
        n.peer.setblocking(False)
        n.peer.send(b"x" * 200_000)
        n.peer.settimeout(5)
        for _ in range(5):
            await n.poll()
        edge = sock.rcv_wup + sock.rcv_wnd
        assert sock.raw_seq == edge <= sock.window_clamp + 8 * MSS
        assert n.pending_bytes() > 0  # the rest waits with the peer
        reader = k.new_task("netreader", cpu=1)
        await run_as(reader, lambda t: sock.tcp_recvmsg(t, sock.raw_seq, waitall=True))
        assert sock.rcv_wup + sock.rcv_wnd > edge  # the window update went out
        await n.poll()
        assert sock.raw_seq > edge


async def test_a_backlog_drained_before_the_prequeue_goes_out_of_order():
    """A segment parked on the reader's prequeue, then the socket taken by another
    task before the reader runs: the next segment goes to the backlog and is
    processed first, beyond the gap, so it waits on the out-of-order queue (and we
    ACK at once); the reader then processes the prequeue and gets both in order."""
    async with tcp_on_nic("vanilla", "slub", name="bg0") as n:
        k, sock = n.k, n.sock
        reader = k.new_task("netreader", cpu=1)
        holder = k.new_task("holder", cpu=1)
        got = []
        async with trio.open_nursery() as nursery:
            async def read(task):
                got.append(await sock.tcp_recvmsg(task, 200, waitall=True))

            nursery.start_soon(run_as, reader, read)
            await wait_until(lambda: reader.wchan is not None and sock.ucopy_task is reader)
            n.peer_send(b"a" * 100)
            await n.poll()
            assert len(sock.prequeue) == 1
            await sock.lock_sock(holder)  # before the woken reader gets to run
            n.peer_send(b"b" * 100)
            await n.poll()
            assert len(sock.backlog) == 1
            await run_as(holder, sock.release_sock)
            assert len(sock.ofo) == 1 and k.vmstat["tcp_ofo_queued"] == 1
        assert got == [b"a" * 100 + b"b" * 100]
        assert not sock.ofo and not sock.drops and sock.rmem_alloc == 0


async def test_a_reader_takes_no_more_than_it_asked_for():
    """The prequeue's direct copy fills the reader's buffer only up to the length it
    asked for, however the bytes before reached it. Here the first reply goes to
    the receive queue (the socket's owner processes it from the backlog) and the
    second to the prequeue: nbd_read_stat's 16-byte read must return one reply,
    not two (a stale ucopy length once let the second one in)."""
    async with tcp_on_nic("vanilla", "slub") as n:
        k, sock = n.k, n.sock
        reader = k.new_task("nbd-client", cpu=1)
        holder = k.new_task("nbd0", cpu=1)
        got = []
        async with trio.open_nursery() as nursery:
            async def read(task):
                with trio.fail_after(5):
                    got.append(await sock.tcp_recvmsg(task, 16, waitall=True))
                    got.append(await sock.tcp_recvmsg(task, 16, waitall=True))

            nursery.start_soon(run_as, reader, read)
            await wait_until(lambda: reader.wchan is not None and sock.ucopy_task is reader)
            await sock.lock_sock(holder)
            n.peer_send(b"1" * 16)
            await n.poll()  # owned: to the backlog
            await holder.cpu.acquire(holder)  # the reader's CPU: it cannot run yet
            await sock.release_sock(holder)  # processed by nbd0: receive queue
            assert len(sock.receive_queue) == 1
            n.peer_send(b"2" * 16)
            await n.poll()  # unowned, the reader still installed: its prequeue
            assert len(sock.prequeue) == 1 and sock.ucopy_task is reader
            holder.cpu.release(holder)
        assert got == [b"1" * 16, b"2" * 16]
