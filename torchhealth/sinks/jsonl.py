"""The default log: JSON Lines, one line per check.

Format (version 1). Each line is one JSON object, of one of two kinds:

- a layout line, ``{"torchhealth": 1, "layout": {"names": [...], "roles": [...],
  "shapes": [...], "dtypes": [...]}}``: what each row of the records after it
  is. It is written before the first record of every opening of the file and
  whenever the set of tensors changes, so names are not repeated per check.
- a record line, one per check: ``{"step", "time", "skipped", "actions",
  "findings", "counts", "values", "hist"}`` where, per row of the layout,
  ``counts`` is ``[nan, posinf, neginf, zero, subnormal, saturated]``,
  ``values`` is ``[min, max, sum, sumsq]`` (``absmax`` is ``max(-min, max)``;
  for float32 and narrower tensors min and max are written with the fewest
  digits that read back as the same float32; non-finite floats are the strings
  "inf", "-inf", "nan") and ``hist`` holds
  the nonzero histogram bins as runs ``[[first_column, count, count, ...], ...]``
  (columns of `torchhealth.histogram_bins`), or null without histograms.

`read_jsonl` turns this back into the exact Reports (``Report.to_dict()`` lines,
with "rows", are read too). A record is appended with one write and flushed,
so a killed process leaves a file that is readable up to its last complete
record; a line cut short (a last line without its newline, even one that
parses) is reported with `TruncatedLogError`.

A path ending in ``.gz`` is gzip-compressed, each record sync-flushed so the
same holds (``zcat`` reads it). That is the form that fits the budget of a
10,000-step run logged every 10 steps: a 300-tensor model (600 rows,
parameters and gradients, with histograms) costs ~40 kB a record gzipped,
~40 MB for 1,000 records, against ~105 kB a record plain
(tests/test_sinks.py::test_log_size_budget).
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from ..report import Finding, Report, Row, _json_float
from .base import Sink

_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 31  # zlib's gzip container
FORMAT = 1
_COUNTS = ("nan", "posinf", "neginf", "zero", "subnormal", "saturated")
_GAP = 2  # up to this many empty bins inside a run are written as zeros
_NARROW = ("float16", "bfloat16", "float32")  # their extremes are float32 values


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _extreme(x: float, dtype: str) -> float | str:
    """min or max as written: for a float32 (or narrower) tensor the shortest
    decimal that rounds back to it as a float32 (at most 9 digits instead of
    float64's 17; the reader rounds it to float32 again), else as is."""
    if dtype in _NARROW and math.isfinite(x):
        for digits in range(6, 10):
            short = float(f"{x:.{digits}g}")
            if _f32(short) == x:
                return short
    return _json_float(x)


def _runs(hist: dict[int, int]) -> list[list[int]]:
    runs: list[list[int]] = []
    end = None
    for col in sorted(hist):
        if end is not None and col - end <= _GAP:
            runs[-1].extend([0] * (col - end) + [hist[col]])
        else:
            runs.append([col, hist[col]])
        end = col + 1
    return runs


def _unruns(runs: list[list[int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for run in runs:
        for i, n in enumerate(run[1:]):
            if n:
                out[int(run[0]) + i] = int(n)
    return out


def _layout(report: Report) -> dict[str, list]:
    return {"names": [r.name for r in report.rows], "roles": [r.role for r in report.rows],
            "shapes": [list(r.shape) for r in report.rows], "dtypes": [r.dtype for r in report.rows]}


def encode(report: Report) -> dict[str, Any]:
    """The record line of `report` (its layout is written separately)."""
    rows = report.rows
    return {"step": report.step, "time": report.time, "skipped": report.skipped,
            "actions": list(report.actions), "findings": [f.to_dict() for f in report.findings],
            "counts": [[getattr(r, k) for k in _COUNTS] for r in rows],
            "values": [[_extreme(r.min, r.dtype), _extreme(r.max, r.dtype), _json_float(r.sum),
                        _json_float(r.sumsq)] for r in rows],
            "hist": None if rows and rows[0].hist is None else [_runs(r.hist or {}) for r in rows]}


def decode(d: dict[str, Any], layout: dict[str, list]) -> Report:
    """The Report of a record line `d`, whose rows are described by `layout`."""
    names = layout["names"]
    if not (len(d["counts"]) == len(d["values"]) == len(names)
            and (d["hist"] is None or len(d["hist"]) == len(names))):
        raise ValueError(f"the record has {len(d['counts'])} rows but its layout {len(names)}")
    rows = []
    for i, name in enumerate(names):
        shape = tuple(int(s) for s in layout["shapes"][i])
        mn, mx, sm, sq = (float(v) for v in d["values"][i])
        if layout["dtypes"][i] in _NARROW and math.isfinite(mn) and math.isfinite(mx):
            mn, mx = _f32(mn), _f32(mx)
        rows.append(Row(name=name, role=layout["roles"][i], shape=shape, dtype=layout["dtypes"][i],
                        numel=math.prod(shape), **dict(zip(_COUNTS, (int(c) for c in d["counts"][i]))),
                        min=mn, max=mx, absmax=0.0 if mn > mx else max(-mn, mx) + 0.0, sum=sm, sumsq=sq,
                        hist=None if d["hist"] is None else _unruns(d["hist"][i])))
    return Report(step=int(d["step"]), rows=rows, time=float(d["time"]), skipped=bool(d["skipped"]),
                  actions=list(d.get("actions", [])),
                  findings=[Finding.from_dict(f) for f in d.get("findings", [])])


def _dumps(obj) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()


class JsonlSink(Sink):
    """Appends each Report to `path` as one JSON line (gzip if it ends in ``.gz``).

    Use it as ``monitor.on_report(sink)`` (it is callable) and close it at the
    end, or as a context manager.
    """

    def __init__(self, path: str | os.PathLike, *, compresslevel: int = 6):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        # Each opening appends a new gzip member; concatenated members are one valid gzip file.
        self._zip = (zlib.compressobj(compresslevel, zlib.DEFLATED, _GZIP_WBITS)
                     if self.path.suffix == ".gz" else None)
        self._layout: dict | None = None

    def write(self, report: Report) -> None:
        if self._file.closed:
            raise ValueError(f"JsonlSink({str(self.path)!r}) is closed")
        layout = _layout(report)
        data = b""
        if layout != self._layout:
            data = _dumps({"torchhealth": FORMAT, "layout": layout})
            self._layout = layout
        data += _dumps(encode(report))
        if self._zip is not None:
            data = self._zip.compress(data) + self._zip.flush(zlib.Z_SYNC_FLUSH)
        self._file.write(data)  # one write per record: a kill leaves whole records and at most one cut
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        if self._zip is not None:
            self._file.write(self._zip.flush(zlib.Z_FINISH))
        self._file.close()


class TruncatedLogError(ValueError):
    """A log ends in the middle of a record (the writer was killed). `reports`
    holds the complete records before it, `line` the 1-based number of the
    incomplete line."""

    def __init__(self, message: str, reports: list[Report], line: int):
        super().__init__(message)
        self.reports = reports
        self.line = line


_SYNC_MARK = b"\x00\x00\xff\xff"  # what Z_SYNC_FLUSH ends with: a record boundary


def _text(path: Path) -> tuple[bytes, bool]:
    """The log's bytes, decompressed as far as they go, and whether a gzip
    stream was cut inside a record (it stops neither at its end nor at a
    record's sync flush); a cut plain file shows as an incomplete last line."""
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw, False
    out = []
    while raw:  # one gzip member per opening of the sink
        z = zlib.decompressobj(_GZIP_WBITS)
        try:
            out.append(z.decompress(raw))
        except zlib.error:
            return b"".join(out), True
        if not z.eof:  # the writer did not close: fine if it stopped between records
            return b"".join(out), not raw.endswith(_SYNC_MARK)
        raw = z.unused_data
    return b"".join(out), False


def read_jsonl(path: str | os.PathLike, *, truncated: str = "raise") -> list[Report]:
    """The Reports of a log written by `JsonlSink` (plain or gzip), in order.

    Raises FileNotFoundError; ValueError naming the line of a line that is not
    a torchhealth record; and, when the file ends inside a record,
    `TruncatedLogError` (a ValueError carrying the complete records and saying
    where the file ends), or with ``truncated="keep"`` returns the complete
    records instead.
    """
    if truncated not in ("raise", "keep"):
        raise ValueError(f"truncated must be 'raise' or 'keep', got {truncated!r}")
    path = Path(path)
    text, cut = _text(path)
    if cut and (not text or text.endswith(b"\n")):
        text += b"\x00"  # the cut fell between lines: an incomplete (empty) record follows
    lines = text.split(b"\n")
    last = len(lines) - 1  # text ending in "\n" leaves an empty last piece
    # A record is written with its newline in one write, so a last line without
    # one was cut, even where the cut left text that happens to parse.
    unterminated = bool(lines[last].strip())
    reports: list[Report] = []
    layout = None
    offset = 0
    for i, line in enumerate(lines):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            if i == last and unterminated:
                raise ValueError("the line has no newline")
            d = json.loads(line)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            if "layout" in d:
                if d.get("torchhealth") != FORMAT:
                    raise ValueError(f"log format {d.get('torchhealth')!r}; this torchhealth reads {FORMAT}")
                layout = d["layout"]
            elif "rows" in d:
                reports.append(Report.from_dict(d))
            elif layout is None:
                raise ValueError("a record before any layout line")
            else:
                reports.append(decode(d, layout))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            if i == last:
                after = (f"the last complete record is step {reports[-1].step}" if reports
                         else "it holds no complete record")
                err = TruncatedLogError(
                    f"{path}: truncated at line {i + 1} (byte {start} of its "
                    f"{'decompressed ' if path.suffix == '.gz' else ''}text): "
                    f"the writer stopped mid-record; {after}, {len(reports)} records readable",
                    reports, i + 1)
                if truncated == "keep":
                    return reports
                raise err from e
            raise ValueError(f"{path}: line {i + 1} is not a torchhealth record: {e}") from e
    return reports
