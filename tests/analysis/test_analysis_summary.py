"""analyze's figures: equal to run_end's own counters; MMTests' row definitions."""

from __future__ import annotations

import pytest
from logfactory import iter_run, write_log

from emulator.analysis.summary import (
    DURATION_ROWS,
    EMULATOR_ROWS,
    VMSTAT_ROWS,
    delta,
    format_value,
    percentile,
    summarize,
    vmstat_rows,
)


def _run(tmp_path, name="run.jsonl", **kw):
    events = list(iter_run(**kw))
    return events, write_log(tmp_path / name, events)


def test_rows_equal_run_end_counters(tmp_path):
    events, p = _run(tmp_path, samples=60, seed=3)
    end = events[-1]
    vm = end["vm"]
    s = summarize(p)
    assert s.complete and s.outcome == "completed"
    v = s.vmstat
    # Counters are cumulative since boot and the baseline is boot: rows == run_end.vm.
    assert v["Page Ins"] == vm["pgpgin"]
    assert v["Page Outs"] == vm["pgpgout"]
    assert v["Swap Ins"] == vm["pswpin"]
    assert v["Swap Outs"] == vm["pswpout"] == v["Page writes anon"]
    assert v["Direct pages scanned"] == vm["pgscan_direct"] == vm["pgscan_direct_normal"]
    assert v["Kswapd pages scanned"] == vm["pgscan_kswapd"]
    assert v["Kswapd pages reclaimed"] == vm["pgsteal_kswapd"]
    assert v["Direct pages reclaimed"] == vm["pgsteal_direct"]
    assert v["Page writes by reclaim"] == vm["nr_vmscan_write"]
    assert v["Allocation stalls"] == vm["allocstall"]
    assert v["Major Faults"] == vm["pgmajfault"]
    assert v["Minor Faults"] == vm["pgfault"] - vm["pgmajfault"]
    assert v["Page reclaim immediate"] is None  # the model has no such counter
    e = s.emulator
    assert e["Direct reclaim throttled"] == vm["pgscan_direct_throttle"]
    assert e["Throttle events"] == end["throttle"]["events"] > 0
    assert e["Throttled time (seconds)"] == end["throttle"]["total_s"]
    assert e["Skb drops pfmemalloc"] == vm["skb_drop_pfmemalloc"] > 0
    assert e["Skb drops nomem"] == vm["skb_drop_nomem"]
    assert e["NBD requests"] == vm["nbd_requests"]
    assert e["NBD latency p50 (ms)"] == pytest.approx(end["nbd_latency"]["p50_s"] * 1000)
    assert e["NBD latency p99 (ms)"] == pytest.approx(end["nbd_latency"]["p99_s"] * 1000)
    assert e["NBD latency max (ms)"] == pytest.approx(end["nbd_latency"]["max_s"] * 1000)
    assert e["OOM kills"] == vm["oom_kill"] == 0
    assert e["Integrity errors"] == end["integrity_errors"]
    assert e["Processes completed"] == end["processes"]["completed"]
    samples = [x for x in events if x["event"] == "vmstat"]
    assert e["Pfmemalloc pages peak"] == max(x["vm"]["nr_pfmemalloc_pages"] for x in samples)
    assert e["NBD in flight peak"] == max(x["nbd_inflight"] for x in samples)
    assert e["Throttled tasks peak"] == max(x["nr_throttled"] for x in samples)
    d = s.duration
    assert d["User Time Running Test (seconds)"] == end["time"]["user_s"]
    assert d["Sys Time Running Test (seconds)"] == end["time"]["sys_s"]
    assert d["User+Sys Time Running Test (seconds)"] == pytest.approx(
        end["time"]["user_s"] + end["time"]["sys_s"])
    assert d["Total Elapsed Time (seconds)"] == s.elapsed == end["elapsed_s"]
    # Every documented row has a value slot.
    assert set(v) == {r.label for r in VMSTAT_ROWS}
    assert set(e) == {r.label for r in EMULATOR_ROWS}
    assert set(d) == {r.label for r in DURATION_ROWS}


