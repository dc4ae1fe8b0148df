"""The buddy allocator (emulator/mm/mmzone.py: __rmqueue + expand,
__free_one_page): splitting, merging, boot-time decomposition, and a hypothesis
test that random alloc/free sequences keep every frame in exactly one place.
Migrate types and pageblocks are in test_pageblocks.py.
"""

from __future__ import annotations

from buddy_helpers import check_free_lists, free_blocks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.config import from_dict
from emulator.flags import ALLOC_NO_WATERMARKS, GFP
from emulator.kernel import Kernel
from emulator.mm.mmzone import MAX_ORDER, MIGRATE_MOVABLE, PgData
from emulator.mm.page import PG, Owner


def take(zone, order: int):
    """__rmqueue for a movable block, as a page-cache or anonymous allocation asks."""
    return zone.rmqueue(order, MIGRATE_MOVABLE)


def test_boot_decomposes_memory_into_maximal_aligned_blocks():
    n = 3 * 1024 + 517  # 517 = 512 + 4 + 1
    pgdat = PgData(n, None)
    zone = pgdat.zone
    check_free_lists(zone)
    assert free_blocks(zone) == {0: 10, 1024: 10, 2048: 10, 3072: 9, 3584: 2, 3588: 0}
    assert pgdat.owners()["free"] == n == zone.nr_free_pages


def test_split_gives_upper_halves_to_lower_orders_and_merge_restores():
    pgdat = PgData(4096, None)  # four order-10 blocks
    zone = pgdat.zone
    before = free_blocks(zone)
    page = take(zone, 0)
    base = page.pfn
    assert base % 1024 == 0 and page.order == 0
    after = free_blocks(zone)
    # One order-10 block went; orders 0..9 each got the upper half of a split.
    assert zone.free_area_counts() == [1] * 10 + [3]
    for h in range(10):
        assert after[base + (1 << h)] == h
    assert zone.nr_free_pages == 4095
    check_free_lists(zone)
    zone.free_one_page(page, 0)
    assert free_blocks(zone) == before and zone.nr_free_pages == 4096
    check_free_lists(zone)


def test_smallest_fitting_block_is_used():
    zone = PgData(4096, None).zone
    a = take(zone, 0)  # splits an order-10 block
    b = take(zone, 3)  # must come from the order-3 leftover, not another 10
    assert zone.free_area_counts()[10] == 3
    assert b.pfn == a.pfn + 8 and b.order == 3
    c = take(zone, 10)
    assert c.order == 10 and zone.free_area_counts()[10] == 2


def test_merge_only_with_free_buddies_of_the_same_order():
    zone = PgData(1024, None).zone
    pages = [take(zone, 0) for _ in range(1024)]
    assert zone.nr_free_pages == 0 and free_blocks(zone) == {}
    by_pfn = {p.pfn: p for p in pages}
    zone.free_one_page(by_pfn[0], 0)
    zone.free_one_page(by_pfn[2], 0)
    assert free_blocks(zone) == {0: 0, 2: 0}  # not buddies: 0's buddy is 1
    zone.free_one_page(by_pfn[1], 0)
    assert free_blocks(zone) == {0: 1, 2: 0}  # 0+1 merged; 2 (order 0) is not 0's order-1 buddy
    zone.free_one_page(by_pfn[3], 0)
    assert free_blocks(zone) == {0: 2}  # 2+3 -> order 1 at 2 -> merges with 0
    zone.free_one_page(by_pfn[5], 0)
    zone.free_one_page(by_pfn[4], 0)
    assert free_blocks(zone) == {0: 2, 4: 1}  # 4's order-1 buddy... is 6: busy
    for pfn in range(6, 1024):
        zone.free_one_page(by_pfn[pfn], 0)
    assert free_blocks(zone) == {0: 10}
    check_free_lists(zone)


def test_no_merge_past_the_end_of_the_zone():
    zone = PgData(1536, None).zone  # 1024 + 512: the order-9 block's order-9 buddy is absent
    assert free_blocks(zone) == {0: 10, 1024: 9}
    p = take(zone, 9)
    zone.free_one_page(p, 9)
    assert free_blocks(zone) == {0: 10, 1024: 9}


# -- conservation under random sequences -------------------------------------------------------
def _kernel() -> Kernel:
    return Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 1}}))


def check_conservation(k: Kernel, held: list, initial_other: dict[int, str]) -> None:
    pgdat = k.pgdat
    zone = pgdat.zone
    check_free_lists(zone)
    covered: set[int] = set()
    total = 0
    for pfn, o in free_blocks(zone).items():
        covered.update(range(pfn, pfn + (1 << o)))
        total += 1 << o
    for page in held:
        covered.update(range(page.pfn, page.pfn + (1 << page.order)))
        total += 1 << page.order
        for pfn in range(page.pfn, page.pfn + (1 << page.order)):
            assert zone.mem_map[pfn].owner is Owner.KERNEL
            assert not zone.mem_map[pfn].flags & PG.buddy
    covered.update(initial_other)
    total += len(initial_other)
    assert total == len(covered), "a frame is in two places"
    assert covered == set(range(pgdat.node_present_pages)), "a frame is nowhere"
    owners = pgdat.owners()
    held_frames = sum(1 << p.order for p in held)
    assert owners["free"] == zone.nr_free_pages == pgdat.nr_free_pages()
    assert owners["kernel"] == held_frames + sum(v == "kernel" for v in initial_other.values())
    assert sum(owners.values()) == pgdat.node_present_pages
    assert k.vmstat["nr_free_pages"] == zone.nr_free_pages


ops = st.lists(
    st.one_of(st.tuples(st.just("alloc"), st.integers(0, MAX_ORDER - 1)),
              st.tuples(st.just("free"), st.integers(0, 10_000))),
    min_size=1, max_size=60)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_alloc_free_sequences_conserve_frames(seq):
    k = _kernel()
    zone = k.pgdat.zone
    # Frames not on the free lists at the start (none today; slab may take some).
    initial_other = {p.pfn: p.owner.value for p in zone.mem_map
                     if p.owner is not Owner.FREE}
    initial_blocks = free_blocks(zone)
    held = []
    pa = k.page_alloc
    for op, arg in seq:
        if op == "alloc":
            page = pa.get_page_from_freelist(GFP(0), arg, ALLOC_NO_WATERMARKS, Owner.KERNEL)
            if page is None:
                assert all(not zone.free_area[o].nr_free for o in range(arg, MAX_ORDER))
            else:
                assert page.order == arg and page.pfn % (1 << arg) == 0
                held.append(page)
        elif held:
            page = held.pop(arg % len(held))
            pa.free_pages(page, page.order)
        check_conservation(k, held, initial_other)
    for page in held:
        pa.free_pages(page, page.order)
    held.clear()
    check_conservation(k, held, initial_other)
    assert free_blocks(zone) == initial_blocks  # everything merged back
