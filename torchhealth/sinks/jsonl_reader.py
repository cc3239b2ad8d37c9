"""Reading a JSON Lines log back: every complete record, whatever happened to
the file around it.

A log is a sequence of writes, each one or more whole lines (a record with its
newline, or a layout line and a record). A writer killed mid-write leaves a
cut line; a new `JsonlSink` on the same path then appends after it (on the
same line in a plain file, as a new gzip member in a compressed one). The
reader therefore splits the text into lines, recovers a new write that starts
inside a damaged line, decompresses each gzip member on its own and keeps what
a corrupt member decoded before the damage. What it skipped is listed in
`Log.damage`; which lines belong to which opening of the sink, in `Log.runs`.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..report import Report
from .jsonl_format import FORMAT, check_layout, decode, decode_rows

_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 31  # zlib's gzip container
# How zlib starts every gzip member it writes (deflate, no name, no time): where a
# new opening of the sink starts after a member that a kill cut short.
_MEMBER_START = b"\x1f\x8b\x08\x00\x00\x00\x00\x00"
_SYNC_MARK = b"\x00\x00\xff\xff"  # what Z_SYNC_FLUSH ends with: a record boundary
_CHUNK = 1 << 16
# Where a line written by the sink can start: a layout line or a record.
_WRITE_START = re.compile(rb'\{"(?:torchhealth|step)"')


@dataclass(frozen=True)
class Damage:
    """Part of a log that holds no readable record. ``kind`` is "cut" (a
    record whose write did not finish: the writer was killed) or "invalid"
    (anything else: not JSON, not a torchhealth record, a value out of range).
    ``line`` is 1-based and ``byte`` the line's offset, both in the
    (decompressed) text."""

    line: int
    byte: int
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line} (byte {self.byte}): {self.reason}"


@dataclass
class Run:
    """The records of one run: one opening of the sink, or several that name
    the same run id (a resumed run). ``id`` is None for logs written before
    run ids (there a step going backwards starts a new run)."""

    id: str | None
    reports: list[Report] = field(default_factory=list)


class Log(list):
    """The Reports of a log in file order (a list), with ``runs`` (the same
    Reports grouped by run) and ``damage`` (what was skipped, and where)."""

    def __init__(self, reports=(), runs: list[Run] | None = None, damage: list[Damage] | None = None):
        super().__init__(reports)
        self.runs = runs if runs is not None else []
        self.damage = damage if damage is not None else []


class TruncatedLogError(ValueError):
    """A log holds a record cut short (the writer was killed). `reports`
    holds every complete record (a `Log`), `line` the 1-based number of the
    first incomplete line."""

    def __init__(self, message: str, reports: list[Report], line: int):
        super().__init__(message)
        self.reports = reports
        self.line = line


@dataclass
class _Segment:
    """Text decoded from one gzip member (or a whole plain file)."""

    text: bytes
    cut: bool = False  # the stream stops inside a record
    problem: str | None = None  # why the rest of the member is unreadable


def _inflate(data: bytes) -> tuple[bytes, int | None, str | None]:
    """Decompresses one gzip member from the start of `data`: its text, where
    the member ends in `data` (None when it does not), and the zlib error that
    stopped it, keeping everything decoded before the bad byte."""
    z = zlib.decompressobj(_GZIP_WBITS)
    out = []
    for at in range(0, len(data), _CHUNK):
        chunk = data[at:at + _CHUNK]
        before = z.copy()
        try:
            out.append(z.decompress(chunk))
        except zlib.error as e:
            z = before  # again byte by byte, to keep the text before the damage
            for i in range(len(chunk)):
                try:
                    out.append(z.decompress(chunk[i:i + 1]))
                except zlib.error:
                    break
            return b"".join(out), None, str(e)
        if z.eof:
            return b"".join(out), len(data) - len(z.unused_data), None
    return b"".join(out), None, None


def _segments(raw: bytes, gz: bool) -> list[_Segment]:
    if not raw.startswith(_GZIP_MAGIC) and not (gz and _MEMBER_START in raw):
        return [_Segment(raw)]
    segments = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(_MEMBER_START, pos + 1)
        end = len(raw) if nxt < 0 else nxt
        if not raw.startswith(_GZIP_MAGIC, pos):
            segments.append(_Segment(b"", problem=f"{end - pos} bytes at file byte {pos} are not gzip data"))
            pos = end
            continue
        text, used, problem = _inflate(raw[pos:end])
        if used is not None:  # a complete member; what follows it is read as the next one
            segments.append(_Segment(text))
            pos += used
            continue
        # The member stops without its end: cut by a kill (fine when that fell
        # between two records' flushes) or corrupt.
        cut = problem is None and not raw[pos:end].endswith(_SYNC_MARK)
        segments.append(_Segment(text, cut=cut, problem=None if problem is None else
                                 f"corrupt gzip data in the member at file byte {pos} ({problem}); "
                                 f"the rest of that member is unreadable"))
        pos = end
    return segments


class _Reader:
    """Turns lines into Reports, runs and damage."""

    def __init__(self):
        self.log = Log()
        self.layout: dict | None = None
        self.layout_lost: int | None = None  # the damaged line that may have held the layout
        self.run: Run | None = None

    def damaged(self, line: int, byte: int, kind: str, reason: str, text: bytes = b"") -> None:
        self.log.damage.append(Damage(line, byte, kind, reason))
        if b'"layout"' in text or b'"torchhealth"' in text:  # the records after it have no known layout
            self.layout, self.layout_lost = None, line

    def add(self, d: object) -> None:
        """Reads one parsed line; ValueError when it is not a valid record."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if "layout" in d:
            if d.get("torchhealth") != FORMAT:
                raise ValueError(f"log format {d.get('torchhealth')!r}; this torchhealth reads {FORMAT}")
            run = d.get("run")
            if run is not None and not isinstance(run, str):
                raise ValueError(f"run is {run!r}; expected a string")
            self.layout, self.layout_lost = check_layout(d), None
            if (run is not None or "started" in d) and (self.run is None or self.run.id != run):
                self._start(run)
            return
        if "rows" in d:
            report = decode_rows(d)
        elif self.layout is None:
            raise ValueError("a record before any layout line" if self.layout_lost is None else
                             f"a record whose layout line (line {self.layout_lost}) is damaged")
        else:
            report = decode(d, self.layout)
        if self.run is None or (self.run.id is None and self.run.reports
                                and report.step < self.run.reports[-1].step):
            self._start(None)
        self.run.reports.append(report)
        self.log.append(report)

    def _start(self, run: str | None) -> None:
        self.run = Run(run)
        self.log.runs.append(self.run)

    def line(self, text: bytes, number: int, byte: int) -> None:
        try:
            return self.add(_parse(text))
        except ValueError as e:
            error = e
        for m in _WRITE_START.finditer(text, 1):  # a write that started inside this line, after a cut one
            try:
                d = _parse(text[m.start():])
            except ValueError:
                continue
            state = (self.layout, self.layout_lost)
            self.damaged(number, byte, "cut", f"a record cut short (its first {m.start()} bytes), "
                         "followed on the same line by the next write", text[:m.start()])
            try:
                return self.add(d)
            except ValueError:
                self.log.damage.pop()
                self.layout, self.layout_lost = state
        self.damaged(number, byte, "invalid", f"not a torchhealth record: {error}", text)


