"""Outcome statistics over many runs: counts per cell, P(lockup) with a Wilson interval.

What it does: reads a sweep's ``runs.jsonl`` (one row per run, written by
emulator/sweep.py), groups the rows into *cells* (runs that differ only by
``run.seed``), and for each cell counts the outcomes, estimates the probability
of a lockup with its 95% Wilson score interval, and gives the median and range
of the elapsed time. ``summary_markdown`` and ``summary_table`` print it (the
sweep's ``summary.md`` and its terminal table).

Which runs count: P(lockup) = lockups / runs that reached a machine outcome
(completed, lockup, failed, timeout, or any outcome a later ``swapnbd run``
adds). Rows that say nothing about the machine (``error``: a bad config, an
internal error, a run killed without a ``run_end``) are counted in their own
column and left out of the denominator. docs/SWEEPS.md says how to read the
interval.

Not a kernel mechanism and no MMTests counterpart: MMTests reports one run per
kernel (or means over iterations), never outcome probabilities.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from rich.markup import escape
from rich.table import Table

#: The 97.5% quantile of the standard normal distribution (two-sided 95%).
Z95 = 1.959963984540054

#: Outcomes that say nothing about the machine: not in P(lockup)'s denominator.
NOT_DECIDED = frozenset({"error", "stopped", "interrupted"})

#: Column order of the outcome counts; outcomes not listed follow, sorted.
OUTCOME_ORDER = ("completed", "lockup", "failed", "timeout", "error")


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (no continuity
    correction; Wilson 1927, Agresti & Coull 1998). Unlike p ± z·se it stays
    inside [0, 1] and is not empty at k = 0 or k = n. n = 0 gives (0, 1)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k} n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


@attrs.frozen
class CellSummary:
    """The runs of one cell (same config and overrides, seeds differ)."""

    cell: str
    runs: int
    counts: dict[str, int]
    decided: int  #: runs that reached a machine outcome
    lockups: int
    elapsed_s: tuple[float, ...]  #: of the decided runs, sorted
    lockup_at_s: tuple[float, ...]  #: when the locked-up runs stopped progressing, sorted

    @property
    def p_lockup(self) -> float | None:
        return self.lockups / self.decided if self.decided else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.lockups, self.decided) if self.decided else None

    @property
    def elapsed_median(self) -> float | None:
        return statistics.median(self.elapsed_s) if self.elapsed_s else None


def read_rows(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of ``OUT/runs.jsonl``, one per ``run_id`` (the last one wins);
    lines that are not a JSON object with a ``run_id`` are skipped."""
    path = os.path.join(os.fspath(out_dir), "runs.jsonl")
    rows: dict[str, dict[str, Any]] = {}
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return []
    with fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("run_id"), str):
                rows.pop(row["run_id"], None)
                rows[row["run_id"]] = row
    return list(rows.values())


def summarize_cells(rows: Iterable[dict[str, Any]]) -> list[CellSummary]:
    """One CellSummary per ``cell``, in the order cells first appear."""
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_cell.setdefault(str(row.get("cell")), []).append(row)
    return [_cell(cell, rs) for cell, rs in by_cell.items()]


def _cell(cell: str, rows: Sequence[dict[str, Any]]) -> CellSummary:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    decided = [r for r in rows if r["outcome"] not in NOT_DECIDED]
    return CellSummary(
        cell=cell, runs=len(rows), counts=counts, decided=len(decided),
        lockups=sum(r["outcome"] == "lockup" for r in decided),
        elapsed_s=tuple(sorted(r["elapsed_s"] for r in decided
                               if r.get("elapsed_s") is not None)),
        lockup_at_s=tuple(sorted(r["lockup_at_s"] for r in decided
                                 if r.get("lockup_at_s") is not None)))


def outcome_columns(cells: Sequence[CellSummary]) -> list[str]:
    seen = {o for c in cells for o in c.counts}
    return [o for o in OUTCOME_ORDER if o in seen] + sorted(seen - set(OUTCOME_ORDER))


def _p_text(c: CellSummary) -> str:
    if c.p_lockup is None:
        return "-"
    lo, hi = c.interval  # type: ignore[misc]
    return f"{c.p_lockup:.2f} [{lo:.2f}, {hi:.2f}]"


def _elapsed_text(c: CellSummary) -> str:
    if not c.elapsed_s:
        return "-"
    return f"{c.elapsed_median:.1f} ({c.elapsed_s[0]:.1f}-{c.elapsed_s[-1]:.1f})"


def _lockup_at_text(c: CellSummary) -> str:
    if not c.lockup_at_s:
        return "-"
    return f"{statistics.median(c.lockup_at_s):.1f}"


def summary_rows(cells: Sequence[CellSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (shared by markdown and rich)."""
    cols = outcome_columns(cells)
    header = ["cell", "runs", *cols, "P(lockup) [95% CI]", "elapsed s median (range)",
              "stalled at s (median)"]
    rows = [[c.cell, str(c.runs), *(str(c.counts.get(o, 0)) for o in cols), _p_text(c),
             _elapsed_text(c), _lockup_at_text(c)] for c in cells]
    return header, rows


def summary_markdown(cells: Sequence[CellSummary]) -> str:
    header, rows = summary_rows(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary_table(cells: Sequence[CellSummary], title: str = "sweep summary") -> Table:
    header, rows = summary_rows(cells)
    t = Table(title=title)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*(escape(x) for x in r))
    return t
