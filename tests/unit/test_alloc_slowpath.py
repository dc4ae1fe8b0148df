"""The page allocator's slow path: whom it wakes, where it looks first, when it
gives up and what it counts (emulator/mm/page_alloc.py).

__alloc_pages_slowpath wakes kswapd unless the caller passed __GFP_NO_KSWAPD,
and its first attempt (at the min watermark) goes through the task's own CPU's
per-cpu list. It gives up, without reclaiming, for a caller that cannot wait
(atomic), is the reclaimer itself (PF_MEMALLOC) or is the OOM killer's victim
(TIF_MEMDIE) once even the reserves are empty; after reclaim made no progress,
for a task with a fatal signal or a costly order once the OOM killer found
nothing (unless __GFP_NOFAIL), and when should_alloc_retry says so (noretry);
otherwise it starts again. It refuses an order of MAX_ORDER or more at once (no
kswapd, no reclaim); every NULL return is counted (``alloc_fail``, and
``pgalloc_high_order_fail`` for order > 0) and, unless the caller passed
__GFP_NOWARN, reported (warn_alloc_failed; here the ``alloc_fail`` debug event).
Besides: a page taken from the reserves counts all its 2^order frames in
nr_pfmemalloc_pages, and drain_all_pages adds what it drained to pcp_drained and
refreshes the free and per-cpu gauges.

Mutation testing found these unguarded (docs/TESTING.md): the tests catch
__GFP_NO_KSWAPD ignored or inverted, the first attempt made without the CPU, an
exit skipped or taken with the wrong arguments (a PF_MEMALLOC task reclaiming,
__GFP_NOFAIL's tests inverted, the OOM killer or reclaim called without the
caller's arguments), the order check moved past MAX_ORDER, _nopage called
without the caller's gfp or task, the counters set instead of added to, the
NOWARN test inverted, the frames of a high-order reserve page counted as one,
and drain_all_pages' totals and gauges dropped.
"""

from __future__ import annotations

import pytest
import trio
from slab_helpers import at_min, free_on_cpu, make_kernel, take_every_page
from structlog.testing import capture_logs

from emulator.flags import ALLOC_NO_WATERMARKS, GFP, GFP_ATOMIC, GFP_KERNEL, GFP_NOIO, PF, gfp_name
from emulator.mm.mmzone import MAX_ORDER
from emulator.mm.page import Owner


def stand_ins(k, *, progress=(), oom_pages=()) -> list:
    """Replace try_to_free_pages and alloc_pages_may_oom with stand-ins that record
    their calls in the list returned ("reclaim", or ("oom", gfp, order, task, owner)).
    Reclaim returns the next of ``progress`` (0 once they run out) and frees
    nothing; the OOM killer returns the next of ``oom_pages`` (None once they run
    out)."""
    calls: list = []
    progress, oom_pages = iter(progress), iter(oom_pages)

    async def try_to_free_pages(gfp, order, task):
        calls.append("reclaim")
        return next(progress, 0)

    async def alloc_pages_may_oom(gfp, order, task, owner):
        calls.append(("oom", gfp, order, task, owner))
        return next(oom_pages, None)

    k.vmscan.try_to_free_pages = try_to_free_pages
    k.oom.alloc_pages_may_oom = alloc_pages_may_oom
    return calls


def task_with(k, state: dict):
    task = k.new_task("a", cpu=0)
    for name, value in state.items():
        setattr(task, name, value)
    return task

async def test_kswapd_is_woken_unless_no_kswapd():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    task = k.new_task("a", cpu=0)
    woken = []
    k.vmscan.wake_all_kswapd = woken.append
    pa = k.page_alloc
    assert await pa._alloc_pages_slowpath(GFP_ATOMIC, 1, task, Owner.ANON) is not None
    assert woken == [1]
    assert await pa._alloc_pages_slowpath(GFP_ATOMIC | GFP.NO_KSWAPD, 0, task,
                                          Owner.ANON) is not None
    assert woken == [1]


async def test_the_first_attempt_uses_the_tasks_cpu_list():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    pa = k.page_alloc
    movable = GFP_ATOMIC | GFP.MOVABLE  # the list a freed page goes to: its pageblock's
    parked = pa.get_page_from_freelist(movable, 0, ALLOC_NO_WATERMARKS, Owner.KERNEL)
    free_on_cpu(k, parked, 1)
    assert k.pgdat.zone.pageset[1].count == 1
    page = await pa._alloc_pages_slowpath(movable, 0, k.new_task("a", cpu=1), Owner.ANON)
    assert page is parked and k.pgdat.zone.pageset[1].count == 0


