"""Render RunSummary objects: ``analyze`` (one run) and ``compare`` (one column per run).

What it does: prints rich tables to a rich Console (plain aligned text when
stdout is not a terminal). ``compare`` follows MMTests' compare layout: a
header of run names, then the "MMTests Statistics: duration" block and the
"MMTests Statistics: vmstat" block, row labels left, one right-aligned column
per run, values in MonitorVmstat.pm's formats (``%d``, ``%d%%``, ``%.3f``).
swapnbd's own rows follow in a third block, "swapnbd statistics".

MMTests counterpart: ``compare-kernels.sh`` / ``subreport/mmtests-duration`` and
``subreport/mmtests-vmstat`` (2012). Simplified: no per-benchmark result block
(MMTests printed "Unrecognised test vmscan-anon-mmap-write" there anyway), no
HTML output, no statistical comparison between columns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .summary import ALL_ROWS, DURATION_ROWS, EMULATOR_ROWS, VMSTAT_ROWS, RunSummary, format_value

BLOCKS = (
    ("MMTests Statistics: duration", DURATION_ROWS, "duration"),
    ("MMTests Statistics: vmstat", VMSTAT_ROWS, "vmstat"),
    ("swapnbd statistics (not MMTests rows)", EMULATOR_ROWS, "emulator"),
)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def analyze_json(s: RunSummary) -> str:
    """The analysis as one JSON object (one line)."""
    return json.dumps(_json_safe(s.as_dict()), separators=(",", ":"), default=str)


def _machine_line(s: RunSummary) -> str:
    m = s.machine
    parts = []
    if "cpus" in m:
        parts.append(f"{m['cpus']} cpus")
    if isinstance(m.get("nr_pages"), (int, float)):
        parts.append(f"{m['nr_pages']} pages ({m['nr_pages'] * 4 / 1024:g} MiB)")
    w = m.get("wmark")
    if isinstance(w, dict):
        parts.append(f"watermarks min/low/high {w.get('min')}/{w.get('low')}/{w.get('high')} pages")
    if "throttle_threshold" in m:
        parts.append(f"throttle threshold {m['throttle_threshold']} pages")
    if "swap_pages" in m:
        parts.append(f"swap {m['swap_pages']} pages")
    return ", ".join(parts)


def _workload_line(s: RunSummary) -> str:
    w = s.config.get("workload")
    if not isinstance(w, dict):
        return ""
    return ", ".join(f"{k}={v}" for k, v in w.items())


def render_analyze(s: RunSummary, console: Console) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("Log", Text(s.path))
    head.add_row("Run", Text(s.name))
    outcome = s.outcome + ("" if s.complete else " (no run_end: analysed up to the last sample)")
    if s.signal:
        outcome += f" ({s.signal})"
    head.add_row("Outcome", Text(outcome))
    if s.error:
        head.add_row("Error", Text(s.error))
    head.add_row("Elapsed", format_value("sec", s.elapsed) + " s")
    head.add_row("Lines", f"{s.lines} read, {s.skipped} lines skipped, {s.samples} vmstat samples")
    if s.machine:
        head.add_row("Machine", Text(_machine_line(s)))
    wl = _workload_line(s)
    if wl:
        head.add_row("Workload", Text(wl))
    console.print(head)

    for title, rows, attr in BLOCKS:
        values = getattr(s, attr)
        t = Table(title=title, title_justify="left", box=box.SIMPLE, show_header=False,
                  pad_edge=False)
        t.add_column("row", min_width=40)
        t.add_column("value", justify="right", min_width=12)
        for r in rows:
            t.add_row(r.label, format_value(r.kind, values.get(r.label)))
        console.print(t)

    tl = Table(title="Timeline", title_justify="left", box=box.SIMPLE, pad_edge=False)
    tl.add_column("t (s)", justify="right")
    tl.add_column("event")
    tl.add_column("detail")
    for e in s.timeline:
        tl.add_row(f"{e.t:.2f}", e.what + (" (sampled)" if e.sampled else ""), Text(e.detail))
    console.print(tl)

    if s.lockup is not None:
        console.print(Text(f"Lockup at t={s.lockup['t']:.2f} s: diagnosis", style="bold red"))
        # soft_wrap: the watchdog's lines are printed as written, never re-wrapped.
        console.print(Text(s.lockup["text"] or "(the lockup event carried no text)"),
                      soft_wrap=True)
        console.print()


def unique_names(names: Sequence[str]) -> list[str]:
    """Disambiguate equal column names: a, a -> a, a#2."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def compare_table(summaries: Sequence[RunSummary], names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The compare layout as data: (label, one formatted cell per run). Block
    titles appear as rows whose cells are empty. Used by render and tests."""
    rows: list[tuple[str, list[str]]] = [("Outcome", [s.outcome for s in summaries])]
    for title, block_rows, attr in BLOCKS:
        rows.append((title, ["" for _ in summaries]))
        for r in block_rows:
            rows.append((r.label, [format_value(r.kind, getattr(s, attr).get(r.label))
                                   for s in summaries]))
    return rows


def render_compare(summaries: Sequence[RunSummary], names: Sequence[str],
                   console: Console) -> None:
    titles = {b[0] for b in BLOCKS}
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    t.add_column("", min_width=40, no_wrap=True)
    for n in names:
        t.add_column(Text(n), justify="right", min_width=12, no_wrap=True)
    for label, cells in compare_table(summaries, names):
        if label in titles:
            t.add_section()
            t.add_row(Text(label, style="bold"), *cells)
        else:
            t.add_row(label, *(Text(c) for c in cells))
    console.print(t)
    for n, s in zip(names, summaries, strict=True):
        notes = []
        if not s.complete:
            notes.append("incomplete (no run_end)")
        if s.skipped:
            notes.append(f"{s.skipped} lines skipped")
        if notes:
            console.print(Text(f"{n}: {s.path}: " + ", ".join(notes)))


def compare_json(summaries: Sequence[RunSummary], names: Sequence[str]) -> str:
    return json.dumps(_json_safe({
        "runs": [{"name": n, **s.as_dict()} for n, s in zip(names, summaries, strict=True)],
        "rows": [label for label in ALL_ROWS],
    }), separators=(",", ":"), default=str)
