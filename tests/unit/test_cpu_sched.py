"""The CPU's pick order: softirqs, then nice -20 tasks, then woken tasks, then tasks
whose slice ran out; when the running task is asked to reschedule; and where a
preempted task is queued again (emulator/sched.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from emulator.sched import CPU, sched_wakeup_granularity
from emulator.task import Task


async def run_once(order: list, task: Task, **kw) -> None:
    """Queue ``task`` on its CPU, record when it is granted, give the CPU back."""
    await task.cpu.acquire(task, **kw)
    order.append(task.comm)
    task.cpu.release(task)


@pytest.mark.parametrize(("cpus", "ms"), [(1, 1), (2, 2), (3, 2), (4, 3), (8, 4), (64, 4)])
def test_wakeup_granularity_is_scaled_like_update_sysctl(cpus, ms):
    assert sched_wakeup_granularity(cpus) == pytest.approx(ms / 1000)


async def test_woken_tasks_run_before_slice_expired_ones_and_softirqs_first():
    cpu = CPU(0)
    hog, expired, woken, sirq = (Task(i, name, cpu, in_softirq=name == "sirq")
                                 for i, name in enumerate(("hog", "expired", "woken", "sirq")))
    order = []


    await cpu.acquire(hog)
    async with trio.open_nursery() as nursery:
        # Queued in the opposite order to the one they are picked in.
        nursery.start_soon(run_once, order, expired)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lambda: run_once(order, woken, wakeup=True))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(run_once, order, sirq)
        await trio.testing.wait_all_tasks_blocked()
        assert cpu.nr_running() == 4
        cpu.release(hog)
    assert order == ["sirq", "woken", "expired"]


def test_need_resched_uses_the_wakeup_granularity_for_woken_tasks(autojump_clock):
    async def main():
        cpu = CPU(0, timeslice=0.004, wakeup_granularity=0.002)
        hog, other = Task(1, "hog", cpu), Task(2, "other", cpu)
        await cpu.acquire(hog)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cpu.acquire, other)  # slice-expired class
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.003)
            assert not cpu.need_resched(hog)  # 3 ms < the 4 ms slice
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: cpu.acquire(other, wakeup=True))
            await trio.testing.wait_all_tasks_blocked()
            assert cpu.need_resched(hog)  # 3 ms >= the 2 ms wake-up granularity
            nursery.cancel_scope.cancel()

    trio.run(main, clock=autojump_clock)


def test_nice_minus_20_task_is_picked_first_and_preempts_almost_at_once(autojump_clock):
    """nbd_thread runs at nice -20: it is picked before woken and slice-expired
    nice-0 tasks, and its wake-up granularity is scaled by its weight
    (2 ms x 1024 / 88761, about 23 us) instead of the full 2 ms."""
    async def main():
        cpu = CPU(0, timeslice=0.004, wakeup_granularity=0.002)
        hog, woken, expired = (Task(i, n, cpu) for i, n in enumerate(("hog", "woken", "exp")))
        nbd = Task(9, "nbd0", cpu)
        nbd.set_user_nice(-20)
        assert nbd.load_weight == 88761 and hog.load_weight == 1024
        order = []


        await cpu.acquire(hog)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_once, order, expired)
            nursery.start_soon(lambda: run_once(order, woken, wakeup=True))
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.0001)
            assert not cpu.need_resched(hog)  # 0.1 ms: below the 2 ms granularity
            nursery.start_soon(lambda: run_once(order, nbd, wakeup=True))
            await trio.testing.wait_all_tasks_blocked()
            assert cpu.need_resched(hog)  # 0.1 ms > 23 us
            cpu.release(hog)
        assert order == ["nbd0", "woken", "exp"]

    trio.run(main, clock=autojump_clock)


def test_set_user_nice_clamps_like_the_kernel():
    t = Task(1, "t", CPU(0))
    t.set_user_nice(-100)
    assert t.nice == -20
    t.set_user_nice(100)
    assert t.nice == 19 and t.load_weight == 15


def test_a_task_preempted_by_a_wakeup_keeps_its_place_and_the_rest_of_its_slice(autojump_clock):
    """CFS charges a preempted task only what it ran, so it stays leftmost among
    its equals: it runs again before the tasks that waited behind it, and only
    for the rest of its slice."""
    async def main():
        cpu = CPU(0, timeslice=0.004, wakeup_granularity=0.002)
        hog, other, woken = (Task(i, n, cpu) for i, n in enumerate(("hog", "other", "woken")))
        order = []


        await cpu.acquire(hog)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_once, order, other)  # a slice-expired equal
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.003)
            nursery.start_soon(lambda: run_once(order, woken, wakeup=True))
            await trio.testing.wait_all_tasks_blocked()
            assert cpu.need_resched(hog)  # 3 ms >= the 2 ms granularity
            await hog.cond_resched()  # woken runs, then hog again, before other
            order.append("hog")
            assert trio.current_time() - hog.slice_start == pytest.approx(0.003)
            await trio.sleep(0.0011)
            assert cpu.need_resched(hog)  # 4.1 ms of its slice used: other's turn
            cpu.release(hog)
        assert order == ["woken", "hog", "other"]

    trio.run(main, clock=autojump_clock)
