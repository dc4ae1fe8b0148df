"""Workloads: what user processes do with their memory.

``anon_mmap_write`` models MMTests' usemem as the seed's test ran it: each
process maps its share of ``size_ratio x memory`` anonymously and writes one
word per page, linearly, ``passes`` times; on every pass after the first it
first checks that the word it wrote last time is still there (usemem's "Data
wrong at offset" check) — with swap in between, that is a check that what went
out over NBD came back intact. A mismatch is an ``integrity_error``.

The word is the page's (pid, virtual page, pass) triple; swap_writepage turns
it into 4096 real bytes with a checksum (emulator/mm/page_io.py).

``rate_pages_s`` (0, the default, is usemem: as fast as the CPU goes) caps how
many pages a process writes per emulated second: between stores it sleeps off
the CPU, as a program waiting for its input would. It sets the swap load's
*rate* apart from its *size*: the seed's deadlock needs allocations to reach
the min watermark, which a rate that kswapd keeps up with does not do.

Simplified: a store is instantaneous Python work (user time is what the loop
costs on the host); the rate limit is checked every ``PACE_EVERY`` pages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from emulator.mm.memory import handle_mm_fault
from emulator.mm.page import PG, Page, pack_contents, unpack_contents

if TYPE_CHECKING:
    from actors.process import UserProcess
    from emulator.kernel import Kernel

RESCHED_EVERY = 64  # pages between cond_resched() checks
PACE_EVERY = 4  # pages between rate-limit checks


async def anon_mmap_write(k: Kernel, proc: UserProcess) -> bool:
    """Returns True when every pass completed, False if the process was killed."""
    task = proc.task
    mm = proc.mm
    pte = mm.pte
    pid = task.pid
    passes = proc.passes
    rate = proc.rate_pages_s
    interval = k.hz(PACE_EVERY / rate) if rate else 0.0
    next_store = trio.current_time()
    for p in range(passes):
        for vpn in range(mm.nr_pages):
            while True:
                if task.fatal_signal:
                    return False
                page = pte[vpn]
                if page.__class__ is Page:
                    page.young = True
                    break
                task.set_mode("sys")
                page = await handle_mm_fault(k, mm, vpn, task, write=True)
                task.set_mode("user")
                if page is not None:
                    break
            word = pack_contents(pid, vpn, p)
            # The generation is the word's low field: word - 1 is last pass's word.
            if p and page.contents != word - 1:
                found = page.contents
                k.integrity_error(what="Data wrong at offset", pid=pid, vaddr=vpn,
                                  expected=[pid, vpn, p - 1],
                                  found=None if found is None else list(unpack_contents(found)))
            page.contents = word
            if page.flags & PG.swapcache:
                page.flags |= PG.dirty  # the PTE's dirty bit, moved to the page at unmap
            k.progress += 1
            if interval and not vpn % PACE_EVERY:
                next_store += interval
                delay = next_store - trio.current_time()
                if delay > 0:
                    await task.sleep(delay, wchan="pace")
                else:
                    next_store -= delay  # fell behind: no burst to catch up
            if not vpn % RESCHED_EVERY:
                await task.cond_resched()
        proc.passes_done = p + 1
    return True


WORKLOADS = {"anon-mmap-write": anon_mmap_write}
