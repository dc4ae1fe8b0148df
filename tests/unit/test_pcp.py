"""Per-cpu page lists: zone_batchsize, free_hot_cold_page, rmqueue_bulk, drain_all_pages,
one list per migrate type, free_pcppages_bulk's round robin.

The property that matters for swap over NBD: pages on a CPU's list are free but
not in NR_FREE_PAGES, so the watermark check refuses an allocation that the
per-cpu lists could serve until drain_all_pages gives them back to the buddy
lists, which is what a direct reclaimer does after its first attempt fails.
"""

from __future__ import annotations

import pytest
from slab_helpers import make_kernel

from emulator.config import from_dict
from emulator.diagnosis import diagnose, explain
from emulator.flags import ALLOC_CPUSET, ALLOC_WMARK_MIN, GFP, GFP_ATOMIC, GFP_HIGHUSER_MOVABLE
from emulator.kernel import Kernel
from emulator.mm.mmzone import MIGRATE_MOVABLE, MIGRATE_UNMOVABLE, PgData, zone_batchsize
from emulator.mm.page import Owner
from emulator.task import current


@pytest.mark.parametrize(("mib", "batch"), [
    (16, 0),     # 4096 pages: 4 / 4 = 1, rounddown_pow_of_two(1) - 1 = 0
    (24, 0),
    (32, 1),     # 8 / 4 = 2 -> rounddown_pow_of_two(3) - 1 = 1
    (48, 3),     # 12 / 4 = 3 -> rounddown_pow_of_two(4) - 1 = 3
    (64, 3),
    (2048, 31),  # capped at 512 KiB (128 pages) / 4 = 32 -> 31, the familiar "batch: 31"
])
def test_zone_batchsize_matches_the_kernel(mib, batch):
    assert zone_batchsize(mib << 8) == batch
    pcp = PgData(mib << 8, None, 2).zone.pageset[1]
    assert (pcp.batch, pcp.high) == (max(1, batch), 6 * batch)


def test_free_goes_to_the_running_cpus_list_and_spills_at_high():
    k = make_kernel("slub", cpus=2, memory_mib=64)  # batch 3, high 18
    zone, pa = k.pgdat.zone, k.page_alloc
    task = k.new_task("t", cpu=1)
    pages = [pa.get_page_from_freelist(GFP(0), 0, ALLOC_CPUSET, Owner.KERNEL) for _ in range(40)]
    free0 = zone.nr_free_pages
    token = current.set(task)
    try:
        for i, page in enumerate(pages[:17], 1):
            pa.free_page(page)
            assert zone.pageset[1].count == i and page.owner is Owner.PCP
        assert zone.nr_free_pages == free0  # invisible to NR_FREE_PAGES
        pa.free_page(pages[17])  # the 18th reaches high: batch (3) go to the buddy lists
        assert zone.pageset[1].count == 15 and zone.nr_free_pages == free0 + 3
        assert zone.pageset[0].count == 0
    finally:
        current.reset(token)
    owners = k.pgdat.owners()
    assert owners["pcp"] == 15 and sum(owners.values()) == k.nr_pages
    assert zone.nr_pcp_pages == 15


def test_cold_frees_leave_first_and_hot_pages_are_reused_first():
    k = make_kernel("slub", cpus=1, memory_mib=64)
    zone, pa = k.pgdat.zone, k.page_alloc
    task = k.new_task("t", cpu=0)
    hot, cold = (pa.get_page_from_freelist(GFP(0), 0, ALLOC_CPUSET, Owner.KERNEL)
                 for _ in range(2))
    token = current.set(task)
    try:
        pa.free_page(cold, cold=True)
        pa.free_page(hot)
    finally:
        current.reset(token)
    assert pa.get_page_from_freelist(GFP(0), 0, ALLOC_CPUSET, Owner.KERNEL, 0) is hot
    zone.free_pcppages_bulk(zone.pageset[0], 1)  # from the tail: the cold page
    assert cold.owner is Owner.FREE and zone.pageset[0].count == 0


def test_an_empty_list_is_refilled_batch_pages_at_a_time():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    zone, pa = k.pgdat.zone, k.page_alloc
    free0 = zone.nr_free_pages
    page = pa.get_page_from_freelist(GFP(0), 0, ALLOC_CPUSET, Owner.KERNEL, 1)
    assert page.owner is Owner.KERNEL
    assert zone.pageset[1].count == 2 and zone.nr_free_pages == free0 - 3
    pa.get_page_from_freelist(GFP(0), 0, ALLOC_CPUSET, Owner.KERNEL, 1)
    assert zone.pageset[1].count == 1 and zone.nr_free_pages == free0 - 3
    assert zone.nr_pcp_pages == 1


def test_watermark_ignores_pcp_pages_until_drain_all_pages():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    zone, pa = k.pgdat.zone, k.page_alloc
    wmin = zone.min_wmark_pages
    held = []
    while zone.nr_free_pages > wmin:  # down to exactly min: order 0 needs free > min
        held.append(pa.get_page_from_freelist(GFP(0), 0, ALLOC_CPUSET, Owner.KERNEL))
    token = current.set(k.new_task("reclaimer", cpu=0))
    try:
        for page in held[:5]:  # "reclaimed" on CPU 0: on its list, not in NR_FREE_PAGES
            pa.free_page(page, cold=True)
    finally:
        current.reset(token)
    flags = ALLOC_WMARK_MIN | ALLOC_CPUSET
    assert pa.get_page_from_freelist(GFP(0), 0, flags, Owner.KERNEL, 1) is None
    assert pa.get_page_from_freelist(GFP(0), 0, flags, Owner.KERNEL, 0) is None
    pa.drain_all_pages()
    assert zone.nr_pcp_pages == 0 and zone.nr_free_pages == wmin + 5
    assert k.vmstat["pcp_drained"] == 5
    assert pa.get_page_from_freelist(GFP(0), 0, flags, Owner.KERNEL, 1) is not None


