"""Emulator accounting of the NBD sender's stalls (no kernel counterpart).

Every send during which the NBD sender (nbd0) entered direct reclaim is a
*sender stall*. While a stall lasts with no request awaiting a reply, it is
*exposed*: no reply can arrive to make a page clean, so only memory freed by
others can end it. An exposed stall in which the sender's own reclaim freed
nothing is a *near miss*: it ended only because another task freed memory in
time. A 3.5 lockup is a near miss that nobody rescues, an exposure that never
ends; the numbers of both say how close a completed run came. Each stall's
``nbd_sender_stall`` event also says where the memory went meanwhile: how many
pages anyone freed (``pgfree``, and by whom: ``freed_by``), how many
drain_all_pages moved from the per-cpu lists, where the watermark check does
not see them (``pcp_drained``), and how many atomic callers took at or below
the min watermark (``pgalloc_below_min``), a band the vanilla sender may not
enter.

The driver (drivers/block/nbd.py) calls ``send_begins`` and ``send_ends``
around each nbd_send_req, and ``exposed`` when a reply leaves nothing in
flight during a send. The counts live in vmstat (``nbd_sender_reclaim``,
``nbd_sender_reclaim_exposed``, ``nbd_sender_near_miss``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import structlog
import trio

if TYPE_CHECKING:
    from emulator.block import Request
    from emulator.kernel import Kernel
    from emulator.task import Task

log = structlog.get_logger("swapnbd.nbd")


@attrs.frozen
class SenderStallSummary:
    """The sender stalls of a run so far (module docstring)."""

    stalls: int  #: sends during which the sender entered direct reclaim
    exposed: int  #: ... that spent time with no request awaiting a reply
    near_misses: int  #: exposed stalls in which the sender's own reclaim freed nothing
    total_s: float
    longest_s: float
    longest_exposed_s: float



class SendMarks:
    """The counters a send began with, for its stall's event: the machine's
    (pgfree, pgalloc_below_min, pcp_drained, the allocator's pgfree_by, free
    pages) and the sender's (direct reclaims, those of them for order > 0, pages
    reclaimed)."""

    __slots__ = ("pgfree", "below_min", "pcp_drained", "freed_by", "free",
                 "allocstall", "high_order", "reclaimed")

    def __init__(self, k: Kernel, task: Task | None) -> None:
        vm = k.vmstat
        self.pgfree = vm["pgfree"]
        self.below_min = vm["pgalloc_below_min"]
        self.pcp_drained = vm["pcp_drained"]
        self.freed_by = dict(k.page_alloc.pgfree_by)
        self.free = k.pgdat.zone.nr_free_pages
        self.allocstall = task.allocstall if task else 0
        self.high_order = task.allocstall_high_order if task else 0
        self.reclaimed = task.direct_reclaimed if task else 0


class SenderStallMonitor:
    """The sender's stalls, exposures and near misses (module docstring)."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.vmstat = k.vmstat
        self.total_s = 0.0
        self.longest_s = 0.0
        self.longest_exposed_s = 0.0
        #: when the send in progress last saw nothing in flight (None: not since it began)
        self._exposed_since: float | None = None
        #: the counters as the send in progress began
        self._marks = SendMarks(k, None)

    # -- the driver's calls ----------------------------------------------------------
    def send_begins(self, req: Request, task: Task, *, in_flight: bool) -> None:
        self._marks = SendMarks(self.k, task)
        self._exposed_since = None if in_flight else req.started

    def exposed(self) -> None:
        """A reply left nothing in flight while the send is under way."""
        self._exposed_since = trio.current_time()

    def send_ends(self, req: Request, task: Task, *, accounted: bool = True) -> None:
        """The send finished (``accounted``: it went out); a stall if it reclaimed."""
        if accounted and task.allocstall != self._marks.allocstall:
            self._account_stall(req, task)
        self._exposed_since = None

    # -- the accounting --------------------------------------------------------------------
    def record(self, seconds: float, exposed_s: float | None, reclaimed: int) -> None:
        """A stall of ``seconds``, the last ``exposed_s`` of them with nothing in
        flight (None: never exposed), in which the sender reclaimed ``reclaimed`` pages."""
        vm = self.vmstat
        vm["nbd_sender_reclaim"] += 1
        self.total_s += seconds
        self.longest_s = max(self.longest_s, seconds)
        if exposed_s is not None:
            vm["nbd_sender_reclaim_exposed"] += 1
            vm["nbd_sender_near_miss"] += reclaimed == 0
            self.longest_exposed_s = max(self.longest_exposed_s, exposed_s)

    def _account_stall(self, req: Request, task: Task) -> None:
        now = trio.current_time()
        marks = self._marks
        reclaimed = task.direct_reclaimed - marks.reclaimed
        exposed_s = None if self._exposed_since is None else now - self._exposed_since
        self.record(now - req.started, exposed_s, reclaimed)
        k = self.k
        freed_by = k.page_alloc.pgfree_by
        log.info("nbd_sender_stall", cookie=req.cookie, stall_s=round(now - req.started, 6),
                 exposed_s=None if exposed_s is None else round(exposed_s, 6),
                 allocstall=task.allocstall - marks.allocstall,
                 high_order=task.allocstall_high_order - marks.high_order,
                 reclaimed=reclaimed, **self.send_deltas(),
                 pcp_drained=k.vmstat["pcp_drained"] - marks.pcp_drained,
                 freed_by={c: n - marks.freed_by.get(c, 0) for c, n in freed_by.items()
                           if n != marks.freed_by.get(c, 0)},
                 free_before=marks.free, free_after=k.pgdat.zone.nr_free_pages)

    # -- what a diagnosis reads ------------------------------------------------------------
    def exposed_s(self) -> float | None:
        """How long the send in progress has had nothing in flight (None: not now)."""
        if self._exposed_since is None:
            return None
        return round(trio.current_time() - self._exposed_since, 3)

    def send_deltas(self) -> dict[str, int]:
        """Pages freed by anyone, and taken below min by atomic callers, since the
        send in progress began."""
        vm = self.vmstat
        marks = self._marks
        return {"pgfree": vm["pgfree"] - marks.pgfree,
                "pgalloc_below_min": vm["pgalloc_below_min"] - marks.below_min}

    def summary(self) -> SenderStallSummary:
        vm = self.vmstat
        return SenderStallSummary(
            stalls=vm["nbd_sender_reclaim"], exposed=vm["nbd_sender_reclaim_exposed"],
            near_misses=vm["nbd_sender_near_miss"], total_s=round(self.total_s, 4),
            longest_s=round(self.longest_s, 4),
            longest_exposed_s=round(self.longest_exposed_s, 4))
