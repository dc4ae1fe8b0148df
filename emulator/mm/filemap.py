"""The page lock and the writeback bit: lock_page / unlock_page, writeback state.

Models the parts of mm/filemap.c (unlock_page, wait_on_page_locked, the hashed
page wait table page_waitqueue, end_page_writeback) and of
mm/page-writeback.c (test_set_page_writeback) that swap uses: PG_locked, and
PG_writeback kept in step with NR_WRITEBACK.

Simplified: no lock_page contention beyond the PG_locked bit and its wait
table (pages are "locked" by setting the bit, synchronously, under k.lock).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.mm.page import PG, Page
from emulator.task import Task

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.wait import HashedWaitTable


class Filemap:
    """Mixed into SwapInfo (emulator/mm/swapfile.py), which owns ``page_wait``."""

    k: Kernel
    page_wait: HashedWaitTable

    def unlock_page(self, page: Page) -> None:
        """unlock_page(): clear PG_locked and wake the page's waiters."""
        page.flags &= ~PG.locked
        self.page_wait.for_key(page.pfn).wake_up()

    async def wait_on_page_locked(self, page: Page, task: Task, wchan: str) -> None:
        """wait_on_page_locked(): sleep (iowait) until PG_locked is clear."""
        if page.flags & PG.locked:
            await task.sleep_on(self.page_wait.for_key(page.pfn),
                                lambda: not page.flags & PG.locked, wchan=wchan, iowait=True)

    def set_page_writeback(self, page: Page) -> None:
        """set_page_writeback(): PG_writeback and NR_WRITEBACK, in step."""
        page.flags |= PG.writeback
        self.k.vmstat["nr_writeback"] += 1

    def end_page_writeback(self, page: Page) -> None:
        """end_page_writeback(): clear PG_writeback and NR_WRITEBACK; a page reclaim
        marked (PG_reclaim) goes to the inactive list's tail; wake its waiters."""
        page.flags &= ~PG.writeback
        self.k.vmstat["nr_writeback"] -= 1
        if page.flags & PG.reclaim:
            page.flags &= ~PG.reclaim
            self.k.vmscan.rotate_reclaimable_page(page)
        self.page_wait.for_key(page.pfn).wake_up()
