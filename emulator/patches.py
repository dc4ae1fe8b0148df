"""The 16 patches of "Swap-over-NBD without deadlocking" (V15, merged for 3.6).

Models: the patch series itself. Each patch is a named toggle; every place in
the emulator whose behaviour a patch changes asks ``patches.has(N)`` and nowhere
else is a kernel preset special-cased. "vanilla" is 3.5 (no patch), "swapnbd"
is 3.6 (all sixteen).

Titles: 2, 10 and 15 are verified against public commits; the others are the
series' titles as recalled in reference/kernel-mechanisms.md §10.2.

``effect`` says what the patch changes *in this model*. Patches whose kernel
change has no observable effect here (pure micro-optimisations, NUMA-only
paths) say so rather than being silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

# Names for the gates: ``patches.has(NBD_SOCK_MEMALLOC)`` reads as the change it tests.
SLAB_PFMEMALLOC = 1
SLUB_FASTPATH_NO_CHECK = 2
GFP_MEMALLOC = 3
SOFTIRQ_PF_MEMALLOC = 4
PFMEMALLOC_WHEN_NEEDED = 5
MEMPOLICY_IGNORED = 6
SK_GFP_ATOMIC = 7
SOCK_MEMALLOC = 8
SKB_RESERVES = 9
SKB_PAGE_PFMEMALLOC = 10
SKB_ALLOC_PAGE_PFMEMALLOC = 11
SKB_PF_MEMALLOC = 12
SLAB_STATIC_KEY = 13
NBD_SOCK_MEMALLOC = 14
THROTTLE_DIRECT_RECLAIM = 15
PGSCAN_DIRECT_THROTTLE = 16


@attrs.frozen
class Patch:
    number: int
    title: str
    effect: str


PATCHES: dict[int, Patch] = {
    p.number: p
    for p in [
        Patch(1, "mm: sl[au]b: add knowledge of PFMEMALLOC reserve pages",
              "slab pages allocated from the reserves are PageSlabPfmemalloc; SLAB tags "
              "their objects and SLUB checks pfmemalloc_match, so only callers entitled "
              "to the reserves get objects from them"),
        Patch(2, "mm: slub: optimise the SLUB fast path to avoid pfmemalloc checks",
              "SLUB's lockless per-cpu freelist hands out objects without a pfmemalloc "
              "check (the documented leak); without it the fast path checks too"),
        Patch(3, "mm: introduce __GFP_MEMALLOC to allow access to emergency reserves",
              "gfp_to_alloc_flags grants ALLOC_NO_WATERMARKS to __GFP_MEMALLOC in any "
              "context; without it the bit is ignored"),
        Patch(4, "mm: allow PF_MEMALLOC from softirq context",
              "a softirq whose context set PF_MEMALLOC (while handling a pfmemalloc skb) "
              "may use the reserves; __do_softirq masks the interrupted task's flag"),
        Patch(5, "mm: only set page->pfmemalloc when ALLOC_NO_WATERMARKS was used",
              "page->pfmemalloc is set only when the no-watermark attempt was needed; "
              "without it every page allocated by a reserve-entitled caller is marked"),
        Patch(6, "mm: ignore mempolicies when using ALLOC_NO_WATERMARK",
              "no effect in this model: it has one node and no mempolicies"),
        Patch(7, "net: introduce sk_gfp_atomic() to allow addition of GFP flags depending "
                 "on the individual socket",
              "TCP's atomic allocations for a socket (ACKs of received data) carry "
              "__GFP_MEMALLOC when the socket has it"),
        Patch(8, "netvm: allow the use of __GFP_MEMALLOC by specific sockets",
              "sk_set_memalloc / sk_clear_memalloc, SOCK_MEMALLOC and the memalloc "
              "socket count exist; without it sk_set_memalloc is unavailable"),
        Patch(9, "netvm: allow skb allocation to use PFMEMALLOC reserves",
              "__alloc_skb(SKB_ALLOC_RX) and the NIC's page fragments add __GFP_MEMALLOC "
              "when sk_memalloc_socks(); kmalloc_reserve marks skb->pfmemalloc; "
              "sk_filter drops pfmemalloc skbs for sockets without SOCK_MEMALLOC"),
        Patch(10, "netvm: propagate page->pfmemalloc to skb",
              "no separate effect: the model's drivers attach no pages to skbs"),
        Patch(11, "netvm: propagate page->pfmemalloc from skb_alloc_page to skb",
              "no effect: no driver here allocates RX pages with __skb_alloc_page "
              "(e1000's page fragments go through build_skb, which 3.6 does not mark)"),
        Patch(12, "netvm: set PF_MEMALLOC as appropriate during SKB processing",
              "PF_MEMALLOC while NET_RX delivers a pfmemalloc skb, and while "
              "__sk_backlog_rcv processes one from a socket's backlog"),
        Patch(13, "mm: micro-optimise slab to avoid a function call",
              "no behavioural effect (a static key around the SLAB pfmemalloc checks); "
              "the model gates the checks on sk_memalloc_socks() either way"),
        Patch(14, "nbd: set SOCK_MEMALLOC for access to PFMEMALLOC reserves",
              "the NBD driver calls sk_set_memalloc on its socket, sends with "
              "GFP_NOIO|__GFP_MEMALLOC and runs sock_xmit with PF_MEMALLOC"),
        Patch(15, "mm: throttle direct reclaimers if PF_MEMALLOC reserves are low and "
                  "swap is backed by network storage",
              "throttle_direct_reclaim / pfmemalloc_watermark_ok: direct reclaimers "
              "sleep on pgdat->pfmemalloc_wait while free <= half the min watermarks; "
              "kswapd wakes them"),
        Patch(16, "mm: account for the number of times direct reclaimers get throttled",
              "the pgscan_direct_throttle vmstat counter"),
    ]
}

PRESETS: dict[str, frozenset[int]] = {
    "vanilla": frozenset(),
    "swapnbd": frozenset(PATCHES),
}


@attrs.frozen
class PatchSet:
    """The set of applied patches; ``has(n)`` is the only gate the model uses."""

    applied: frozenset[int] = frozenset()

    def has(self, number: int) -> bool:
        return number in self.applied

    @classmethod
    def preset(cls, name: str) -> PatchSet:
        return cls(PRESETS[name])

    @classmethod
    def of(cls, numbers: Iterable[int]) -> PatchSet:
        numbers = frozenset(numbers)
        unknown = sorted(n for n in numbers if n not in PATCHES)
        if unknown:
            raise ValueError(f"unknown patch number(s) {unknown}; patches are 1-16")
        return cls(numbers)

    @property
    def name(self) -> str:
        """"vanilla", "swapnbd", or e.g. "swapnbd-15" / "vanilla+1,9"."""
        allp = frozenset(PATCHES)
        if self.applied == allp:
            return "swapnbd"
        if not self.applied:
            return "vanilla"
        missing = sorted(allp - self.applied)
        if len(missing) <= len(self.applied):
            return "swapnbd-" + ",".join(map(str, missing))
        return "vanilla+" + ",".join(map(str, sorted(self.applied)))

    def __str__(self) -> str:
        return self.name
