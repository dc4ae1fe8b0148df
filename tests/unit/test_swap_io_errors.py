"""Swap I/O errors as 3.5 handles them, and the messages about them.

end_swap_bio_write on an error: the page is re-dirtied, PG_reclaim cleared so
that it is not rotated, and it is no forward progress; only I/O that succeeded
moves ``k.progress``. A failed swap-in gives the faulting process SIGBUS and is
not an integrity error. The per-I/O messages go through printk_ratelimited's
state: 10 per 5 s of kernel time, then "callbacks suppressed".
"""

from __future__ import annotations

import trio

from emulator.config import from_dict
from emulator.flags import ALLOC_NO_WATERMARKS, GFP
from emulator.kernel import Kernel
from emulator.mm.page import PG, Owner
from emulator.printk import RateLimitState
from emulator.task import Task


def small_kernel() -> Kernel:
    return Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 1, "page_cache_mib": 0}}))


class FakeBio:
    def __init__(self, page) -> None:
        self.page = page
        self.data = b""


def page_under_writeback(k: Kernel):
    page = k.page_alloc.get_page_from_freelist(GFP(0), 0, ALLOC_NO_WATERMARKS, Owner.ANON)
    page.flags |= PG.swapbacked | PG.swapcache | PG.writeback | PG.reclaim | PG.lru
    page.swap = 7
    k.vmscan.add_page_to_lru(page, 0)
    k.vmstat["nr_writeback"] += 1
    return page


async def test_a_failed_swap_write_redirties_and_is_no_progress():
    k = small_kernel()
    page = page_under_writeback(k)
    rotated = k.vmstat["pgrotated"]
    k.swap.end_swap_bio_write(FakeBio(page), 5)
    assert page.flags & PG.dirty and page.flags & PG.error
    assert not page.flags & (PG.writeback | PG.reclaim)
    assert k.vmstat["pgrotated"] == rotated  # ClearPageReclaim: no rotation
    assert k.progress == 0
    ok = page_under_writeback(k)
    k.swap.end_swap_bio_write(FakeBio(ok), 0)
    assert k.progress == 1 and not ok.flags & PG.dirty
    assert k.vmstat["pgrotated"] == rotated + 1  # PG_reclaim: to the tail


async def test_a_failed_swap_read_is_sigbus_not_an_integrity_error():
    k = small_kernel()
    page = page_under_writeback(k)
    page.flags &= ~PG.writeback
    page.flags |= PG.locked
    k.swap.end_swap_bio_read(FakeBio(page), 5)
    assert k.progress == 0 and not page.flags & PG.uptodate
    task = Task(9, "usemem", k.cpus[0])
    k.sigbus(task, 3, page)
    assert task.fatal_signal and task.signal == "SIGBUS"
    assert k.integrity_errors == 0 and k.vmstat["sigbus_kill"] == 1


def test_ratelimit_state_is_the_kernels():
    rs = RateLimitState(interval=5.0, burst=10)
    assert [rs.ratelimit(0.1 * i)[0] for i in range(15)] == [True] * 10 + [False] * 5
    # The first call after the interval reports what was missed, and prints again.
    assert rs.ratelimit(5.3) == (True, 5)
    assert rs.total_missed == 5 and rs.missed == 0


async def test_repeated_messages_are_rate_limited_with_a_count(autojump_clock):
    from emulator import logs

    events: list[dict] = []
    logs.configure()
    logs.sink.observers.append(events.append)
    try:
        k = small_kernel()
        for _ in range(100):
            k.printk.ratelimited("warning", "swap_write_error", pfn=1, entry=2, error=5)
        await trio.sleep(5.1)
        k.printk.ratelimited("warning", "swap_write_error", pfn=1, entry=2, error=5)
    finally:
        logs.sink.observers.remove(events.append)
    assert k.printk.suppressed_total() == {"swap_write_error": 90}
    names = [e["event"] for e in events]
    assert names.count("swap_write_error") == 11
    (sup,) = [e for e in events if e["event"] == "printk_suppressed"]
    assert sup["message"] == "swap_write_error" and sup["suppressed"] == 90
