"""Per-CPU caching figures and slab geometry against the kernel's values (3.6, x86_64).

SLAB: enable_cpucache's limit/batchcount table, the shared array, free_limit,
cache_estimate / calculate_slab_order objects per slab. SLUB: calculate_order's
objects per slab and order for the configured CPU count (reference §5.2's table),
min_partial and cpu_partial.
"""

from __future__ import annotations

import pytest
from slab_helpers import make_kernel

from emulator.mm.slab_common import SLAB_HWCACHE_ALIGN, SLAB_RECLAIM_ACCOUNT
from emulator.mm.slub import calculate_order, order_objects


# -- SLAB -------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "limit", "batch", "objperslab", "order"), [
    (64, 120, 60, 59, 0),     # on-slab: (4096-48)/(64+4) = 59, mgmt 320 B + 59*64 = 4096
    (32, 120, 60, 112, 0),    # 32-byte aligned (HWCACHE_ALIGN halves 64 while it fits twice)
    (256, 120, 60, 15, 0),    # on-slab, 64-byte aligned
    (512, 54, 27, 8, 0),      # off-slab management from 512 B (PAGE_SIZE/8)
    (1024, 54, 27, 4, 0),     # limit 24 only above 1024 bytes
    (2048, 24, 12, 2, 0),
    (4096, 24, 12, 1, 0),
    (8192, 8, 4, 1, 1),       # > PAGE_SIZE: limit 8; needs order 1 for one object
])
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_slab_array_cache_sizes(size, limit, batch, objperslab, order, cpus):
    k = make_kernel("slab", cpus=cpus, memory_mib=16)
    c = k.slab.kmalloc_caches[size]
    assert (c.limit, c.batchcount) == (limit, batch)
    assert all(ac.limit == limit and ac.batchcount == batch for ac in c.array)
    assert len(c.array) == cpus
    assert (c.num, c.gfporder) == (objperslab, order)
    assert c.align == min(size, 64)  # SLAB_HWCACHE_ALIGN: a cache line, or half of one
    shared = 8 if size <= 4096 and cpus > 1 else 0
    assert c.shared == shared
    l3 = c.nodelist
    if shared:
        assert l3.shared.limit == 8 * batch  # e.g. kmalloc-2048: 96 objects per node
    else:
        assert l3.shared is None
    assert l3.free_limit == (1 + cpus) * batch + objperslab
    assert c.off_slab == (size >= 512)


@pytest.mark.parametrize(("size", "kw", "align", "objperslab", "order", "off_slab", "slab_size"), [
    (8, {}, 8, 337, 0, False, 1400),    # (4096-48)/(8+4); mgmt 1400 B + 337*8 = 4096
    (505, {}, 8, 8, 0, True, 80),       # 512 once word-aligned: off-slab from PAGE_SIZE/8
    # Off-slab sized; each then has room for its management (slab_size) in what is left
    # over, so it goes back on-slab.
    (1008, {}, 8, 4, 0, False, 64),     # 64 B left over, exactly the 64 B needed
    (1500, {}, 8, 5, 1, False, 72),     # order 0 wastes 1088 B (> 1/8): order 1
    (1500, {"flags": SLAB_RECLAIM_ACCOUNT}, 8, 2, 0, False, 56),  # reclaimable: first fit
    (1792, {}, 8, 2, 0, False, 56),     # order 0 wastes exactly 1/8 (512 B): kept
    (3000, {}, 8, 2, 1, False, 56),     # order 1 is slab_max_order: kept despite the waste
    (200, {"align": 128}, 128, 15, 0, False, 128),  # the caller's alignment wins
])
def test_slab_geometry_of_created_caches(size, kw, align, objperslab, order, off_slab,
                                        slab_size):
    """__kmem_cache_create and calculate_slab_order for caches kmem_cache_create makes
    (no SLAB_HWCACHE_ALIGN unless asked; slab_max_order 1 on this 64 MiB machine)."""
    k = make_kernel("slab", cpus=2, memory_mib=64)
    c = k.slab.kmem_cache_create("geometry", size, **kw)
    assert (c.align, c.num, c.gfporder, c.off_slab) == (align, objperslab, order, off_slab)
    assert c.slab_size == slab_size  # struct slab + a kmem_bufctl_t per object, aligned on-slab
    assert c.size % align == 0 and c.size - size < align


@pytest.mark.parametrize(("memory_mib", "max_order"), [(16, 0), (32, 0), (33, 1), (64, 1)])
def test_slab_max_order_is_1_above_32_mib(memory_mib, max_order):
    """kmem_cache_init: slab_max_order = SLAB_MAX_ORDER_HI (1) when the machine has more
    than 32 MiB, else 0; a 3000-byte cache then takes 2 objects on order 1, or 1 on
    order 0."""
    k = make_kernel("slab", cpus=2, memory_mib=memory_mib)
    s = k.slab
    assert s.slab_max_order == max_order
    c = s.kmem_cache_create("big", 3000)
    assert (c.num, c.gfporder) == ((2, 1) if max_order else (1, 0))


def test_slab_standard_caches():
    k = make_kernel("slab", cpus=2, memory_mib=16)
    s = k.slab
    got = {c.name: (c.size, c.num, c.gfporder, c.limit, c.batchcount)
           for c in (s.skbuff_head_cache, s.radix_tree_node, s.bio_cache, s.request_cache)}
    assert got == {
        "skbuff_head_cache": (256, 15, 0, 120, 60),
        "radix_tree_node": (576, 7, 0, 54, 27),
        "bio": (192, 20, 0, 120, 60),
        "blkdev_requests": (352, 11, 0, 54, 27),
    }
    # SLAB's 3.6 x86_64 kmalloc classes: size-32 ... size-8192, no 96.
    assert sorted(s.kmalloc_caches) == [32, 64, 128, 192, 256, 512, 1024, 2048, 4096, 8192]


