"""The machine swapping to real NBD servers: nbdkit's memory plugin and qemu-nbd.

Issue 2 and issue 7 acceptance: `quick.toml` with `swap.server` pointing at a
server nobody here wrote completes with zero integrity errors — every page
swapped out over NBD comes back intact.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.interop

QUICK = ("configs/quick.toml", "swap.size_mib=64", "workload.size_ratio=2.0",
         "machine.memory_mib=32", "workload.passes=2")


async def _run_against(machine, url: str):
    m = await machine(QUICK[0], f"swap.server={url}", *QUICK[1:])
    result = await m.wait_done(timeout=600)
    assert result.outcome == "completed", result.diagnosis and result.diagnosis["text"]
    assert result.integrity_errors == 0
    assert result.vm["pswpout"] > m.k.nr_pages
    assert result.vm["pswpin"] > 0
    connect = m.events_named("nbd_connect")[0]
    assert connect["size"] >= 64 << 20


async def test_machine_swaps_to_nbdkit_memory(machine, nbdkit_factory):
    peer = nbdkit_factory(plugin=("memory", "64M"))
    await _run_against(machine, peer.url)


async def test_machine_swaps_to_qemu_nbd(machine, qemu_nbd):
    await _run_against(machine, qemu_nbd.url)
