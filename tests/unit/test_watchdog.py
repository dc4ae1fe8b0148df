"""The lockup detector's rules (actors/watchdog.py), on trio's autojump clock.

No progress for ``run.lockup_timeout_s`` is a lockup only when the wait-for
graph is a closed cycle; otherwise the hung-task time (120 s of kernel time,
scaled by ``time.hz_scale``) must pass, so a retransmission backoff, which
grows to TCP_RTO_MAX = 120 s, is not called a lockup while it may still get
through. Progress restarts the count.
"""

from __future__ import annotations

import trio

from actors.watchdog import HUNG_TASK_TIMEOUT_S, watchdog


class Machine:
    """What the watchdog reads of a kernel: progress and the timeout scale."""

    def __init__(self, hz_scale: float = 1.0) -> None:
        self.progress = 0
        self.hz_scale = hz_scale

    def hz(self, seconds: float) -> float:
        return seconds * self.hz_scale


async def fired_after(k, timeout: float, cycle, nudges: tuple[float, ...] = ()) -> float:
    """Run the watchdog; progress happens at the times in ``nudges``. Returns the
    stall it reported."""
    reported = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog, k, timeout, cycle, reported.append)
        for t in nudges:
            await trio.sleep_until(t)
            k.progress += 1
    return reported[0]


async def test_a_closed_cycle_is_a_lockup_after_the_configured_timeout(autojump_clock):
    start = trio.current_time()
    stalled = await fired_after(Machine(), 7.0, lambda: ["memory waits for replies"])
    assert 7.0 <= stalled < 8.0
    assert 7.0 <= trio.current_time() - start < 8.0


async def test_without_a_cycle_only_the_hung_task_time_is_a_lockup(autojump_clock):
    start = trio.current_time()
    stalled = await fired_after(Machine(), 7.0, lambda: None)
    assert HUNG_TASK_TIMEOUT_S <= stalled < HUNG_TASK_TIMEOUT_S + 1
    assert trio.current_time() - start < HUNG_TASK_TIMEOUT_S + 1


async def test_the_hung_task_time_scales_with_hz_scale(autojump_clock):
    stalled = await fired_after(Machine(hz_scale=0.1), 3.0, lambda: None)
    assert 0.1 * HUNG_TASK_TIMEOUT_S <= stalled < 0.1 * HUNG_TASK_TIMEOUT_S + 1


async def test_progress_restarts_the_count(autojump_clock):
    start = trio.current_time()
    stalled = await fired_after(Machine(), 5.0, lambda: ["cycle"], nudges=(start + 4, start + 8))
    assert 5.0 <= stalled < 6.0
    assert trio.current_time() - start >= 13.0
