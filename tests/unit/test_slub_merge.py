"""SLUB cache merging (3.6 find_mergeable / slab_unmergeable / kmem_cache alias refcount,
the slub_nomerge boot parameter); SLAB never merges.

The 3.6 rule: a kmem_cache_create() with no SLUB_NEVER_MERGE flag and no constructor is
served by the newest existing cache that is itself mergeable, has the same
SLUB_MERGE_SAME flags, and whose s->size is at least the request's size (word-aligned,
then aligned to calculate_alignment()), less than a word more, and a multiple of that
alignment.
"""

from __future__ import annotations

import pytest
from slab_helpers import ALL, hold_below_min, make_kernel, release

from emulator.flags import GFP_ATOMIC, GFP_KERNEL, PF
from emulator.mm.slab_common import (
    SLAB_CACHE_DMA,
    SLAB_DESTROY_BY_RCU,
    SLAB_HWCACHE_ALIGN,
    SLAB_PANIC,
    SLAB_POISON,
    SLAB_RECLAIM_ACCOUNT,
)
from emulator.mm.slub import SLUB_MERGE_SAME, SLUB_NEVER_MERGE


def names(s) -> dict:
    return {d["name"]: d for d in s.slabinfo()}


# -- which standard caches merge ------------------------------------------------------------
@pytest.mark.parametrize("cpus", [1, 2, 4, 8])
def test_slub_standard_caches_merge_as_in_3_6(cpus):
    k = make_kernel("slub", cpus=cpus, memory_mib=16)
    s = k.slab
    # skbuff_head_cache: 256 B, SLAB_HWCACHE_ALIGN|SLAB_PANIC -> size 256, align 64;
    # kmalloc-256 (size 256, no MERGE_SAME flags) takes it. On a real 3.6 box
    # sizeof(struct sk_buff) = 232 aligns to the same 256.
    assert s.skbuff_head_cache is s.kmalloc_caches[256]
    # bio ("bio-0"): 192 B, SLAB_HWCACHE_ALIGN -> kmalloc-192.
    assert s.bio_cache is s.kmalloc_caches[192]
    # radix_tree_node has a constructor: never merges.
    assert s.radix_tree_node not in s.kmalloc_caches.values()
    assert s.radix_tree_node.aliases == [] and s.radix_tree_node.refcount == 1
    # blkdev_requests: 352 B; no cache of 352..359 bytes exists -> its own cache.
    assert s.request_cache not in s.kmalloc_caches.values()
    assert s.request_cache.aliases == [] and s.request_cache.size == 352
    assert s.kmalloc_caches[256].refcount == 2 and s.kmalloc_caches[192].refcount == 2
    # The merged caches keep their kmalloc geometry (reference §5.2 table).
    assert s.skbuff_head_cache.size == 256 and s.skbuff_head_cache.object_size == 256
    # skbuff_fclone_cache: 468 B, HWCACHE_ALIGN -> 512 -> kmalloc-512 (order 1 on 2 CPUs).
    assert s.skbuff_fclone_cache is s.kmalloc_caches[512]
    assert s.kmalloc_caches[512].aliases == ["skbuff_fclone_cache"]
    assert len(s.caches) == 13 + 2  # kmalloc-8 .. kmalloc-8192, radix_tree_node, requests
    s.check()


def test_slub_slabinfo_lists_a_merged_cache_once():
    k = make_kernel("slub", memory_mib=16)
    info = names(k.slab)
    # /proc/slabinfo: the cache under its first (kmalloc) name only.
    assert "skbuff_head_cache" not in info and "bio" not in info
    assert info["kmalloc-256"]["aliases"] == ["skbuff_head_cache"]
    assert info["kmalloc-192"]["aliases"] == ["bio"]
    assert info["kmalloc-512"]["aliases"] == ["skbuff_fclone_cache"]
    assert info["radix_tree_node"]["aliases"] == [] and info["blkdev_requests"]["aliases"] == []
    merged = ("kmalloc-192", "kmalloc-256", "kmalloc-512")
    assert all(not d["aliases"] for n, d in info.items() if n not in merged)
    # /sys/kernel/slab: mergeable caches live under a unique id, their names are links.
    assert info["kmalloc-256"]["sysfs_name"] == ":t-0000256"
    assert info["kmalloc-192"]["sysfs_name"] == ":t-0000192"
    assert info["radix_tree_node"]["sysfs_name"] == "radix_tree_node"  # ctor: unmergeable


