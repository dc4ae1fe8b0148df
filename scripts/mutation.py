"""Mutation testing of the core rule modules against their unit tests, on demand.

    python scripts/mutation.py                      # run what has no result yet, then summarise
    python scripts/mutation.py --only 'emulator.mm.page_alloc.*'   # a part of it
    python scripts/mutation.py --recheck-survivors  # run the survivors again (tests added)
    python scripts/mutation.py --summary            # the summary table of the last results
    python scripts/mutation.py --survivors          # every surviving mutant, with its diff
    timeout -s INT 900 python scripts/mutation.py   # a part of at most 15 minutes
    (other options, e.g. --max-children 1, go to `mutmut run`)

Configuration: ``[tool.mutmut]`` in pyproject.toml says which files are mutated
and which tests run against them (tests/unit, the RX outcome matrix, the NBD
codec tests, the TCP socket tests: no whole machines, loopback sockets only). ``TARGETS`` below picks the
mutants: the whole of page_alloc.py, slab.py, slub.py and the NBD codec, and the
rule functions of mmzone.py (watermarks), vmscan.py (patch 15's throttling and
kswapd's wake-ups) and sock.py (sk_filter, SOCK_MEMALLOC and sk_gfp_atomic,
patch 12's __sk_backlog_rcv, the backlog's bound). Results are
kept in mutants/ (delete it to start again); a run picks up the mutants that
have none, so a long run can be done in parts. Not part of the default test run
or CI: all of it takes hours on 2 cores. The triage is in docs/TESTING.md.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_Z = "emulator.mm.mmzone."
_V = "emulator.mm.vmscan.xǁVMScanǁ"
_S = "net.sock.xǁSockǁ"
TARGETS = [
    "emulator.mm.page_alloc.*",
    _Z + "x_zone_watermark_ok*", _Z + "xǁZoneǁzone_watermark_ok*", _Z + "x_setup_per_zone_wmarks*",
    _Z + "x_default_min_free_kbytes*", _Z + "x_int_sqrt*", _Z + "xǁPgDataǁreserve_pages*",
    "emulator.mm.slab.*",
    "emulator.mm.slub.*",
    _V + "pfmemalloc_watermark_ok*", _V + "throttle_direct_reclaim*", _V + "try_to_free_pages*",
    _V + "prepare_kswapd_sleep*", _V + "balance_pgdat*",
    _S + "sk_filter*", _S + "sk_gfp_atomic*", _S + "sk_set_memalloc*", _S + "sk_clear_memalloc*",
    _S + "sk_backlog_rcv*", _S + "sk_add_backlog*", _S + "sk_rcvqueues_full*",
    "nbdproto.*",
]
#: mutmut's exit codes (mutmut/stats.py) folded into the summary's columns.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}
COLUMNS = ["mutants", "killed", "timeout", "survived", "no tests", "other", "not run"]


def selected_results() -> dict[str, int | None]:
    """mutant name -> exit code (None: not run yet), for the mutants TARGETS picks."""
    out = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        for name, code in codes.items():
            if any(fnmatch.fnmatch(name, t) for t in TARGETS):
                out[name] = code
    return out


def module_of(name: str) -> str:
    return name.split(".x_")[0].split(".xǁ")[0]


def summary(results: dict[str, int | None]) -> str:
    rows: dict[str, Counter] = defaultdict(Counter)
    for name, code in results.items():
        status = STATUS.get(code, "other") if code is not None else "not run"
        rows[module_of(name)][status] += 1
        rows[module_of(name)]["mutants"] += 1
    total = sum(rows.values(), Counter())
    lines = ["| module | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for mod in sorted(rows) + ["total"]:
        c = total if mod == "total" else rows[mod]
        lines.append(f"| {mod} | " + " | ".join(str(c[k]) for k in COLUMNS) + " |")
    return "\n".join(lines)


def survivors(results: dict[str, int | None]) -> None:
    for name, code in sorted(results.items()):
        if code == 0:
            diff = subprocess.run(["mutmut", "show", name], cwd=ROOT, capture_output=True,
                                  text=True).stdout
            print(f"## {name}\n{diff}")


def _take(argv: list[str], flag: str) -> list[str]:
    """Remove every ``flag VALUE`` pair from argv; return the values."""
    values = []
    while flag in argv:
        i = argv.index(flag)
        values.append(argv[i + 1])
        del argv[i:i + 2]
    return values


def run_mutmut(args: list[str]) -> None:
    """``mutmut run ARGS``, stoppable: on SIGINT (Ctrl-C, or ``timeout -s INT``, which
    signals the whole process group) mutmut stops its workers and keeps every result
    it has recorded, so this waits for it rather than killing it. A results file
    left half-written by the interrupt is put back as it was before this run."""
    metas = {m: m.read_bytes() for m in (ROOT / "mutants").rglob("*.py.meta")}
    proc = subprocess.Popen(["mutmut", "run", *args], cwd=ROOT)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.wait()
    finally:
        for meta in (ROOT / "mutants").rglob("*.py.meta"):
            try:
                json.loads(meta.read_text())
            except ValueError:
                if meta in metas:
                    meta.write_bytes(metas[meta])
                    print(f"{meta}: half-written, restored as before this run", file=sys.stderr)


def main(argv: list[str]) -> int:
    argv = list(argv)
    only = _take(argv, "--only")

    def picked(name: str) -> bool:
        return not only or any(fnmatch.fnmatch(name, o) for o in only)

    if "--survivors" in argv:
        survivors({n: c for n, c in selected_results().items() if picked(n)})
        return 0
    if "--summary" not in argv:
        recheck = "--recheck-survivors" in argv
        mutmut_args = [a for a in argv if a != "--recheck-survivors"]
        results = selected_results()
        if not results:  # first run: mutmut generates the mutants and runs those named
            names = [t for t in TARGETS if picked(t)] or only
        else:
            # Named mutants are always run again; name only those that need it.
            want = (lambda c: c == 0) if recheck else (lambda c: c is None)
            names = [n for n, c in results.items() if want(c) and picked(n)]
        if names:
            run_mutmut([*mutmut_args, *names])
    print(summary(selected_results()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
