"""Pageblocks and migrate types in the buddy allocator (emulator/mm/mmzone.py):
setup_zone_migrate_reserve, __rmqueue_fallback's stealing and claiming,
MIGRATE_RESERVE as the last resort, and the per-cpu lists' page_private type.
Expected values are worked out by hand from 3.5's mm/page_alloc.c.
"""

from __future__ import annotations

from buddy_helpers import check_free_lists

from emulator.config import from_dict
from emulator.diagnosis import diagnose, explain
from emulator.flags import GFP, GFP_HIGHUSER_MOVABLE
from emulator.kernel import Kernel
from emulator.mm.mmzone import (
    MIGRATE_MOVABLE,
    MIGRATE_RECLAIMABLE,
    MIGRATE_RESERVE,
    MIGRATE_UNMOVABLE,
    PgData,
    allocflags_to_migratetype,
    pageblock_nr_pages,
)
from emulator.mm.page import Owner
from emulator.task import current


def blocks_of(zone, migratetype: int) -> list[int]:
    return [i for i, mt in enumerate(zone.pageblock_flags) if mt == migratetype]


def test_reserve_pageblocks_cover_the_min_watermark_at_most_two():
    # 64 MiB: min_free_kbytes 1024 -> min 256 pages: one pageblock, the zone's first.
    zone = PgData(16384, None).zone
    assert zone.min_wmark_pages == 256
    assert blocks_of(zone, MIGRATE_RESERVE) == [0]
    assert zone.free_by_migratetype()[MIGRATE_RESERVE] >= pageblock_nr_pages
    check_free_lists(zone)
    # min 1024 pages: roundup(1024, 512) / 512 = 2 pageblocks.
    assert blocks_of(PgData(16384, 4096).zone, MIGRATE_RESERVE) == [0, 1]
    # min 2048 pages would be 4: capped at 2 (more is for hugepages, not atomics).
    assert blocks_of(PgData(16384, 8192).zone, MIGRATE_RESERVE) == [0, 1]