def test_slab_never_merges():
    k = make_kernel("slab", memory_mib=16)
    s = k.slab
    std = [s.skbuff_head_cache, s.skbuff_fclone_cache, s.bio_cache, s.request_cache,
           s.radix_tree_node]
    assert len({id(c) for c in std + list(s.kmalloc_caches.values())}) == len(std) + 10
    assert s.skbuff_head_cache.name == "skbuff_head_cache" and s.bio_cache.name == "bio"
    info = names(s)
    assert {"skbuff_head_cache", "bio", "blkdev_requests", "radix_tree_node"} <= set(info)
    assert all(d["aliases"] == [] for d in info.values())
    # Even a request the SLUB rules would merge gets a new SLAB cache.
    c = s.kmem_cache_create("x", 256, 0, flags=SLAB_HWCACHE_ALIGN)
    assert c not in s.kmalloc_caches.values() and c.refcount == 1
    s.check()


def test_slub_nomerge_is_the_old_behaviour():
    k = make_kernel("slub", memory_mib=16, slub_nomerge=True)
    s = k.slab
    assert s.slub_nomerge
    assert s.skbuff_head_cache is not s.kmalloc_caches[256]
    assert s.bio_cache is not s.kmalloc_caches[192]
    assert s.skbuff_head_cache.name == "skbuff_head_cache" and s.bio_cache.name == "bio"
    info = names(s)
    assert info["skbuff_head_cache"]["aliases"] == [] and info["bio"]["aliases"] == []
    # slab_unmergeable() is true for every cache: sysfs uses the plain names.
    assert all(d["sysfs_name"] == n for n, d in info.items())
    assert s.skbuff_fclone_cache is not s.kmalloc_caches[512]
    assert len(s.caches) == 13 + 5
    # The geometry is the same as the merged cache's.
    assert s.skbuff_head_cache.oo == s.kmalloc_caches[256].oo
    s.check()


# -- the find_mergeable rules -----------------------------------------------------------------
def test_slub_merge_rules():
    k = make_kernel("slub", memory_mib=16)
    s = k.slab
    k256 = s.kmalloc_caches[256]
    # Word alignment: 249..256 bytes become 256 -> kmalloc-256.
    assert s.kmem_cache_create("a249", 249, 0) is k256
    # 241..248 bytes: kmalloc-256 is a whole word bigger -> no merge, a new cache ...
    c241 = s.kmem_cache_create("c241", 241, 0)
    assert c241 not in s.kmalloc_caches.values()
    assert (c241.object_size, c241.inuse, c241.size) == (241, 248, 248)
    # ... which the next 241..248-byte request merges into; object_size grows to the
    # largest user (so kzalloc clears the whole object).
    assert s.kmem_cache_create("d248", 248, 0) is c241
    assert s.kmem_cache_create("e244", 244, 0) is c241
    assert (c241.object_size, c241.inuse, c241.size) == (248, 248, 248)
    assert c241.aliases == ["d248", "e244"] and c241.refcount == 3
    # Hardware cache alignment: 232 (sizeof(struct sk_buff)) aligns to 256.
    assert s.kmem_cache_create("skb232", 232, 0, flags=SLAB_HWCACHE_ALIGN | SLAB_PANIC) is k256
    # An explicit alignment counts too: 96 bytes aligned to 64 is 128.
    assert s.kmem_cache_create("al64", 96, 64) is s.kmalloc_caches[128]
    assert s.kmem_cache_create("al8", 96, 0) is s.kmalloc_caches[96]
    # A constructor keeps a new cache out, and a cache with one takes no aliases.
    ct = s.kmem_cache_create("ctor256", 256, 0, ctor=True)
    assert ct not in s.kmalloc_caches.values() and ct.refcount == 1
    assert s.kmem_cache_create("like-radix", 584, 0) is not s.radix_tree_node
    # SLUB_NEVER_MERGE flags: never merged, never merged into.
    for flag in (SLAB_DESTROY_BY_RCU, SLAB_POISON):
        assert flag & SLUB_NEVER_MERGE
        c = s.kmem_cache_create(f"never{flag:x}", 512, 0, flags=flag)
        assert c is not s.kmalloc_caches[512]
        assert s.kmem_cache_create(f"after{flag:x}", 512, 0, flags=flag) is not c
    # SLUB_MERGE_SAME flags must match: a RECLAIM_ACCOUNT or DMA cache gets its own
    # cache, and later requests with the same flag merge into it.
    for flag in (SLAB_RECLAIM_ACCOUNT, SLAB_CACHE_DMA):
        assert flag & SLUB_MERGE_SAME
        c = s.kmem_cache_create(f"same{flag:x}", 1024, 0, flags=flag)
        assert c is not s.kmalloc_caches[1024]
        assert s.kmem_cache_create(f"same2{flag:x}", 1020, 0, flags=flag) is c
        assert s.kmem_cache_create(f"plain{flag:x}", 1024, 0) is s.kmalloc_caches[1024]
    assert k256.aliases == ["skbuff_head_cache", "a249", "skb232"] and k256.refcount == 4
    s.check()


