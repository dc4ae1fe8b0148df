"""The streaming reader: valid logs, corrupt lines, and files that are not logs."""

from __future__ import annotations

import json

import pytest
from logfactory import CORRUPT_LINES, count_corrupt, iter_run, run_start, write_log

from emulator.analysis import reader as reader_mod
from emulator.analysis.reader import LogError, LogReader, run_name


def test_streams_every_event_in_order(tmp_path):
    events = list(iter_run(samples=10))
    p = write_log(tmp_path / "run.jsonl", events)
    r = LogReader(p)
    got = list(r.events())
    assert [e["event"] for e in got] == [e["event"] for e in events]
    assert r.lines == len(events)
    assert r.skipped == 0
    assert r.run_end == events[-1]
    assert r.machine["kernel"] == "swapnbd"


def test_reader_is_lazy(tmp_path):
    p = write_log(tmp_path / "run.jsonl", iter_run(samples=200))
    r = LogReader(p)
    it = r.events()
    next(it)
    next(it)
    # Only a couple of lines consumed, not the file.
    assert r.lines == 2
    assert r._fh.tell() < p.stat().st_size // 20
    it.close()
    assert r._fh is None  # closing the generator closes the file


def test_corrupt_lines_are_counted_and_skipped(tmp_path):
    events = list(iter_run(samples=30, debug=True))
    p = write_log(tmp_path / "run.jsonl", events, corrupt_every=4)
    r = LogReader(p)
    got = list(r.events())
    assert r.skipped == count_corrupt(len(events), 4) > len(CORRUPT_LINES)
    assert len(got) == len(events)
    assert r.lines == len(events) + r.skipped


def test_truncated_last_line_is_one_skipped_line(tmp_path):
    events = list(iter_run(samples=5))
    p = write_log(tmp_path / "run.jsonl", events, truncate_last=True)
    r = LogReader(p)
    got = list(r.events())
    assert r.skipped == 1
    assert got[-1]["event"] != "run_end"
    assert r.run_end is None


def test_unknown_events_and_keys_pass_through(tmp_path):
    p = write_log(tmp_path / "run.jsonl", iter_run(samples=6, extra_every=2))
    names = {e["event"] for e in LogReader(p).events()}
    assert "some_future_event" in names


def test_blank_lines_are_not_corrupt(tmp_path):
    p = tmp_path / "run.jsonl"
    lines = [json.dumps(e) for e in iter_run(samples=3)]
    p.write_text("\n\n".join(lines) + "\n\n")
    r = LogReader(p)
    list(r.events())
    assert r.skipped == 0


def test_overlong_line_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_mod, "MAX_LINE", 4096)
    events = list(iter_run(samples=3))
    p = tmp_path / "run.jsonl"
    with open(p, "w") as fh:
        fh.write(json.dumps(events[0]) + "\n")
        fh.write('{"event":"vmstat","t":1,"x":"' + "a" * 20000 + '"}\n')
        for e in events[1:]:
            fh.write(json.dumps(e) + "\n")
    r = LogReader(p)
    got = list(r.events())
    assert r.skipped == 1
    assert len(got) == len(events)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "empty file"),
    ("\n\n  \n", "only blank lines"),
    ("hello world\n", "not a JSON-lines file"),
    ("\x89PNG\r\n\x1a\n\x00\x00binary", "not a JSON-lines file"),
    ("[1, 2]\n", "not a JSON object"),
    ('{"event":"vmstat","t":1.0}\n', "not 'run_start'"),
    ('{"event":"run_start","t":0.0,"schema":2}\n', "different schema version"),
    ('{"event":"run_start","t":0.0}\n', "different schema version"),
])
def test_bad_files_raise_log_error(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    if content is not None:
        p.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(LogError) as ei:
        LogReader(p)
    assert message in str(ei.value)
    assert "\n" not in str(ei.value)


def test_directory_is_bad_input(tmp_path):
    with pytest.raises(LogError, match="directory"):
        LogReader(tmp_path)


def test_run_name_from_machine_and_config():
    rs = run_start("vanilla", "slab")
    assert run_name(rs["machine"], rs["config"]) == "vanilla-slab"
    m = dict(rs["machine"])
    del m["kernel"], m["slab"]
    assert run_name(m, rs["config"]) == "vanilla-slab"
    assert run_name({}, {}) == "unknown-unknown"
