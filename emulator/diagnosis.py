"""Why the machine stopped: the lockup diagnosis and the wait-for cycle.

Models what a kernel engineer assembles from a hung machine: SysRq-m's memory
report (free pages against the watermarks, who holds memory), SysRq-w's
blocked tasks with their wait channels (the hung-task detector's report), the
NBD device's in-flight requests, the NIC's RX ring, and the socket statistics
(who owns the socket and since when, the backlog, drops and retransmission
backoff, the unacknowledged transmit queue). Built only from the machine's
state at the moment the watchdog fires; the ``text`` is written so the cycle
can be read off it.

``nbd_wait_cycle`` is the wait-for graph the watchdog consults: swap-out
frees memory only when NBD replies complete writeback, so the machine is in a
closed cycle when memory can come from nowhere else (no page free above the
min watermark, no clean page any reclaimer could take without I/O) and the
replies themselves wait for memory: the NBD socket is owned by a task that
sleeps in the page allocator (3.5's sender in direct reclaim), the NIC has no
receive buffer left, the receiver is in the allocator, or the requests not
yet sent wait for a sender that is. A long retransmission backoff with
nothing else blocked is not a cycle: the peer's next retransmission may get
through.

It also sorts the swap cache by what reclaim may do with each page (under
writeback, dirty, clean but mapped, clean and unmapped on the LRU or
isolated), a walk of mem_map the kernel has no single report for, and gives
the free pages on the MIGRATE_RESERVE lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from emulator.mm.mmzone import MIGRATE_PCPTYPES, MIGRATE_RESERVE, MIGRATETYPE_NAMES
from emulator.mm.page import PG

if TYPE_CHECKING:
    from emulator.kernel import Kernel
    from emulator.task import Task


def diagnose(k: Kernel, stalled_s: float, sockets=(), nbd=None) -> dict:
    z = k.pgdat.zone
    free = z.nr_free_pages
    wmin, wlow, whigh = z.watermark
    atomic_floor = wmin - wmin // 2
    atomic_floor -= atomic_floor // 4
    owners = k.pgdat.owners()
    vm = k.vmstat
    tasks = [t.describe() for t in k.tasks.values() if not t.exited]
    d = {
        "stalled_s": round(stalled_s, 3),
        "free": free,
        "pcp": z.nr_pcp_pages,
        "pcp_by_type": {name.lower(): sum(len(pcp.lists[mt]) for pcp in z.pageset)
                        for mt, name in enumerate(MIGRATETYPE_NAMES[:MIGRATE_PCPTYPES])},
        "free_reserve": z.free_by_migratetype()[MIGRATE_RESERVE],
        "wmark": {"min": wmin, "low": wlow, "high": whigh},
        "atomic_floor": atomic_floor,
        "throttle_threshold": k.pgdat.reserve_pages() // 2,
        "owners": owners,
        "pages": {
            "anon_mapped": vm["nr_anon_pages"], "swapcache": vm["nr_swapcache"],
            "writeback": vm["nr_writeback"], "slab": vm["nr_slab_unreclaimable"],
            "pfmemalloc": vm["nr_pfmemalloc_pages"],
            "lru_active": len(z.lru_active_anon), "lru_inactive": len(z.lru_inactive_anon),
            "isolated": z.nr_isolated_anon,
            "reclaimed_unfreed": k.vmscan.nr_reclaimed_unfreed,
        },
        "swapcache": swapcache_states(z),
        "all_unreclaimable": z.all_unreclaimable,
        "tasks": tasks,
        "throttled": len(k.vmscan.throttled),
        "nbd": attrs.asdict(nbd.statistics()) if nbd is not None else None,
        "sockets": [attrs.asdict(s.statistics()) for s in sockets],
        "nic": attrs.asdict(k.netdev.statistics()) if k.netdev is not None else None,
        "skbs_live": k.skb.live if k.skb is not None else 0,
        "cycle": nbd_wait_cycle(k, nbd),
    }
    d["text"] = explain(d)
    return d


def in_allocator(task: Task | None) -> bool:
    """Is the task inside __alloc_pages_slowpath's reclaim loop (direct reclaim, its
    congestion waits, the throttle)?"""
    return task is not None and task.activity is not None and not task.exited


def nbd_wait_cycle(k: Kernel, nbd) -> list[str] | None:
    """The closed wait-for cycle through the NBD device, in words, or None."""
    if nbd is None or nbd.sock is None:
        return None  # no connection: requests fail at once, nothing waits for a reply
    if not (nbd.queue_head or nbd.waiting_queue or nbd.active_req):
        return None  # nothing waits for a reply
    z = k.pgdat.zone
    if z.nr_free_pages > z.watermark[0]:
        return None  # a watermark-respecting allocation can still succeed
    states = swapcache_states(z)
    if states["clean_on_lru"] + k.nr_page_cache:
        return None  # reclaim can still free a clean page without I/O
    memory = ("memory waits for NBD replies: every reclaimable page needs its swap "
              "writeback completed, and there is no free page above the min watermark")
    if states["clean_isolated"]:
        memory += (f" (the {states['clean_isolated']} clean swap-cache pages that exist sit in "
                   f"the isolated batches of reclaimers that wait for the block layer)")
    sock = nbd.sock
    owner = sock.owner
    tasks = {t.comm: t for t in k.tasks.values()}
    waits: list[str] = []
    if owner is not None and in_allocator(owner):
        waits.append(f"NBD replies wait for the socket, owned by {owner.comm}/{owner.pid} since "
                     f"{trio.current_time() - sock.owned_since:.1f} s, which is in the page allocator "
                     f"({owner.activity}), not entitled to the reserve; packets meanwhile go "
                     f"to the socket's backlog")
    if k.netdev is not None and not k.netdev.ring:
        waits.append("NBD replies wait for a receive buffer: the NIC's RX ring is empty and "
                     "refilling it needs memory")
    reader = tasks.get("nbd-client")
    if in_allocator(reader):
        waits.append(f"NBD replies wait for the receiver nbd-client/{reader.pid}, which sleeps "
                     f"in the page allocator ({reader.activity})")
    sender = tasks.get("nbd0")
    if not nbd.queue_head and nbd.waiting_queue and in_allocator(sender) and owner is not sender:
        waits.append(f"the next swap writes wait for the sender nbd0/{sender.pid}, which sleeps "
                     f"in the page allocator ({sender.activity})")
    if not waits:
        return None
    return [memory, *waits]


def swapcache_states(zone) -> dict[str, int]:
    """The swap cache by what reclaim may do with each page: a page under
    writeback waits for its reply; a dirty one must be written first (only with
    __GFP_IO); a clean one still mapped must be unmapped first; a clean unmapped
    one on the LRU is what any reclaimer, GFP_NOIO included, can free at once,
    and one isolated is in another reclaimer's batch."""
    n = {"writeback": 0, "dirty": 0, "clean_mapped": 0, "clean_on_lru": 0, "clean_isolated": 0}
    for page in zone.mem_map:
        f = page.flags
        if not f & PG.swapcache:
            continue
        if f & PG.writeback:
            n["writeback"] += 1
        elif f & PG.dirty:
            n["dirty"] += 1
        elif page.mm is not None:
            n["clean_mapped"] += 1
        elif f & PG.lru:
            n["clean_on_lru"] += 1
        else:
            n["clean_isolated"] += 1
    return n


