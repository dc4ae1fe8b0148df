"""Plot one or more run logs: memory pressure, swap traffic, reserves, throttling, NBD.

What it does: streams each log once (emulator/analysis/reader.py), keeps the
``vmstat`` samples' few plotted series, and draws five panels sharing the time
axis (seconds since boot), headless (matplotlib's Agg canvas, no pyplot state):

1. free pages (log scale) with the min/low/high watermarks and the direct-reclaim
   throttle threshold as horizontal lines;
2. swap-in / swap-out rate (pages/s, from Δpswpin, Δpswpout between samples);
3. skbs queued for receive or unacknowledged (skb_rx_queued + skb_tx_queued) and
   pfmemalloc pages
   (nr_pfmemalloc_pages);
4. throttled tasks (nr_throttled, left axis) and skb drops/s by reason
   (Δskb_drop_nomem, Δskb_drop_pfmemalloc, right axis);
5. NBD requests in flight.

Several logs overlay: each run has one colour, each series one line style, and a
legend names both. A lockup is a vertical red line on every panel.

MMTests counterpart: ``report/graph-single-*.sh`` / ``graph-compare-*.sh`` (gnuplot
over monitor logs: free pages, swapio, vmstat). Simplified: no smoothing; above
``MAX_POINTS`` samples a series is decimated (every k-th sample kept; rates are
then averages over the wider interval, gauges may miss short spikes).
"""

from __future__ import annotations

import array
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .reader import LogError, LogReader, run_name  # noqa: E402

MAX_POINTS = 20_000

#: The per-sample series kept for each run (one array each).
_FIELDS = ("t", "free", "pswpin", "pswpout", "skb", "pfmemalloc", "throttled",
           "drop_nomem", "drop_pfmemalloc", "nbd_inflight")


@dataclass
class Series:
    """The plotted series of one run (array('d'), one entry per kept sample)."""

    path: str
    name: str
    outcome: str
    wmark: dict[str, float]
    throttle_threshold: float | None
    data: dict[str, array.array] = field(
        default_factory=lambda: {k: array.array("d") for k in _FIELDS})
    lockup_t: float | None = None
    skipped: int = 0
    stride: int = 1
    _seen: int = 0

    def add(self, row: tuple[float, ...]) -> None:
        self._seen += 1
        if (self._seen - 1) % self.stride:
            return
        for k, v in zip(_FIELDS, row, strict=True):
            self.data[k].append(v)
        if len(self.data["t"]) >= 2 * MAX_POINTS:
            for k in _FIELDS:
                self.data[k] = self.data[k][::2]
            self.stride *= 2

    def __len__(self) -> int:
        return len(self.data["t"])


def _f(x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def load_series(path: str, name: str | None = None) -> Series:
    """Stream one log into a Series. Raises LogError for unusable files."""
    r = LogReader(path)
    m = r.machine
    w = m.get("wmark") if isinstance(m.get("wmark"), dict) else {}
    s = Series(path=r.path, name=name or run_name(m, r.config), outcome="incomplete",
               wmark={k: _f(w.get(k)) for k in ("min", "low", "high")},
               throttle_threshold=_f(m.get("throttle_threshold")))
    for ev in r.events():
        name_ = ev["event"]
        if name_ == "vmstat":
            vm = ev.get("vm")
            if not isinstance(vm, dict):
                continue
            g = vm.get
            if isinstance(ev.get("wmark"), dict) and math.isnan(s.wmark["min"]):
                s.wmark = {k: _f(ev["wmark"].get(k)) for k in ("min", "low", "high")}
            if s.throttle_threshold is None or math.isnan(s.throttle_threshold):
                s.throttle_threshold = _f(ev.get("throttle_threshold"))
            skb = _f(g("skb_rx_queued")) + _f(g("skb_tx_queued"))
            inflight = ev.get("nbd_inflight", g("nbd_inflight"))
            s.add((ev["t"], _f(g("nr_free_pages")), _f(g("pswpin")), _f(g("pswpout")),
                   skb, _f(g("nr_pfmemalloc_pages")), _f(ev.get("nr_throttled")),
                   _f(g("skb_drop_nomem")), _f(g("skb_drop_pfmemalloc")), _f(inflight)))
        elif name_ == "lockup" and s.lockup_t is None:
            s.lockup_t = ev["t"]
    s.skipped = r.skipped
    if r.run_end is not None:
        s.outcome = str(r.run_end.get("outcome", "unknown"))
    if len(s) == 0:
        raise LogError(f"{path}: no vmstat samples to plot")
    return s


def _rate(t: Sequence[float], c: Sequence[float]) -> tuple[list[float], list[float]]:
    """Per-interval rate of a cumulative counter, placed at the interval's end."""
    xs, ys = [], []
    for i in range(1, len(t)):
        dt = t[i] - t[i - 1]
        if dt > 0:
            xs.append(t[i])
            ys.append(max(0.0, (c[i] - c[i - 1]) / dt))
    return xs, ys


_RUN_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown",
                "tab:pink", "tab:olive", "tab:cyan")


