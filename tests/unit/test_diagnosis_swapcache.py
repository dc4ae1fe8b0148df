"""The lockup diagnosis sorts the swap cache by what reclaim may do with each
page (emulator/diagnosis.py, swapcache_states): the claim "finds no clean page
to free" in a lockup's cycle rests on it."""

from __future__ import annotations

from emulator.config import from_dict
from emulator.diagnosis import swapcache_states
from emulator.kernel import Kernel
from emulator.mm.page import PG


def test_each_swap_cache_page_is_counted_once_by_what_reclaim_may_do():
    k = Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 1, "page_cache_mib": 0}}))
    zone = k.pgdat.zone
    pages = zone.mem_map[100:106]
    sc = PG.swapcache | PG.swapbacked
    pages[0].flags = sc | PG.writeback | PG.dirty  # under writeback wins over dirty
    pages[1].flags = sc | PG.dirty | PG.lru
    pages[2].flags = sc | PG.lru
    pages[2].mm = object()  # clean, but a process still maps it
    pages[3].flags = sc | PG.lru  # clean, unmapped, on the LRU: freeable at once
    pages[4].flags = sc  # clean, unmapped, off the LRU: in someone's isolated batch
    pages[5].flags = PG.swapbacked | PG.lru  # anon, not in the swap cache: not counted
    assert swapcache_states(zone) == {"writeback": 1, "dirty": 1, "clean_mapped": 1,
                                      "clean_on_lru": 1, "clean_isolated": 1}
