"""The ``swapnbd`` command.

Subcommands: ``run`` (emulate one machine from a TOML config), ``serve`` (the
userspace NBD server alone), ``analyze`` / ``compare`` / ``plot`` (read run
logs), ``experiment`` (the seed's four kernels, patch ablation), ``sweep``
(many runs over Dask workers, emulator/sweep.py).

Exit status of ``run``: 0 completed; 3 locked up (the watchdog fired; the
diagnosis is printed and logged); 4 the workload failed (data integrity
errors or OOM-killed processes); 5 ``run.max_duration_s`` passed while the
machine was still making progress; 2 bad input (config, command line); 130
interrupted (Ctrl-C); 1 an internal error (a bug: the traceback is in the
log). Status 6 (outcome ``stopped``) exists only for embedders that call
``Machine.stop()``.

This module is the only place that writes to the terminal directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from emulator.config import ConfigError, load


def _err(msg: str) -> None:
    print(f"swapnbd: {msg}", file=sys.stderr)


# -- run ------------------------------------------------------------------------------
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set machine.cpus=4")
    p.add_argument("--log", help="JSON-lines log path (default: run.log, or run.log in the config)")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--debug-log", action="store_true",
                   help="also log high-volume debug events (per request, per reclaim)")


def run_main(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        _err(str(e))
        return 2
    log_path = args.log or cfg.run.log or "run.log"
    try:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        open(log_path, "a").close()
    except OSError as e:
        _err(f"--log {log_path}: cannot write: {e.strerror}")
        return 2
    from emulator.report import print_run_summary, run_with_progress

    try:
        result = trio.run(run_with_progress, cfg, log_path, not args.quiet, args.debug_log)
    except ConfigError as e:
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    print_run_summary(cfg, result)
    return result.exit_status


# -- dispatcher -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from emulator.analysis import cli as acli
    from emulator.experiment import add_experiment_arguments
    from net.nbd.serve import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="swapnbd",
        description="An emulated Linux machine that swaps over a real NBD connection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="emulate one machine from a TOML config")
    add_run_arguments(p)
    p = sub.add_parser("serve", help="run the userspace NBD server alone")
    add_serve_arguments(p)
    p = sub.add_parser("analyze", help="what happened in a run, from its log")
    acli.add_analyze_arguments(p)
    p = sub.add_parser("compare", help="MMTests-style table of several runs")
    acli.add_compare_arguments(p)
    p = sub.add_parser("plot", help="plot one or more runs to a PNG")
    acli.add_plot_arguments(p)
    p = sub.add_parser("experiment", help="the seed's experiment and patch ablation")
    add_experiment_arguments(p)
    from emulator.sweep import add_sweep_arguments

    p = sub.add_parser("sweep", help="many runs (configs x grid x seeds) over Dask workers")
    add_sweep_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse prints its own one-line usage error
        return 2 if e.code else 0
    if args.command == "run":
        return run_main(args)
    if args.command == "serve":
        from net.nbd.serve import serve_main

        return serve_main(args)
    if args.command in ("analyze", "compare", "plot"):
        from emulator.analysis import cli as acli

        return getattr(acli, f"{args.command}_main")(args)
    if args.command == "experiment":
        from emulator.experiment import experiment_main

        return experiment_main(args)
    if args.command == "sweep":
        from emulator.sweep import sweep_main

        return sweep_main(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
