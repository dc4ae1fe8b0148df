"""``swapnbd experiment``: the seed's four kernels, and patch ablation.

``seed`` runs configs/vanilla-slub.toml, swapnbd-slub.toml, vanilla-slab.toml
and swapnbd-slab.toml (identical but for kernel.patches and machine.slab),
each with its own log, then prints one MMTests-style table with the published
figures beside the emulated ones.

``ablation`` runs the swapnbd kernel minus one patch at a time and vanilla
plus one patch at a time, on one slab allocator, and tabulates each outcome.

``--runs N`` repeats the whole plan N times, run i with ``run.seed`` S + i - 1
(S: the configs' seed after ``--set``), each in its own ``OUT/run-i``
directory, and ends with a table of how many runs of each kernel completed
and how many locked up. An outcome here can be a race (docs/EXPERIMENT.md),
so one run says little about its odds; the table of counts gives P(lockup)
with its 95% Wilson interval.

The runs go through the sweep engine (emulator/sweep.py): each is a ``swapnbd
run`` subprocess on a Dask worker, in parallel (``--workers``, ``--scheduler``
as for ``swapnbd sweep``), with ``OUT/runs.jsonl`` holding one row per run; the
tables are printed from those rows. Rerunning the same command resumes.

Each run is an independent machine; nothing here influences an outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from emulator.analysis.outcomes import NOT_DECIDED, wilson_interval
from emulator.config import ConfigError, load, packaged_configs
from emulator.patches import PATCHES
from emulator.sweep import VM_KEYS, RunSpec, cluster_of, plan_rows, progress_console, run_sweep

SEED_KERNELS = ["vanilla-slub", "swapnbd-slub", "vanilla-slab", "swapnbd-slab"]

#: The V15 cover letter's MMTests results (2 GB RAM, swap on NBD, 8 procs/CPU, 4x RAM).
PUBLISHED = {
    "vanilla-slub": {"outcome": "locked up"},
    "swapnbd-slub": {"outcome": "completed"},
    "vanilla-slab": {"outcome": "completed", "sys_s": 197.80, "user_sys_s": 206.96,
                     "elapsed_s": 3240.70},
    "swapnbd-slab": {"outcome": "completed", "sys_s": 173.07, "user_sys_s": 182.03,
                     "elapsed_s": 1762.09},
}

#: Console width when stdout is a file or a pipe. A table of four runs needs more
#: than 80 columns, about 180 when every kernel locked up; keep it whole.
PIPE_WIDTH = 200

ROWS = [
    ("Sys s", lambda r: r.time and round(r.time["sys_s"], 1)),
    ("User+Sys s", lambda r: r.time and round(r.time["user_s"] + r.time["sys_s"], 1)),
    ("Elapsed s", lambda r: round(r.elapsed_s, 1)),
    ("pswpin", lambda r: r.vm.get("pswpin")),
    ("pswpout", lambda r: r.vm.get("pswpout")),
    ("Direct pages scanned", lambda r: r.vm.get("pgscan_direct")),
    ("Kswapd pages scanned", lambda r: r.vm.get("pgscan_kswapd")),
    ("Direct pages reclaimed", lambda r: r.vm.get("pgsteal_direct")),
    ("Kswapd pages reclaimed", lambda r: r.vm.get("pgsteal_kswapd")),
    ("allocstall", lambda r: r.vm.get("allocstall")),
    ("pgscan_direct_throttle", lambda r: r.vm.get("pgscan_direct_throttle")),
    ("skb drops (nomem)", lambda r: r.vm.get("skb_drop_nomem")),
    ("skb drops (pfmemalloc)", lambda r: r.vm.get("skb_drop_pfmemalloc")),
    ("OOM kills", lambda r: r.vm.get("oom_kill")),
    ("NBD sender stalls (exposed)",
     lambda r: f"{r.vm.get('nbd_sender_reclaim')} ({r.vm.get('nbd_sender_reclaim_exposed')})"),
    ("NBD sender near misses", lambda r: r.vm.get("nbd_sender_near_miss")),
    ("longest exposure ms",
     lambda r: r.nbd_sender and round(r.nbd_sender["longest_exposed_s"] * 1e3)),
    ("integrity errors", lambda r: r.integrity_errors),
]


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    from emulator.sweep import add_cluster_arguments

    p.add_argument("which", choices=["seed", "ablation"], help="which experiment")
    p.add_argument("--out", default="runs", help="directory for the runs' logs (default: runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override applied to every run (repeatable)")
    p.add_argument("--configs", default=None,
                   help="directory holding the seed's configs (default: the packaged ones)")
    p.add_argument("--slab", choices=["slab", "slub"], default="slub",
                   help="ablation: which slab allocator (default slub)")
    p.add_argument("--json", action="store_true", help="also write a JSON summary to OUT")
    p.add_argument("--runs", type=int, default=1, metavar="N",
                   help="repeat the experiment N times with seeds S..S+N-1, each in OUT/run-i, "
                        "and count the outcomes (default 1)")
    add_cluster_arguments(p)


def _outcome_text(r) -> str:
    if r.outcome == "lockup":
        return f"locked up after {r.elapsed_s:.0f} s"
    return r.outcome


def _variants(args: argparse.Namespace) -> list[tuple[str, Path, list[str], str]]:
    """(kernel name, config, extra overrides, log stem) of each run of one plan."""
    configs = Path(args.configs) if args.configs else packaged_configs()
    if args.which == "seed":
        return [(name, configs / f"{name}.toml", [], name) for name in SEED_KERNELS]
    base = configs / f"swapnbd-{args.slab}.toml"
    all_p = sorted(PATCHES)
    minus = [(f"swapnbd-{n}", base, [f"kernel.patches={[p for p in all_p if p != n]}"],
              f"ablation-{args.slab}-minus{n}") for n in all_p]
    plus = [(f"vanilla+{n}", base, [f"kernel.patches=[{n}]"], f"ablation-{args.slab}-plus{n}")
            for n in all_p]
    return minus + plus


def _specs(args: argparse.Namespace) -> list[list[RunSpec]]:
    """One plan per run i (seed S + i - 1, S the configs' seed after --set), its
    logs in OUT (one run) or OUT/run-i."""
    variants = _variants(args)
    first_seed = load(variants[0][1], args.overrides).run.seed
    for _, config, extra, _ in variants:  # every config must load; fail before anything runs
        load(config, [*args.overrides, *extra])
    plans = []
    for i in range(1, args.runs + 1):
        prefix = "" if args.runs == 1 else f"run-{i}/"
        plans.append([RunSpec(f"{name}-seed{first_seed + i - 1}", name, str(config),
                              (*args.overrides, *extra), (), first_seed + i - 1,
                              f"{prefix}{stem}.jsonl")
                      for name, config, extra, stem in variants])
    return plans


def result_of(row: dict) -> SimpleNamespace:
    """A sweep row as the tables read a RunResult."""
    has_time = row.get("sys_s") is not None
    return SimpleNamespace(
        outcome=row["outcome"], elapsed_s=row.get("elapsed_s") or 0.0,
        time={"sys_s": row["sys_s"], "user_s": row["user_s"]} if has_time else None,
        vm={k: row.get(k) for k in VM_KEYS}, integrity_errors=row.get("integrity_errors"),
        nbd_sender={"longest_exposed_s": row["nbd_sender_longest_exposed_s"]}
        if row.get("nbd_sender_longest_exposed_s") is not None else None,
        error=row.get("error"), log_path=row.get("log"))


def _summary(results: dict) -> dict:
    return {name: {"outcome": r.outcome, "elapsed_s": r.elapsed_s, "time": r.time,
                   "vm": {k: r.vm.get(k) for k in ("pswpin", "pswpout", "allocstall",
                                                   "pgscan_direct_throttle",
                                                   "skb_drop_nomem", "skb_drop_pfmemalloc")},
                   "integrity_errors": r.integrity_errors, "nbd_sender": r.nbd_sender,
                   "error": r.error, "log": r.log_path}
            for name, r in results.items()}


def experiment_main(args: argparse.Namespace) -> int:
    """Exit status: 0 done; 1 a run ended in error; 2 bad input; 130 interrupted."""
    out = Path(args.out)
    if args.runs < 1:
        print("swapnbd: --runs must be at least 1", file=sys.stderr)
        return 2
    cluster = cluster_of(args)
    if isinstance(cluster, str):
        print(f"swapnbd: {cluster}", file=sys.stderr)
        return 2
    try:
        plans = _specs(args)
        out.mkdir(parents=True, exist_ok=True)
    except ConfigError as e:
        print(f"swapnbd: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"swapnbd: --out {out}: {e.strerror}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    specs = [s for plan in plans for s in plan]
    try:
        interrupted = run_sweep(specs, out, cluster, progress_console()).interrupted
    except KeyboardInterrupt:  # while the cluster was starting
        interrupted = True
    rows = {r["run_id"]: r for r in plan_rows(specs, out)}
    all_results = [{s.cell: result_of(rows[s.run_id]) for s in plan if s.run_id in rows}
                   for plan in plans]
    for i, results in enumerate(all_results, 1):
        if args.runs > 1:
            console.print(f"run {i} of {args.runs}: seed {plans[i - 1][0].seed}, "
                          f"logs in {out / f'run-{i}'}", highlight=False)
        _print_table(args.which, results, console)
        if args.json:
            run_out = out if args.runs == 1 else out / f"run-{i}"
            run_out.mkdir(parents=True, exist_ok=True)
            (run_out / f"{args.which}-summary.json").write_text(
                json.dumps(_summary(results), indent=2))
    if args.runs > 1:
        print_outcome_counts(all_results, console)
        if args.json:
            (out / f"{args.which}-outcomes.json").write_text(json.dumps(
                outcome_counts(all_results), indent=2))
    if interrupted:
        return 130
    return 1 if any(r.outcome == "error" for res in all_results for r in res.values()) else 0


def _print_table(which: str, results: dict, console: Console) -> None:
    if which == "seed" and len(results) == len(SEED_KERNELS):
        print_seed_table(results, console)
    elif which == "ablation":
        print_ablation_table(results, console)


def outcome_counts(all_results: list[dict]) -> dict:
    """Per kernel: how many runs ended in each outcome, P(lockup) with its 95%
    Wilson interval (over runs with a machine outcome), and the completed runs'
    elapsed times."""
    counts: dict[str, dict] = {}
    for results in all_results:
        for name, r in results.items():
            c = counts.setdefault(name, {"runs": 0, "completed": 0, "lockup": 0, "other": 0,
                                         "decided": 0, "completed_elapsed_s": []})
            c["runs"] += 1
            key = r.outcome if r.outcome in ("completed", "lockup") else "other"
            c[key] += 1
            c["decided"] += r.outcome not in NOT_DECIDED
            if r.outcome == "completed":
                c["completed_elapsed_s"].append(round(r.elapsed_s, 1))
    for c in counts.values():
        c["p_lockup"] = c["lockup"] / c["decided"] if c["decided"] else None
        c["p_lockup_95"] = list(wilson_interval(c["lockup"], c["decided"]))
    return counts


def print_outcome_counts(all_results: list[dict], console: Console) -> None:
    t = Table(title=f"outcomes over {len(all_results)} runs")
    for col in ("kernel", "completed", "locked up", "other", "P(lockup) [95% CI]",
                "elapsed s of completed runs"):
        t.add_column(col)
    for name, c in outcome_counts(all_results).items():
        lo, hi = c["p_lockup_95"]
        p = "-" if c["p_lockup"] is None else f"{c['p_lockup']:.2f} [{lo:.2f}, {hi:.2f}]"
        t.add_row(name, f"{c['completed']}/{c['runs']}", f"{c['lockup']}/{c['runs']}",
                  f"{c['other']}/{c['runs']}", escape(p),
                  ", ".join(f"{e:.1f}" for e in c["completed_elapsed_s"]) or "-")
    console.print(t)


def print_seed_table(results: dict, console: Console) -> None:
    t = Table(title="swap over NBD: the seed's four kernels (emulated; published in brackets)")
    t.add_column("", no_wrap=True)
    for name in results:
        t.add_column(name, justify="right")
    t.add_row("Outcome", *[f"{_outcome_text(r)} " + escape(f"[{PUBLISHED[n]['outcome']}]")
                           for n, r in results.items()])
    keys = {"Sys s": "sys_s", "User+Sys s": "user_sys_s", "Elapsed s": "elapsed_s"}
    for label, fn in ROWS:
        cells = []
        for n, r in results.items():
            v = fn(r)
            pub = PUBLISHED[n].get(keys.get(label, ""), None)
            cells.append(f"{v}" + (" " + escape(f"[{pub}]") if pub is not None else ""))
        t.add_row(label, *cells)
    console.print(t)
    console.print("Published: 2 GB RAM, 8 processes/CPU, mappings 4x RAM, MMTests "
                  "vmscan-anon-mmap-write (V15 cover letter). Emulated: see the configs.")


def print_ablation_table(results: dict, console: Console) -> None:
    t = Table(title="patch ablation")
    for col in ("kernel", "patch", "outcome", "elapsed s", "drops nomem", "drops pfmemalloc",
                "throttle", "integrity errors"):
        t.add_column(col)
    for name, r in results.items():
        n = int(name.split("-")[-1] if "-" in name else name.split("+")[-1])
        t.add_row(name, PATCHES[n].title[:60], _outcome_text(r), f"{r.elapsed_s:.1f}",
                  str(r.vm.get("skb_drop_nomem")), str(r.vm.get("skb_drop_pfmemalloc")),
                  str(r.vm.get("pgscan_direct_throttle")), str(r.integrity_errors))
    console.print(t)