def test_efficiency_rows_follow_mmtests(tmp_path):
    events, p = _run(tmp_path, samples=50, seed=7)
    vm, el = events[-1]["vm"], events[-1]["elapsed_s"]
    v = summarize(p).vmstat
    ks, kr = vm["pgscan_kswapd"], vm["pgsteal_kswapd"]
    ds, dr = vm["pgscan_direct"], vm["pgsteal_direct"]
    assert v["Kswapd efficiency"] == pytest.approx(kr * 100 / ks)
    assert v["Direct efficiency"] == pytest.approx(dr * 100 / ds)
    assert v["Kswapd velocity"] == pytest.approx(ks / el)
    assert v["Direct velocity"] == pytest.approx(ds / el)
    assert v["Percentage direct scans"] == pytest.approx(ds * 100 / (ks + ds))


def test_mmtests_definitions_by_hand():
    before = {"pgscan_kswapd_normal": 100, "pgsteal_kswapd_normal": 50, "pgscan_direct_normal": 0,
              "pgsteal_direct_normal": 0, "pgscan_kswapd": 100, "pgsteal_kswapd": 50}
    after = {"pgscan_kswapd_normal": 400, "pgsteal_kswapd_normal": 250, "pgscan_direct_normal": 0,
             "pgsteal_direct_normal": 0, "pgscan_kswapd": 400, "pgsteal_kswapd": 250,
             "pgscan_kswapd_dma32": 0, "nr_vmscan_write": 30, "pswpout": 20}
    v = vmstat_rows(before, after, elapsed=10.0)
    # zone names win over zone-less aliases: no double counting
    assert v["Kswapd pages scanned"] == 300
    assert v["Kswapd pages reclaimed"] == 200
    assert v["Kswapd efficiency"] == pytest.approx(200 * 100 / 300)
    assert format_value("pct", v["Kswapd efficiency"]) == "66%"  # Perl %d truncates
    assert v["Kswapd velocity"] == 30.0
    assert format_value("vel", v["Kswapd velocity"]) == "30.000"
    # nothing scanned directly: efficiency 100, percentage 0 (MonitorVmstat.pm)
    assert v["Direct efficiency"] == 100
    assert v["Percentage direct scans"] == 0
    assert v["Page writes file"] == 10
    assert v["Page writes anon"] == 20
    # nothing scanned at all
    z = vmstat_rows({}, {"pgscan_kswapd": 0, "pgscan_direct": 0}, elapsed=5.0)
    assert z["Kswapd efficiency"] == 100 and z["Percentage direct scans"] == 0
    # a log without the counters: '-' rather than a made-up zero
    n = vmstat_rows({}, {}, elapsed=None)
    assert n["Kswapd efficiency"] is None and n["Kswapd velocity"] is None
    assert format_value("int", None) == "-"


def test_pre_3_4_kswapd_steal_semantics():
    # <= 3.3 kernels: kswapd_steal, and pgsteal_<zone> counting both kswapd and direct.
    after = {"kswapd_steal": 70, "pgsteal_normal": 100, "pgsteal_dma32": 10,
             "pgscan_kswapd_normal": 90, "pgscan_direct_normal": 50}
    v = vmstat_rows({}, after, elapsed=1.0)
    assert v["Kswapd pages reclaimed"] == 70
    assert v["Direct pages reclaimed"] == 110 - 70
    assert v["Direct efficiency"] == pytest.approx(40 * 100 / 50)


def test_delta_and_percentile():
    assert delta({"a": 3}, {"a": 10}, "a") == 7
    assert delta({}, {"a": 10}, "a") == 10
    assert delta({"a": 1}, {}, "a") is None
    xs = sorted([5.0, 1.0, 3.0, 2.0, 4.0])
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 99) == 5.0
    assert percentile(xs, 0) == 1.0
    assert percentile([], 50) is None


def test_corrupt_lines_do_not_change_the_figures(tmp_path):
    events = list(iter_run(samples=40, seed=5))
    clean = summarize(write_log(tmp_path / "a.jsonl", events))
    dirty = summarize(write_log(tmp_path / "b.jsonl", events, corrupt_every=3))
    assert dirty.skipped > 10 and clean.skipped == 0
    assert dirty.vmstat == clean.vmstat
    assert dirty.emulator == clean.emulator
    assert dirty.duration == clean.duration


