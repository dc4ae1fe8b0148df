"""gfp_to_alloc_flags (reference §2.2) as a table, for vanilla (3.5) and
swapnbd (3.6), plus the flag values of include/linux/gfp.h (§3.1-3.2).

Each row: caller context, gfp mask, expected alloc_flags without and with the
series. The expectations are the reference's rules written out by hand:
start MIN|CPUSET; __GFP_HIGH -> HIGH; !__GFP_WAIT -> HARDER (unless
__GFP_NOMEMALLOC) and no CPUSET; then unless __GFP_NOMEMALLOC: __GFP_MEMALLOC
(patch 3) or softirq+PF_MEMALLOC (patch 4) or (!in_interrupt and (PF_MEMALLOC
or TIF_MEMDIE)) -> NO_WATERMARKS.
"""

from __future__ import annotations

import pytest

from emulator.flags import (
    ALLOC_CPUSET,
    ALLOC_HARDER,
    ALLOC_HIGH,
    ALLOC_NO_WATERMARKS,
    ALLOC_WMARK_MIN,
    GFP,
    GFP_ATOMIC,
    GFP_HIGHUSER_MOVABLE,
    GFP_KERNEL,
    GFP_NOFS,
    GFP_NOIO,
    GFP_NOWAIT,
    GFP_RECLAIM_MASK,
    GFP_USER,
    PF,
    gfp_name,
)
from emulator.mm.page_alloc import gfp_pfmemalloc_allowed, gfp_to_alloc_flags
from emulator.patches import PATCHES, PatchSet
from emulator.sched import CPU
from emulator.task import Task

VANILLA = PatchSet.preset("vanilla")
SWAPNBD = PatchSet.preset("swapnbd")

MIN, CPUSET, HIGH, HARDER, NOWM = (ALLOC_WMARK_MIN, ALLOC_CPUSET, ALLOC_HIGH, ALLOC_HARDER,
                                  ALLOC_NO_WATERMARKS)


def task(ctx: str) -> Task:
    """ctx: "normal", "memalloc" (PF_MEMALLOC), "memdie" (TIF_MEMDIE), "softirq",
    "softirq+memalloc", "softirq+memdie", "kswapd"."""
    flags = PF(0)
    if "memalloc" in ctx:
        flags |= PF.MEMALLOC
    if ctx == "kswapd":
        flags = PF.MEMALLOC | PF.KSWAPD | PF.KTHREAD | PF.SWAPWRITE
    t = Task(1, ctx, CPU(0), flags, in_softirq=ctx.startswith("softirq"))
    t.memdie = "memdie" in ctx
    return t


# (context, gfp, vanilla flags, swapnbd flags)
TABLE = [
    # GFP_KERNEL
    ("normal", GFP_KERNEL, MIN | CPUSET, MIN | CPUSET),
    ("memalloc", GFP_KERNEL, MIN | CPUSET | NOWM, MIN | CPUSET | NOWM),
    ("kswapd", GFP_KERNEL, MIN | CPUSET | NOWM, MIN | CPUSET | NOWM),
    ("memdie", GFP_KERNEL, MIN | CPUSET | NOWM, MIN | CPUSET | NOWM),
    ("normal", GFP_KERNEL | GFP.MEMALLOC, MIN | CPUSET, MIN | CPUSET | NOWM),
    ("memalloc", GFP_KERNEL | GFP.NOMEMALLOC, MIN | CPUSET, MIN | CPUSET),
    ("memdie", GFP_KERNEL | GFP.NOMEMALLOC, MIN | CPUSET, MIN | CPUSET),
    ("normal", GFP_KERNEL | GFP.MEMALLOC | GFP.NOMEMALLOC, MIN | CPUSET, MIN | CPUSET),
    # GFP_ATOMIC = __GFP_HIGH: HIGH, HARDER, no CPUSET
    ("normal", GFP_ATOMIC, HIGH | HARDER, HIGH | HARDER),
    ("softirq", GFP_ATOMIC, HIGH | HARDER, HIGH | HARDER),
    ("memalloc", GFP_ATOMIC, HIGH | HARDER | NOWM, HIGH | HARDER | NOWM),
    ("softirq+memalloc", GFP_ATOMIC, HIGH | HARDER, HIGH | HARDER | NOWM),  # patch 4
    ("softirq+memdie", GFP_ATOMIC, HIGH | HARDER, HIGH | HARDER),  # TIF_MEMDIE: not in IRQ
    ("softirq", GFP_ATOMIC | GFP.MEMALLOC, HIGH | HARDER, HIGH | HARDER | NOWM),  # patch 3
    ("softirq+memalloc", GFP_ATOMIC | GFP.NOMEMALLOC, HIGH, HIGH),  # no HARDER either
    ("normal", GFP_ATOMIC | GFP.NOMEMALLOC, HIGH, HIGH),
    ("softirq", GFP_ATOMIC | GFP.MEMALLOC | GFP.NOMEMALLOC, HIGH, HIGH),
    # GFP_NOIO = __GFP_WAIT only
    ("normal", GFP_NOIO, MIN | CPUSET, MIN | CPUSET),
    ("memalloc", GFP_NOIO, MIN | CPUSET | NOWM, MIN | CPUSET | NOWM),
    ("normal", GFP_NOIO | GFP.MEMALLOC, MIN | CPUSET, MIN | CPUSET | NOWM),  # NBD sk_allocation
    ("memalloc", GFP_NOIO | GFP.NOMEMALLOC, MIN | CPUSET, MIN | CPUSET),
    ("softirq+memalloc", GFP_NOIO, MIN | CPUSET, MIN | CPUSET | NOWM),
    # GFP_NOWAIT = 0: HARDER only
    ("normal", GFP_NOWAIT, HARDER, HARDER),
    ("softirq", GFP_NOWAIT, HARDER, HARDER),
    ("softirq", GFP_NOWAIT | GFP.NOMEMALLOC, 0, 0),
    # add_to_swap's radix-tree nodes: __GFP_HIGH|__GFP_NOMEMALLOC|__GFP_NOWARN
    ("kswapd", GFP.HIGH | GFP.NOMEMALLOC | GFP.NOWARN, HIGH, HIGH),
    # __GFP_HIGH with __GFP_WAIT (GFP_KERNEL | __GFP_HIGH): HIGH added, CPUSET kept
    ("normal", GFP_KERNEL | GFP.HIGH, MIN | CPUSET | HIGH, MIN | CPUSET | HIGH),
]


