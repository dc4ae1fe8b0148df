"""Helpers for the network-memory tests: a kernel, held memory levels, fake sockets."""

from __future__ import annotations

from emulator.config import Config, apply_overrides, from_dict
from emulator.flags import ALLOC_NO_WATERMARKS, GFP
from emulator.machine import boot_kernel
from emulator.mm.page import Owner


def kernel(patches: str = "swapnbd", slab: str = "slub", *overrides: str):
    data = apply_overrides({}, [f"kernel.patches=\"{patches}\"", f"machine.slab=\"{slab}\"",
                                "machine.memory_mib=32", "swap.size_mib=96", *overrides])
    cfg: Config = from_dict(data)
    return boot_kernel(cfg)


def hold_free_at(k, target: int) -> list:
    """Take order-0 pages (owner KERNEL) until exactly ``target`` pages are free."""
    held = []
    zone = k.pgdat.zone
    while zone.nr_free_pages > target:
        held.append(k.page_alloc.get_page_from_freelist(GFP(0), 0, ALLOC_NO_WATERMARKS,
                                                        Owner.KERNEL))
    return held


def release(k, pages: list) -> None:
    for p in pages:
        k.page_alloc.free_pages(p, 0)


class FakeRaw:
    """Stands for the real TCP socket: bytes waiting to be received, peekable."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)

    def recv(self, n: int, flags: int = 0) -> bytes:
        import socket

        out = bytes(self.data[:n])
        if not flags & socket.MSG_PEEK:
            del self.data[:n]
        return out

    def send(self, data) -> int:
        return len(data)