def test_slub_newest_cache_first():
    """slab_caches is built with list_add(): find_mergeable tries the newest cache first."""
    k = make_kernel("slub", memory_mib=16)
    s = k.slab
    s.slub_nomerge = True  # boot-time parameter: affects later creations only
    a = s.kmem_cache_create("a", 336, 0)
    b = s.kmem_cache_create("b", 336, 0)
    assert a is not b
    assert s.skbuff_head_cache is s.kmalloc_caches[256]  # created before the change
    s.slub_nomerge = False
    assert s.kmem_cache_create("c", 330, 0) is b
    assert s.kmem_cache_create("d", 336, 0, ctor=True) not in (a, b)


def test_slub_refcount_below_zero_is_unmergeable():
    k = make_kernel("slub", memory_mib=16)
    s = k.slab
    k512 = s.kmalloc_caches[512]
    k512.refcount = -1  # "set a slab to be unmergeable during bootstrap"
    assert s.slab_unmergeable(k512)
    assert s.kmem_cache_create("x512", 512, 0) is not k512


# -- merged caches share their per-CPU slabs ------------------------------------------------
async def test_skb_head_and_kmalloc_256_share_the_cpu_slab():
    k = make_kernel("slub", memory_mib=16)
    s = k.slab
    t = k.new_task("a", cpu=0)
    head = await s.kmem_cache_alloc(s.skbuff_head_cache, GFP_KERNEL, t)
    obj = await s.kmalloc(256, GFP_KERNEL, t)
    assert obj.cache is head.cache is s.kmalloc_caches[256]
    assert obj.slab is head.slab is s.kmalloc_caches[256].cpu_slab[0].page
    # LIFO per-CPU freelist: the freed skb head is the next kmalloc(256) object.
    s.kmem_cache_free(s.skbuff_head_cache, head, t)
    again = await s.kmalloc(200, GFP_KERNEL, t)
    assert again is head
    s.kfree(again, t)
    s.kfree(obj, t)
    info = names(s)["kmalloc-256"]
    assert info["in_use"] == 0 and info["slabs"] == 1
    # bio and kmalloc-192 the same way.
    bio = await s.kmem_cache_alloc(s.bio_cache, GFP_KERNEL, t)
    kobj = await s.kmalloc(150, GFP_KERNEL, t)
    assert bio.slab is kobj.slab
    s.kfree(bio, t)  # kfree() of a bio object is just kmem_cache_free on the same cache
    s.kmem_cache_free(s.bio_cache, kobj, t)
    s.check()


async def test_nomerge_skb_head_and_kmalloc_256_use_separate_slabs():
    k = make_kernel("slub", memory_mib=16, slub_nomerge=True)
    s = k.slab
    t = k.new_task("a", cpu=0)
    head = await s.kmem_cache_alloc(s.skbuff_head_cache, GFP_KERNEL, t)
    obj = await s.kmalloc(256, GFP_KERNEL, t)
    assert head.cache is not obj.cache and head.slab is not obj.slab
    assert names(s)["skbuff_head_cache"]["in_use"] == 1
    assert names(s)["kmalloc-256"]["in_use"] == 1
    s.kfree(head, t)
    s.kfree(obj, t)
    s.check()


@pytest.mark.parametrize(("nomerge", "patches", "leaks"), [
    (False, ALL, True),         # merged + patch 2: kmalloc(256) users get the reserve slab
    (False, ALL - {2}, False),  # merged, fast path checks: refused
    (True, ALL, False),         # kept apart (slub_nomerge, or SLAB): no shared cpu slab
])
async def test_pfmemalloc_skb_slab_reaches_kmalloc_256_users(nomerge, patches, leaks):
    """Why merging matters: an entitled task's skb head loads a pfmemalloc cpu slab of
    skbuff_head_cache; with merging that is kmalloc-256's cpu slab, and patch 2's fast
    path hands its objects to any kmalloc(193..256) caller on that CPU."""
    k = make_kernel("slub", patches, memory_mib=64, slub_nomerge=nomerge)
    s = k.slab
    memalloc = k.new_task("kswapd0", PF.MEMALLOC, cpu=0)
    user = k.new_task("user", cpu=0)
    held = await hold_below_min(k, user)
    head = await s.kmem_cache_alloc(s.skbuff_head_cache, GFP_KERNEL, memalloc)
    assert head is not None and head.slab.pfmemalloc
    got = await s.kmalloc(256, GFP_ATOMIC, user)
    if leaks:
        assert got is not None and got.slab is head.slab and got.pfmemalloc
        assert k.vmstat["slab_pfmemalloc_refused"] == 0
    else:
        assert got is None  # below min: no reserve object and no new page for the user
    s.check()
    release(k, held)
    for o in (head, got):
        if o is not None:
            s.kfree(o, user)
    s.shrink_all()
    s.check()
    assert k.vmstat["nr_slab_unreclaimable"] == 0
