"""Swap I/O: swap_writepage, swap_readpage and their completions.

Models mm/page_io.c (3.5): swap_writepage (a bio from the bio mempool with
GFP_NOIO; pswpout counted at submission; PG_writeback; the page unlocked before
submission), end_swap_bio_write (on an error: SetPageError, set_page_dirty and
ClearPageReclaim so that end_page_writeback does not rotate the page, "Write-error
on swap-device"), swap_readpage (a bio with GFP_KERNEL, pswpin) and
end_swap_bio_read (SetPageUptodate, or SetPageError and "Read-error on
swap-device"; unlock_page).

Page contents are real on the wire: swap_writepage turns the page's (pid,
virtual page, generation) into 4096 bytes with a CRC32 (``encode_page``), and
end_swap_bio_read checks them (``decode_page``). A bad checksum is an
``integrity_error``. Only I/O that succeeded is forward progress.

Simplified: no frontswap, no SWP_FILE direct I/O, no synchronous completion.

A failed read leaves the page not uptodate: do_swap_page returns
VM_FAULT_SIGBUS and the process dies of SIGBUS. Both error messages are rate-
limited (emulator/printk.py).
"""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING

from emulator.flags import GFP_KERNEL, GFP_NOIO
from emulator.mm.page import PAGE_SIZE, PG, Page, pack_contents, unpack_contents
from emulator.task import Task

if TYPE_CHECKING:
    from emulator.kernel import Kernel

_HDR = struct.Struct(">4sIQQQ")  # magic, crc32 of the rest, pid, vpn, gen
_MAGIC = b"SWPG"


def encode_page(contents: int) -> bytes:
    """The bytes of an anonymous page: a header naming its (pid, vpn, gen), a filler
    derived from them, and a CRC32 over everything after the CRC field."""
    pid, vpn, gen = unpack_contents(contents)
    seed = zlib.crc32(struct.pack(">QQQ", pid, vpn, gen)).to_bytes(4, "big")
    body = struct.pack(">QQQ", pid, vpn, gen) + (seed * ((PAGE_SIZE - _HDR.size) // 4 + 1))
    body = body[: PAGE_SIZE - 8]
    return _MAGIC + zlib.crc32(body).to_bytes(4, "big") + body


def decode_page(data: bytes) -> int | None:
    """The packed (pid, vpn, gen) of a page's bytes, or None if the bytes are not an
    intact page (a header whose fields no page of this machine can have included)."""
    if len(data) != PAGE_SIZE or data[:4] != _MAGIC:
        return None
    _, crc, pid, vpn, gen = _HDR.unpack_from(data)
    if zlib.crc32(memoryview(data)[8:]) != crc:
        return None
    try:
        return pack_contents(pid, vpn, gen)
    except ValueError:
        return None


class PageIO:
    """Mixed into SwapInfo (emulator/mm/swapfile.py), which owns ``bdev``."""

    k: Kernel

    async def swap_writepage(self, page: Page, task: Task) -> bool:
        """swap_writepage(): bio from the bio mempool with GFP_NOIO, PG_writeback,
        pswpout, submit. The page is unlocked here, as in the kernel."""
        k = self.k
        if self.try_to_free_swap(page, task):
            self.unlock_page(page)
            return False
        bio = await self.bdev.bio_alloc(GFP_NOIO, task)
        if bio is None:
            page.flags |= PG.dirty  # set_page_dirty: try again later
            page.flags &= ~PG.reclaim
            self.unlock_page(page)
            return False
        with k.lock:
            k.vmstat["pswpout"] += 1
            k.vmstat["pgpgout"] += PAGE_SIZE // 1024
            self.set_page_writeback(page)
        bio.prepare_write(page.swap * PAGE_SIZE, encode_page(page.contents), page,
                          self.end_swap_bio_write)
        self.unlock_page(page)
        await self.bdev.submit_bio(bio, task)
        return True

    def end_swap_bio_write(self, bio, error: int) -> None:
        """end_swap_bio_write(): on an error, SetPageError, set_page_dirty (the page
        stays in the swap cache and is written again by a later scan), "Write-error
        on swap-device" and ClearPageReclaim, so that end_page_writeback does not
        rotate it. Only a write that succeeded is progress."""
        page = bio.page
        if error:
            page.flags |= PG.error | PG.dirty
            page.flags &= ~PG.reclaim
            self.k.printk.ratelimited("warning", "swap_write_error", pfn=page.pfn,
                                      entry=page.swap, error=error)
        self.end_page_writeback(page)
        if not error:
            self.k.progress += 1

    async def swap_readpage(self, page: Page, task: Task) -> None:
        """swap_readpage(): bio with GFP_KERNEL, pswpin, submit; end_swap_bio_read
        unlocks the page."""
        k = self.k
        bio = await self.bdev.bio_alloc(GFP_KERNEL, task)
        if bio is None:
            self.unlock_page(page)
            return
        k.vmstat["pswpin"] += 1
        k.vmstat["pgpgin"] += PAGE_SIZE // 1024
        bio.prepare_read(page.swap * PAGE_SIZE, PAGE_SIZE, page, self.end_swap_bio_read)
        await self.bdev.submit_bio(bio, task)

    def end_swap_bio_read(self, bio, error: int) -> None:
        """end_swap_bio_read(): SetPageUptodate, or on an error SetPageError and
        "Read-error on swap-device" (do_swap_page then finds the page not uptodate:
        SIGBUS); unlock_page. Only a read that succeeded is progress."""
        page = bio.page
        if not error:
            contents = decode_page(bio.data)
            if contents is None:
                self.k.integrity_error(what="checksum", pid=None, vaddr=None,
                                       expected=f"swap slot {page.swap}",
                                       found="bytes failing the CRC/magic check")
                page.flags |= PG.error
            else:
                page.contents = contents
                page.flags |= PG.uptodate
        else:
            page.flags |= PG.error
            self.k.printk.ratelimited("warning", "swap_read_error", pfn=page.pfn,
                                      entry=page.swap, error=error)
        self.unlock_page(page)
        if not error:
            self.k.progress += 1