def _pcp_types(d: dict) -> str:
    """The non-empty per-cpu lists by migrate type, e.g. ", 3 unmovable, 12 movable"."""
    by_type = d.get("pcp_by_type") or {}
    return "".join(f", {n} {name}" for name, n in by_type.items() if n)


def _in_reserve(d: dict) -> str:
    """How many of the free pages are in MIGRATE_RESERVE pageblocks, which an
    allocation reaches only when every other type's lists are empty."""
    n = d.get("free_reserve")
    return f"; {n} of the free in reserve pageblocks" if n is not None else ""


def explain(d: dict) -> str:
    w = d["wmark"]
    lines = [
        (f"LOCKUP: no page accessed and no I/O completed without an error for "
         f"{d['stalled_s']:.1f} s."),
        f"Memory: {d['free']} pages free "
        f"(+{d.get('pcp', 0)} on per-cpu lists{_pcp_types(d)}{_in_reserve(d)}); "
        f"watermarks min {w['min']} / low {w['low']} / "
        f"high {w['high']}; GFP_ATOMIC may go down to {d['atomic_floor']}; "
        f"direct reclaimers are throttled below {d['throttle_threshold']}.",
    ]
    if d["free"] <= d["atomic_floor"]:
        lines.append("  -> below the atomic floor: a softirq without the reserves cannot "
                     "allocate a receive buffer.")
    elif d["free"] <= w["min"]:
        lines.append(f"  -> at or below the min watermark: memory above the PFMEMALLOC "
                     f"reserve is exhausted; the {d['free']} pages left are for "
                     f"reserve-entitled callers (PF_MEMALLOC, __GFP_MEMALLOC) and atomic "
                     f"allocations only.")
    p = d["pages"]
    o = d["owners"]
    lines.append(
        f"Held: anon mapped {p['anon_mapped']}, swap cache {p['swapcache']} "
        f"(under writeback {p['writeback']}), slab {o.get('slab', 0)}, skb pages "
        f"{o.get('skb', 0)}, mempool {o.get('mempool', 0)}, kernel {o.get('kernel', 0)}, "
        f"pfmemalloc pages {p['pfmemalloc']}; LRU active {p['lru_active']} inactive "
        f"{p['lru_inactive']} isolated {p['isolated']}.")
    sc = d.get("swapcache")
    if sc:
        lines.append(
            f"  Swap cache: {sc['writeback']} under writeback, {sc['dirty']} dirty, "
            f"{sc['clean_mapped']} clean but mapped, {sc['clean_on_lru']} clean and unmapped on "
            f"the LRU (what a GFP_NOIO reclaimer can free), {sc['clean_isolated']} clean and "
            f"unmapped in reclaimers' isolated batches.")
    if p["reclaimed_unfreed"]:
        lines.append(
            f"  {p['reclaimed_unfreed']} pages are reclaimed but not yet free: their reclaimers "
            f"sleep in the middle of a batch and free it only when they finish it.")
    nbd = d.get("nbd")
    if nbd:
        lines.append(f"NBD: {nbd['inflight']} requests sent and unanswered, {nbd['queued']} "
                     f"waiting to be sent; requests allocated: {nbd.get('requests_async', '?')} async "
                     f"(swap-out writes), {nbd.get('requests_sync', '?')} sync (swap-in reads); "
                     f"write-congested: {nbd['congested']}.")
        for r in nbd["oldest"][:3]:
            lines.append(f"  cookie {r['cookie']} {r['cmd']} @{r['offset']} waiting "
                         f"{r['age_s']} s for its reply")
        if not nbd.get("connected", True):
            lines.append("  The NBD device has no connection: every request fails with -EIO "
                         "at once.")
        errs = nbd.get("errors")
        if errs:
            lines.append("  Requests that ended with -EIO so far: "
                         + ", ".join(f"{k} {v}" for k, v in errs.items())
                         + " (a failed swap write leaves its page dirty: reclaim cannot free "
                           "it, and writes it again).")
        if nbd.get("sender_exposed_s") is not None:
            lines.append(f"  No reply has been on its way for the last {nbd['sender_exposed_s']} s "
                         f"of the sender's current send.")
        send = nbd.get("sender_send")
        if send:
            freed, taken = send["pgfree"], send["pgalloc_below_min"]
            lines.append(f"  Since that send began, {_pages(freed)} {'was' if freed == 1 else 'were'} "
                         f"freed, and atomic callers (GFP_ATOMIC, __GFP_HIGH) took {_pages(taken)} "
                         f"at or below the min watermark, a band the sender may not enter.")
        ss = nbd.get("sender_stalls")
        if ss and ss["stalls"]:
            lines.append(f"  Earlier, the sender stalled in direct reclaim during {ss['stalls']} "
                         f"sends; " + _exposures(ss))
    nic = d.get("nic")
    if nic:
        lines.append(f"NIC: {nic['posted']} of {nic['ring_size'] - 1} RX buffers posted; "
                     f"{nic['rx_no_buffer']} frames dropped with none posted, "
                     f"{nic['alloc_rx_buff_failed']} refills failed.")
    for s in d["sockets"]:
        lines.append(_socket_line(s))
    waits: dict[str, list[str]] = {}
    for t in d["tasks"]:
        key = t.get("wchan") or t.get("state", "?")
        if t.get("activity"):
            key = f"{key}: {t['activity']}"
        waits.setdefault(key.split("(")[0] if "lock_page" not in key else "lock_page (swap-in)",
                         []).append(f"{t['comm']}/{t['pid']}")
    lines.append("Tasks:")
    for key, who in sorted(waits.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(who):3d} in {key}: {', '.join(who[:6])}{' ...' if len(who) > 6 else ''}")
    cycle = d.get("cycle")
    if cycle:
        lines.append("Cycle: " + "; ".join(cycle) + ".")
    else:
        lines.append("No closed wait-for cycle: nothing progressed for the hung-task time.")
    return "\n".join(lines)