def test_incomplete_log_uses_last_sample(tmp_path):
    events = list(iter_run(samples=30, seed=2, with_run_end=False))
    s = summarize(write_log(tmp_path / "cut.jsonl", events, truncate_last=True))
    assert not s.complete and s.outcome == "incomplete"
    samples = [e for e in events if e["event"] == "vmstat"]
    last = samples[-1]
    assert s.vmstat["Swap Outs"] == last["vm"]["pswpout"]
    assert s.elapsed == max(e["t"] for e in events[:-1])
    assert s.duration["User Time Running Test (seconds)"] == pytest.approx(
        sum(c["user"] for c in last["cpus"]))
    # no run_end: throttle figures come from the events themselves
    begins = [e for e in events[:-1] if e["event"] == "throttle_begin"]
    assert s.emulator["Throttle events"] == len(begins)
    assert s.timeline[-1].what.startswith("log ends")


def test_baseline_first_sample(tmp_path):
    events, p = _run(tmp_path, samples=30, seed=4)
    first = next(e for e in events if e["event"] == "vmstat")["vm"]
    s = summarize(p, baseline="first-sample")
    assert s.vmstat["Swap Outs"] == events[-1]["vm"]["pswpout"] - first["pswpout"]
    with pytest.raises(ValueError):
        summarize(p, baseline="yesterday")


def test_lockup_diagnosis_and_timeline(tmp_path):
    events, p = _run(tmp_path, samples=60, seed=1, kernel="vanilla", outcome="lockup")
    s = summarize(p)
    assert s.outcome == "lockup"
    assert s.lockup is not None and "LOCKUP" in s.lockup["text"]
    assert s.lockup["diagnosis"]["tasks"][0]["wchan"] == "throttle_direct_reclaim"
    whats = [e.what for e in s.timeline]
    for w in ("first kswapd wake", "first direct reclaim", "first skb drop",
              "first OOM kill", "lockup", "run end"):
        assert w in whats
    assert whats.index("lockup") < whats.index("run end")
    assert [e.t for e in s.timeline] == sorted(e.t for e in s.timeline)
    assert s.emulator["OOM kills"] == 1
    assert s.emulator["Skb drops nomem"] > 0 and s.emulator["Skb drops pfmemalloc"] == 0
    assert s.emulator["Processes killed"] == 1


def test_timeline_prefers_exact_events_over_samples(tmp_path):
    events, p = _run(tmp_path, samples=40, seed=6, debug=True)
    s = summarize(p)
    tl = {e.what: e for e in s.timeline}
    first_dr = next(e for e in events if e["event"] == "direct_reclaim_begin")
    assert tl["first direct reclaim"].t == first_dr["t"] and not tl["first direct reclaim"].sampled
    # without the debug event, the first sample where allocstall moved
    events2, p2 = _run(tmp_path, "nodebug.jsonl", samples=40, seed=6)
    s2 = summarize(p2)
    first_stall = next(e for e in events2 if e["event"] == "vmstat" and e["vm"]["allocstall"] > 0)
    e2 = {e.what: e for e in s2.timeline}["first direct reclaim"]
    assert e2.sampled and e2.t == first_stall["t"]


def test_fallbacks_when_counters_are_missing(tmp_path):
    """A log whose vm lacks the emulator counters: figures from the events."""
    def strip(evs):
        for e in evs:
            if "vm" in e:
                e = dict(e, vm={k: v for k, v in e["vm"].items()
                                if not k.startswith(("skb_drop", "oom_kill", "nbd_"))})
            if e["event"] == "run_end":
                e = {k: v for k, v in e.items() if k not in ("nbd_latency",)}
            yield e
    events = list(iter_run(samples=40, seed=1, kernel="vanilla", outcome="lockup", debug=True))
    s = summarize(write_log(tmp_path / "x.jsonl", strip(events)))
    drops = [e for e in events if e["event"] == "skb_drop"]
    assert s.emulator["Skb drops nomem"] == len(drops)
    assert s.emulator["OOM kills"] == 1
    lats = sorted(e["latency_s"] for e in events if e["event"] == "nbd_reply")
    assert s.emulator["NBD latency max (ms)"] == pytest.approx(lats[-1] * 1000)
    assert s.emulator["NBD latency p50 (ms)"] == pytest.approx(percentile(lats, 50) * 1000)