# -- SLUB -------------------------------------------------------------------------------
# reference §5.2: objects per slab (order) for nr_cpu_ids 1, 2, 4, 8
SLUB_TABLE = {
    1: {256: (16, 0), 512: (8, 0), 1024: (8, 1), 2048: (8, 2), 4096: (8, 3)},
    2: {256: (16, 0), 512: (16, 1), 1024: (16, 2), 2048: (16, 3), 4096: (8, 3)},
    4: {256: (16, 0), 512: (16, 1), 1024: (16, 2), 2048: (16, 3), 4096: (8, 3)},
    8: {256: (32, 1), 512: (32, 2), 1024: (32, 3), 2048: (16, 3), 4096: (8, 3)},
}


@pytest.mark.parametrize("cpus", sorted(SLUB_TABLE))
def test_slub_objects_per_slab_and_order(cpus):
    k = make_kernel("slub", cpus=cpus, memory_mib=16)
    s = k.slab
    for size, (objects, order) in SLUB_TABLE[cpus].items():
        c = s.kmalloc_caches[size]
        assert c.oo == (order, objects), (cpus, size, c.oo)
        assert c.min == (0, 4096 // size)  # fallback: get_order(size)
    # skbuff_head_cache (256 B, cache-line aligned) behaves like the 256 column.
    skb = s.skbuff_head_cache
    assert skb.size == 256
    assert skb.oo == SLUB_TABLE[cpus][256][::-1]
    assert len(skb.cpu_slab) == cpus


def test_slub_min_partial_and_cpu_partial():
    k = make_kernel("slub", cpus=2, memory_mib=16)
    s = k.slab
    got = {size: (s.kmalloc_caches[size].min_partial, s.kmalloc_caches[size].cpu_partial)
           for size in (8, 64, 256, 1024, 2048, 4096, 8192)}
    # min_partial = clamp(ilog2(size)/2, 5, 10); cpu_partial 30 / 13 / 6 / 2.
    assert got == {8: (5, 30), 64: (5, 30), 256: (5, 13), 1024: (5, 6), 2048: (5, 6),
                   4096: (6, 2), 8192: (6, 2)}
    assert sorted(s.kmalloc_caches) == [8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048,
                                        4096, 8192]
    # radix_tree_node has a constructor: the free pointer moves behind the object.
    assert s.radix_tree_node.size == 584
    assert s.radix_tree_node.oo == (1, 14)
    assert s.kmalloc_caches[8192].oo == (3, 4)
    assert s.kmalloc_caches[8].oo == (0, 512)


def test_slub_calculate_order_matches_formula():
    # min_objects = 4 * (fls(nr_cpu_ids) + 1), capped at what fits an order-3 slab.
    assert calculate_order(2048, 0, 1) == 2
    assert calculate_order(2048, 0, 64) == 3
    assert order_objects(3, 2048, 0) == 16
    assert calculate_order(96, 0, 2) == 0


@pytest.mark.parametrize(("size", "order"), [
    # min_objects 12 capped at the 10 an order-3 slab holds: order 3 wastes 2768 B,
    # more than 1/16 of it, so the waste allowed goes to 1/8, and order 3 is kept.
    (3000, 3),
    # Order 0 holds 13 and wastes 248 B, within 1/16 of it (256 B): the first try fits.
    (296, 0),
    # 12 fit in order 0 and waste 256 B, exactly 1/16: kept.
    (320, 0),
    # 12 need order 1, which wastes 608 B, more than 1/16; order 2 wastes 584 B.
    (632, 2),
    # 6 fit in order 3 and waste 4640 B: more than 1/8, within 1/4, so order 3 is
    # kept on the last waste step rather than with fewer objects.
    (4688, 3),
    # 3 fit in order 3 and waste 8168 B, within 1/4 (8192 B) only.
    (8200, 3),
    # 2 fit in order 3 and waste 8192 B, exactly 1/4: kept, with 2 objects.
    (12288, 3),
    # 2 fit in order 3 but waste 9768 B, more than 1/4: no layout with 2 objects; a
    # single object goes in the smallest order that holds it, 2.
    (11500, 2),
    # Only one fits in order 3: the single-object layout, order 3.
    (20000, 3),
    # Not even one fits in order 3 (slub_max_order): the smallest order that holds
    # one, up to MAX_ORDER.
    (40000, 4),
])
def test_slub_calculate_order_backs_off_waste_then_objects(size, order):
    """calculate_order() for 2 CPUs beyond the first layout it tries (hand-computed from
    3.6's calculate_order and slab_order). Catches the waste steps started at 1/17,
    divided by 3, or stopped before 1/4; the object count's loop stopped before
    trying 2 objects; slab_order's waste bound made strict, or its orders tried two
    at a time."""
    assert calculate_order(size, 0, 2) == order


@pytest.mark.parametrize(("size", "align"), [(8, 8), (16, 16), (24, 32), (32, 32), (40, 64),
                                             (100, 64), (1000, 64)])
def test_slub_hwcache_align_halves_the_line_while_the_object_fits_twice(size, align):
    """calculate_alignment(): with SLAB_HWCACHE_ALIGN a cache line (64 B), halved while
    the object fits in half of it twice over; at least ARCH_SLAB_MINALIGN."""
    k = make_kernel("slub", slub_nomerge=True, cpus=2, memory_mib=32)
    c = k.slab.kmem_cache_create("aligned", size, flags=SLAB_HWCACHE_ALIGN)
    assert c.align == align and c.size % align == 0
