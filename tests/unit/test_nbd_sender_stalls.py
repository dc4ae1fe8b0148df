"""The NBD driver's sender-stall accounting (drivers/block/nbd.py, SenderStalls).

A send during which the sender entered direct reclaim is a stall; the part of
it with no request awaiting a reply is its exposure (no reply can come to make
a page clean); an exposed stall in which the sender reclaimed nothing itself is
a near miss. The device is driven with a scripted socket on a real emulator
Kernel and trio's autojump clock, so every duration is exact.
"""

from __future__ import annotations

import trio
from structlog.testing import capture_logs

import nbdproto as P
from drivers.block.nbd import NBDDevice
from emulator.block import Bio, Request
from emulator.config import from_dict
from emulator.flags import ALLOC_NO_WATERMARKS, GFP
from emulator.kernel import Kernel
from emulator.mm.page import Owner
from emulator.task import Task, current


class ScriptedSock:
    """tcp_sendmsg runs the next scripted step in a request's last call (the one
    without MSG_MORE), or returns at once."""

    def __init__(self) -> None:
        self.sk_allocation = 0
        self.steps: list = []

    async def tcp_sendmsg(self, task: Task, data: bytes, more: bool = False) -> None:
        if self.steps and not more:
            await self.steps.pop(0)(task)


class Device(NBDDevice):
    def end_request(self, req: Request, error: int, task: Task) -> None:
        pass  # no bio or request pool behind these requests


def device(memory_mib: int = 16) -> tuple[Kernel, ScriptedSock, Device, Task]:
    k = Kernel(from_dict({"machine": {"memory_mib": memory_mib, "cpus": 1, "page_cache_mib": 0}}))
    sock = ScriptedSock()
    dev = Device(k, sock, P.ExportInfo(name="", size=1 << 20, flags=0), mss=1448)
    return k, sock, dev, Task(50, "nbd0", k.cpus[0])


def write_request() -> Request:
    bio = Bio(None)
    bio.prepare_write(0, b"\0" * 4096, None, None)
    return Request(bio, None)


async def test_stalls_and_exposures_are_timed_from_the_replies(autojump_clock):
    k, sock, dev, task = device()

    def reply(cookie: int) -> None:
        dev.nbd_end_request(P.Reply(cookie=cookie, error=0), dev.queue_head.pop(cookie), task)

    def stall(before: float, then=None, after: float = 0.0, reclaimed: int = 0):
        async def step(t: Task) -> None:
            t.allocstall += 1  # the send's allocation entered direct reclaim
            t.direct_reclaimed += reclaimed
            await trio.sleep(before)
            if then is not None:
                then()
                await trio.sleep(after)
        return step

    await dev.nbd_handle_req(write_request(), task)  # cookie 1: no stall
    # cookie 2 stalls 40 ms; the reply to 1 arrives after 10: exposed for 30.
    sock.steps.append(stall(0.010, lambda: reply(1), 0.030, reclaimed=32))
    await dev.nbd_handle_req(write_request(), task)
    reply(2)
    # cookie 3 stalls 20 ms with nothing in flight from the start: exposed for 20,
    # and reclaims nothing itself: a near miss.
    sock.steps.append(stall(0.020))
    await dev.nbd_handle_req(write_request(), task)
    # cookie 4 stalls 50 ms while 3 awaits its reply: not exposed (nor a near miss).
    sock.steps.append(stall(0.050))
    await dev.nbd_handle_req(write_request(), task)

    s = dev.sender_stalls.summary()
    assert (s.stalls, s.exposed, s.near_misses) == (3, 2, 1)
    assert abs(s.longest_s - 0.050) < 1e-9
    assert abs(s.longest_exposed_s - 0.030) < 1e-9
    assert abs(s.total_s - 0.110) < 1e-9
    assert (k.vmstat["nbd_sender_reclaim"], k.vmstat["nbd_sender_reclaim_exposed"],
            k.vmstat["nbd_sender_near_miss"]) == (3, 2, 1)
    assert dev.statistics().sender_exposed_s is None  # no send in progress


async def test_a_send_in_progress_reports_its_exposure(autojump_clock):
    _, sock, dev, task = device()
    seen = []

    async def stuck(t: Task) -> None:
        t.allocstall += 1
        await trio.sleep(7.0)
        seen.append(dev.statistics().sender_exposed_s)  # what a diagnosis would read

    sock.steps.append(stuck)
    await dev.nbd_handle_req(write_request(), task)
    assert seen == [7.0]


async def test_a_stall_says_where_the_memory_went(autojump_clock):
    """Pages freed by anyone, and taken below min by atomic callers, while the
    send was stalled: in the send's statistics while it lasts."""
    k, sock, dev, task = device()
    seen = []

    async def stuck(t: Task) -> None:
        t.allocstall += 1
        await trio.sleep(1.0)
        k.vmstat["pgfree"] += 5  # another task frees five pages...
        k.vmstat["pgalloc_below_min"] += 3  # ...and atomic receive takes three of them
        seen.append(dev.statistics().sender_send)

    sock.steps.append(stuck)
    await dev.nbd_handle_req(write_request(), task)
    assert seen == [{"pgfree": 5, "pgalloc_below_min": 3}]
    assert dev.statistics().sender_send is None  # no send in progress


async def test_a_stall_event_names_who_freed_pages(autojump_clock):
    """The stall's event breaks the pages freed during it down by the freeing
    task's comm ("-" outside any task), and counts per-cpu pages drained."""
    k, sock, dev, task = device(memory_mib=64)  # per-cpu lists that hold a few pages
    pa = k.page_alloc
    pages = [pa.get_page_from_freelist(GFP(0), 0, ALLOC_NO_WATERMARKS, Owner.KERNEL)
             for _ in range(4)]
    pa.free_pages(pages.pop(), 0)  # before the send: not counted
    reader = Task(60, "netreader", k.cpus[0])
    on_lists = []

    async def stuck(t: Task) -> None:
        t.allocstall += 1
        await trio.sleep(0.5)
        token = current.set(reader)
        try:
            pa.free_pages(pages.pop(), 0)  # onto cpu 0's per-cpu list
            pa.free_pages(pages.pop(), 0)
        finally:
            current.reset(token)
        pa.free_pages(pages.pop(), 0)  # no task: straight to the buddy lists
        on_lists.append(k.pgdat.zone.nr_pcp_pages)
        pa.drain_all_pages()

    sock.steps.append(stuck)
    with capture_logs() as logs:
        await dev.nbd_handle_req(write_request(), task)
    (ev,) = [e for e in logs if e["event"] == "nbd_sender_stall"]
    assert ev["freed_by"] == {"netreader": 2, "-": 1}
    assert ev["pgfree"] == 3
    assert on_lists[0] > 0 and ev["pcp_drained"] == on_lists[0]
