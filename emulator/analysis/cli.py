"""Argument parsing and entry points for ``swapnbd analyze | compare | plot | outcomes``.

What it does: ``add_*_arguments(parser)`` declares each sub-command's options on
an argparse parser (the ``swapnbd`` CLI in emulator/cli.py builds the
sub-parsers and calls these), and ``*_main(args) -> int`` runs it and returns the
exit status: 0 ok, 2 bad input (missing, empty, non-JSON file, other schema
version, bad option) with a one-line message on stderr and no traceback.
``python -m emulator.analysis.cli analyze LOG`` works without the main CLI.

MMTests counterpart: ``compare-kernels.sh`` (compare) and ``graph-*.sh``
(plot); analyze is the single-column case. ``outcomes`` pools the rows of
several sweeps (or experiments) into one outcome table, which MMTests has no
counterpart for. Simplified: no HTML report, no
per-benchmark result block.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console

from .reader import LogError

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def _console(min_width: int = 100) -> Console:
    """A Console on the *current* sys.stdout (so tests capturing it see output);
    wide enough for the tables when stdout is not a terminal."""
    out = sys.stdout
    if out.isatty():
        return Console(file=out, highlight=False)
    return Console(file=out, highlight=False, width=max(min_width, 100), color_system=None,
                   soft_wrap=False)


def _error(cmd: str, msg: str) -> int:
    sys.stderr.write(f"swapnbd {cmd}: error: {msg}\n")
    sys.stderr.flush()
    return EXIT_BAD_INPUT


def _name_count_error(names: Sequence[str] | None, logs: Sequence[str]) -> str | None:
    """compare / plot take ``--name`` once per LOG or not at all: the message
    when they got another number, else None."""
    if names and len(names) != len(logs):
        return f"{len(names)} --name labels for {len(logs)} logs; give one --name per LOG or none"
    return None


# -- analyze ----------------------------------------------------------------

def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", metavar="LOG", help="a run's JSON-lines log")
    parser.add_argument("--json", action="store_true",
                        help="print the analysis as one JSON object instead of tables")
    parser.add_argument("--baseline", choices=("boot", "first-sample"), default="boot",
                        help="the 'before' snapshot for vmstat deltas: boot (all counters 0, "
                             "the default) or the first vmstat sample")


def analyze_main(args: argparse.Namespace) -> int:
    from .report import analyze_json, render_analyze
    from .summary import summarize

    try:
        s = summarize(args.log, baseline=getattr(args, "baseline", "boot"))
    except LogError as e:
        return _error("analyze", str(e))
    if getattr(args, "json", False):
        sys.stdout.write(analyze_json(s) + "\n")
        sys.stdout.flush()
    else:
        render_analyze(s, _console())
    return EXIT_OK


# -- compare ----------------------------------------------------------------

def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", metavar="LOG", nargs="+", help="run logs, one column each")
    parser.add_argument("--name", action="append", dest="names", metavar="LABEL",
                        help="column label, once per LOG in order "
                             "(default: <kernel>-<slab> from each log)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--baseline", choices=("boot", "first-sample"), default="boot",
                        help="the 'before' snapshot for vmstat deltas (see analyze)")


def compare_main(args: argparse.Namespace) -> int:
    from .report import compare_json, render_compare, unique_names
    from .summary import summarize

    logs: Sequence[str] = args.logs
    names = getattr(args, "names", None)
    bad_names = _name_count_error(names, logs)
    if bad_names:
        return _error("compare", bad_names)
    summaries = []
    for path in logs:
        try:
            summaries.append(summarize(path, baseline=getattr(args, "baseline", "boot")))
        except LogError as e:
            return _error("compare", str(e))
    cols = unique_names(list(names) if names else [s.name for s in summaries])
    if getattr(args, "json", False):
        sys.stdout.write(compare_json(summaries, cols) + "\n")
        sys.stdout.flush()
    else:
        render_compare(summaries, cols, _console(44 + 15 * len(cols)))
    return EXIT_OK


# -- plot -------------------------------------------------------------------

def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", metavar="LOG", nargs="+",
                        help="run logs to overlay, or one sweep directory (swapnbd sweep --out)")
    parser.add_argument("-o", "--output", metavar="FILE.png",
                        help="image to write (default: <first log's name>.png in the "
                             "current directory; DIR/sweep.png for a sweep)")
    parser.add_argument("--name", action="append", dest="names", metavar="LABEL",
                        help="legend label, once per LOG in order")
    parser.add_argument("--dpi", type=int, default=110, help="resolution (default 110)")


def plot_main(args: argparse.Namespace) -> int:
    from .plot import load_series, plot
    from .report import unique_names

    logs: Sequence[str] = args.logs
    if len(logs) == 1 and os.path.isdir(logs[0]):
        return plot_sweep_main(logs[0], getattr(args, "output", None), getattr(args, "dpi", 110))
    names = getattr(args, "names", None)
    bad_names = _name_count_error(names, logs)
    if bad_names:
        return _error("plot", bad_names)
    output = getattr(args, "output", None) or (
        os.path.splitext(os.path.basename(logs[0]))[0] + ".png")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        return _error("plot", f"{output}: directory {out_dir} does not exist")
    dpi = getattr(args, "dpi", 110)
    if not 20 <= dpi <= 600:
        return _error("plot", f"--dpi {dpi}: must be between 20 and 600")
    series = []
    for i, path in enumerate(logs):
        try:
            series.append(load_series(path, names[i] if names else None))
        except LogError as e:
            return _error("plot", str(e))
    for s, n in zip(series, unique_names([s.name for s in series]), strict=True):
        s.name = n
    try:
        plot(series, output, dpi=dpi)
    except (OSError, ValueError) as e:
        return _error("plot", f"{output}: cannot write ({e})")
    msg = f"wrote {output}"
    skipped = sum(s.skipped for s in series)
    if skipped:
        msg += f" ({skipped} lines skipped)"
    sys.stdout.write(msg + "\n")
    return EXIT_OK


def plot_sweep_main(directory: str, output: str | None, dpi: int) -> int:
    """``plot DIR``: outcome probability and elapsed time against the grid axes."""
    from .outcome_plot import plot_sweep
    from .outcomes import read_rows

    rows = read_rows(directory)
    if not rows:
        return _error("plot", f"{directory}: no runs.jsonl rows (not a swapnbd sweep directory)")
    if not 20 <= dpi <= 600:
        return _error("plot", f"--dpi {dpi}: must be between 20 and 600")
    output = output or os.path.join(directory, "sweep.png")
    try:
        plot_sweep(rows, output, dpi=dpi, title=os.path.basename(os.path.normpath(directory)))
    except (OSError, ValueError) as e:
        return _error("plot", f"{output}: cannot write ({e})")
    sys.stdout.write(f"wrote {output}\n")
    return EXIT_OK


# -- outcomes ---------------------------------------------------------------

def add_outcomes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", metavar="DIR", nargs="+",
                        help="sweep or experiment output directories (their runs.jsonl); "
                             "rows of the same cell are pooled")
    parser.add_argument("--markdown", action="store_true",
                        help="print a markdown table (as in a sweep's summary.md)")
    parser.add_argument("--ratio", action="append", default=[], metavar="CELL_A/CELL_B",
                        help="also print median elapsed of CELL_A over that of CELL_B (repeatable)")


def outcomes_main(args: argparse.Namespace) -> int:
    """``outcomes DIR...``: one outcome table over the runs of several directories."""
    import statistics

    from .outcomes import read_rows, summarize_cells, summary_markdown, summary_table

    rows = []
    for d in args.dirs:
        found = read_rows(d)
        if not found:
            return _error("outcomes", f"{d}: no runs.jsonl rows (not a sweep or experiment directory)")
        rows.extend(found)
    rows, common = _name_pooled_cells(rows)
    cells = summarize_cells(rows)
    by_name = {c.cell: c for c in cells}
    ratios = []
    for spec in args.ratio:
        a, sep, b = spec.partition("/")
        missing = [n for n in (a, b) if n not in by_name] if sep else [spec]
        if missing:
            return _error("outcomes", f"--ratio {spec}: no cell named {missing[0]!r} "
                          f"(cells: {', '.join(by_name)})")
        ea, eb = by_name[a].elapsed_s, by_name[b].elapsed_s
        if not ea or not eb:
            return _error("outcomes", f"--ratio {spec}: a cell without elapsed times")
        ratios.append(f"median elapsed {a} / {b}: {statistics.median(ea):.1f} s / "
                      f"{statistics.median(eb):.1f} s = {statistics.median(ea) / statistics.median(eb):.2f}")
    every_run = f"every run: {' '.join(f'--set {o}' for o in common)}" if common else None
    if args.markdown:
        sys.stdout.write(summary_markdown(cells))
        for r in [every_run, *ratios] if every_run else ratios:
            sys.stdout.write(f"\n{r}\n")
    else:
        console = _console(120)
        console.print(summary_table(cells, title=f"outcomes over {len(rows)} runs"))
        for r in [every_run, *ratios] if every_run else ratios:
            console.print(r, markup=False)
    return EXIT_OK


def _name_pooled_cells(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Keep apart runs that share a cell name but not their ``--set`` overrides.

    A sweep names a cell by its config and grid values; its other ``--set``
    overrides apply to every run of that sweep. Pooling several directories
    can therefore put different machines under one name: an override joins
    the cell's name only where runs of that name disagree on it. Overrides
    that every run shares are returned apart, to be printed once.
    """
    def extra(r: dict) -> dict[str, str]:
        grid = r.get("grid") or {}
        return {o.partition("=")[0]: o for o in r.get("overrides", ()) if o.partition("=")[0] not in grid}

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get("cell")), []).append(r)
    named = []
    for name, group in groups.items():
        extras = [extra(r) for r in group]
        keys = sorted({k for e in extras for k in e})
        apart = [k for k in keys if len({e.get(k) for e in extras}) > 1]
        named += [{**r, "cell": " ".join([name, *(e[k] for k in apart if k in e)])}
                  for r, e in zip(group, extras, strict=True)]
    shared = set.intersection(*(set(extra(r).values()) for r in rows)) if rows else set()
    return named, sorted(shared)


# -- stand-alone dispatcher -------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emulator.analysis.cli",
                                description="Analyse swapnbd run logs.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, add, main, help_ in (
            ("analyze", add_analyze_arguments, analyze_main, "summarise one run"),
            ("compare", add_compare_arguments, compare_main, "MMTests-style table, one column per run"),
            ("plot", add_plot_arguments, plot_main, "plot runs over time to a PNG"),
            ("outcomes", add_outcomes_arguments, outcomes_main, "outcome table over sweep directories")):
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)
        sp.set_defaults(func=main)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