async def test_an_order_of_max_order_fails_at_once():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    task = k.new_task("a", cpu=0)
    woken = []
    k.vmscan.wake_all_kswapd = woken.append
    with capture_logs() as logs:
        assert await k.page_alloc.alloc_pages(GFP_KERNEL, MAX_ORDER, task) is None
    assert woken == []
    assert k.vmstat["alloc_fail"] == 1 and k.vmstat["pgalloc_high_order_fail"] == 1
    (ev,) = [e for e in logs if e["event"] == "alloc_fail"]
    assert (ev["order"], ev["reason"], ev["pid"]) == (MAX_ORDER, "order", task.pid)
    page = await k.page_alloc.alloc_pages(GFP_KERNEL, MAX_ORDER - 1, task)
    assert page is not None and page.order == MAX_ORDER - 1


async def test_every_failure_is_counted_and_warned_unless_nowarn():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    take_every_page(k)
    task = k.new_task("a", cpu=0)
    pa = k.page_alloc
    with capture_logs() as logs:
        assert await pa.alloc_pages(GFP_ATOMIC, 0, task) is None
        assert await pa.alloc_pages(GFP_ATOMIC | GFP.NOWARN, 0, task) is None
        assert await pa.alloc_pages(GFP_ATOMIC, 1, task) is None
        assert await pa.alloc_pages(GFP_ATOMIC, 2, task) is None
    assert k.vmstat["alloc_fail"] == 4
    assert k.vmstat["pgalloc_high_order_fail"] == 2
    events = [e for e in logs if e["event"] == "alloc_fail"]
    assert [e["order"] for e in events] == [0, 1, 2]
    assert all(e["comm"] == "a" and e["free"] == k.pgdat.zone.nr_free_pages for e in events)


async def test_a_high_order_reserve_page_counts_all_its_frames():
    k = make_kernel("slub", cpus=2, memory_mib=64)  # every patch: 5 marks reserve pages
    page = k.page_alloc.get_page_from_freelist(GFP_ATOMIC, 2, ALLOC_NO_WATERMARKS, Owner.KERNEL)
    assert page.pfmemalloc and k.vmstat["nr_pfmemalloc_pages"] == 4
    assert k.vmstat["pgalloc_pfmemalloc"] == 4


async def test_drain_all_pages_adds_up_and_refreshes_the_gauges():
    k = make_kernel("slub", cpus=2, memory_mib=64)
    pa, zone = k.page_alloc, k.pgdat.zone
    drained = []
    for _ in range(2):
        pages = [pa.get_page_from_freelist(GFP_KERNEL, 0, ALLOC_NO_WATERMARKS, Owner.KERNEL)
                 for _ in range(3)]
        for p in pages:
            free_on_cpu(k, p, 1)
        drained.append(zone.nr_pcp_pages)
        k.vmstat["nr_free_pages"] = k.vmstat["nr_pcp_pages"] = -1
        pa.drain_all_pages()
        assert k.vmstat["nr_free_pages"] == zone.nr_free_pages
        assert k.vmstat["nr_pcp_pages"] == zone.nr_pcp_pages == 0
    assert drained[0] > 0 and k.vmstat["pcp_drained"] == sum(drained)


@pytest.mark.parametrize("why, gfp, order, task_state, reclaims, ooms", [
    ("atomic", GFP_ATOMIC, 0, {}, 0, 0),
    ("PF_MEMALLOC", GFP_KERNEL, 0, {"flags": PF.MEMALLOC}, 0, 0),
    ("TIF_MEMDIE", GFP_KERNEL, 0, {"memdie": True}, 0, 0),
    ("killed", GFP_KERNEL, 0, {"fatal_signal": True}, 1, 1),
    ("costly", GFP_KERNEL, 4, {}, 1, 1),
    ("noretry", GFP_KERNEL | GFP.NORETRY, 0, {}, 1, 0),
    ("noretry", GFP_NOIO, 4, {}, 1, 0),  # no __GFP_FS: no OOM killer
])
async def test_where_the_slow_path_gives_up(why, gfp, order, task_state, reclaims, ooms):
    """No memory at all (the reserves too); reclaim never makes progress and the OOM
    killer finds nothing: each caller gets NULL at its own exit, having reclaimed
    (and called the OOM killer) only where the kernel does."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    take_every_page(k)
    task = task_with(k, task_state)
    calls = stand_ins(k)
    with capture_logs() as logs, trio.fail_after(60):  # the bound stops a hang only
        assert await k.page_alloc.alloc_pages(gfp, order, task) is None
    assert calls == ["reclaim"] * reclaims + [("oom", gfp, order, task, Owner.KERNEL)] * ooms
    (ev,) = [e for e in logs if e["event"] == "alloc_fail"]
    assert (ev["reason"], ev["order"], ev["pid"]) == (why, order, task.pid)
    assert ev["gfp"] == gfp_name(gfp)
    assert k.vmstat["alloc_fail"] == 1


@pytest.mark.parametrize("gfp, order, task_state", [
    (GFP_KERNEL, 3, {}),
    (GFP_KERNEL | GFP.NOFAIL, 4, {}),
    (GFP_KERNEL | GFP.NOFAIL, 0, {"fatal_signal": True}),
], ids=["order-3", "costly-nofail", "killed-nofail"])
async def test_where_the_slow_path_starts_again(gfp, order, task_state):
    """Order 3 (PAGE_ALLOC_COSTLY_ORDER) is not costly, and __GFP_NOFAIL keeps a costly
    order or a killed task going: with no progress and nothing from the OOM killer
    the slow path starts again (goto restart), and the page the second OOM call
    finds is the caller's. The OOM killer gets the caller's gfp, order, task and
    owner."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    held = take_every_page(k)
    task = task_with(k, task_state)
    got = held.pop()
    calls = stand_ins(k, oom_pages=[None, got])
    with trio.fail_after(60):  # the bound stops a hang only
        page = await k.page_alloc.alloc_pages(gfp, order, task, Owner.ANON)
    assert page is got
    assert calls == ["reclaim", ("oom", gfp, order, task, Owner.ANON)] * 2


