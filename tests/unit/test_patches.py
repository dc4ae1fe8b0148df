"""The patch set (emulator/patches.py) and page->pfmemalloc marking per patch 1
and patch 5 (reference §2.4, §10.3), on a real emulator Kernel (no network).

Free memory is positioned exactly by allocating and holding pages with
ALLOC_NO_WATERMARKS; then a PF_MEMALLOC task allocates:

* free > low: the fast path succeeds -> never pfmemalloc;
* min < free <= low: the fast path fails, the slow path's min-watermark
  attempt succeeds -> pfmemalloc only without patch 5 (patch 1 alone marks
  every slow-path page of an entitled caller);
* free <= min: only the no-watermark attempt succeeds -> pfmemalloc (with
  patch 1 or 5; vanilla 3.5 has no page->pfmemalloc at all).
"""

from __future__ import annotations

import pytest
from page_holder import Holder

from emulator.config import ConfigError, from_dict
from emulator.flags import GFP, GFP_ATOMIC, GFP_KERNEL, GFP_NOIO, PF
from emulator.kernel import Kernel
from emulator.patches import PATCHES, PRESETS, PatchSet

ALL = frozenset(range(1, 17))


# -- the patch set ----------------------------------------------------------------------
def test_sixteen_patches_with_titles_and_effects():
    assert sorted(PATCHES) == list(range(1, 17))
    for n, p in PATCHES.items():
        assert p.number == n and p.title and p.effect
    assert PATCHES[15].title.startswith("mm: throttle direct reclaimers")
    assert PATCHES[5].title == "mm: only set page->pfmemalloc when ALLOC_NO_WATERMARKS was used"


def test_presets_and_names():
    assert PRESETS["vanilla"] == frozenset() and PRESETS["swapnbd"] == ALL
    assert PatchSet.preset("vanilla").name == "vanilla"
    assert PatchSet.preset("swapnbd").name == "swapnbd"
    assert PatchSet.of(ALL - {15}).name == "swapnbd-15"
    assert PatchSet.of({1, 9}).name == "vanilla+1,9"
    assert str(PatchSet.of(ALL)) == "swapnbd"
    ps = PatchSet.of([3, 4])
    assert ps.has(3) and ps.has(4) and not ps.has(5)
    assert not PatchSet.preset("vanilla").has(1)


def test_unknown_patch_numbers_are_rejected():
    with pytest.raises(ValueError, match=r"unknown patch number\(s\) \[0, 17\]"):
        PatchSet.of([0, 5, 17])
    with pytest.raises(KeyError):
        PatchSet.preset("mainline")


# -- pfmemalloc marking -------------------------------------------------------------------
def make_kernel(patches) -> Kernel:
    return Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 1},
                             "kernel": {"patches": sorted(patches)}}))


async def alloc_at(k: Kernel, holder: Holder, free: int, gfp, flags=PF.MEMALLOC):
    holder.set_free(free)
    t = k.new_task("t", flags, cpu=0)
    before = k.vmstat["pgalloc_pfmemalloc"]
    page = await k.page_alloc.alloc_pages(gfp, 0, t)
    assert page is not None
    return page, k.vmstat["pgalloc_pfmemalloc"] - before


@pytest.mark.parametrize("patches, above_low, min_to_low, below_min", [
    (ALL, False, False, True),             # patch 5: only when NO_WATERMARKS was needed
    (ALL - {5}, False, True, True),        # patch 1 alone: any slow-path page of an entitled caller
    (frozenset({1}), False, True, True),
    (frozenset({5}), False, False, True),
    (frozenset(), False, False, False),    # 3.5: no page->pfmemalloc
    (ALL - {1, 5}, False, False, False),
])
async def test_pfmemalloc_marking_of_a_pf_memalloc_task(patches, above_low, min_to_low,
                                                        below_min):
    k = make_kernel(patches)
    h = Holder(k)
    zone = k.pgdat.zone
    wmin, wlow = zone.min_wmark_pages, zone.low_wmark_pages
    assert wmin + 1 < wlow
    p1, nw1 = await alloc_at(k, h, wlow + 1, GFP_KERNEL)    # fast path
    p2, nw2 = await alloc_at(k, h, wlow, GFP_KERNEL)        # slow path, min watermark ok
    p3, nw3 = await alloc_at(k, h, wmin, GFP_KERNEL)        # only without watermarks
    assert (p1.pfmemalloc, p2.pfmemalloc, p3.pfmemalloc) == (above_low, min_to_low, below_min)
    marked = sum((above_low, min_to_low, below_min))
    assert k.vmstat["nr_pfmemalloc_pages"] == marked
    # Only the third allocation needed the no-watermark attempt, whatever the marking.
    assert (nw1, nw2, nw3) == (0, 0, 1)
    # Freeing a marked page clears the mark and the gauge.
    for p in (p1, p2, p3):
        k.page_alloc.free_pages(p, 0)
    assert not any(p.pfmemalloc for p in (p1, p2, p3))
    assert k.vmstat["nr_pfmemalloc_pages"] == 0


@pytest.mark.parametrize("patches", [ALL, ALL - {5}])
async def test_entitled_via_gfp_memalloc(patches):
    """An NBD-style GFP_NOIO|__GFP_MEMALLOC caller (patch 3) below min gets a marked
    page; between min and low only without patch 5."""
    k = make_kernel(patches)
    h = Holder(k)
    zone = k.pgdat.zone
    p, nw = await alloc_at(k, h, zone.low_wmark_pages, GFP_NOIO | GFP.MEMALLOC, flags=PF(0))
    assert p.pfmemalloc == (5 not in patches) and nw == 0
    p, nw = await alloc_at(k, h, zone.min_wmark_pages, GFP_NOIO | GFP.MEMALLOC, flags=PF(0))
    assert p.pfmemalloc and nw == 1


@pytest.mark.parametrize("patches", [ALL, ALL - {5}])
async def test_unentitled_callers_are_never_marked(patches):
    """GFP_ATOMIC without reserve rights gets pages down to 3/8 of min, unmarked,
    and nothing below that."""
    k = make_kernel(patches)
    h = Holder(k)
    zone = k.pgdat.zone
    p, nw = await alloc_at(k, h, zone.low_wmark_pages, GFP_ATOMIC, flags=PF(0))
    assert not p.pfmemalloc and nw == 0
    p, nw = await alloc_at(k, h, zone.min_wmark_pages, GFP_ATOMIC, flags=PF(0))
    assert not p.pfmemalloc and nw == 0
    floor = zone.min_wmark_pages - zone.min_wmark_pages // 2
    floor -= floor // 4
    h.set_free(floor)
    t = k.new_task("atomic", cpu=0)
    assert await k.page_alloc.alloc_pages(GFP_ATOMIC, 0, t) is None
    assert k.vmstat["nr_pfmemalloc_pages"] == 0


def test_config_patch_lists():
    cfg = from_dict({"kernel": {"patches": [1, 15, 16]}})
    assert cfg.kernel.patches == PatchSet.of({1, 15, 16})
    with pytest.raises(ConfigError) as e:
        from_dict({"kernel": {"patches": [1, 17]}})
    assert e.value.key == "kernel.patches" and "17" in str(e.value)
