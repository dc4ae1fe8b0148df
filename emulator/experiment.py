"""``swapnbd experiment``: the seed's four kernels, and patch ablation.

``seed`` runs configs/vanilla-slub.toml, swapnbd-slub.toml, vanilla-slab.toml
and swapnbd-slab.toml (identical but for kernel.patches and machine.slab) one
after the other, each with its own log, then prints one MMTests-style table
with the published figures beside the emulated ones.

``ablation`` runs the swapnbd kernel minus one patch at a time and vanilla
plus one patch at a time, on one slab allocator, and tabulates each outcome.

``--runs N`` repeats the whole plan N times, run i with ``run.seed`` S + i - 1
(S: the configs' seed after ``--set``), each in its own ``OUT/run-i``
directory, and ends with a table of how many runs of each kernel completed
and how many locked up. An outcome here can be a race (docs/EXPERIMENT.md),
so one run says little about its odds.

Each run is an independent machine; nothing here influences an outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from emulator.config import ConfigError, load, packaged_configs
from emulator.patches import PATCHES

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


def _outcome_text(r) -> str:
    if r.outcome == "lockup":
        return f"locked up after {r.elapsed_s:.0f} s"
    return r.outcome


async def _run_all(plan: list[tuple[str, object, str]], console: Console):
    from emulator.machine import Machine
    from emulator.report import _progress_line

    results = {}
    for i, (name, cfg, log_path) in enumerate(plan, 1):
        m = Machine(cfg, log_path)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            async def show() -> None:
                while True:
                    await trio.sleep(5)
                    console.print(f"[{i}/{len(plan)}] {name}: {_progress_line(m, start)}",
                                  highlight=False)
            nursery.start_soon(show)
            r = await m.run()
            nursery.cancel_scope.cancel()
        console.print(f"[{i}/{len(plan)}] {name}: {_outcome_text(r)} "
                      f"(elapsed {r.elapsed_s:.1f} s, log {log_path})", highlight=False)
        results[name] = r
    return results


def _plan(args: argparse.Namespace, out: Path, overrides: list[str]) -> list:
    plan = []
    configs = Path(args.configs) if args.configs else packaged_configs()
    if args.which == "seed":
        for name in SEED_KERNELS:
            cfg = load(configs / f"{name}.toml", overrides)
            plan.append((name, cfg, str(out / f"{name}.jsonl")))
    else:
        base = configs / f"swapnbd-{args.slab}.toml"
        all_p = sorted(PATCHES)
        for n in all_p:
            cfg = load(base, [*overrides, f"kernel.patches={[p for p in all_p if p != n]}"])
            plan.append((f"swapnbd-{n}", cfg, str(out / f"ablation-{args.slab}-minus{n}.jsonl")))
        for n in all_p:
            cfg = load(base, [*overrides, f"kernel.patches=[{n}]"])
            plan.append((f"vanilla+{n}", cfg, str(out / f"ablation-{args.slab}-plus{n}.jsonl")))
    return plan


def _summary(results: dict) -> dict:
    return {name: {"outcome": r.outcome, "elapsed_s": r.elapsed_s, "time": r.time,
                   "vm": {k: r.vm.get(k) for k in ("pswpin", "pswpout", "allocstall",
                                                   "pgscan_direct_throttle",
                                                   "skb_drop_nomem", "skb_drop_pfmemalloc")},
                   "integrity_errors": r.integrity_errors, "nbd_sender": r.nbd_sender,
                   "log": r.log_path}
            for name, r in results.items()}


def experiment_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.runs < 1:
        print("swapnbd: --runs must be at least 1", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)

    def run_dir(i: int) -> Path:
        return out if args.runs == 1 else out / f"run-{i}"

    try:
        # Run 1 is the plan as configured; run i repeats it with seed S + i - 1.
        first_plan = _plan(args, run_dir(1), args.overrides)
        first_seed = first_plan[0][1].run.seed  # (name, cfg, log) of its first kernel
        runs = [(run_dir(1), first_plan)]
        for i in range(2, args.runs + 1):
            seed = f"run.seed={first_seed + i - 1}"
            runs.append((run_dir(i), _plan(args, run_dir(i), [*args.overrides, seed])))
    except ConfigError as e:
        print(f"swapnbd: {e}", file=sys.stderr)
        return 2
    all_results = []
    for i, (run_out, plan) in enumerate(runs, 1):
        try:
            run_out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"swapnbd: --out {run_out}: {e.strerror}", file=sys.stderr)
            return 2
        if args.runs > 1:
            console.print(f"run {i} of {args.runs}: seed {plan[0][1].run.seed}, logs in {run_out}",
                          highlight=False)
        results = trio.run(_run_all, plan, console)
        all_results.append(results)
        if args.which == "seed":
            print_seed_table(results, console)
        else:
            print_ablation_table(results, console)
        if args.json:
            (run_out / f"{args.which}-summary.json").write_text(
                json.dumps(_summary(results), indent=2))
    if args.runs > 1:
        print_outcome_counts(all_results, console)
        if args.json:
            (out / f"{args.which}-outcomes.json").write_text(json.dumps(
                outcome_counts(all_results), indent=2))
    return 1 if any(r.outcome == "error" for res in all_results for r in res.values()) else 0


def outcome_counts(all_results: list[dict]) -> dict:
    """Per kernel: how many runs ended in each outcome, and the completed runs' elapsed times."""
    counts: dict[str, dict] = {}
    for results in all_results:
        for name, r in results.items():
            c = counts.setdefault(name, {"runs": 0, "completed": 0, "lockup": 0, "other": 0,
                                         "completed_elapsed_s": []})
            c["runs"] += 1
            key = r.outcome if r.outcome in ("completed", "lockup") else "other"
            c[key] += 1
            if r.outcome == "completed":
                c["completed_elapsed_s"].append(round(r.elapsed_s, 1))
    return counts


def print_outcome_counts(all_results: list[dict], console: Console) -> None:
    t = Table(title=f"outcomes over {len(all_results)} runs")
    for col in ("kernel", "completed", "locked up", "other", "elapsed s of completed runs"):
        t.add_column(col)
    for name, c in outcome_counts(all_results).items():
        t.add_row(name, f"{c['completed']}/{c['runs']}", f"{c['lockup']}/{c['runs']}",
                  f"{c['other']}/{c['runs']}",
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
