"""Bare NBD round-trip rate: a plain trio client (NBDClient) against an NBDServerThread.

Each worker (``queue_depth`` of them, sharing one connection) alternates a
4 KiB WRITE and a 4 KiB READ of the same block in its own region; every
request is one round trip.  :func:`roundtrip_rate` returns requests per
second; it is what the emulated machine's own benchmark imports to know the
transport's ceiling.

    python benchmarks/nbd_roundtrip.py [--seconds 3] [--url nbd://...]

Without ``--url`` an NBDServerThread (memory export, 256 MiB) is started in
this process, as the machine does.  This is a report, not a test.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys

import structlog
import trio

from userspace.nbd.client import NBDClient

BLOCK = 4096


async def roundtrip_rate(url: str, seconds: float, queue_depth: int) -> float:
    """Requests per second (alternating 4 KiB WRITE / READ) over one connection."""
    if queue_depth < 1:
        raise ValueError("queue_depth must be at least 1")
    count = 0
    async with NBDClient.connect(url) as c:
        blocks = c.info.size // BLOCK
        per_worker = max(1, blocks // queue_depth)
        payload = os.urandom(BLOCK)

        async def worker(w: int) -> None:
            nonlocal count
            base = w * per_worker
            i = 0
            while True:
                off = (base + (i * 7919) % per_worker) * BLOCK
                await c.pwrite(payload, off)
                data = await c.pread(off, BLOCK)
                if data != payload:
                    raise AssertionError(f"data mismatch at offset {off}")
                count += 2
                i += 1

        # warm-up, then measure
        with trio.move_on_after(min(0.5, seconds / 4)):
            async with trio.open_nursery() as n:
                for w in range(queue_depth):
                    n.start_soon(worker, w)
        count = 0
        start = trio.current_time()
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as n:
                for w in range(queue_depth):
                    n.start_soon(worker, w)
        elapsed = trio.current_time() - start
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--url", default=None,
                    help="an existing NBD server (default: an in-process NBDServerThread)")
    ap.add_argument("--depths", default="1,16")
    args = ap.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    depths = [int(d) for d in args.depths.split(",")]
    srv = None
    url = args.url
    if url is None:
        from userspace.nbd.server import ExportSpec
        from userspace.nbd.thread import NBDServerThread

        srv = NBDServerThread([ExportSpec("", 256 * 1024 * 1024)]).start()
        url = srv.url()
    try:
        print(f"# {platform.python_implementation()} {platform.python_version()} ({sys.executable}); "
              f"server: {url}")
        for qd in depths:
            rate = trio.run(roundtrip_rate, url, args.seconds, qd)
            print(f"4 KiB write+read round trips, QD{qd}: {rate:,.0f} requests/s")
    finally:
        if srv is not None:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
