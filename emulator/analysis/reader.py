"""Streaming reader for swapnbd's JSON-lines run logs (written by emulator/logs.py).

What it does: opens a log, checks that its first event is ``run_start`` with the
schema version this code reads (``SCHEMA_VERSION``), then yields one event dict
per valid line. It never holds more than one line in memory, so logs of hundreds
of MB are fine. Lines that are not a JSON object with an ``event`` name and a
numeric ``t`` (a run killed mid-write, a corrupted file) are counted in
``LogReader.skipped`` and skipped, never fatal. Unknown event names and unknown
extra keys are passed through untouched; the consumers ignore what they do not
know.

MMTests counterpart: the parsing half of ``bin/lib/MMTests/MonitorVmstat.pm``
(``extractReport`` reads ``tests-timestamp-*``: a ``/proc/vmstat`` dump before
and after the test and a ``time ::`` line). Here the before/after dumps are the
log's ``vm`` snapshots and the ``time ::`` line is ``run_end.time``.

A path ending in ``.gz`` is read through gzip (``swapnbd sweep`` stores
large logs compressed).

Simplified: a line longer than ``MAX_LINE`` bytes is treated as corrupt (so a
file without newlines cannot exhaust memory). Bad *files* (missing, empty,
not JSON, another schema) raise ``LogError`` with a one-line message; the CLI
turns it into exit status 2.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

try:  # orjson is ~3x faster on 1M-line logs; the standard library is the fallback.
    import orjson

    _loads = orjson.loads
    _DecodeErrors: tuple[type[Exception], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - depends on the environment
    _loads = json.loads
    _DecodeErrors = (ValueError, UnicodeDecodeError)

#: The log schema this analysis reads (emulator/logs.py SCHEMA_VERSION).
SCHEMA_VERSION = 1

#: Longest line accepted (bytes). A lockup diagnosis is a few KiB; anything
#: approaching this is a corrupt file, not a log line.
MAX_LINE = 16 * 1024 * 1024


class LogError(Exception):
    """A file that cannot be analysed at all. ``str()`` is a one-line message."""


def _parse(raw: bytes) -> dict[str, Any] | None:
    """One line -> event dict, or None when the line is not a valid event."""
    try:
        obj = _loads(raw)
    except _DecodeErrors:
        return None
    if not isinstance(obj, dict):
        return None
    ev = obj.get("event")
    t = obj.get("t")
    if not isinstance(ev, str) or isinstance(t, bool) or not isinstance(t, (int, float)):
        return None
    if not math.isfinite(t):
        return None
    return obj


class LogReader:
    """A run log, opened and validated; iterate ``events()`` once to stream it.

    Attributes after ``open``: ``path``, ``run_start`` (the first event),
    ``config`` and ``machine`` (its dicts, ``{}`` when absent). While/after
    streaming: ``lines`` (physical lines read, blank ones excluded), ``skipped``
    (corrupt lines), ``run_end`` (the last ``run_end`` event seen, or None).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.lines = 0
        self.skipped = 0
        self.run_end: dict[str, Any] | None = None
        self._fh: BinaryIO | None = None
        self._consumed = False
        self.run_start = self._open()
        cfg = self.run_start.get("config")
        mach = self.run_start.get("machine")
        self.config: dict[str, Any] = cfg if isinstance(cfg, dict) else {}
        self.machine: dict[str, Any] = mach if isinstance(mach, dict) else {}

    # -- opening -------------------------------------------------------------
    def _open(self) -> dict[str, Any]:
        p = self.path
        try:
            if os.path.isdir(p):
                raise LogError(f"{p}: is a directory, not a log file")
            # Closed in close()/events(). A sweep keeps its large logs gzipped.
            fh = gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise LogError(f"{p}: no such file") from None
        except PermissionError:
            raise LogError(f"{p}: permission denied") from None
        except OSError as e:
            raise LogError(f"{p}: cannot open ({e.strerror or e})") from None
        self._fh = fh
        try:
            first = self._first_line()
        except LogError:
            self.close()
            raise
        return first

    def _first_line(self) -> dict[str, Any]:
        assert self._fh is not None
        p = self.path
        blank = 0
        while True:
            try:
                raw = self._fh.readline(MAX_LINE)
            except (OSError, EOFError) as e:  # a .gz that is not gzip, or cut short
                raise LogError(f"{p}: cannot read ({e})") from None
            if not raw:
                if blank == 0:
                    raise LogError(f"{p}: empty file, not a swapnbd log")
                raise LogError(f"{p}: only blank lines, not a swapnbd log")
            if raw.strip():
                break
            blank += 1
        self.lines += 1
        try:
            obj = _loads(raw)
        except _DecodeErrors:
            raise LogError(f"{p}: not a JSON-lines file (first line is not JSON)") from None
        if not isinstance(obj, dict):
            raise LogError(f"{p}: not a swapnbd log (first line is not a JSON object)")
        schema = obj.get("schema")
        if obj.get("event") != "run_start":
            raise LogError(
                f"{p}: first event is {obj.get('event')!r}, not 'run_start': "
                f"not a swapnbd log of schema version {SCHEMA_VERSION}")
        if schema != SCHEMA_VERSION:
            raise LogError(
                f"{p}: log schema version {schema!r}, this swapnbd reads version "
                f"{SCHEMA_VERSION} (a log from a different schema version)")
        if not isinstance(obj.get("t", 0.0), (int, float)):
            obj["t"] = 0.0
        obj.setdefault("t", 0.0)
        return obj

    # -- streaming -----------------------------------------------------------
    def events(self) -> Iterator[dict[str, Any]]:
        """Yield every valid event, ``run_start`` first; corrupt lines are counted
        in ``skipped``. Single use: the file is closed at the end."""
        if self._consumed:
            raise RuntimeError("LogReader.events() can be iterated only once")
        self._consumed = True
        fh = self._fh
        assert fh is not None
        try:
            yield self.run_start
            readline = fh.readline
            while True:
                try:
                    raw = readline(MAX_LINE)
                except (OSError, EOFError):  # a .gz cut short: the rest is lost
                    self.skipped += 1
                    break
                if not raw:
                    break
                if len(raw) >= MAX_LINE and not raw.endswith(b"\n"):
                    # Over-long line: drop the rest of it, count it once.
                    while raw and not raw.endswith(b"\n"):
                        raw = readline(MAX_LINE)
                    self.lines += 1
                    self.skipped += 1
                    continue
                if raw.isspace():
                    continue
                self.lines += 1
                ev = _parse(raw)
                if ev is None:
                    self.skipped += 1
                    continue
                if ev["event"] == "run_end":
                    self.run_end = ev
                yield ev
        finally:
            self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_name(machine: dict[str, Any], config: dict[str, Any] | None = None) -> str:
    """``<kernel>-<slab>`` from run_start.machine (config as a fallback), the
    column name ``compare`` uses, e.g. ``swapnbd-slub``."""
    config = config or {}
    kernel = machine.get("kernel")
    if not kernel:
        patches = (config.get("kernel") or {}).get("patches") or {}
        kernel = patches.get("name") if isinstance(patches, dict) else None
    slab = machine.get("slab") or (config.get("machine") or {}).get("slab")
    return f"{kernel or 'unknown'}-{slab or 'unknown'}"
