"""An NBD round trip over real loopback TCP with memory held at a quarter of min.

At that level GFP_ATOMIC (floor 3/8 of min) cannot allocate, so without the
series the request never leaves (the sender's GFP_NOIO allocations loop in
direct reclaim that cannot start I/O, owning the socket); with it, the NBD
socket is SOCK_MEMALLOC, the sender runs with PF_MEMALLOC and the NIC refills
its ring from the reserves, so the read completes. A packet for an ordinary
socket that lands in a reserve buffer is dropped by sk_filter when the driver
kmallocs its buffers (kmalloc_reserve marks them pfmemalloc); with e1000's page
fragments it is not (3.6's build_skb does not mark the skb), and the reserve
pages it holds are freed only when its reader reads it.

Timeouts here bound how long the test waits for something that must not
happen; they are not performance thresholds.
"""

from __future__ import annotations

import pytest
import trio
from netmem_helpers import hold_free_at, kernel, release

from actors.kthreadd import KthreaddNursery
from actors.nbdclient import start_nbd_client
from actors.netload import start_background_traffic
from actors.softirq import start_net_rx
from emulator.config import BackgroundConfig
from emulator.flags import GFP_NOIO, PF
from emulator.machine import attach_nbd_swap
from emulator.sched import running
from userspace.nbd.server import ExportSpec
from userspace.nbd.thread import NBDServerThread

SWAP = 96 << 20


@pytest.mark.parametrize("buffers", ["kmalloc", "page_frag"])
@pytest.mark.parametrize("patches", ["swapnbd", "vanilla"])
async def test_nbd_read_at_quarter_min(patches, buffers):
    k = kernel(patches, "slub", f"network.rx_buffers={buffers}")
    srv = NBDServerThread([ExportSpec(name="swap", size=SWAP)])
    await trio.to_thread.run_sync(srv.start)
    senders: list = []
    try:
        dev, stream = await attach_nbd_swap(k, "127.0.0.1", srv.port, "swap", SWAP, 1448)
        init = k.new_task("swapper", PF.KTHREAD, cpu=0)
        async with running(init):
            await dev.init_pools(init)
            await k.netdev.e1000_open(init)
        async with trio.open_nursery() as nursery:
            k.kthreadd = KthreaddNursery(nursery)
            start_net_rx(k, nursery, k.netdev)
            start_nbd_client(k, nursery, dev, persist=False, timeout_s=0)
            bg = BackgroundConfig(streams=1, rate_kib_s=512, reader_rate_kib_s=64)
            (bg_sock,) = await start_background_traffic(k, nursery, bg, 1448, senders)
            with trio.fail_after(10):
                while patches == "swapnbd" and not k.sk_memalloc_socks():
                    await trio.sleep(0.01)  # nbd-client's NBD_DO_IT runs sk_set_memalloc
            held = hold_free_at(k, k.pgdat.zone.watermark[0] // 4)
            done = trio.Event()
            result: dict = {}

            def end_io(bio, error):
                result["error"] = error
                result["data"] = bio.data
                done.set()

            task = k.new_task("reader")
            async with running(task):
                bio = await dev.bio_alloc(GFP_NOIO, task)  # from the bio mempool
                bio.prepare_read(4096, 4096, None, end_io)
                await dev.submit_bio(bio, task)
            with trio.move_on_after(5):
                await done.wait()
            if patches == "swapnbd":
                assert done.is_set(), "the NBD read did not complete with the series applied"
                assert result["error"] == 0 and result["data"] == bytes(4096)
                assert k.vmstat["pgalloc_pfmemalloc"] > 0  # it needed the reserves
                if buffers == "kmalloc":
                    with trio.fail_after(20):
                        while not k.vmstat["skb_drop_pfmemalloc"]:
                            await trio.sleep(0.05)
                    assert bg_sock.drops["pfmemalloc"] > 0
                else:
                    # The ring was refilled from the reserves (its pages are pfmemalloc),
                    # but build_skb never marks the skb: nothing for sk_filter to drop.
                    with trio.fail_after(20):
                        while not bg_sock.rx_bytes:
                            await trio.sleep(0.05)
                    assert k.vmstat["skb_drop_pfmemalloc"] == 0
                assert "pfmemalloc" not in dev.sock.drops
            else:
                assert not done.is_set(), "vanilla completed an NBD read at a quarter of min"
                assert dev.requests == 0  # the request never left: TX could not allocate
                assert k.vmstat["skb_drop_pfmemalloc"] == 0
            nursery.cancel_scope.cancel()
        release(k, held)
    finally:
        for s in senders:
            await trio.to_thread.run_sync(s.stop)
        await trio.to_thread.run_sync(srv.stop)