def plot(series: Sequence[Series], output: str, *, dpi: int = 110) -> None:
    """Draw the five panels for ``series`` into ``output`` (format from its
    extension, PNG by default). Written to a temporary file, then renamed."""
    single = len(series) == 1
    fig = Figure(figsize=(13, 13), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(5, 1, sharex=True)
    ax_free, ax_swap, ax_mem, ax_thr, ax_nbd = axes
    ax_drop = ax_thr.twinx()

    def colour(i: int, single_colour: str) -> str:
        return single_colour if single else _RUN_COLOURS[i % len(_RUN_COLOURS)]

    wm_drawn: set[tuple] = set()
    for i, s in enumerate(series):
        d = s.data
        t = d["t"]
        lbl = "" if single else f" ({s.name})"
        free = [v if v >= 1 else 1.0 for v in d["free"]]  # log scale: floor at 1
        ax_free.plot(t, free, color=colour(i, "tab:blue"), lw=1.2, label=f"free pages{lbl}")
        key = (s.wmark["min"], s.wmark["low"], s.wmark["high"], s.throttle_threshold)
        if key not in wm_drawn:
            wm_drawn.add(key)
            first = len(wm_drawn) == 1
            for (val, name, col, ls) in (
                    (s.wmark["high"], "high wmark", "tab:green", "-."),
                    (s.wmark["low"], "low wmark", "tab:orange", "--"),
                    (s.wmark["min"], "min wmark", "tab:red", ":"),
                    (s.throttle_threshold, "throttle threshold", "tab:purple", (0, (5, 1, 1, 1)))):
                if val is not None and not math.isnan(val):
                    # Several runs: grey watermarks, so they do not look like a run's colour.
                    ax_free.axhline(val, color=col if single else "0.35", ls=ls, lw=1,
                                    label=f"{name} ({val:g})" if first else None)

        for key_, ls, what in (("pswpout", "-", "swap out"), ("pswpin", "--", "swap in")):
            xs, ys = _rate(t, d[key_])
            ax_swap.plot(xs, ys, ls=ls, lw=1,
                         color=colour(i, "tab:red" if key_ == "pswpout" else "tab:blue"),
                         label=f"{what}{lbl}")

        ax_mem.plot(t, d["skb"], lw=1.2, color=colour(i, "tab:cyan"),
                    label=f"skbs (rx queued + tx unacked){lbl}")
        ax_mem.plot(t, d["pfmemalloc"], lw=1.2, ls="--", color=colour(i, "tab:purple"),
                    label=f"pfmemalloc pages{lbl}")

        ax_thr.step(t, d["throttled"], where="post", lw=1.2, color=colour(i, "tab:purple"),
                    label=f"throttled tasks{lbl}")
        for key_, ls, what, col in (("drop_nomem", ":", "skb drops nomem/s", "tab:red"),
                                     ("drop_pfmemalloc", "--", "skb drops pfmemalloc/s",
                                      "tab:orange")):
            xs, ys = _rate(t, d[key_])
            ax_drop.plot(xs, ys, ls=ls, lw=1, color=colour(i, col), label=f"{what}{lbl}")

        ax_nbd.step(t, d["nbd_inflight"], where="post", lw=1.2, color=colour(i, "tab:green"),
                    label=f"NBD requests in flight{lbl}")

        if s.lockup_t is not None:
            for ax in axes:
                ax.axvline(s.lockup_t, color="red", lw=1.5, alpha=0.8)
            ax_free.annotate(f"lockup{lbl}", xy=(s.lockup_t, 1), xycoords=("data", "axes fraction"),
                             xytext=(-3, -3), textcoords="offset points", ha="right", va="top",
                             color="red", fontsize=8)

    ax_free.set_yscale("log")
    ax_free.set_title("Free pages and watermarks")
    ax_free.set_ylabel("pages (log scale)")
    ax_swap.set_title("Swap traffic")
    ax_swap.set_ylabel("pages/s")
    ax_mem.set_title("Network buffers and emergency reserves")
    ax_mem.set_ylabel("skbs / pages")
    ax_thr.set_title("Direct-reclaim throttling and dropped packets")
    ax_thr.set_ylabel("throttled tasks")
    ax_drop.set_ylabel("skb drops/s")
    ax_nbd.set_title("NBD requests in flight")
    ax_nbd.set_ylabel("requests")
    ax_nbd.set_xlabel("time since boot (s)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax is not ax_free:
            ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
    # Counts of tasks and requests: integer ticks, and a visible axis when all zero.
    for ax in (ax_mem, ax_thr, ax_nbd):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_swap, ax_mem, ax_thr, ax_nbd, ax_drop):
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))

    # Legends outside the plotting area, on the right: they never hide data.
    lockup_proxy = ([Line2D([], [], color="red", lw=1.5)], ["lockup"]) \
        if any(s.lockup_t is not None for s in series) else ([], [])
    small = {"fontsize": 8, "loc": "upper left", "borderaxespad": 0.0}
    for ax in (ax_free, ax_swap, ax_mem, ax_nbd):
        h, lab = ax.get_legend_handles_labels()
        ax.legend(h + lockup_proxy[0], lab + lockup_proxy[1], bbox_to_anchor=(1.01, 1.0), **small)
    h1, l1 = ax_thr.get_legend_handles_labels()
    h2, l2 = ax_drop.get_legend_handles_labels()
    ax_drop.legend(h1 + h2 + lockup_proxy[0], l1 + l2 + lockup_proxy[1],
                   bbox_to_anchor=(1.07, 1.0), **small)

    title = "  |  ".join(f"{s.name}: {s.outcome}" for s in series)
    fig.suptitle(f"swapnbd run{'s' if not single else ''} — {title}", fontsize=11)

    out_dir = os.path.dirname(os.path.abspath(output))
    fmt = os.path.splitext(output)[1].lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=".swapnbd-plot-", suffix="." + fmt, dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=fmt)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what a plain write gives
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
