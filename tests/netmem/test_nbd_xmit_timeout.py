"""NBD_SET_TIMEOUT (swap.timeout_s): 3.x's xmit timer around each send.

A send that waits for send-buffer space (sk_stream_wait_memory, an
interruptible sleep) is ended by the timer's SIGKILL: the driver shuts the
socket down and fails the request. A vanilla sender sleeping in direct reclaim
inside the same send is not: 3.5's page allocator has no fatal-signal exit, so
the signal waits until the allocation succeeds, and only then does the send
end and the socket go down.

The waits here bound how long a test waits for something that must happen;
they are not performance thresholds.
"""

from __future__ import annotations

import trio
from netmem_helpers import hold_free_at, release
from tcp_helpers import run_as, tcp_on_nic, wait_until

import nbdproto as P
from actors.kthreadd import KthreaddNursery
from drivers.block.nbd import NBDDevice
from emulator.block import Bio, Request

XMIT_TIMEOUT_S = 0.2


class Device(NBDDevice):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.ended: list[int] = []

    def end_request(self, req: Request, error: int, task) -> None:
        self.ended.append(error)  # no bio or request pool behind these requests


def write_request() -> Request:
    bio = Bio(None)
    bio.prepare_write(0, b"\0" * 4096, None, None)
    return Request(bio, None)


def device(net, nursery) -> Device:
    """The device with NBD_SET_TIMEOUT as nbd-client sets it from swap.timeout_s, and
    kthreadd running its timers in the test's nursery."""
    net.k.kthreadd = KthreaddNursery(nursery)
    dev = Device(net.k, net.sock, P.ExportInfo(name="", size=1 << 30, flags=0), mss=1448)
    dev.nbd_set_timeout(XMIT_TIMEOUT_S)
    return dev


async def test_the_timer_ends_a_send_waiting_for_buffer_space(nursery):
    async with tcp_on_nic("swapnbd", "slub") as net:
        dev = device(net, nursery)
        assert dev.xmit_timeout == 0.2
        net.sock.wmem_queued = net.sock.sk_sndbuf  # the send buffer is full, no ACK comes
        sender = net.k.new_task("nbd0")
        with trio.fail_after(10):
            await run_as(sender, lambda t: dev.nbd_handle_req(write_request(), t))
        assert dev.ended == [5]  # -EIO
        assert dev.failed == {"write": 1}
        assert dev.sock is None and net.sock.shut_down  # sock_shutdown
        assert net.k.vmstat["nbd_xmit_timeouts"] == 1
        assert not sender.fatal_signal  # dequeued by sock_xmit
        net.peer.settimeout(5)
        assert net.peer.recv(100) == b""  # the real connection was shut down


async def test_the_timer_cannot_end_direct_reclaim(nursery):
    """Vanilla: the sender's GFP_NOIO allocation below min loops in direct reclaim.
    SIGKILL is pending after the timeout, and the sender is still in the allocator."""
    async with tcp_on_nic("vanilla", "slub", open_ring=False) as net:
        k = net.k
        dev = device(net, nursery)
        held = hold_free_at(k, k.pgdat.zone.watermark[0] // 4)
        sender = k.new_task("nbd0")
        done = trio.Event()

        async def send() -> None:
            await run_as(sender, lambda t: dev.nbd_handle_req(write_request(), t))
            done.set()

        nursery.start_soon(send)
        await wait_until(lambda: sender.fatal_signal, timeout=10)  # the timer fired
        await trio.sleep(0.3)
        assert not done.is_set() and sender.activity is not None  # still reclaiming
        assert dev.sock is net.sock and not dev.ended
        release(k, held)  # memory comes back: the allocation succeeds, the send ends
        with trio.fail_after(10):
            await done.wait()
        assert dev.ended == [5] and dev.sock is None
