"""kmalloc-256 alloc/free pairs per second on SLAB and SLUB (not part of the tests).

Usage: python benchmarks/slab_alloc.py [--pairs N] [--batch B]

Two patterns per allocator, on a default-config machine (emulator.kernel.Kernel):
  * "hot": alloc then free at once (the per-CPU array / freelist fast path);
  * "batch": alloc B objects, then free them all (refills, flushes, new slabs).
All objects come from kmalloc(256, GFP_KERNEL) on CPU 0; the machine never runs
short of memory, so the page allocator's fast path serves any new slab.
"""

from __future__ import annotations

import argparse
import time

import attrs
import trio

from emulator.config import Config, MachineConfig
from emulator.flags import GFP_KERNEL
from emulator.kernel import Kernel


async def bench(kind: str, pairs: int, batch: int) -> dict[str, float]:
    cfg = attrs.evolve(Config(), machine=MachineConfig(slab=kind, memory_mib=64))
    k = Kernel(cfg)
    slab = k.slab
    task = k.new_task("bench", cpu=0)
    kmalloc, kfree = slab.kmalloc, slab.kfree
    out = {}

    t0 = time.perf_counter()
    for _ in range(pairs):
        obj = await kmalloc(256, GFP_KERNEL, task)
        kfree(obj, task)
    out["hot"] = pairs / (time.perf_counter() - t0)

    rounds = max(1, pairs // batch)
    t0 = time.perf_counter()
    for _ in range(rounds):
        objs = [await kmalloc(256, GFP_KERNEL, task) for _ in range(batch)]
        for obj in objs:
            kfree(obj, task)
    out["batch"] = rounds * batch / (time.perf_counter() - t0)
    slab.check()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args()
    print(f"kmalloc-256 alloc/free pairs per second ({args.pairs} pairs; batch {args.batch})")
    for kind in ("slab", "slub"):
        r = trio.run(bench, kind, args.pairs, args.batch)
        print(f"  {kind:5s} hot {r['hot']:>10,.0f}/s   batch {r['batch']:>10,.0f}/s")


if __name__ == "__main__":
    main()