def _id(row) -> str:
    return f"{row[0]}:{gfp_name(row[1])}"


@pytest.mark.parametrize("row", TABLE, ids=[_id(r) for r in TABLE])
def test_gfp_to_alloc_flags_table(row):
    ctx, gfp, vanilla, swapnbd = row
    got_v = gfp_to_alloc_flags(gfp, task(ctx), VANILLA)
    got_s = gfp_to_alloc_flags(gfp, task(ctx), SWAPNBD)
    assert (hex(got_v), hex(got_s)) == (hex(vanilla), hex(swapnbd))
    assert gfp_pfmemalloc_allowed(gfp, task(ctx), VANILLA) == bool(vanilla & NOWM)
    assert gfp_pfmemalloc_allowed(gfp, task(ctx), SWAPNBD) == bool(swapnbd & NOWM)


def test_each_gate_is_its_own_patch():
    """__GFP_MEMALLOC needs exactly patch 3; softirq+PF_MEMALLOC exactly patch 4."""
    only3, only4 = PatchSet.of({3}), PatchSet.of({4})
    all_but_3 = PatchSet.of(set(PATCHES) - {3})
    all_but_4 = PatchSet.of(set(PATCHES) - {4})
    gfp = GFP_ATOMIC | GFP.MEMALLOC
    assert gfp_to_alloc_flags(gfp, task("softirq"), only3) & NOWM
    assert not gfp_to_alloc_flags(gfp, task("softirq"), all_but_3) & NOWM
    assert gfp_to_alloc_flags(GFP_ATOMIC, task("softirq+memalloc"), only4) & NOWM
    assert not gfp_to_alloc_flags(GFP_ATOMIC, task("softirq+memalloc"), all_but_4) & NOWM
    # PF_MEMALLOC in process context and TIF_MEMDIE predate the series.
    assert gfp_to_alloc_flags(GFP_KERNEL, task("memalloc"), VANILLA) & NOWM
    assert gfp_to_alloc_flags(GFP_KERNEL, task("memdie"), VANILLA) & NOWM


def test_gfp_bits_have_the_3_6_values():
    expected = {
        "DMA": 0x01, "HIGHMEM": 0x02, "DMA32": 0x04, "MOVABLE": 0x08, "WAIT": 0x10,
        "HIGH": 0x20, "IO": 0x40, "FS": 0x80, "COLD": 0x100, "NOWARN": 0x200,
        "REPEAT": 0x400, "NOFAIL": 0x800, "NORETRY": 0x1000, "MEMALLOC": 0x2000,
        "COMP": 0x4000, "ZERO": 0x8000, "NOMEMALLOC": 0x10000, "HARDWALL": 0x20000,
        "THISNODE": 0x40000, "RECLAIMABLE": 0x80000, "NO_KSWAPD": 0x400000,
        "WRITE": 0x1000000,
    }
    assert dict(GFP.items()) == expected
    assert GFP(0x2010) == 0x2010 and type(GFP(0x2010)) is int
    assert GFP.names(GFP_NOIO | GFP.MEMALLOC) == ["WAIT", "MEMALLOC"]
    assert GFP_ATOMIC == 0x20 and GFP_NOWAIT == 0
    assert GFP_NOIO == 0x10 and GFP_NOFS == 0x50 and GFP_KERNEL == 0xD0
    assert GFP_USER == 0x200D0 and GFP_HIGHUSER_MOVABLE == 0x200DA
    assert GFP_RECLAIM_MASK == 0x10 | 0x20 | 0x40 | 0x80 | 0x200 | 0x400 | 0x800 | 0x1000 \
        | 0x2000 | 0x10000
    assert (MIN, NOWM, HARDER, HIGH, CPUSET) == (0, 0x04, 0x10, 0x20, 0x40)
    assert ALLOC_HIGH == GFP.HIGH  # the kernel relies on this identity
    assert PF.MEMALLOC == 0x800


def test_gfp_name():
    assert gfp_name(GFP_KERNEL) == "GFP_KERNEL"
    assert gfp_name(GFP_NOIO | GFP.MEMALLOC) == "GFP_NOIO|__GFP_MEMALLOC"
    assert gfp_name(GFP_NOWAIT) == "GFP_NOWAIT"
