"""Watermarks (reference §1): min_free_kbytes from the memory size, per-zone
min/low/high, and __zone_watermark_ok's ALLOC_HIGH/ALLOC_HARDER reductions and
per-order loop. The expected values are computed here from the kernel's
formula (init_per_zone_wmark_min, __setup_per_zone_wmarks), independently of
emulator/mm/mmzone.py, and checked against the table in the kernel's comment.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from page_holder import Holder

from emulator.config import from_dict
from emulator.flags import ALLOC_HARDER, ALLOC_HIGH, ALLOC_NO_WATERMARKS, ALLOC_WMARK_MIN, GFP
from emulator.kernel import Kernel
from emulator.mm.mmzone import (
    PgData,
    Zone,
    default_min_free_kbytes,
    setup_per_zone_wmarks,
    zone_watermark_ok,
)
from emulator.mm.page import Owner

MIB = 1024  # KiB


def kernel_min_free_kbytes(mem_kbytes: int) -> int:
    """init_per_zone_wmark_min (3.6): int_sqrt(lowmem_kbytes * 16) in [128, 65536]."""
    return min(65536, max(128, math.isqrt(mem_kbytes * 16)))


def kernel_wmarks(min_free_kbytes: int) -> tuple[int, int, int]:
    """__setup_per_zone_wmarks for one (non-highmem) zone holding all memory."""
    pages_min = min_free_kbytes >> 2  # >> (PAGE_SHIFT - 10)
    return pages_min, pages_min + (pages_min >> 2), pages_min + (pages_min >> 1)


#: The table in the comment above init_per_zone_wmark_min (mm/page_alloc.c).
#: (8 GB -> 11584k is the comment's rounding; int_sqrt gives 11585, so it is left out.)
SOURCE_TABLE = {16: 512, 64: 1024, 256: 2048, 1024: 4096, 2048: 5792, 4096: 8192,
                16384: 16384}

SIZES_MIB = [16, 32, 64, 256, 1024, 2048]


@pytest.mark.parametrize("mib, expected", sorted(SOURCE_TABLE.items()))
def test_min_free_kbytes_matches_the_kernel_comment_table(mib, expected):
    assert kernel_min_free_kbytes(mib * MIB) == expected  # the test's own formula
    assert default_min_free_kbytes(mib * MIB) == expected


def test_min_free_kbytes_clamps():
    assert default_min_free_kbytes(512) == 128  # isqrt(8192) = 90 -> 128
    assert default_min_free_kbytes(1024) == 128  # exactly 128
    assert default_min_free_kbytes(2048) == 181
    assert default_min_free_kbytes(256 * 1024 * MIB) == 65536  # 256 GiB: exactly 65536
    assert default_min_free_kbytes(1024 * 1024 * MIB) == 65536  # 1 TiB: clamped


@pytest.mark.parametrize("mib", SIZES_MIB)
def test_zone_watermarks_follow_the_kernel_formula(mib):
    pages = mib * 256
    zone = Zone("Normal", 0, pages, [])  # no frames needed for the watermark arithmetic
    mfk = default_min_free_kbytes(pages * 4)
    setup_per_zone_wmarks([zone], mfk)
    assert mfk == kernel_min_free_kbytes(mib * MIB)
    assert tuple(zone.watermark) == kernel_wmarks(mfk)
    assert (zone.min_wmark_pages, zone.low_wmark_pages, zone.high_wmark_pages) == kernel_wmarks(mfk)


def test_watermark_values_spelled_out():
    # 32 MiB: sqrt(32768*16) = 724 KiB -> 181 pages; low 181+45; high 181+90.
    z = Zone("Normal", 0, 32 * 256, [])
    setup_per_zone_wmarks([z], default_min_free_kbytes(32 * MIB))
    assert z.watermark == [181, 226, 271]
    # 2 GiB: 5792 KiB -> 1448 pages; 1448+362, 1448+724.
    z = Zone("Normal", 0, 2048 * 256, [])
    setup_per_zone_wmarks([z], default_min_free_kbytes(2048 * MIB))
    assert z.watermark == [1448, 1810, 2172]


def test_watermarks_split_between_zones_by_size():
    """tmp = pages_min * present / lowmem_pages per zone; low/high add tmp/4, tmp/2."""
    small, big = Zone("DMA", 0, 4000, []), Zone("DMA32", 4000, 500000, [])
    setup_per_zone_wmarks([small, big], 5650)
    pages_min = 5650 >> 2
    for z in (small, big):
        tmp = pages_min * z.present_pages // 504000
        assert z.watermark == [tmp, tmp + tmp // 4, tmp + tmp // 2]


@pytest.mark.parametrize("mib", [16, 32, 64, 256])
def test_pgdat_boots_with_the_kernel_watermarks(mib):
    pgdat = PgData(mib * 256, None)
    assert pgdat.min_free_kbytes == kernel_min_free_kbytes(mib * MIB)
    assert tuple(pgdat.zone.watermark) == kernel_wmarks(pgdat.min_free_kbytes)
    assert pgdat.nr_free_pages() == mib * 256
    assert pgdat.reserve_pages() == pgdat.zone.min_wmark_pages


def test_explicit_min_free_kbytes_and_config_path():
    pgdat = PgData(16 * 256, 2000)
    assert pgdat.min_free_kbytes == 2000 and pgdat.zone.watermark == [500, 625, 750]
    k = Kernel(from_dict({"machine": {"memory_mib": 64}}))  # min_free_kbytes "auto"
    assert k.pgdat.zone.watermark == list(kernel_wmarks(1024))
    k = Kernel(from_dict({"machine": {"memory_mib": 64, "min_free_kbytes": 4096}}))
    assert k.pgdat.zone.watermark == [1024, 1280, 1536]


# -- __zone_watermark_ok -----------------------------------------------------------------
NO_LOWER = [0] * 11


@pytest.mark.parametrize("mark, flags, floor", [
    (800, 0, 800),                        # free must exceed the mark
    (800, ALLOC_HIGH, 400),               # min -= min/2
    (800, ALLOC_HARDER, 600),             # min -= min/4
    (800, ALLOC_HIGH | ALLOC_HARDER, 300),  # 3/8 of the mark (GFP_ATOMIC)
    (100, ALLOC_HIGH | ALLOC_HARDER, 38),   # integer arithmetic: 100-50=50, 50-12=38
    (101, ALLOC_HIGH, 51),                # 101 - 50
    (7, ALLOC_HIGH | ALLOC_HARDER, 3),    # 7-3=4, 4-1=3
])
def test_order0_floor(mark, flags, floor):
    assert not zone_watermark_ok(floor, NO_LOWER, 0, mark, 0, flags)
    assert zone_watermark_ok(floor + 1, NO_LOWER, 0, mark, 0, flags)


def test_no_watermarks_flag_is_not_interpreted_by_the_check():
    """ALLOC_NO_WATERMARKS skips the call (get_page_from_freelist), not the arithmetic."""
    assert not zone_watermark_ok(10, NO_LOWER, 0, 100, 0, ALLOC_NO_WATERMARKS)


def test_lowmem_reserve_is_added_to_the_first_check_only():
    assert not zone_watermark_ok(15, NO_LOWER, 0, 10, 5, 0)
    assert zone_watermark_ok(16, NO_LOWER, 0, 10, 5, 0)
    # order 1, mark 10, reserve 20, 40 free of which 14 are order-0 singles:
    # 40-1 = 39 > 30; then 39-14 = 25 > 10>>1. Re-adding the reserve would fail.
    nr_free = [14] + [0] * 10
    assert zone_watermark_ok(40, nr_free, 1, 10, 20, 0)


def test_per_order_loop():
    # order 2, mark 16: free 40 - 3 = 37 > 16.
    nr_free = [10, 5, 2] + [0] * 8
    # k=0: 37-10 = 27 > 8; k=1: 27-5*2 = 17 > 4 -> ok
    assert zone_watermark_ok(40, nr_free, 2, 16, 0, 0)
    # k=0: 37-20 = 17 > 8; k=1: 17-8*2 = 1 <= 4 -> fails on order 1
    assert not zone_watermark_ok(40, [20, 8, 1] + [0] * 8, 2, 16, 0, 0)
    # k=0 fails: 37-30 = 7 <= 8
    assert not zone_watermark_ok(40, [30, 0, 2] + [0] * 8, 2, 16, 0, 0)
    # The halving is of the already-reduced min: ALLOC_HIGH mark 16 -> 8 -> 4 -> 2.
    assert zone_watermark_ok(40, [20, 8, 1] + [0] * 8, 2, 16, 0, ALLOC_HIGH) is False
    assert zone_watermark_ok(40, [20, 7, 1] + [0] * 8, 2, 16, 0, ALLOC_HIGH)  # 17-14=3 > 2
    # Order 0 ignores the free-area counts entirely.
    assert zone_watermark_ok(17, [17] + [0] * 10, 0, 16, 0, 0)


def test_per_order_loop_boundary():
    """Inside the per-order loop, free equal to the halved min fails, as the first
    check does (``<=``). Kills zone_watermark_ok 28 (``<=`` -> ``<`` in the loop)."""
    # order 1, mark 8: 20 - 1 = 19 > 8; k=0: 19 - 15 = 4 <= 8 >> 1 -> fails
    assert not zone_watermark_ok(20, [15] + [0] * 10, 1, 8, 0, 0)
    assert zone_watermark_ok(20, [14] + [0] * 10, 1, 8, 0, 0)  # 5 > 4


#: The table above calculate_zone_inactive_ratio (mm/page_alloc.c): zone size -> ratio.
INACTIVE_RATIO_TABLE = {10 << 20: 1, 100 << 20: 1, 1 << 30: 3, 10 << 30: 10, 100 << 30: 31,
                        1 << 40: 101}


@pytest.mark.parametrize("size, ratio", sorted(INACTIVE_RATIO_TABLE.items()))
def test_inactive_ratio_follows_the_kernel_table(size, ratio):
    """inactive_ratio = int_sqrt(10 * GiB), 1 below a GiB (the kernel comment's table).
    Kills setup_per_zone_wmarks 17-23 and 26 (the GiB count or the formula
    changed); the unit tests' machines are all below 1 GiB, where it is 1."""
    zone = SimpleNamespace(present_pages=size >> 12)
    setup_per_zone_wmarks([zone], 1024)
    assert zone.inactive_ratio == ratio


def test_zone_method_uses_live_free_area():
    """Zone.zone_watermark_ok feeds the zone's own counts: a zone whose free memory
    is all order-0 singles fails an order-1 check that the same count passes at order 0."""
    k = Kernel(from_dict({"machine": {"memory_mib": 16}}))
    zone = k.pgdat.zone
    held = []
    # Take every page, then give back every other one: 2048 free singles, no pairs.
    while True:
        p = k.page_alloc.get_page_from_freelist(GFP(0), 0, ALLOC_NO_WATERMARKS, Owner.KERNEL)
        if p is None:
            break
        held.append(p)
    held.sort(key=lambda p: p.pfn)
    for p in held[::2]:
        k.page_alloc.free_pages(p, 0)
    assert zone.nr_free_pages == 2048
    assert zone.free_area_counts()[0] == 2048
    assert zone.zone_watermark_ok(0, zone.high_wmark_pages)
    assert not zone.zone_watermark_ok(1, zone.high_wmark_pages)


def test_pgalloc_below_min_counts_only_the_band_left_to_atomic_callers():
    """pgalloc_below_min: pages that passed the watermark check only through
    ALLOC_HIGH/ALLOC_HARDER, i.e. were taken at or below the min watermark by a
    caller without the reserves' entitlement."""
    k = Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 1, "page_cache_mib": 0}}))
    zone, pa, vm = k.pgdat.zone, k.page_alloc, k.vmstat
    wmin = zone.watermark[0]
    atomic = ALLOC_WMARK_MIN | ALLOC_HIGH | ALLOC_HARDER  # GFP_ATOMIC's flags
    holder = Holder(k)

    holder.set_free(wmin + 1)  # above min: an ordinary check passes too
    assert pa.get_page_from_freelist(GFP.HIGH, 0, atomic, Owner.SKB) is not None
    assert vm["pgalloc_below_min"] == 0
    # now at min: only the ALLOC_HIGH/HARDER reduction lets these through
    assert pa.get_page_from_freelist(GFP.HIGH, 0, atomic, Owner.SKB) is not None
    assert pa.get_page_from_freelist(GFP.HIGH, 0, atomic, Owner.SKB) is not None
    assert vm["pgalloc_below_min"] == 2
    # a plain min-watermark caller is refused there, and counts nothing
    assert pa.get_page_from_freelist(GFP(0), 0, ALLOC_WMARK_MIN, Owner.KERNEL) is None
    # the reserves proper are counted apart (pgalloc_pfmemalloc)
    before = vm["pgalloc_pfmemalloc"]
    assert pa.get_page_from_freelist(GFP(0), 0, ALLOC_NO_WATERMARKS, Owner.KERNEL) is not None
    assert (vm["pgalloc_below_min"], vm["pgalloc_pfmemalloc"]) == (2, before + 1)
