"""The default log: JSON Lines, one line per check.

Format (version 1). Each line is one JSON object, of one of two kinds:

- a layout line, ``{"torchhealth": 1, "run": ID, "started": TIME, "layout":
  {"names": [...], "roles": [...], "shapes": [...], "dtypes": [...]}}``: what
  each row of the records after it is. Each opening of the file starts with
  one: the start of a run (``run`` and ``started`` say which run and when it
  was opened; a resumed run passes its id again). It is written again, with
  ``run`` and without ``started``, whenever the set of tensors changes, so
  names are not repeated per check. Logs written before run ids have neither.
- a record line, one per check: ``{"step", "time", "skipped", "actions",
  "findings", "counts", "values", "hist"}`` where, per row of the layout,
  ``counts`` is ``[nan, posinf, neginf, zero, subnormal, saturated]``,
  ``values`` is ``[min, max, sum, sumsq]`` (``absmax`` is ``max(-min, max)``;
  for float32 and narrower tensors min and max are written with the fewest
  digits that read back as the same float32; non-finite floats are the strings
  "inf", "-inf", "nan") and ``hist`` holds
  the nonzero histogram bins as runs ``[[first_column, count, count, ...], ...]``
  (columns of `torchhealth.histogram_bins`), or null without histograms;
  ``scalars``, only when the user logged any (`HealthMonitor.log`), maps each
  name to its number (non-finite ones as the strings above).

`read_jsonl` turns this back into the exact Reports (``Report.to_dict()`` lines,
with "rows", are read too), checking every field. A record is appended with one
write and flushed, so a killed process leaves a file that is readable up to its
last complete record; a line cut short (a last line without its newline, even
one that parses) is reported with `TruncatedLogError`, and the records that a
later opening appends after it are read too.

A path ending in ``.gz`` is gzip-compressed, each record sync-flushed so the
same holds (``zcat`` reads it); each opening appends a gzip member. That is the
form that fits the budget of a 10,000-step run logged every 10 steps: a
300-tensor model (600 rows, parameters and gradients, with histograms) costs
~40 kB a record gzipped, ~40 MB for 1,000 records, against ~105 kB a record
plain (tests/test_sinks.py::test_log_size_budget).
"""
from __future__ import annotations

import json
import os
import secrets
import time
import zlib
from pathlib import Path

from ..report import Report
from .base import Sink
from .jsonl_format import FORMAT, decode, encode, layout_of
from .jsonl_reader import Damage, Log, Run, TruncatedLogError, read_jsonl

__all__ = ["FORMAT", "Damage", "JsonlSink", "Log", "Run", "TruncatedLogError", "decode", "encode",
           "read_jsonl"]

_GZIP_WBITS = 31  # zlib's gzip container


def _dumps(obj) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()


class JsonlSink(Sink):
    """Appends each Report to `path` as one JSON line (gzip if it ends in ``.gz``).

    Every opening is a run of its own, with a new random ``run_id``, unless
    `run_id` names the run it continues (a run resumed from a checkpoint).
    Use it as ``monitor.on_report(sink)`` (it is callable) and close it at the
    end, or as a context manager.
    """

    def __init__(self, path: str | os.PathLike, *, compresslevel: int = 6, run_id: str | None = None):
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        self.path = Path(path)
        self.run_id = run_id or secrets.token_hex(8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        # Each opening appends a new gzip member; concatenated members are one valid gzip file.
        self._zip = (zlib.compressobj(compresslevel, zlib.DEFLATED, _GZIP_WBITS)
                     if self.path.suffix == ".gz" else None)
        self._layout: dict | None = None

    def write(self, report: Report) -> None:
        if self._file.closed:
            raise ValueError(f"JsonlSink({str(self.path)!r}) is closed")
        layout = layout_of(report)
        data = b""
        if layout != self._layout:
            head = {"torchhealth": FORMAT, "run": self.run_id}
            if self._layout is None:
                head["started"] = time.time()
            data = _dumps({**head, "layout": layout})
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
