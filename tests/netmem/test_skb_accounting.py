"""Conservation of network memory: after a run ends cleanly every skb has been
freed, no page is held for skbs, and the slab caches are consistent (their
remaining objects are free objects cached by the allocator, nothing more)."""

import pytest

from emulator.mm.page import Owner


@pytest.mark.parametrize("slab", ["slub", "slab"])
async def test_no_skb_memory_left_after_a_clean_run(machine, slab):
    m = await machine("configs/quick.toml", f"machine.slab={slab}", "machine.memory_mib=16",
                      "swap.size_mib=40", "machine.page_cache_mib=2",
                      "network.background.streams=1", "network.background.rate_kib_s=512",
                      "network.background.reader_rate_kib_s=128")
    result = await m.wait_done(timeout=300)
    assert result.outcome == "completed"
    k = m.k
    assert k.vmstat["skb_alloc"] > 0  # traffic did flow through skbs
    assert k.skb.live == 0
    assert k.vmstat["skb_rx_queued"] == 0 and k.vmstat["skb_tx_queued"] == 0
    assert not k.netdev.ring  # the NIC's RX buffers went back at shutdown
    k.skb.drain(next(iter(k.tasks.values())))  # the per-CPU RX fragment caches' own refs
    assert k.pgdat.owners()[Owner.SKB.value] == 0
    k.slab.check()
