"""Checks on the buddy allocator's free lists, shared by test_buddy.py and
test_pageblocks.py."""

from __future__ import annotations

from emulator.mm.page import PG


def free_blocks(zone) -> dict[int, int]:
    """head pfn -> order, for every block on the free lists (of any migrate type)."""
    return {pfn: o for o, area in enumerate(zone.free_area)
            for free_list in area.free_list for pfn in free_list}


def check_free_lists(zone) -> None:
    for o, area in enumerate(zone.free_area):
        assert area.nr_free == sum(len(fl) for fl in area.free_list)
        for mt, free_list in enumerate(area.free_list):
            for pfn, page in free_list.items():
                assert page.pfn == pfn and page.order == o and page.flags & PG.buddy
                assert page.migratetype == mt
                assert (pfn - zone.zone_start_pfn) % (1 << o) == 0, f"misaligned block {pfn}/{o}"
                assert pfn + (1 << o) <= zone.zone_start_pfn + zone.present_pages
    assert zone.nr_free_pages == sum(a.nr_free << o for o, a in enumerate(zone.free_area))
