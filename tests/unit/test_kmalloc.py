"""kmalloc / kfree: size classes of each allocator, kmalloc_large, ZERO_SIZE_PTR,
and check() catching corrupted bookkeeping."""

from __future__ import annotations

import pytest
from slab_helpers import make_kernel

from emulator.flags import GFP_KERNEL
from emulator.mm.kmalloc import ZERO_SIZE_PTR, ksize
from emulator.mm.page import Owner


@pytest.mark.parametrize(("kind", "table"), [
    ("slub", {1: 8, 8: 8, 9: 16, 24: 32, 33: 64, 65: 96, 96: 96, 97: 128, 129: 192,
              193: 256, 257: 512, 1500: 2048, 4096: 4096, 4097: 8192, 8192: 8192}),
    ("slab", {1: 32, 8: 32, 33: 64, 65: 128, 97: 128, 129: 192, 193: 256, 257: 512,
              1500: 2048, 4097: 8192, 8192: 8192}),
])
async def test_kmalloc_size_classes(kind, table):
    k = make_kernel(kind, memory_mib=16)
    t = k.new_task()
    for size, cls in table.items():
        obj = await k.slab.kmalloc(size, GFP_KERNEL, t)
        assert obj.cache.name == f"kmalloc-{cls}", (size, obj.cache.name)
        assert ksize(obj) == cls
        k.slab.kfree(obj, t)
    k.slab.check()


@pytest.mark.parametrize("kind", ["slab", "slub"])
async def test_kmalloc_large_goes_to_the_page_allocator(kind):
    k = make_kernel(kind, memory_mib=16)
    t = k.new_task()
    free0 = k.pgdat.zone.nr_free_pages
    obj = await k.slab.kmalloc(8193, GFP_KERNEL, t)
    assert obj.cache is None and obj.order == 2 and obj.page.owner is Owner.KERNEL
    assert k.pgdat.zone.nr_free_pages == free0 - 4
    assert k.vmstat["nr_slab_unreclaimable"] == 0
    k.slab.kfree(obj, t)
    assert k.pgdat.zone.nr_free_pages == free0
    with pytest.raises(AssertionError):
        k.slab.kfree(obj, t)
    assert await k.slab.kmalloc(0, GFP_KERNEL, t) is ZERO_SIZE_PTR
    k.slab.kfree(ZERO_SIZE_PTR, t)
    k.slab.kfree(None, t)


@pytest.mark.parametrize("kind", ["slab", "slub"])
async def test_double_free_and_corruption_are_caught(kind):
    k = make_kernel(kind, memory_mib=16)
    s = k.slab
    t = k.new_task()
    objs = [await s.kmalloc(100, GFP_KERNEL, t) for _ in range(10)]
    s.kfree(objs[0], t)
    with pytest.raises(AssertionError, match="double free"):
        s.kfree(objs[0], t)
    s.check()
    objs[1].allocated = False  # an object "lost": neither free nor allocated
    with pytest.raises(AssertionError):
        s.check()
    objs[1].allocated = True
    s.check()
    k.vmstat["nr_slab_unreclaimable"] += 1
    with pytest.raises(AssertionError, match="nr_slab_unreclaimable"):
        s.check()


async def test_slabinfo_fields():
    for kind in ("slab", "slub"):
        k = make_kernel(kind, memory_mib=16)
        t = k.new_task()
        objs = [await k.slab.kmem_cache_alloc(k.slab.skbuff_head_cache, GFP_KERNEL, t)
                for _ in range(20)]
        # Under SLUB skbuff_head_cache is merged into kmalloc-256 (listed once, as an alias).
        info = next(d for d in k.slab.slabinfo()
                    if "skbuff_head_cache" in (d["name"], *d["aliases"]))
        for key in ("name", "active_objs", "num_objs", "objsize", "objperslab", "pagesperslab",
                    "slabs", "pfmemalloc_slabs", "cpu_cached", "shared_cached", "in_use",
                    "aliases"):
            assert key in info
        assert info["in_use"] == 20
        assert info["num_objs"] == info["slabs"] * info["objperslab"]
        assert info["active_objs"] >= 20
        for o in objs:
            k.slab.kfree(o, t)
