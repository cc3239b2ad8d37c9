"""`Report`: the one host-side record of a health check.

Everything below a Report (kernels, `TensorStats`, checks, policy) stays on the
device; building a Report is the only place that reads device memory. Sinks
(JSON Lines, TensorBoard, W&B) and readers (CLI report, demo) consume Reports,
never tensors. ``Report.to_dict()`` is strict JSON (non-finite floats become the
strings "inf", "-inf" and "nan") and ``Report.from_dict`` inverts it exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .stats import COLS, MIN, NUM_COUNTS, TensorStats

COUNT_FIELDS = ("numel", "nan", "posinf", "neginf", "zero", "subnormal", "saturated")
VALUE_FIELDS = ("min", "max", "absmax", "sum", "sumsq")


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _from_json_float(x: float | str) -> float:
    return float(x)


@dataclass
class Row:
    """Statistics of one tensor at one check.

    ``role`` is "param", "grad" or "state.<key>" (e.g. "state.exp_avg_sq").
    ``hist`` maps histogram column (see `torchhealth.histogram_bins`) to count,
    nonzero bins only; None when the check ran without histograms.
    """

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nan: int
    posinf: int
    neginf: int
    zero: int
    subnormal: int
    saturated: int
    min: float
    max: float
    absmax: float
    sum: float
    sumsq: float
    hist: dict[int, int] | None = None

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def l2norm(self) -> float:
        return math.sqrt(self.sumsq)

    @property
    def rms(self) -> float:
        finite = self.numel - self.nonfinite
        return math.sqrt(self.sumsq / finite) if finite else math.nan

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "role": self.role, "shape": list(self.shape),
                             "dtype": self.dtype}
        d.update({k: getattr(self, k) for k in COUNT_FIELDS})
        d.update({k: _json_float(getattr(self, k)) for k in VALUE_FIELDS})
        if self.hist is not None:
            d["hist"] = {str(k): v for k, v in self.hist.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        hist = d.get("hist")
        return cls(name=d["name"], role=d["role"], shape=tuple(d["shape"]), dtype=d["dtype"],
                   **{k: int(d[k]) for k in COUNT_FIELDS},
                   **{k: _from_json_float(d[k]) for k in VALUE_FIELDS},
                   hist=None if hist is None else {int(k): int(v) for k, v in hist.items()})


@dataclass
class Finding:
    """One check that fired: which check, how bad, on which tensors, and the
    measured value against its threshold. ``primary``: the finding of its
    Report that names the cause (the others on that step may follow from it;
    info findings never are). Written to JSON only when true, so logs written
    before the field existed read back unchanged. ``ranks``: for a finding
    about a per-rank fact (non-finite gradients under torch.distributed), the
    global ranks it holds for (empty: none); None when not known per rank.
    ``local``: a fact of this rank alone (its own activations, from
    `torchhealth.watch`, under torch.distributed), which the other ranks'
    Reports do not hold: it warns on this rank and never raises, so that no
    rank stops while the others wait for it in a collective."""

    check: str  # e.g. "nonfinite", "exploding", "vanishing", "headroom", "dead"
    severity: str  # "info", "warning" or "error"
    message: str
    names: list[str] = field(default_factory=list)
    value: float | None = None
    threshold: float | None = None
    primary: bool = False
    ranks: list[int] | None = None
    local: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = {"check": self.check, "severity": self.severity, "message": self.message,
             "names": list(self.names),
             "value": None if self.value is None else _json_float(self.value),
             "threshold": None if self.threshold is None else _json_float(self.threshold)}
        if self.primary:
            d["primary"] = True
        if self.ranks is not None:
            d["ranks"] = list(self.ranks)
        if self.local:
            d["local"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(check=d["check"], severity=d["severity"], message=d["message"],
                   names=list(d.get("names", [])),
                   value=None if d.get("value") is None else _from_json_float(d["value"]),
                   threshold=None if d.get("threshold") is None else _from_json_float(d["threshold"]),
                   primary=bool(d.get("primary", False)),
                   ranks=None if d.get("ranks") is None else [int(r) for r in d["ranks"]],
                   local=bool(d.get("local", False)))


def rows_from_stats(stats: TensorStats, names: list[str], roles: list[str],
                    shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> list[Row]:
    """One `Row` per statistics row, named as given (reads `stats` to the host)."""
    data = stats.data.cpu()
    counts = data[:, :NUM_COUNTS].tolist()
    values = data[:, MIN:COLS].view(torch.float64).tolist()
    hists: list[dict[int, int] | None] = [None] * len(names)
    if stats.has_histogram:
        hist = data[:, COLS:]
        hists = [{} for _ in names]
        where = hist.nonzero()
        for (r, c), v in zip(where.tolist(), hist[where[:, 0], where[:, 1]].tolist()):
            hists[r][c] = v
    return [Row(name=n, role=ro, shape=tuple(sh), dtype=str(dt).replace("torch.", ""),
                **dict(zip(COUNT_FIELDS, cnt)), **dict(zip(VALUE_FIELDS, val)), hist=h)
            for n, ro, sh, dt, cnt, val, h in zip(names, roles, shapes, dtypes, counts, values, hists)]


@dataclass
class Report:
    """The host-side record of one check: statistics per tensor, findings,
    actions taken, and whether the optimizer step was skipped."""

    step: int
    rows: list[Row]
    findings: list[Finding] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    skipped: bool = False
    time: float = field(default_factory=time.time)
    # Where a non-finite value first appeared, with `torchhealth.watch`: {"module",
    # "pass" ("forward"/"backward"), "step", "numel", "nan", "posinf", "neginf"}.
    origin: dict[str, Any] | None = None
    # The user's numbers of this step (`HealthMonitor.log`: loss, learning rate,
    # ...), non-finite ones included: a NaN loss is a finding of its own.
    scalars: dict[str, float] = field(default_factory=dict)
    # How many ranks the statistics cover: the world size under torch.distributed
    # (rows combined across ranks, or replicated as under DDP), else 1.
    world_size: int = 1

    @classmethod
    def from_stats(cls, step: int, stats: TensorStats, names: list[str], roles: list[str],
                   shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], **kwargs) -> Report:
        """Reads `stats` (one row per name) to the host: this is the sync point."""
        return cls(step=step, rows=rows_from_stats(stats, names, roles, shapes, dtypes), **kwargs)

    # -- totals -------------------------------------------------------------------
    def norm(self, role: str, *, finite_only: bool = False) -> float:
        """L2 norm over every tensor of one role ("grad", "param", ...), as
        `torch.linalg.vector_norm` gives it: NaN when a value is NaN, else inf
        when one is infinite. ``finite_only``: the norm of the finite values."""
        rows = [r for r in self.rows if r.role == role]
        if not finite_only:
            if any(r.nan for r in rows):
                return math.nan
            if any(r.posinf or r.neginf for r in rows):
                return math.inf
        return math.sqrt(sum(r.sumsq for r in rows))

    @property
    def grad_norm(self) -> float:
        """The gradients' norm (NaN or inf on a step with non-finite gradients)."""
        return self.norm("grad")

    @property
    def finite_grad_norm(self) -> float:
        """The norm of the finite gradient values."""
        return self.norm("grad", finite_only=True)

    @property
    def param_norm(self) -> float:
        return self.norm("param")

    def nonfinite(self, role: str | None = None) -> int:
        return sum(r.nonfinite for r in self.rows if role is None or r.role == role)

    @property
    def ok(self) -> bool:
        """True when no finding of severity warning or error fired."""
        return not any(f.severity in ("warning", "error") for f in self.findings)

    @property
    def status(self) -> str:
        """"UNHEALTHY" if an error fired, "WARNING" if only warnings, else "OK"."""
        severities = {f.severity for f in self.findings}
        return "UNHEALTHY" if "error" in severities else "WARNING" if "warning" in severities else "OK"

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"step": self.step, "time": self.time, "skipped": self.skipped,
             "world_size": self.world_size, "actions": list(self.actions),
             "findings": [f.to_dict() for f in self.findings],
             "rows": [r.to_dict() for r in self.rows]}
        if self.origin is not None:
            d["origin"] = dict(self.origin)
        if self.scalars:
            d["scalars"] = {k: _json_float(v) for k, v in self.scalars.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        return cls(step=int(d["step"]), time=float(d["time"]), skipped=bool(d["skipped"]),
                   actions=list(d.get("actions", [])),
                   findings=[Finding.from_dict(f) for f in d.get("findings", [])],
                   rows=[Row.from_dict(r) for r in d["rows"]], origin=d.get("origin"),
                   scalars={k: _from_json_float(v) for k, v in d.get("scalars", {}).items()},
                   world_size=int(d.get("world_size", 1)))

    def __str__(self) -> str:
        ranks = f" ({self.world_size} ranks)" if self.world_size > 1 else ""
        head = (f"torchhealth step {self.step}{ranks}: {self.status}"
                f"{' (step skipped)' if self.skipped else ''}  grad norm {self.grad_norm:.4g}"
                f"  param norm {self.param_norm:.4g}")
        lines = [head]
        if self.origin is not None:
            o = self.origin
            on = f", rank {o['rank']}" if "rank" in o else ""
            lines.append(f"  origin: {o['module']} ({o['pass']} pass, step {o['step']}{on})")
        if self.scalars:
            lines.append("  logged: " + ", ".join(f"{k} {v:.4g}" for k, v in self.scalars.items()))
        for f in self.findings:
            lines.append(f"  [{f.severity}] {f.check}{' (primary)' if f.primary else ''}: {f.message}")
        if self.actions:
            lines.append(f"  actions: {', '.join(self.actions)}")
        w = max([len(r.name) for r in self.rows] + [4])
        lines.append(f"  {'name':<{w}}  {'role':<6} {'dtype':<9} {'numel':>10} {'nonfinite':>9} "
                     f"{'zero%':>6} {'absmax':>10} {'l2norm':>10}")
        for r in self.rows:
            zero = 100.0 * r.zero / r.numel if r.numel else 0.0
            lines.append(f"  {r.name:<{w}}  {r.role:<6} {r.dtype:<9} {r.numel:>10} {r.nonfinite:>9} "
                         f"{zero:>6.1f} {r.absmax:>10.3g} {r.l2norm:>10.3g}")
        return "\n".join(lines)
