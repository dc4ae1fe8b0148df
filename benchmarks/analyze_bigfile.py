"""Benchmark: ``swapnbd analyze`` on a 1-million-line log, in bounded memory.

What it does: writes a synthetic, schema-correct log of about ``--lines`` lines
(tests/analysis/logfactory.py, debug events included so that most lines are
small nbd_request/nbd_reply events, as in a real debug-level run), then runs
the analysis in fresh child processes and reports each one's wall time and
peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` inside the child):
first on a tiny log (the interpreter + imports baseline), then on the big one.
With ``--plot`` it also times ``plot`` on the big log.

MMTests counterpart: none (MMTests parses two /proc/vmstat dumps, not a stream).
Simplified: the log's numbers are synthetic; only its shape and size matter.

    python benchmarks/analyze_bigfile.py                  # 1M lines in a temp dir
    python benchmarks/analyze_bigfile.py --lines 200000 --keep --plot
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "analysis"))


def _lines_per_sample() -> float:
    from logfactory import iter_run

    n = 2000
    return sum(1 for _ in iter_run(samples=n, debug=True)) / n


def generate(path: Path, lines: int) -> int:
    from logfactory import iter_run

    samples = max(10, int(lines * 1.02 / _lines_per_sample()))  # aim just over
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        for ev in iter_run(samples=samples, interval=0.01, debug=True, seed=42):
            fh.write(dumps(ev) + "\n")
            count += 1
    return count


def measure(path: str, what: str) -> None:
    """Child mode: run one analysis, print {seconds, maxrss_kib} as JSON."""
    t0 = time.perf_counter()
    if what == "analyze":
        # The real command, tables rendered (to /dev/null), plus one summarize
        # for the figures reported here.
        from emulator.analysis import cli
        from emulator.analysis.summary import summarize

        real_stdout = sys.stdout
        with open(os.devnull, "w") as sys.stdout:
            rc = cli.main(["analyze", path])
        sys.stdout = real_stdout
        dt = time.perf_counter() - t0
        s = summarize(path)
        info = {"rc": rc, "outcome": s.outcome, "lines": s.lines, "samples": s.samples,
                "skipped": s.skipped, "seconds": dt}
    else:
        from emulator.analysis.plot import load_series, plot

        out = path + ".png"
        plot([load_series(path)], out)
        info = {"png_bytes": os.path.getsize(out)}
    dt = info.pop("seconds", time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    sys.stdout.write(json.dumps({"seconds": dt, "maxrss_kib": rss, **info}) + "\n")


def _child(path: Path, what: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--measure", str(path), "--what", what],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--dir", help="where to write the log (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated log")
    ap.add_argument("--plot", action="store_true", help="also time plot on the big log")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--what", default="analyze", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args.measure, args.what)
        return 0

    d = Path(args.dir or tempfile.mkdtemp(prefix="swapnbd-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    tiny, big = d / "tiny.jsonl", d / "big.jsonl"
    try:
        generate(tiny, 100)
        t0 = time.perf_counter()
        n = generate(big, args.lines)
        gen_s = time.perf_counter() - t0
        size_mib = big.stat().st_size / 2**20
        base = _child(tiny, "analyze")
        res = _child(big, "analyze")
        report = [
            f"log: {big} ({n} lines, {size_mib:.0f} MiB, generated in {gen_s:.1f} s)",
            f"analyze tiny log : {base['seconds']:6.2f} s, peak RSS {base['maxrss_kib'] / 1024:6.1f} MiB"
            " (interpreter + imports)",
            f"analyze big log  : {res['seconds']:6.2f} s, peak RSS {res['maxrss_kib'] / 1024:6.1f} MiB"
            f" ({res['lines']} lines, {res['samples']} samples, "
            f"{n / res['seconds']:,.0f} lines/s)",
        ]
        if args.plot:
            pl = _child(big, "plot")
            report.append(f"plot big log     : {pl['seconds']:6.2f} s, peak RSS "
                          f"{pl['maxrss_kib'] / 1024:6.1f} MiB")
        sys.stdout.write("\n".join(report) + "\n")
    finally:
        if not args.keep:
            for f in d.glob("*"):
                f.unlink()
            if not args.dir:
                d.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