def test_hand_made_log_exact_rows():
    """tests/analysis/data/tiny.jsonl: numbers chosen to be checked by hand."""
    from pathlib import Path

    s = summarize(Path(__file__).parent / "data" / "tiny.jsonl")
    assert (s.name, s.outcome, s.skipped, s.samples) == ("vanilla-slab", "completed", 1, 2)
    v, e, d = s.vmstat, s.emulator, s.duration
    assert (v["Page Ins"], v["Page Outs"], v["Swap Ins"], v["Swap Outs"]) == (80, 800, 20, 200)
    assert (v["Kswapd pages scanned"], v["Kswapd pages reclaimed"]) == (600, 450)
    assert (v["Direct pages scanned"], v["Direct pages reclaimed"]) == (200, 50)
    assert v["Kswapd efficiency"] == 75.0 and v["Direct efficiency"] == 25.0
    assert v["Kswapd velocity"] == 150.0 and v["Direct velocity"] == 50.0
    assert v["Percentage direct scans"] == 25.0
    assert v["Page writes by reclaim"] == 200 and v["Page writes file"] == 0
    assert v["Allocation stalls"] == 5
    assert v["Slabs scanned"] is None  # not in this log at all
    assert d == {"User Time Running Test (seconds)": 1.25, "Sys Time Running Test (seconds)": 1.5,
                 "User+Sys Time Running Test (seconds)": 2.75, "Total Elapsed Time (seconds)": 4.0}
    assert e["Skb drops nomem"] == 3 and e["Pfmemalloc pages peak"] == 12
    assert e["NBD requests"] == 30 and e["NBD in flight peak"] == 3
    assert e["NBD latency p99 (ms)"] == pytest.approx(10.5)
    assert e["Throttle events"] == 0 and e["Processes completed"] == 1
    tl = [(x.t, x.what, x.sampled) for x in s.timeline]
    assert tl == [(1.5, "first kswapd wake", False), (2.0, "first swap out", True),
                  (2.0, "first direct reclaim", True),
                  # the counter says 2 drops by t=2.0; the first logged drop is at 2.1:
                  # the earlier (sampled) time wins
                  (2.0, "first skb drop", True),
                  (4.0, "run end", False)]


def test_real_quick_run_rows_equal_run_end():
    """data/quick-swapnbd-slub.jsonl: a real `swapnbd run configs/quick.toml` log
    (schema 1, 2 CPUs, 32 MiB, swapnbd kernel, SLUB), kept as recorded."""
    import json
    from pathlib import Path

    path = Path(__file__).parent / "data" / "quick-swapnbd-slub.jsonl"
    end = json.loads(path.read_text().splitlines()[-1])
    assert end["event"] == "run_end"
    s = summarize(path)
    vm = end["vm"]
    assert s.outcome == end["outcome"] == "completed" and s.skipped == 0
    assert s.vmstat["Swap Outs"] == vm["pswpout"] > 0
    assert s.vmstat["Swap Ins"] == vm["pswpin"]
    assert s.vmstat["Direct pages scanned"] == vm["pgscan_direct"]
    assert s.vmstat["Kswapd pages reclaimed"] == vm["pgsteal_kswapd"]
    assert s.vmstat["Kswapd efficiency"] == pytest.approx(
        vm["pgsteal_kswapd"] * 100 / vm["pgscan_kswapd"])
    assert s.emulator["Throttle events"] == end["throttle"]["events"]
    assert s.emulator["NBD latency p99 (ms)"] == pytest.approx(end["nbd_latency"]["p99_s"] * 1000)
    assert s.duration["Sys Time Running Test (seconds)"] == end["time"]["sys_s"]
    assert s.duration["Total Elapsed Time (seconds)"] == end["elapsed_s"]