def test_a_large_steal_claims_the_pageblock_and_later_allocations_stay_in_it():
    zone = PgData(16384, None).zone
    before = blocks_of(zone, MIGRATE_MOVABLE)
    page = zone.rmqueue(0, MIGRATE_UNMOVABLE)
    # No unmovable block is free: __rmqueue_fallback takes the largest movable
    # block (order 10, two pageblocks), which changes both pageblocks' type
    # (change_pageblock_range); the split's leftovers are unmovable.
    unmovable = blocks_of(zone, MIGRATE_UNMOVABLE)
    assert len(unmovable) == 2 and unmovable[0] * pageblock_nr_pages == page.pfn
    assert set(before) - set(blocks_of(zone, MIGRATE_MOVABLE)) == set(unmovable)
    assert zone.free_by_migratetype()[MIGRATE_UNMOVABLE] == 1023
    # The next unmovable allocations come from that block, without another steal.
    more = [zone.rmqueue(0, MIGRATE_UNMOVABLE) for _ in range(100)]
    assert all(p.pfn // pageblock_nr_pages in unmovable for p in more)
    assert len(blocks_of(zone, MIGRATE_UNMOVABLE)) == 2
    check_free_lists(zone)


def test_a_small_steal_leaves_the_pageblock_its_type():
    """Below pageblock_order / 2 an unmovable steal takes one block and moves
    nothing else; a reclaimable steal moves the pageblock's free pages, and claims
    the pageblock only if at least half of it was free."""
    zone = PgData(4096, None).zone  # eight pageblocks; the first is the reserve
    assert not zone.page_group_by_mobility_disabled
    # Fill everything but one free order-1 block in pageblock 2.
    held = []
    while (p := zone.rmqueue(0, MIGRATE_MOVABLE)) is not None:
        held.append(p)
    by_pfn = {p.pfn: p for p in held}
    base = 2 * pageblock_nr_pages
    zone.free_one_page(by_pfn[base], 0)
    zone.free_one_page(by_pfn[base + 1], 0)  # merges into an order-1 block
    zone.free_one_page(by_pfn[base + 8], 0)
    assert zone.free_by_migratetype()[MIGRATE_MOVABLE] == 3
    page = zone.rmqueue(0, MIGRATE_UNMOVABLE)
    assert page.pfn == base  # the largest (order 1) first; its other half stays...
    assert zone.get_pageblock_migratetype(base) == MIGRATE_MOVABLE
    # ...on the unmovable lists (expand's leftovers take the requesting type),
    # while the untouched order-0 block at base + 8 is still movable.
    assert zone.free_by_migratetype()[MIGRATE_UNMOVABLE] == 1
    assert zone.free_by_migratetype()[MIGRATE_MOVABLE] == 1
    # A reclaimable steal moves the pageblock's free pages (2 < 256: no claim).
    page = zone.rmqueue(0, MIGRATE_RECLAIMABLE)
    assert page is not None and zone.get_pageblock_migratetype(base) == MIGRATE_MOVABLE
    check_free_lists(zone)


def test_grouping_by_mobility_is_off_below_five_pageblocks():
    """build_all_zonelists(): fewer than pageblock_nr_pages * MIGRATE_TYPES pages
    (5 types in 3.5, counting MIGRATE_ISOLATE) turn grouping off, and then every
    steal claims its pageblock."""
    zone = PgData(2048, None).zone
    assert zone.page_group_by_mobility_disabled
    assert allocflags_to_migratetype(GFP_HIGHUSER_MOVABLE, True) == MIGRATE_UNMOVABLE
    # The reserve pageblock's free pages went to the reserve lists, but the
    # pageblock itself is recorded unmovable, so frees there go to unmovable.
    assert zone.free_by_migratetype()[MIGRATE_RESERVE] > 0
    assert zone.get_pageblock_migratetype(0) == MIGRATE_UNMOVABLE
    while (p := zone.rmqueue(0, MIGRATE_MOVABLE)) is not None:
        last = p
    zone.free_one_page(last, 0)
    assert zone.rmqueue(0, MIGRATE_UNMOVABLE).pfn == last.pfn
    assert zone.get_pageblock_migratetype(last.pfn) == MIGRATE_UNMOVABLE


def test_the_reserve_pageblock_is_reached_only_when_everything_else_is_gone():
    zone = PgData(4096, None).zone
    # Boot freed pfn 0-1023 as one order-10 block; move_freepages_block moved it
    # whole onto the reserve lists, movable pageblock 1's half included.
    reserve_free = zone.free_by_migratetype()[MIGRATE_RESERVE]
    assert reserve_free == 2 * pageblock_nr_pages
    assert zone.get_pageblock_migratetype(pageblock_nr_pages) == MIGRATE_MOVABLE
    others = zone.nr_free_pages - reserve_free
    taken = [zone.rmqueue(0, mt) for mt in
             [MIGRATE_MOVABLE, MIGRATE_UNMOVABLE, MIGRATE_RECLAIMABLE] * (others // 3)]
    taken += [zone.rmqueue(0, MIGRATE_MOVABLE) for _ in range(others % 3)]
    assert all(p.pfn >= reserve_free for p in taken)
    assert zone.free_by_migratetype()[MIGRATE_RESERVE] == reserve_free
    page = zone.rmqueue(0, MIGRATE_UNMOVABLE)
    assert page.pfn < reserve_free
    assert zone.get_pageblock_migratetype(0) == MIGRATE_RESERVE  # never stolen
    # A high-order request finds the reserve's blocks intact.
    assert zone.rmqueue(3, MIGRATE_UNMOVABLE).pfn < reserve_free
    check_free_lists(zone)


def test_per_cpu_pages_carry_their_type_back_to_the_buddy_lists():
    """A reserve page freed to a CPU shares the movable list but goes back to the
    reserve lists when drained; a page rmqueue_bulk took for the unmovable list
    keeps that type (page_private) when drained unused."""
    # 64 MiB: per-cpu batch 3, high 18 (at 16 MiB high is 0: every free spills).
    k = Kernel(from_dict({"machine": {"memory_mib": 64, "cpus": 1, "page_cache_mib": 0}}))
    zone, pa = k.pgdat.zone, k.page_alloc
    reserve_before = zone.free_by_migratetype()[MIGRATE_RESERVE]
    reserve_pfn = next(p.pfn for p in zone.free_area[10].free_list[MIGRATE_RESERVE].values())
    page = zone.mem_map[reserve_pfn]
    zone.del_free_block(page)
    zone.expand(page, 0, 10, MIGRATE_RESERVE)
    zone.nr_free_pages -= 1
    page.owner = Owner.ANON
    token = current.set(k.new_task("t", cpu=0))
    try:
        pa.free_page(page)
        pcp = zone.pageset[0]
        assert page in pcp.lists[MIGRATE_MOVABLE] and page.migratetype == MIGRATE_RESERVE
        unmovable = pa.get_page_from_freelist(GFP(0), 0, 0, Owner.KERNEL, 0)
        spare = list(pcp.lists[MIGRATE_UNMOVABLE])
        assert spare and all(p.migratetype == MIGRATE_UNMOVABLE for p in spare)
        d = diagnose(k, 20.0)
        assert d["free_reserve"] == zone.free_by_migratetype()[MIGRATE_RESERVE]
        assert f"; {d['free_reserve']} of the free in reserve pageblocks)" in explain(d)
        zone.drain_pages(0)
    finally:
        current.reset(token)
    assert page.migratetype == MIGRATE_RESERVE
    assert zone.free_by_migratetype()[MIGRATE_RESERVE] == reserve_before
    assert all(p.migratetype == MIGRATE_UNMOVABLE for p in spare)
    assert unmovable.owner is Owner.KERNEL
    check_free_lists(zone)
