"""Whole-machine stress tests (pytest-trio), through the ``machine`` fixture of
emulator/testing.py: a small machine swaps over real NBD and completes with
verified data; a machine whose NBD server never replies is declared locked up
by the watchdog (and ``swapnbd run`` exits 3), at the configured lockup
timeout; a server that corrupts what it returns makes the run fail with
integrity errors (the swap-in checksum), and so does one that returns another
page's intact bytes (the workload's data check).

The misbehaving servers are tiny trio NBD servers written here on top of the
sans-I/O handshake of nbdproto/, so that nothing of the project's own
server is involved in what they do wrong.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import trio

import nbdproto as P
from actors.watchdog import HUNG_TASK_TIMEOUT_S
from emulator.config import RunConfig
from emulator.mm.mmzone import LRU_NAMES
from emulator.mm.page import PG

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quick.toml")

#: A small machine: 16 MiB, 2 CPUs, 2 processes, mapping 2x memory, 2 passes.
SMALL = ("machine.memory_mib=16", "machine.cpus=2", "workload.processes_per_cpu=1",
         "workload.size_ratio=2.0", "swap.size_mib=32", "workload.passes=2",
         "run.lockup_timeout_s=20", "run.max_duration_s=120")

LOCKUP_TIMEOUT_S = 3.0
#: Kernel time runs 20 times faster for the never-replying server, so that the
#: hung-task rule (120 s of kernel time) fires after 6 s.
HZ_SCALE = 0.05
#: Filling memory before the server's silence matters, plus the watchdog's period.
LOCKUP_MARGIN_S = 25.0


class TinyNBDServer:
    """A minimal NBD server on 127.0.0.1, port 0: fixed-newstyle handshake
    (NBD_OPT_GO / NBD_OPT_EXPORT_NAME through ServerHandshake), then

    * ``mode="silent"``: reads every request and never answers;
    * ``mode="corrupt"``: stores WRITE payloads in a dict and answers READs
      with the stored bytes, one byte flipped in every 4 KiB page;
    * ``mode="misdirect"``: stores WRITE payloads and answers a READ of each
      4 KiB page with the page last written to its partner slot (slots 2n and
      2n+1 swapped; the page's own bytes when its partner was never written):
      intact pages, each with a valid checksum, of the wrong slot.
    """

    def __init__(self, mode: str, size: int = 1 << 30) -> None:
        assert mode in ("silent", "corrupt", "misdirect")
        self.mode = mode
        self.size = size
        self.port: int | None = None
        self.requests = 0
        self.connections = 0
        self.store: dict[int, bytes] = {}
        self.misdirected = 0  # pages answered with another slot's bytes

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        exports = {"": P.ServerExport(name="", size=self.size,
                                      flags=P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH)}
        hs = P.ServerHandshake(exports)
        try:
            await stream.send_all(hs.greeting())
            while True:
                ev = hs.next_event()
                out = hs.data_to_send()
                if out:
                    await stream.send_all(out)
                if isinstance(ev, P.HandshakeDone):
                    break
                if isinstance(ev, P.HandshakeAborted):
                    return
                data = await stream.receive_some(65536)
                if not data:
                    return
                hs.receive_data(data)
            parser = P.RequestParser()
            parser.receive_data(hs.trailing_data())
            while True:
                while True:
                    req = parser.next_event()
                    if req is P.NEED_DATA:
                        break
                    self.requests += 1
                    if self.mode != "silent":
                        await stream.send_all(self.answer(req))
                data = await stream.receive_some(65536)
                if not data:
                    return
                parser.receive_data(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, P.ProtocolError):
            return

    def answer(self, req: P.Request) -> bytes:
        if req.cmd == P.NBD_CMD_WRITE:
            for i in range(0, req.length, 4096):
                self.store[req.offset + i] = req.payload[i:i + 4096]
            return P.encode_simple_reply(req.cookie)
        if req.cmd == P.NBD_CMD_READ:
            out = bytearray()
            for i in range(0, req.length, 4096):
                own = self.store.get(req.offset + i, bytes(4096))
                if self.mode == "misdirect":
                    partner = self.store.get((req.offset + i) ^ 4096)
                    if partner is not None and partner != own:
                        self.misdirected += 1
                        own = partner
                out += own
            if self.mode == "corrupt":
                for i in range(0, len(out), 4096):
                    out[i + 100] ^= 0xFF  # flip one byte of every page
            return P.encode_simple_reply(req.cookie, 0, bytes(out))
        return P.encode_simple_reply(req.cookie)


def assert_lru_lists_consistent(k) -> None:
    """Every frame with PG_lru is on the list page_lru names, exactly once; every
    list's walk agrees with its length and with its NR_* counter."""
    zone = k.pgdat.zone
    on_lists = 0
    for lru, lst in enumerate(zone.lru):
        pages = list(lst)
        assert len(pages) == len(lst) == k.vmstat[f"nr_{LRU_NAMES[lru]}"]
        assert all(p.flags & PG.lru and k.vmscan.page_lru(p) == lru for p in pages)
        on_lists += len(pages)
    assert on_lists == sum(1 for p in k.pgdat.mem_map if p.flags & PG.lru)


async def test_small_machine_completes_with_swap_in_and_out(machine):
    m = await machine(QUICK, *SMALL)
    nr_pages = m.k.nr_pages
    await m.wait_until(lambda m: m.vmstat["pswpout"] > 0, timeout=60)
    assert_lru_lists_consistent(m.k)  # mid-run, reclaim and swap-in busy
    r = await m.wait_done(timeout=150)
    assert r.outcome == "completed", r.error or r.diagnosis
    assert r.exit_status == 0
    assert r.vm["pswpout"] > nr_pages
    assert r.vm["pswpin"] > 0
    assert r.integrity_errors == 0
    assert r.processes == {"total": 2, "completed": 2, "killed": 0,
                           "killed_by": {"oom_kill": 0, "sigbus": 0}}
    # The log, as captured by the fixture and as written to the file.
    assert m.events[0]["event"] == "run_start"
    end = m.events[-1]
    assert end["event"] == "run_end" and end["outcome"] == "completed"
    assert end["integrity_errors"] == 0 and end["vm"]["pswpout"] > nr_pages
    lines = Path(m.log_path).read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["event"] == "run_end" and last["outcome"] == "completed"


async def test_rate_limited_workload_is_paced(machine):
    """workload.rate_pages_s caps each process's stores per second: the run
    cannot end before every process's pages at that rate (a lower bound the
    sleeps guarantee, however slow the host is)."""
    from actors.workloads import PACE_EVERY

    rate = 2000.0
    m = await machine(QUICK, *SMALL, "workload.size_ratio=0.25", "workload.passes=1",
                      f"workload.rate_pages_s={rate}")
    per_process = m.cfg.workload_pages // 2  # shared by 2 processes
    r = await m.wait_done(timeout=60)
    assert r.outcome == "completed", r.error or r.diagnosis
    assert r.vm["pswpout"] == 0  # a quarter of memory: no swap needed
    assert r.elapsed_s >= (per_process - PACE_EVERY) / rate


async def test_never_replying_server_is_a_lockup(machine, nursery):
    """A server that never answers is not a wait-for cycle inside the machine (the
    replies wait for the peer): the hung-task rule declares the lockup, after
    HUNG_TASK_TIMEOUT_S scaled by time.hz_scale, not after run.lockup_timeout_s."""
    srv = await nursery.start(TinyNBDServer("silent").serve)
    hung_task = HUNG_TASK_TIMEOUT_S * HZ_SCALE
    with trio.fail_after(hung_task + LOCKUP_MARGIN_S + 30):
        m = await machine(QUICK, *SMALL, f"swap.server={srv.url!r}",
                          f"run.lockup_timeout_s={LOCKUP_TIMEOUT_S}", f"time.hz_scale={HZ_SCALE}")
        start = trio.current_time()
        r = await m.wait_done(timeout=hung_task + LOCKUP_MARGIN_S)
    assert srv.requests > 0  # the machine did try to swap to it
    assert r.outcome == "lockup", r.outcome
    assert r.exit_status == 3
    assert trio.current_time() - start >= hung_task
    # The diagnosis names the stalled NBD requests: sent, never answered; no cycle.
    nbd = r.diagnosis["nbd"]
    assert nbd["inflight"] > 0 and nbd["harderror"] == 0
    assert all(req["age_s"] >= hung_task for req in nbd["oldest"])
    assert r.diagnosis["stalled_s"] >= hung_task
    assert r.diagnosis["cycle"] is None
    assert "No closed wait-for cycle" in r.diagnosis["text"]
    assert m.events_named("lockup")
    assert m.events[-1]["event"] == "run_end" and m.events[-1]["outcome"] == "lockup"


async def test_lockup_is_declared_at_the_configured_timeout(machine):
    """Targets: a watchdog that ignores ``run.lockup_timeout_s`` (always the
    default, 20 s). A machine in the certain 3.5 deadlock (vanilla, no clean page
    cache: a closed wait-for cycle) with a timeout of 7 s: the stall the ``lockup``
    event records is at least 7 s (no lockup before the timeout) and below the
    default (the configured value, not the default, was used) and far below the
    hung-task time, which a cycle does not wait for."""
    default = RunConfig().lockup_timeout_s
    timeout = 7.0
    with trio.fail_after(default + LOCKUP_MARGIN_S + 60):
        m = await machine(QUICK, "kernel.patches=vanilla", "machine.slab=slub",
                          "machine.page_cache_mib=0", f"run.lockup_timeout_s={timeout}")
        r = await m.wait_done(timeout=default + LOCKUP_MARGIN_S + 30)
    assert r.outcome == "lockup", r.outcome
    (event,) = m.events_named("lockup")
    stalled = event["diagnosis"]["stalled_s"]
    assert timeout <= stalled < default
    assert r.diagnosis["stalled_s"] == stalled and r.diagnosis["cycle"]


async def test_cli_run_against_never_replying_server_exits_3(nursery, tmp_path):
    srv = await nursery.start(TinyNBDServer("silent").serve)
    log = tmp_path / "run.jsonl"
    cmd = [sys.executable, "-m", "emulator.cli", "run", QUICK, "--quiet", "--log", str(log),
           "--set", f"swap.server={srv.url}", "--set", f"run.lockup_timeout_s={LOCKUP_TIMEOUT_S}",
           "--set", f"time.hz_scale={HZ_SCALE}"]
    cmd += [a for o in SMALL if not o.startswith("run.lockup") for a in ("--set", o)]
    with trio.fail_after(HUNG_TASK_TIMEOUT_S * HZ_SCALE + LOCKUP_MARGIN_S + 30):
        proc = await trio.run_process(cmd, check=False, capture_stdout=True,
                                      capture_stderr=True, cwd=tmp_path,
                                      env={**os.environ, "COLUMNS": "200"})
    out = proc.stdout.decode()
    assert proc.returncode == 3, (proc.returncode, out, proc.stderr.decode()[-2000:])
    assert "LOCKED UP" in out
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "run_end" and last["outcome"] == "lockup"


async def test_corrupted_swap_data_fails_the_run(machine, nursery):
    srv = await nursery.start(TinyNBDServer("corrupt").serve)
    with trio.fail_after(150):
        m = await machine(QUICK, *SMALL, f"swap.server={srv.url!r}")
        r = await m.wait_done()
    assert srv.store  # pages were written
    assert r.integrity_errors > 0
    assert r.outcome == "failed"
    assert r.exit_status != 0
    assert m.events_named("integrity_error")
    end = m.events[-1]
    assert end["event"] == "run_end" and end["outcome"] == "failed"
    assert end["integrity_errors"] == r.integrity_errors


async def test_intact_page_of_the_wrong_slot_fails_the_data_check(machine, nursery):
    """Targets: a disabled or wrong workload data check (actors/workloads.py,
    usemem's "Data wrong at offset" comparison of the word written last pass).

    The server answers reads with the partner slot's page: well-formed bytes
    with a valid CRC, so end_swap_bio_read accepts every page and only the
    workload's comparison can see that the (pid, page, pass) is not the one
    it wrote. Without that check this run completes with no integrity error."""
    srv = await nursery.start(TinyNBDServer("misdirect").serve)
    with trio.fail_after(150):
        m = await machine(QUICK, *SMALL, f"swap.server={srv.url!r}")
        r = await m.wait_done()
    assert srv.misdirected > 0  # wrong pages did go back to the machine
    errors = m.events_named("integrity_error")
    assert errors and r.integrity_errors == len(errors)
    # Every error is the data check's; none is a failed checksum or read.
    assert {e["what"] for e in errors} == {"Data wrong at offset"}
    for e in errors:
        # What was found is an intact page's word, just not this page's.
        found = list(e["found"])
        assert len(found) == 3 and found != list(e["expected"])
        assert found[:2] != [e["pid"], e["vaddr"]]  # another page's (pid, page)
    assert r.outcome == "failed" and r.exit_status == 4
    end = m.events[-1]
    assert end["event"] == "run_end" and end["outcome"] == "failed"


async def test_machine_swaps_to_the_nbd_server_fixture(machine, nbd_server):
    """The ``nbd_server`` fixture's URL works as swap.server; the fixture's handle
    exposes live counters and the events as they happen."""
    m = await machine(QUICK, "machine.memory_mib=8", "swap.size_mib=16",
                      "workload.processes_per_cpu=1", "workload.passes=2",
                      f"swap.server={nbd_server.url!r}")
    assert m.cfg.swap.server == nbd_server.url
    await m.wait_until(lambda m: m.vmstat["pswpin"] > 0, timeout=60)
    assert any(e["event"] == "nbd_connect" and e["port"] == nbd_server.port for e in m.events)
    r = await m.wait_done(timeout=120)
    assert r.outcome == "completed" and r.integrity_errors == 0
    assert r.vm["pswpout"] > m.k.nr_pages


async def test_fixture_wait_until_timeout_and_stop(machine):
    m = await machine(QUICK, *SMALL)
    with pytest.raises(AssertionError, match="still false after 0.2 s"):
        await m.wait_until(lambda m: False, timeout=0.2)
    m.stop()
    r = await m.wait_done(timeout=30)
    assert m.done and r is m.result
    assert m.events[-1]["event"] == "run_end"
    with pytest.raises(AssertionError, match="finished"):
        await m.wait_until(lambda m: False, timeout=5)


async def test_fixture_stops_a_machine_left_running(machine):
    """Teardown stops machines the test did not wait for (the test just returns)."""
    m = await machine(QUICK, *SMALL)
    await m.wait_until(lambda m: m.vmstat["pgfault"] > 0, timeout=30)