def test_each_migrate_type_has_its_own_list():
    """An unmovable allocation does not take the movable pages a CPU holds: its own
    empty list is refilled from the buddy lists (3.5's pcp->lists[migratetype])."""
    k = make_kernel("slub", cpus=1, memory_mib=64)  # batch 3, high 18
    zone, pa = k.pgdat.zone, k.page_alloc
    anon = [pa.get_page_from_freelist(GFP_HIGHUSER_MOVABLE, 0, ALLOC_CPUSET, Owner.ANON)
            for _ in range(4)]
    assert {p.migratetype for p in anon} == {MIGRATE_MOVABLE}
    token = current.set(k.new_task("kswapd0", cpu=0))
    try:
        for page in anon:
            pa.free_page(page, cold=True)
    finally:
        current.reset(token)
    pcp = zone.pageset[0]
    assert len(pcp.lists[MIGRATE_MOVABLE]) == 4 and pcp.count == 4
    free0 = zone.nr_free_pages
    page = pa.get_page_from_freelist(GFP_ATOMIC, 0, ALLOC_CPUSET, Owner.SKB, 0)
    assert page not in anon and page.migratetype == MIGRATE_UNMOVABLE
    assert zone.nr_free_pages == free0 - 3  # a batch for the unmovable list
    assert len(pcp.lists[MIGRATE_UNMOVABLE]) == 2 and len(pcp.lists[MIGRATE_MOVABLE]) == 4
    assert pcp.count == zone.nr_pcp_pages == 6
    # A movable allocation takes the hot end of the movable list: no refill.
    assert pa.get_page_from_freelist(GFP_HIGHUSER_MOVABLE, 0, ALLOC_CPUSET, Owner.ANON, 0) in anon
    assert zone.nr_free_pages == free0 - 3


def test_free_pcppages_bulk_takes_from_the_lists_in_turn():
    """The round robin of 3.5's free_pcppages_bulk: batch_free grows with each list
    looked at, so the fuller list gives more; the reclaimable list here is empty."""
    k = make_kernel("slub", cpus=1, memory_mib=64)
    zone, pa = k.pgdat.zone, k.page_alloc
    unmovable = [pa.get_page_from_freelist(GFP(0), 0, ALLOC_CPUSET, Owner.KERNEL) for _ in range(2)]
    movable = [pa.get_page_from_freelist(GFP_HIGHUSER_MOVABLE, 0, ALLOC_CPUSET, Owner.ANON)
               for _ in range(10)]
    token = current.set(k.new_task("t", cpu=0))
    try:
        for page in unmovable + movable:
            pa.free_page(page, cold=True)
    finally:
        current.reset(token)
    pcp = zone.pageset[0]
    zone.free_pcppages_bulk(pcp, 6)
    # movable 2 (batch_free 2: the empty reclaimable list was looked at), unmovable 1,
    # movable 2, unmovable 1: from each list's tail, the coldest first.
    assert [p.owner for p in unmovable] == [Owner.FREE, Owner.FREE]
    assert [p.owner for p in movable[-4:]] == [Owner.FREE] * 4
    assert [p.owner for p in movable[:6]] == [Owner.PCP] * 6
    assert (len(pcp.lists[MIGRATE_UNMOVABLE]), len(pcp.lists[MIGRATE_MOVABLE])) == (0, 6)
    assert pcp.count == zone.nr_pcp_pages == 6
    assert zone.drain_pages(0) == 6 and zone.nr_pcp_pages == 0
    assert all(p.owner is Owner.FREE for p in movable)


def test_the_lockup_diagnosis_gives_per_cpu_pages_by_migrate_type():
    k = Kernel(from_dict({"machine": {"memory_mib": 64, "cpus": 1, "page_cache_mib": 0}}))
    pa = k.page_alloc
    pa.get_page_from_freelist(GFP_HIGHUSER_MOVABLE, 0, ALLOC_CPUSET, Owner.ANON, 0)
    d = diagnose(k, 20.0)
    assert d["pcp"] == 2 and d["pcp_by_type"] == {"unmovable": 0, "reclaimable": 0, "movable": 2}
    assert "(+2 on per-cpu lists, 2 movable; " in explain(d)


def test_a_cold_allocation_takes_the_tail_of_the_list():
    """buffered_rmqueue(): __GFP_COLD (skb page fragments) takes list->prev, the
    coldest page; rmqueue_bulk lays a fresh batch out so that either end first
    hands out the first page it took. Two identical machines, batch 3: the
    batch is the same three pages p, p+1, p+2 in both."""
    def first_two(*gfps):
        pa = make_kernel("slub", cpus=1, memory_mib=64).page_alloc
        return [pa.get_page_from_freelist(g, 0, ALLOC_CPUSET, Owner.SKB, 0).pfn for g in gfps]

    hot, cold = first_two(GFP_ATOMIC, GFP_ATOMIC | GFP.COLD)
    assert cold == hot + 2  # a hot refill, then the tail: the batch's last page
    cold_first, hot_next = first_two(GFP_ATOMIC | GFP.COLD, GFP_ATOMIC)
    assert cold_first == hot  # a cold refill hands out the first page taken...
    assert hot_next == hot + 2  # ...and the head is then the last one taken
