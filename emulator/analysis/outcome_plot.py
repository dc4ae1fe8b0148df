"""``swapnbd plot DIR``: a sweep's outcome probability and elapsed time against each grid axis.

What it does: reads ``DIR/runs.jsonl`` (emulator/sweep.py), and for each grid
axis draws two panels: P(lockup) with its 95% Wilson interval (error bars), and
the elapsed time (median, bars from the fastest to the slowest run). One line
per combination of the config and the other axes' values. A sweep without a grid
axis has one panel pair with a point per cell. Statistics: emulator/analysis/
outcomes.py.

Not a kernel mechanism; no MMTests counterpart (MMTests plots one run per kernel).
Simplified: values of an axis are placed on a numeric x axis when every value is
a number, otherwise one slot each in the order they first appear.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .outcomes import CellSummary, summarize_cells  # noqa: E402


def grid_axes(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        for k in r.get("grid") or {}:
            if k not in keys:
                keys.append(k)
    return keys


def _number(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def axis_series(rows: Sequence[dict[str, Any]], key: str | None
                ) -> dict[str, list[tuple[str, CellSummary]]]:
    """label -> [(value of ``key``, summary of its cell)], one label per
    combination of config and the other axes."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        grid = r.get("grid") or {}
        config = os.path.splitext(os.path.basename(str(r.get("config"))))[0]
        if key is None:
            label, value = "cells", str(r.get("cell"))
        else:
            others = [f"{k}={v}" for k, v in grid.items() if k != key]
            label, value = " ".join([config, *others]), str(grid.get(key))
        groups.setdefault(label, {}).setdefault(value, []).append(r)
    return {label: [(v, summarize_cells(rs)[0]) for v, rs in by_value.items()]
            for label, by_value in groups.items()}


def _draw_axis(ax_p, ax_e, key: str | None, series: dict[str, list[tuple[str, CellSummary]]]
               ) -> None:
    values = list(dict.fromkeys(v for pts in series.values() for v, _ in pts))
    numeric = key is not None and all(_number(v) is not None for v in values)
    pos = {v: (_number(v) if numeric else i) for i, v in enumerate(values)}
    for label, pts in series.items():
        pts = sorted(pts, key=lambda p: pos[p[0]])
        decided = [(pos[v], c) for v, c in pts if c.p_lockup is not None]
        if decided:
            xs = [x for x, _ in decided]
            ps = [c.p_lockup for _, c in decided]
            err = [[p - c.interval[0] for p, (_, c) in zip(ps, decided, strict=True)],
                   [c.interval[1] - p for p, (_, c) in zip(ps, decided, strict=True)]]
            ax_p.errorbar(xs, ps, yerr=err, marker="o", capsize=4, label=label)
        timed = [(pos[v], c) for v, c in pts if c.elapsed_s]
        if timed:
            xs = [x for x, _ in timed]
            med = [c.elapsed_median for _, c in timed]
            err = [[m - c.elapsed_s[0] for m, (_, c) in zip(med, timed, strict=True)],
                   [c.elapsed_s[-1] - m for m, (_, c) in zip(med, timed, strict=True)]]
            ax_e.errorbar(xs, med, yerr=err, marker="s", capsize=4, label=label)
    ax_p.set_ylim(-0.03, 1.03)
    ax_p.set_ylabel("P(lockup), 95% Wilson interval")
    ax_e.set_ylabel("elapsed s (median, min-max)")
    ax_e.set_xlabel(key or "cell")
    ax_e.set_ylim(bottom=0)
    if not numeric:
        for ax in (ax_p, ax_e):
            ax.set_xticks(range(len(values)), values, rotation=20, ha="right", fontsize=8)
    for ax in (ax_p, ax_e):
        ax.grid(True, alpha=0.3)
    ax_p.legend(fontsize=7, loc="best")


def plot_sweep(rows: Sequence[dict[str, Any]], output: str, *, dpi: int = 110,
               title: str = "") -> None:
    """Draw the panels into ``output`` (format from its extension); written to
    a temporary file, then renamed."""
    keys: list[str | None] = list(grid_axes(rows)) or [None]
    fig = Figure(figsize=(6 * len(keys), 8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(keys), squeeze=False)
    for i, key in enumerate(keys):
        _draw_axis(axes[0][i], axes[1][i], key, axis_series(rows, key))
    fig.suptitle(f"swapnbd sweep {title} ({len(rows)} runs)", fontsize=11)
    out_dir = os.path.dirname(os.path.abspath(output))
    fmt = os.path.splitext(output)[1].lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=".swapnbd-plot-", suffix="." + fmt, dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=fmt)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
