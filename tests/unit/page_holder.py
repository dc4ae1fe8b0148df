"""Holding free pages at an exact level, for unit tests on a real emulator Kernel.

``Holder(k).set_free(n)`` allocates order-0 pages with ALLOC_NO_WATERMARKS (and
frees them again) until the zone has exactly ``n`` free pages.
"""

from __future__ import annotations

from emulator.flags import ALLOC_NO_WATERMARKS, GFP
from emulator.kernel import Kernel
from emulator.mm.page import Owner


class Holder:
    """Holds pages so that the zone's free count sits exactly where a test wants it."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.held = []

    def set_free(self, target: int) -> None:
        zone = self.k.pgdat.zone
        pa = self.k.page_alloc
        while zone.nr_free_pages > target:
            page = pa.get_page_from_freelist(GFP(0), 0, ALLOC_NO_WATERMARKS, Owner.KERNEL)
            assert page is not None
            # Test-held pages are not counted as pfmemalloc users: drop the mark
            # (and the gauge get_page_from_freelist raised with it).
            if page.pfmemalloc:
                page.pfmemalloc = False
                self.k.vmstat["nr_pfmemalloc_pages"] -= 1
            self.held.append(page)
        while zone.nr_free_pages < target:
            pa.free_pages(self.held.pop(), 0)
        assert zone.nr_free_pages == target
