"""The seed's SLUB pair, end to end (slow: minutes).

Same machine, same workload, only ``kernel.patches`` differs: without the
series the machine locks up (the watchdog fires and its diagnosis names the
stalled NBD traffic); with it the workload completes and every page that came
back from swap is verified. The machine is configs/vanilla-slub.toml and
configs/swapnbd-slub.toml as they are (about four minutes for the pair).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

SCALE = ()  # the seed configs as they are: 48 MiB, 16 processes, 5 passes


async def test_vanilla_slub_locks_up(machine):
    # The lockup emerges from a race (the sender against 16 reclaimers for the
    # pages the last replies free), so it is probable, not certain, in any one
    # run: it locked up in all 5 runs of this config measured for
    # docs/EXPERIMENT.md, but it has also completed here (once, run under this
    # fixture), and a 32 MiB version of it locked up in only 1 of 3 runs. Up to
    # five seeds are tried; the machine must lock up in one of them and must
    # never lose data.
    for seed in (1, 2, 3, 4, 5):
        m = await machine("configs/vanilla-slub.toml", *SCALE, f"run.seed={seed}")
        result = await m.wait_done(timeout=900)
        assert result.outcome in ("lockup", "completed"), result.outcome
        assert result.integrity_errors == 0
        if result.outcome == "lockup":
            break
    assert result.outcome == "lockup"
    d = result.diagnosis
    assert d["free"] <= d["wmark"]["min"]  # the machine is out of ordinary memory
    assert d["nbd"]["queued"] + d["nbd"]["inflight"] > 0  # swap I/O is stuck
    stuck = {t["comm"] for t in d["tasks"] if t.get("allocstall")}
    assert "nbd0" in stuck  # the sender had to reclaim: 3.5's GFP_NOIO path
    assert [e for e in m.events if e["event"] == "lockup"]


async def test_swapnbd_slub_completes_with_verified_data(machine):
    m = await machine("configs/swapnbd-slub.toml", *SCALE)
    result = await m.wait_done(timeout=900)
    assert result.outcome == "completed"
    assert result.integrity_errors == 0
    assert result.processes["completed"] == result.processes["total"]
    assert result.vm["pswpin"] > 0 and result.vm["pswpout"] > m.k.nr_pages
    # The sender never entered direct reclaim: it runs with PF_MEMALLOC.
    assert m.k.tasks and all(t.allocstall == 0 for t in m.k.tasks.values() if t.comm == "nbd0")