async def test_a_page_reclaim_made_room_for_is_the_callers():
    """Reclaim frees enough to pass the min watermark: the attempt after it succeeds,
    and the page is allocated for the caller's owner."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    held = take_every_page(k)
    calls = []

    async def try_to_free_pages(gfp, order, task):
        calls.append(order)
        n = k.pgdat.zone.min_wmark_pages + 8
        for _ in range(n):
            k.page_alloc.free_pages(held.pop(), 0)  # no task: to the buddy lists
        return n

    k.vmscan.try_to_free_pages = try_to_free_pages
    page = await k.page_alloc.alloc_pages(GFP_KERNEL, 0, k.new_task("a", cpu=0), Owner.ANON)
    assert page is not None and page.owner == Owner.ANON and calls == [0]


@pytest.mark.parametrize("gfp, why, calls_made", [
    (GFP_KERNEL, "noretry", ["reclaim"]),
    (GFP_KERNEL | GFP.REPEAT, "costly", ["reclaim", "reclaim", "oom"]),
])
async def test_repeat_retries_a_costly_order_while_reclaim_progresses(gfp, why, calls_made):
    """Order 4: reclaim reports progress once, then none, and nothing comes free.
    should_alloc_retry gives up on a costly order at once unless __GFP_REPEAT, which
    retries while reclaim progresses; then the OOM path gives up on it."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    take_every_page(k)
    calls = stand_ins(k, progress=[1])
    with capture_logs() as logs, trio.fail_after(60):  # the bound stops a hang only
        assert await k.page_alloc.alloc_pages(gfp, 4, k.new_task("a", cpu=0)) is None
    assert [c if c == "reclaim" else c[0] for c in calls] == calls_made
    assert [e["reason"] for e in logs if e["event"] == "alloc_fail"] == [why]


@pytest.mark.parametrize("gfp, reserves", [(GFP_KERNEL, True),
                                           (GFP_KERNEL | GFP.NOMEMALLOC, False)])
async def test_an_oom_victim_chosen_while_waiting_gets_the_reserves(gfp, reserves):
    """The zone at its min watermark; reclaim reports progress but frees nothing, and
    meanwhile the OOM killer picks this task (TIF_MEMDIE). After the wait the slow
    path recomputes its flags: the victim may now ignore the watermarks, and the
    next attempt gives it a reserve page; unless it asked for __GFP_NOMEMALLOC,
    which keeps it out of the reserves: it gets NULL (the TIF_MEMDIE exit). Either
    way there is no second round of reclaim."""
    k = make_kernel("slub", cpus=2, memory_mib=64)
    at_min(k)
    task = k.new_task("a", cpu=0)
    calls = []

    async def try_to_free_pages(gfp, order, task):
        calls.append("reclaim")
        assert len(calls) == 1, "a second round of reclaim"
        task.memdie = True  # the OOM killer chose it meanwhile
        return 1

    k.vmscan.try_to_free_pages = try_to_free_pages
    with capture_logs() as logs:
        page = await k.page_alloc.alloc_pages(gfp, 0, task, Owner.ANON)
    assert calls == ["reclaim"]
    if reserves:
        assert page is not None and page.pfmemalloc
    else:
        assert page is None
        assert [e["reason"] for e in logs if e["event"] == "alloc_fail"] == ["TIF_MEMDIE"]
