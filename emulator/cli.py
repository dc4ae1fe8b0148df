"""The ``swapnbd`` command.

Subcommands: ``run`` (emulate one machine from a TOML config: a path, or the
name of a packaged config such as ``quick``), ``configs`` (list the packaged
configs), ``serve`` (the userspace NBD server alone), ``analyze`` /
``compare`` / ``plot`` (read run logs), ``experiment`` (the seed's four
kernels, patch ablation), ``sweep`` (many runs over Dask workers,
emulator/sweep.py).

Exit status of ``run``: 0 completed; 1 an internal error (a bug: the
traceback is in the log); 2 bad input (config, command line, a machine too
big for this host's memory); 3 locked up (the watchdog fired; the diagnosis
is printed and logged); 4 the workload failed (data integrity errors, or
processes killed by the OOM killer or by SIGBUS); 5 ``run.max_duration_s``
passed while the machine was still making progress; 7 the swap device could
not be used (refused or unreachable, not NBD, no such export, too small,
read-only, a minimum block size above 4096: one line says which); 8 the log
could not be written (ENOSPC, EIO); 130 interrupted by SIGINT (Ctrl-C), 143
by SIGTERM (the run shuts down and its log ends with ``run_end``, outcome
"interrupted"; a second signal ends it at once). Status 6 (outcome
``stopped``) exists only for embedders that call ``Machine.stop()``.

This module is the only place that writes to the terminal directly.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import trio

from emulator.config import ConfigError, load


def _err(msg: str) -> None:
    print(f"swapnbd: {msg}", file=sys.stderr)


# -- run ------------------------------------------------------------------------------
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML config file, or the name of a packaged config "
                                  "(swapnbd configs lists them), e.g. quick")
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
    from emulator.report import print_run_summary

    previous = signal.signal(signal.SIGTERM, _terminated)  # until trio takes over
    try:
        result = trio.run(_run_interruptibly, cfg, log_path, not args.quiet, args.debug_log)
    except ConfigError as e:
        _err(str(e))
        return 2
    except (KeyboardInterrupt, _Terminated, BaseExceptionGroup) as e:
        signum = _signal_of(e)
        if signum is None:
            raise
        _err(f"interrupted ({signal.Signals(signum).name})")
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.outcome in ("swap_unusable", "log_error"):
        _err(result.error or result.outcome)  # one line says it all
        return result.exit_status
    print_run_summary(cfg, result)
    return result.exit_status


class _Terminated(BaseException):
    """SIGTERM outside the run (before trio starts or after it ends)."""


def _terminated(signum, frame) -> None:
    raise _Terminated()


def _signal_of(exc: BaseException) -> int | None:
    """The signal a KeyboardInterrupt / _Terminated (maybe in a group) stands for."""
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(exc, _Terminated):
        return signal.SIGTERM
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            s = _signal_of(e)
            if s is not None:
                return s
    return None


async def _run_interruptibly(cfg, log_path: str, progress: bool, debug_log: bool):
    """Run the machine; SIGINT and SIGTERM interrupt it (Machine.interrupt): it shuts
    down, logs run_end and returns. A second signal ends the run at once."""
    from emulator.machine import Machine
    from emulator.report import run_with_progress

    m = Machine(cfg, log_path, debug_log=debug_log)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                async for signum in signals:
                    if m._signal is not None or m.done.is_set():
                        raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated()
                    m.interrupt(signum)

            nursery.start_soon(on_signal)
            result = await run_with_progress(m, progress)
            nursery.cancel_scope.cancel()
    return result


# -- configs ----------------------------------------------------------------------------
def configs_main(args: argparse.Namespace) -> int:
    """List the packaged configs: name, machine size, kernel, and the first comment line."""
    from emulator.config import config_names, packaged_configs

    for name in config_names():
        path = packaged_configs() / f"{name}.toml"
        try:
            cfg = load(path)
        except ConfigError as e:
            print(f"{name:14s} (cannot load: {e})")
            continue
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines()
                      if ln.startswith("#")), "")
        print(f"{name:14s} {cfg.machine.memory_mib:5d} MiB, {cfg.machine.cpus} CPUs, "
              f"{cfg.kernel.patches.name}-{cfg.machine.slab}  {first}")
    print(f"(in {packaged_configs()}; `swapnbd run NAME` runs one, a path works too)")
    return 0


# -- dispatcher -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from emulator.analysis import cli as acli
    from emulator.experiment import add_experiment_arguments
    from userspace.nbd.serve import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="swapnbd",
        description="An emulated Linux machine that swaps over a real NBD connection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="emulate one machine from a TOML config")
    add_run_arguments(p)
    sub.add_parser("configs", help="list the packaged configs")
    p = sub.add_parser("serve", help="run the userspace NBD server alone")
    add_serve_arguments(p)
    p = sub.add_parser("analyze", help="what happened in a run, from its log")
    acli.add_analyze_arguments(p)
    p = sub.add_parser("compare", help="MMTests-style table of several runs")
    acli.add_compare_arguments(p)
    p = sub.add_parser("plot", help="plot one or more runs to a PNG")
    acli.add_plot_arguments(p)
    p = sub.add_parser("outcomes", help="outcome counts over sweep or experiment directories")
    acli.add_outcomes_arguments(p)
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
    if args.command == "configs":
        return configs_main(args)
    if args.command == "serve":
        from userspace.nbd.serve import serve_main

        return serve_main(args)
    if args.command in ("analyze", "compare", "plot", "outcomes"):
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
