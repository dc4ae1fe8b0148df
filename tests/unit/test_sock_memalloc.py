"""struct sock's memory rules in isolation (net/sock.py): SOCK_MEMALLOC and the
memalloc_socks count (patch 8), sk_gfp_atomic (patch 7), sk_rcvqueues_full's
bound, and patch 12's __sk_backlog_rcv, which sets PF_MEMALLOC only while a
pfmemalloc skb is processed and leaves every other task flag alone.

A bare Sock on an emulator Kernel: no network, no protocol. Each test names in
its docstring the mutants (``python scripts/mutation.py``) it was written to
kill; the rules are the kernel's, so the test would fail for any such bug.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from emulator.config import from_dict
from emulator.flags import GFP, GFP_ATOMIC, GFP_KERNEL, PF
from emulator.kernel import Kernel
from net.sock import Sock

ALL = list(range(1, 17))


def make_kernel(patches=ALL) -> Kernel:
    return Kernel(from_dict({"machine": {"memory_mib": 16, "cpus": 2},
                             "kernel": {"patches": sorted(patches)}}))


def without(*numbers: int) -> list[int]:
    return [p for p in ALL if p not in numbers]


def test_sk_set_and_clear_memalloc_keep_the_flag_mask_and_the_count():
    """sk_set_memalloc adds exactly __GFP_MEMALLOC to sk_allocation and counts each
    socket once; sk_clear_memalloc takes exactly that back, once. Kills
    sk_set_memalloc 1 (`or` -> `and`: a second call counts the socket twice),
    6/7 (sk_allocation replaced or masked instead of or-ed), 8/10 (the count
    set or stepped by 2), and sk_clear_memalloc 1-8 (the early return inverted,
    the flag left set, the mask replaced/or-ed/inverted, the count set to 1 or
    incremented)."""
    k = make_kernel()
    a, b = Sock(k, "a"), Sock(k, "b")
    assert (a.memalloc, a.sk_allocation, k.memalloc_socks) == (False, GFP_KERNEL, 0)
    a.sk_set_memalloc()
    assert a.memalloc is True and a.sk_allocation == GFP_KERNEL | GFP.MEMALLOC
    assert k.memalloc_socks == 1 and k.sk_memalloc_socks()
    a.sk_set_memalloc()  # already set: nothing changes
    assert a.sk_allocation == GFP_KERNEL | GFP.MEMALLOC and k.memalloc_socks == 1
    b.sk_set_memalloc()
    assert k.memalloc_socks == 2
    b.sk_clear_memalloc()
    assert b.memalloc is False and b.sk_allocation == GFP_KERNEL
    assert k.memalloc_socks == 1 and k.sk_memalloc_socks()
    b.sk_clear_memalloc()  # not set: nothing changes
    assert b.memalloc is False and b.sk_allocation == GFP_KERNEL and k.memalloc_socks == 1
    a.sk_clear_memalloc()
    assert a.memalloc is False and a.sk_allocation == GFP_KERNEL
    assert k.memalloc_socks == 0 and not k.sk_memalloc_socks()


def test_sk_set_memalloc_needs_patch_8():
    """Without patch 8 sk_set_memalloc does nothing (there is no SOCK_MEMALLOC).
    Kills sk_set_memalloc's gate removed or inverted."""
    k = make_kernel(without(8))
    s = Sock(k, "nbd0")
    s.sk_set_memalloc()
    assert (s.memalloc, s.sk_allocation, k.memalloc_socks) == (False, GFP_KERNEL, 0)


@pytest.mark.parametrize("patches,memalloc,expected", [
    (ALL, True, GFP_ATOMIC | GFP.MEMALLOC),
    (ALL, False, GFP_ATOMIC),
    (without(7), True, GFP_ATOMIC),  # 3.5's GFP_ATOMIC, whatever the socket
])
def test_sk_gfp_atomic(patches, memalloc, expected):
    """sk_gfp_atomic (patch 7): GFP_ATOMIC plus the socket's __GFP_MEMALLOC, and
    nothing else. Kills sk_gfp_atomic 1 (the patch gate lost), 2 (`|` -> `&`:
    no GFP_ATOMIC bits left) and 3 (`&` -> `|`: every sk_allocation bit, and
    __GFP_MEMALLOC for an ordinary socket)."""
    k = make_kernel(patches)
    s = Sock(k, "s")
    if memalloc:
        s.sk_set_memalloc()
    assert s.sk_gfp_atomic(GFP_ATOMIC) == expected


def test_sk_rcvqueues_full_counts_backlog_and_receive_queue_strictly_over_the_limit():
    """sk_rcvqueues_full: backlog.len + rmem_alloc > limit (equal is not full).
    Kills sk_rcvqueues_full 1 (`+` -> `-`) and 2 (`>` -> `>=`)."""
    s = Sock(make_kernel(), "s")
    s.backlog_len, s.rmem_alloc = 600, 400
    assert s.sk_rcvqueues_full(1000) is False
    assert s.sk_rcvqueues_full(999) is True
    assert s.sk_add_backlog(SimpleNamespace(truesize=10), 999) is False
    assert s.sk_add_backlog(SimpleNamespace(truesize=10), 1000) is True
    assert s.backlog_len == 610 and len(s.backlog) == 1


class _Recording(Sock):
    def __init__(self, k: Kernel) -> None:
        super().__init__(k, "nbd0")
        self.seen: list[PF] = []

    async def backlog_rcv(self, skb, task) -> None:
        self.seen.append(task.flags)


@pytest.mark.parametrize("had_memalloc", [False, True])
async def test_sk_backlog_rcv_sets_only_pf_memalloc_and_restores_the_flags(had_memalloc):
    """__sk_backlog_rcv (patch 12): while a pfmemalloc skb is processed the task's
    flags are its own plus PF_MEMALLOC; afterwards exactly what they were (a
    PF_MEMALLOC the task had is kept). Kills sk_backlog_rcv 15 (`|=` -> `=`: the
    other flags dropped while processing) and 22 (`| saved` -> `& saved`: the
    flags lost afterwards)."""
    k = make_kernel()
    s = _Recording(k)
    s.sk_set_memalloc()
    own = PF.SWAPWRITE | (PF.MEMALLOC if had_memalloc else PF(0))
    task = k.new_task("nbd-client", own, cpu=1)
    await s.sk_backlog_rcv(SimpleNamespace(pfmemalloc=True), task)
    await s.sk_backlog_rcv(SimpleNamespace(pfmemalloc=False), task)
    assert s.seen == [own | PF.MEMALLOC, own]
    assert task.flags == own


async def test_sk_backlog_rcv_without_patch_12_leaves_the_flags():
    """Without patch 12 a pfmemalloc skb is processed with the task's own flags."""
    k = make_kernel(without(12))
    s = _Recording(k)
    s.sk_set_memalloc()
    task = k.new_task("nbd-client", PF.SWAPWRITE, cpu=1)
    await s.sk_backlog_rcv(SimpleNamespace(pfmemalloc=True), task)
    assert s.seen == [PF.SWAPWRITE] and task.flags == PF.SWAPWRITE
