"""The lines of a JSON Lines log (format 1, see `torchhealth.sinks.jsonl`):
Reports to records and back. Every field read from a log is checked before it
is used, so a damaged or crafted line gives a ValueError naming the field,
never an OverflowError, IndexError or TypeError."""
from __future__ import annotations

import math
import struct
from typing import Any

from .. import stats as S
from ..report import COUNT_FIELDS, VALUE_FIELDS, Finding, Report, Row, _json_float

FORMAT = 1
COUNTS = ("nan", "posinf", "neginf", "zero", "subnormal", "saturated")
_GAP = 2  # up to this many empty bins inside a run are written as zeros
_NARROW = ("float16", "bfloat16", "float32")  # their extremes are float32 values
_SPECIAL = ("inf", "-inf", "nan")
_MAX_STEP = 2 ** 63 - 1  # steps are int64 in torch and TensorBoard  # non-finite floats, as strings (strict JSON)


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


def layout_of(report: Report) -> dict[str, list]:
    return {"names": [r.name for r in report.rows], "roles": [r.role for r in report.rows],
            "shapes": [list(r.shape) for r in report.rows], "dtypes": [r.dtype for r in report.rows]}


def encode(report: Report) -> dict[str, Any]:
    """The record line of `report` (its layout is written separately)."""
    rows = report.rows
    return {"step": report.step, "time": report.time, "skipped": report.skipped,
            "world_size": report.world_size, "actions": list(report.actions),
            "findings": [f.to_dict() for f in report.findings],
            "counts": [[getattr(r, k) for k in COUNTS] for r in rows],
            "values": [[_extreme(r.min, r.dtype), _extreme(r.max, r.dtype), _json_float(r.sum),
                        _json_float(r.sumsq)] for r in rows],
            "hist": None if rows and rows[0].hist is None else [_runs(r.hist or {}) for r in rows],
            **({"origin": dict(report.origin)} if report.origin is not None else {}),
            **({"scalars": {k: _json_float(v) for k, v in report.scalars.items()}} if report.scalars else {})}


# -- checked reading ----------------------------------------------------------------------
def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def field(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where} is {_show(d)}, not a JSON object")
    if key not in d:
        raise ValueError(f"{where} has no field {key!r}")
    return d[key]


def _int(v: Any, where: str, limit: int | None = None) -> int:
    if type(v) is not int or v < 0 or (limit is not None and v > limit):
        bound = f" at most {limit}" if limit is not None else ""
        raise ValueError(f"{where} is {_show(v)}; expected an integer >= 0{bound}")
    return v


def _float(v: Any, where: str) -> float:
    if isinstance(v, str) and v in _SPECIAL:
        return float(v)
    if type(v) in (int, float):
        try:
            return float(v)
        except OverflowError:
            pass
    raise ValueError(f"{where} is {_show(v)}; expected a number or one of {', '.join(_SPECIAL)}")


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{where} is {_show(v)}; expected true or false")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{where} is {_show(v)}; expected a string")
    return v


def _list(v: Any, where: str, length: int | None = None) -> list:
    if not isinstance(v, list) or (length is not None and len(v) != length):
        want = f" of {length} entries" if length is not None else ""
        got = f"a list of {len(v)}" if isinstance(v, list) else _show(v)
        raise ValueError(f"{where} is {got}; expected a list{want}")
    return v


def _strings(v: Any, where: str, length: int | None = None) -> list[str]:
    return [_str(s, f"{where}[{i}]") for i, s in enumerate(_list(v, where, length))]


def check_layout(d: dict, where: str = "the layout line") -> dict[str, list]:
    """The layout of a layout line, checked: equal-length lists of names,
    roles, dtypes (strings) and shapes (lists of sizes)."""
    lay = field(d, "layout", where)
    names = _strings(field(lay, "names", f"{where}'s layout"), "layout.names")
    n = len(names)
    shapes = [tuple(_int(s, f"layout.shapes[{i}][{j}]") for j, s in enumerate(_list(sh, f"layout.shapes[{i}]")))
              for i, sh in enumerate(_list(field(lay, "shapes", "layout"), "layout.shapes", n))]
    return {"names": names, "roles": _strings(field(lay, "roles", "layout"), "layout.roles", n),
            "shapes": shapes, "dtypes": _strings(field(lay, "dtypes", "layout"), "layout.dtypes", n)}


def _hist(cols: dict[int, int], numel: int, where: str) -> dict[int, int]:
    if sum(cols.values()) > numel:
        raise ValueError(f"{where} counts {sum(cols.values())} values in a tensor of {numel}")
    return cols


