"""Analysis of swapnbd run logs: ``swapnbd analyze | compare | plot``.

What it does: reads a run's JSON-lines log (emulator/logs.py, schema 1) as a
stream (``reader``), summarises it into MMTests-style rows plus the emulator's
own figures and a timeline (``summary``), prints them as tables (``report``),
and draws the run over time (``plot``); ``outcomes`` and ``outcome_plot`` count
outcomes over a sweep's runs. ``cli`` holds the argparse entry points
that emulator/cli.py calls. Row definitions: docs/ANALYSIS.md.

MMTests counterpart: compare-kernels.sh, subreport/mmtests-duration,
bin/lib/MMTests/MonitorVmstat.pm and the graph-*.sh scripts (2012). Simplified:
no HTML report.

Importing this package is cheap: matplotlib is only imported by ``plot``.
"""

from .reader import SCHEMA_VERSION, LogError, LogReader
from .summary import RunSummary, summarize

__all__ = ["SCHEMA_VERSION", "LogError", "LogReader", "RunSummary", "summarize"]