def _socket_line(s: dict) -> str:
    """One socket: ownership, backlog, queues, drops."""
    own = ("not owned" if s["owner"] is None else
           f"owned by {s['owner']} for {s['owned_s']} s"
           + (f" (asleep in {s['owner_wchan']})" if s["owner_wchan"] else " (running)")
           + (f", {s['lock_waiters']} waiting in lock_sock" if s["lock_waiters"] else ""))
    drops = ", ".join(f"{n} {r}" for r, n in s["drops"].items()) or "none"
    return (f"Socket {s['sock']} (SOCK_MEMALLOC={s['memalloc']}): {own}; backlog "
            f"{s['backlog_skbs']} skbs / {s['backlog_bytes']} of {s['backlog_limit']} bytes; "
            f"prequeue {s['prequeue_skbs']}, receive queue {s['rx_queued_skbs']} "
            f"({s['rmem_alloc']} of {s['sk_rcvbuf']} bytes); {s['tx_unacked_skbs']} transmit "
            f"skbs unacknowledged ({s['wmem_queued']} of {s['sk_sndbuf']} bytes); drops: {drops}"
            + (f"; the peer retransmits in {s['rto_s']} s after {s['consecutive_drops']} "
               f"losses" if s["consecutive_drops"] else "") + ".")


def now() -> float:
    return trio.current_time()


def _pages(n: int) -> str:
    return f"{n} page" if n == 1 else f"{n} pages"


def _exposures(ss: dict) -> str:
    """The earlier stalls' exposures and near misses (drivers/block/nbd.py)."""
    if not ss["exposed"]:
        return "a reply was always on its way."
    return (f"{ss['exposed']} of them were exposed (no reply left to wait for) and recovered, "
            f"the longest after {ss['longest_exposed_s'] * 1e3:.0f} ms; in {ss['near_misses']} "
            f"of those the sender's own reclaim found nothing and another task freed memory "
            f"in time.")
