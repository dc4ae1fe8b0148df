"""The SLUB pair where the 3.5 deadlock is certain: no clean page cache.

Same machine (configs/quick.toml without its page cache), same workload, only
``kernel.patches`` differs. Every page the workload touches is dirty anonymous
memory, so once memory reaches the min watermark the only pages anybody can
free are swap-cache pages whose writeback has completed, and writeback
completes only when the NBD sender sends it:

* 3.5: the sender allocates with GFP_NOIO and no PF_MEMALLOC, so it stops at
  the min watermark and enters direct reclaim, which may not start swap I/O
  and finds nothing clean, and it does so inside tcp_sendmsg, owning the NBD
  socket, so no reply can be processed until it lets go. Nothing decides
  this; the watchdog observes that no page is accessed and no I/O completes
  and that the wait-for graph is a closed cycle, and its diagnosis names it.
* 3.6 with the series: the NBD socket is SOCK_MEMALLOC and the sender runs
  with PF_MEMALLOC (patch 14), so it sends from the reserves and the machine
  swaps its way through, with every page that comes back from swap verified.

The seed configs themselves (6 MiB of page cache) make the 3.5 outcome a race
whose odds docs/EXPERIMENT.md measures; this test is the certain case.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quick.toml")
NO_PAGE_CACHE = ("machine.slab=slub", "machine.page_cache_mib=0", "run.lockup_timeout_s=10")


async def test_vanilla_slub_locks_up_when_nothing_clean_is_left(machine):
    m = await machine(QUICK, *NO_PAGE_CACHE, "kernel.patches=vanilla")
    result = await m.wait_done(timeout=300)
    assert result.outcome == "lockup"
    assert result.integrity_errors == 0
    d = result.diagnosis
    assert d["free"] <= d["wmark"]["min"]  # out of ordinary memory
    assert d["nbd"]["queued"] > 0  # swap writes wait to be sent
    sender = [t for t in d["tasks"] if t["comm"] == "nbd0"]
    assert sender and sender[0].get("allocstall")  # 3.5's GFP_NOIO sender had to reclaim
    # The closed cycle: memory waits for replies, replies wait for the socket that the
    # sender owns while it is in the allocator, not entitled to the reserve (the link
    # the series breaks).
    assert d["cycle"] and "owned by nbd0/" in d["cycle"][1]
    assert "not entitled to the reserve" in d["cycle"][1]
    assert "Cycle: memory waits for NBD replies" in d["text"]
    (sock,) = [s for s in d["sockets"] if s["sock"] == "nbd0"]
    assert sock["owner"].startswith("nbd0/") and not sock["memalloc"]
    assert result.vm["skb_drop_nomem"] == 0  # a transmit deadlock: no packet was lost
    # The stall that never ended is exposed: nothing in flight, no reply coming,
    # for about the whole watchdog period.
    assert d["nbd"]["inflight"] == 0
    assert d["nbd"]["sender_exposed_s"] >= d["stalled_s"] / 2
    assert "No reply has been on its way" in d["text"]
    # ... and it says where memory freed during that send went.
    assert d["nbd"]["sender_send"] is not None
    # The sender reclaims in a loop, so no swap-cache page it could free (clean,
    # unmapped, on the LRU) is left; the ones it cannot free are accounted.
    sc = d["swapcache"]
    assert sc["clean_on_lru"] == 0
    assert sum(sc.values()) == d["pages"]["swapcache"]
    assert "Swap cache:" in d["text"]
    if sc["clean_isolated"]:
        assert "isolated batches of reclaimers" in d["text"]


async def test_swapnbd_slub_completes_with_verified_data(machine):
    m = await machine(QUICK, *NO_PAGE_CACHE, "kernel.patches=swapnbd")
    result = await m.wait_done(timeout=300)
    assert result.outcome == "completed"
    assert result.integrity_errors == 0
    assert result.processes["completed"] == result.processes["total"]
    assert result.vm["pswpin"] > 0 and result.vm["pswpout"] > m.k.nr_pages
    # The sender never entered direct reclaim: it sends with PF_MEMALLOC.
    assert all(t.allocstall == 0 for t in m.k.tasks.values() if t.comm == "nbd0")
    assert result.nbd_sender["stalls"] == 0 and result.vm["nbd_sender_reclaim"] == 0
    assert result.vm["pgalloc_pfmemalloc"] > 0  # ... from the reserves