def _unruns(runs: Any, numel: int, where: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, run in enumerate(_list(runs, where)):
        run = _list(run, f"{where}[{k}]")
        if not run:
            raise ValueError(f"{where}[{k}] is empty; expected [first_column, count, ...]")
        first = _int(run[0], f"{where}[{k}][0] (a histogram column)", S.BINS - len(run) + 1)
        for i, n in enumerate(run[1:]):
            if _int(n, f"{where}[{k}][{i + 1}]", numel):
                out[first + i] = n
    return _hist(out, numel, where)


def _finding(d: Any, where: str) -> Finding:
    check = _str(field(d, "check", where), f"{where}.check")
    value, threshold = d.get("value"), d.get("threshold")
    return Finding(check=check, severity=_str(field(d, "severity", where), f"{where}.severity"),
                   message=_str(field(d, "message", where), f"{where}.message"),
                   names=_strings(d.get("names", []), f"{where}.names"),
                   value=None if value is None else _float(value, f"{where}.value"),
                   threshold=None if threshold is None else _float(threshold, f"{where}.threshold"),
                   primary=_bool(d.get("primary", False), f"{where}.primary"),
                   ranks=_ranks(d.get("ranks"), f"{where}.ranks"),
                   local=_bool(d.get("local", False), f"{where}.local"))


def _ranks(v: Any, where: str) -> list[int] | None:
    """A per-rank finding's ranks (None in logs written before the field)."""
    return None if v is None else [_int(r, f"{where}[{i}]") for i, r in enumerate(_list(v, where))]


def _row(name: str, role: str, shape: tuple[int, ...], dtype: str, counts: dict[str, int],
         values: dict[str, float], hist: dict[int, int] | None) -> Row:
    return Row(name=name, role=role, shape=shape, dtype=dtype, numel=math.prod(shape), **counts,
               **values, hist=hist)


def _report(d: dict, rows: list[Row]) -> Report:
    return Report(step=_int(field(d, "step", "the record"), "step", _MAX_STEP), rows=rows,
                  time=_float(field(d, "time", "the record"), "time"),
                  skipped=_bool(field(d, "skipped", "the record"), "skipped"),
                  actions=_strings(d.get("actions", []), "actions"),
                  findings=[_finding(f, f"findings[{i}]")
                            for i, f in enumerate(_list(d.get("findings", []), "findings"))],
                  origin=_origin(d.get("origin")), scalars=_scalars(d.get("scalars", {})),
                  world_size=_world_size(d.get("world_size", 1)))


def _scalars(s: Any) -> dict[str, float]:
    """The user's numbers of a record (`Report.scalars`; absent in older logs), checked."""
    if not isinstance(s, dict):
        raise ValueError(f"scalars is {_show(s)}; expected an object of name: number")
    return {k: _float(v, f"scalars[{k!r}]") for k, v in s.items()}


def _world_size(v: Any) -> int:
    """Ranks a record covers (1 in logs written before the field)."""
    if _int(v, "world_size") < 1:
        raise ValueError("world_size is 0; a record covers at least one rank")
    return v


def _origin(o: Any) -> dict | None:
    """Where a non-finite value first appeared (`Report.origin`), checked."""
    if o is None:
        return None
    if not isinstance(o, dict):
        raise ValueError(f"origin is {_show(o)}; expected an object")
    out = {"module": _str(field(o, "module", "origin"), "origin.module"),
           "pass": _str(field(o, "pass", "origin"), "origin.pass"),
           "step": _int(field(o, "step", "origin"), "origin.step", _MAX_STEP)}
    out["numel"] = _int(field(o, "numel", "origin"), "origin.numel")
    out.update({k: _int(field(o, k, "origin"), f"origin.{k}", out["numel"]) for k in ("nan", "posinf", "neginf")})
    return out


def decode(d: dict, layout: dict[str, list]) -> Report:
    """The Report of a record line `d`, whose rows are described by `layout`
    (as returned by `check_layout`); ValueError naming the field that is wrong."""
    n = len(layout["names"])
    counts = _list(field(d, "counts", "the record"), "counts", n)
    values = _list(field(d, "values", "the record"), "values", n)
    hist = field(d, "hist", "the record")
    if hist is not None:
        _list(hist, "hist", n)
    rows = []
    for i, name in enumerate(layout["names"]):
        numel = math.prod(layout["shapes"][i])
        c = [_int(v, f"counts[{i}][{j}] ({COUNTS[j]} of {name!r})", numel)
             for j, v in enumerate(_list(counts[i], f"counts[{i}]", len(COUNTS)))]
        mn, mx, sm, sq = (_float(x, f"values[{i}][{j}]")
                          for j, x in enumerate(_list(values[i], f"values[{i}]", 4)))
        if layout["dtypes"][i] in _NARROW and math.isfinite(mn) and math.isfinite(mx):
            mn, mx = _f32(mn), _f32(mx)
        v = {"min": mn, "max": mx, "absmax": 0.0 if mn > mx else max(-mn, mx) + 0.0, "sum": sm, "sumsq": sq}
        rows.append(_row(name, layout["roles"][i], layout["shapes"][i], layout["dtypes"][i],
                         dict(zip(COUNTS, c)), v, None if hist is None else _unruns(hist[i], numel, f"hist[{i}]")))
    return _report(d, rows)


def decode_rows(d: dict) -> Report:
    """The Report of a ``Report.to_dict()`` line (with "rows"), checked."""
    rows = []
    for i, r in enumerate(_list(d["rows"], "rows")):
        where = f"rows[{i}]"
        shape = tuple(_int(s, f"{where}.shape[{j}]") for j, s in enumerate(_list(field(r, "shape", where),
                                                                                 f"{where}.shape")))
        numel = _int(field(r, "numel", where), f"{where}.numel")
        if numel != math.prod(shape):
            raise ValueError(f"{where}.numel is {numel} but its shape {list(shape)} holds {math.prod(shape)}")
        counts = {k: _int(field(r, k, where), f"{where}.{k}", numel) for k in COUNT_FIELDS if k != "numel"}
        hist = r.get("hist")
        if hist is not None:
            if not isinstance(hist, dict):
                raise ValueError(f"{where}.hist is {_show(hist)}; expected an object of column: count")
            cols = {_int(int(k) if k.isdigit() else k, f"{where}.hist column {k!r}", S.BINS - 1):
                    _int(v, f"{where}.hist[{k!r}]", numel) for k, v in hist.items()}
            hist = _hist(cols, numel, f"{where}.hist")
        values = {k: _float(field(r, k, where), f"{where}.{k}") for k in VALUE_FIELDS}
        rows.append(_row(_str(field(r, "name", where), f"{where}.name"), _str(field(r, "role", where),
                         f"{where}.role"), shape, _str(field(r, "dtype", where), f"{where}.dtype"),
                         counts, values, hist))
    return _report(d, rows)