def _parse(text: bytes) -> object:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason})") from None


def read_jsonl(path: str | os.PathLike, *, truncated: str = "raise", errors: str = "raise") -> Log:
    """The Reports of a log written by `JsonlSink` (plain or gzip), in order,
    as a `Log` (a list with ``runs`` and ``damage``).

    Strict by default: a line that is not a valid torchhealth record raises a
    ValueError naming the line and the field, and a record cut short by a
    killed writer raises `TruncatedLogError` (a ValueError carrying every
    complete record). ``truncated="keep"`` skips cut records; ``errors="skip"``
    skips every damaged line. Skipped lines are listed in ``damage``; records
    before and after them are all kept. Raises FileNotFoundError.
    """
    if truncated not in ("raise", "keep"):
        raise ValueError(f"truncated must be 'raise' or 'keep', got {truncated!r}")
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    path = Path(path)
    segments = _segments(path.read_bytes(), path.suffix == ".gz")
    reader = _Reader()
    number = byte = 0
    for seg in segments:
        lines = seg.text.split(b"\n")
        for i, text in enumerate(lines):
            number += 1
            if i < len(lines) - 1:
                if text.strip():
                    reader.line(text, number, byte)
            elif seg.problem is not None:  # the text ends where the gzip data went bad
                reader.damaged(number, byte, "invalid", seg.problem, text)
            elif text.strip():  # no newline after it: the end of what was written
                reader.damaged(number, byte, "cut", "a record cut short (the line has no newline)", text)
            elif seg.cut:
                reader.damaged(number, byte, "cut", "a record cut short (its text never arrived)")
            else:
                number -= 1
            byte += len(text) + 1
    log = reader.log
    for d in log.damage:
        if d.kind == "invalid" and errors == "raise":
            raise ValueError(f"{path}: line {d.line} is {d.reason}" if d.reason.startswith("not a ")
                             else f"{path}: line {d.line}: {d.reason}")
        if d.kind == "cut" and errors == "raise" and truncated == "raise":
            text = "decompressed " if path.suffix == ".gz" else ""
            last = d is log.damage[-1] and d.line >= number
            after = (f"the last complete record is step {log[-1].step}" if log else "it holds no complete record")
            raise TruncatedLogError(
                f"{path}: truncated at line {d.line} (byte {d.byte} of its {text}text): the writer "
                f"stopped mid-record{'' if last else ' and the log was appended to after it'}; "
                f"{after}, {len(log)} records readable", log, d.line)
    return log
