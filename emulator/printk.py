"""Kernel messages: the debug switch, and printk_ratelimited with its suppressed count.

The debug switch (``debug_enabled``) stands for the kernel's own decision to
emit a debug message at all (dynamic debug / the console loglevel): hot paths
(one event per NBD request or reclaim) test it before building an event. It
is the kernel's; where the messages go, and at which level, is the machine's
log configuration (emulator/logs.py), which sets it.

Models lib/ratelimit.c's ``___ratelimit`` (3.5) with the defaults of
include/linux/ratelimit.h (DEFAULT_RATELIMIT_INTERVAL = 5 * HZ,
DEFAULT_RATELIMIT_BURST = 10), one ``struct ratelimit_state`` per message, as
``printk_ratelimited`` defines one per call site: at most ``burst`` messages
per ``interval``; the first message after an interval in which some were
missed is preceded by "<func>: N callbacks suppressed", here a
``printk_suppressed`` event (message, suppressed).

Which messages: the ones a failing swap device repeats for every I/O
(``swap_write_error``, ``swap_read_error``, ``nbd_error``). 3.5 prints those
with a plain printk (end_swap_bio_write's "Write-error on swap-device",
nbd.c's "Other side returned error", blk-core's "end_request: I/O error"),
and the kernel's log buffer is a ring of fixed size that overwrites itself;
the emulator's log is a file, so it applies printk_ratelimited's state to
them instead, and keeps the exact numbers in counters (vmstat, run_end).
Whatever was still suppressed when the run ends is in ``run_end.suppressed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import trio

if TYPE_CHECKING:
    from emulator.kernel import Kernel

log = structlog.get_logger("swapnbd.printk")

_debug = False


def debug_enabled() -> bool:
    """Whether debug events are emitted. Building an event that the log then drops
    costs more than the work it describes, so hot paths ask first."""
    return _debug


def set_debug(on: bool) -> None:
    global _debug
    _debug = on

DEFAULT_RATELIMIT_INTERVAL_S = 5.0  #: 5 * HZ, in kernel seconds
DEFAULT_RATELIMIT_BURST = 10


class RateLimitState:
    """struct ratelimit_state."""

    __slots__ = ("begin", "burst", "interval", "missed", "printed", "total_missed")

    def __init__(self, interval: float, burst: int = DEFAULT_RATELIMIT_BURST) -> None:
        self.interval = interval
        self.burst = burst
        self.printed = 0
        self.missed = 0
        self.begin: float | None = None
        self.total_missed = 0

    def ratelimit(self, now: float) -> tuple[bool, int]:
        """___ratelimit(): (may print, messages suppressed in the interval that just
        ended, to report first: 0 if none)."""
        if not self.interval:
            return True, 0
        if self.begin is None:
            self.begin = now
        suppressed = 0
        if now > self.begin + self.interval:  # time_is_before_jiffies(begin + interval)
            suppressed = self.missed
            self.begin = now
            self.printed = 0
            self.missed = 0
        if self.burst and self.burst > self.printed:
            self.printed += 1
            return True, suppressed
        self.missed += 1
        self.total_missed += 1
        return False, suppressed


class Printk:
    """The kernel's rate-limited messages, one state per message (event name)."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.states: dict[str, RateLimitState] = {}

    def ratelimited(self, level: str, event: str, **fields) -> bool:
        """Log ``event`` at ``level`` unless its state says no; True if logged."""
        state = self.states.get(event)
        if state is None:
            state = self.states[event] = RateLimitState(self.k.hz(DEFAULT_RATELIMIT_INTERVAL_S))
        ok, suppressed = state.ratelimit(trio.current_time())
        if suppressed:
            log.warning("printk_suppressed", message=event, suppressed=suppressed)
        if ok:
            getattr(log, level)(event, **fields)
        return ok

    def pending(self) -> dict[str, int]:
        """Messages suppressed in the current interval of each state (not yet reported)."""
        return {name: s.missed for name, s in self.states.items() if s.missed}

    def suppressed_total(self) -> dict[str, int]:
        """Every message suppressed since boot, by message."""
        return {name: s.total_missed for name, s in self.states.items() if s.total_missed}
