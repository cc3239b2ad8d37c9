"""The HTML report of a logged run: one self-contained file (plots embedded as
base64 PNGs, nothing fetched from the network), built from Reports only.

Sections: a summary; the user's scalars (loss, learning rate) when the
Reports carry any; gradient and weight norms per parameter over steps; for
the worst parameters a heatmap of the log2-magnitude histogram over steps with
the float16 and bfloat16 limits marked; a timeline of the checks that fired;
a table of the worst parameters. Plots need matplotlib (the optional extra
``torchhealth[report]``); without it the report keeps its tables and says how
to get the plots.
"""
from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
import stat
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ._optional import require
from .histogram_view import magnitude_counts
from .report import Report, Row

# Binary exponents of the low-precision limits drawn on the heatmaps.
LIMITS = [  # (log2 magnitude, label, dtype)
    (math.log2(65504.0), "fp16 max 65504", "float16"),
    (-14.0, "fp16 smallest normal 2^-14", "float16"),
    (-24.0, "fp16 subnormal floor 2^-24", "float16"),
    (128.0, "bf16 max ~2^128", "bfloat16"),
    (-126.0, "bf16 smallest normal 2^-126", "bfloat16"),
    (-133.0, "bf16 subnormal floor 2^-133", "bfloat16"),
]
INSTALL_HINT = "pip install torchhealth[report]"
NO_HISTOGRAMS = ("Histograms were not recorded in this run, so there is nothing to draw here. "
                 "Turn them on with <code>histogram=True</code> (e.g. "
                 "<code>HealthCheckedOptimizer(opt, model=model, histogram=True)</code>).")
_SEVERITIES = ("error", "warning", "info")  # the ones with a style


@dataclass
class _Param:
    """One parameter's history across the run."""

    name: str
    rows: dict[str, list[tuple[int, Row]]] = field(default_factory=dict)  # role -> (step, row)
    findings: Counter = field(default_factory=Counter)  # check -> reports naming it

    def series(self, role: str, value) -> tuple[list[int], list[float]]:
        pts = self.rows.get(role, [])
        return [s for s, _ in pts], [value(r) for _, r in pts]

    def worst(self) -> dict:
        grads = [r for _, r in self.rows.get("grad", [])]
        params = [r for _, r in self.rows.get("param", [])]
        zero = [(r.zero + r.subnormal) / r.numel for r in grads if r.numel]
        return {"findings": sum(self.findings.values()),
                "checks": ", ".join(sorted(self.findings)),
                "nonfinite": sum(r.nonfinite for r in grads + params),
                "max_grad_norm": max((r.l2norm for r in grads), default=math.nan),
                "max_grad_absmax": max((r.absmax for r in grads), default=math.nan),
                "max_zero": max(zero, default=math.nan),
                "saturated": max((r.saturated for r in grads + params), default=0),
                "param_norm": params[-1].l2norm if params else math.nan}


def _params(reports: list[Report]) -> dict[str, _Param]:
    out: dict[str, _Param] = {}
    for rep in reports:
        for r in rep.rows:
            out.setdefault(r.name, _Param(r.name)).rows.setdefault(r.role, []).append((rep.step, r))
        for f in rep.findings:
            for n in dict.fromkeys(f.names):
                out.setdefault(n, _Param(n)).findings[f.check] += 1
    return out


def _ranked(params: dict[str, _Param]) -> list[tuple[_Param, dict]]:
    """Parameters worst first: most findings, then most non-finite values, then
    the largest gradient norm."""
    scored = [(p, p.worst()) for p in params.values()]

    def key(item):
        w = item[1]
        norm = w["max_grad_norm"]
        return (-w["findings"], -w["nonfinite"], -(norm if math.isfinite(norm) else math.inf))
    return sorted(scored, key=key)


# -- plots -------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _fault_steps(reports: list[Report]) -> list[int]:
    return [r.step for r in reports if not r.ok]


def _norm(rows: list[Row]) -> float:
    """The L2 norm to plot: NaN (a gap) when a value is non-finite, since the
    statistics' norm covers the finite values only, and for 0 (log axis)."""
    if any(r.nonfinite for r in rows):
        return math.nan
    n = math.sqrt(sum(r.sumsq for r in rows))
    return n if n > 0 else math.nan


def _norms_plot(mpl, reports: list[Report], params: dict[str, _Param]) -> str:
    fig = mpl.figure.Figure(figsize=(13, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    cmap = mpl.colormaps["viridis"]
    names = list(params)
    for ax, role, title in ((axes[0], "grad", "gradient norm"), (axes[1], "param", "weight norm")):
        drawn = False  # a log axis needs one positive value: not so in a run NaN or zero throughout
        for i, name in enumerate(names):
            steps, norms = params[name].series(role, lambda r: _norm([r]))
            drawn = drawn or any(math.isfinite(n) for n in norms)
            ax.plot(steps, norms, lw=1, color=cmap(i / max(len(names) - 1, 1)),
                    label=name if len(names) <= 10 else None)
        total = [(r.step, _norm([w for w in r.rows if w.role == role]))
                 for r in reports if any(w.role == role for w in r.rows)]
        if total:
            ax.plot(*zip(*total), color="black", lw=2, label="total")
        for s in _fault_steps(reports):
            ax.axvline(s, color="#d62728", alpha=0.5, lw=1.5, zorder=0)
        if drawn:
            _log_y(mpl, ax)
        else:
            ax.text(0.5, 0.5, f"no finite nonzero {title} in this run", transform=ax.transAxes,
                    ha="center", va="center", color="#d62728")
        ax.set_title(f"{title} per parameter")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", ncol=2)
    if len(names) > 10:  # too many for a legend: the colour scale names some of them
        sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(0, len(names) - 1))
        bar = fig.colorbar(sm, ax=axes, label="parameter (first to last)", shrink=0.9)
        ticks = sorted({round(i * (len(names) - 1) / 11) for i in range(12)})
        bar.set_ticks(ticks, labels=[_short(names[i]) for i in ticks], fontsize=7)
    return _png(fig)


def _log_y(mpl, ax) -> None:
    """A log y axis labelled in plain text ("1e-05"): the default labels are
    mathtext, which the report turns off so that names from the log draw as they are."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(mpl.ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(mpl.ticker.LogFormatter(labelOnlyBase=False))


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "\u2026" + name[-(width - 1):]


def _scalars_plot(mpl, reports: list[Report]) -> str | None:
    """The user's scalars (loss, learning rate, ...) over steps, one panel each;
    None when no Report carries any."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in reports:
        for k, v in (getattr(r, "scalars", None) or {}).items():
            steps, values = series.setdefault(k, ([], []))
            steps.append(r.step)
            values.append(float(v))
    if not series:
        return None
    cols = min(len(series), 3)
    rows = -(-len(series) // cols)
    fig = mpl.figure.Figure(figsize=(13, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, (steps, values)) in zip(axes, series.items()):
        ax.plot(steps, values, lw=1.2, color="#1f77b4", marker="." if len(steps) < 50 else None)
        for s in _fault_steps(reports):
            ax.axvline(s, color="#d62728", alpha=0.5, lw=1.5, zorder=0)
        finite = [v for v in values if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) > 100 * min(finite):
            _log_y(mpl, ax)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    return _png(fig)


def _heatmap(mpl, ax, pts: list[tuple[int, Row]], title: str):
    """Fraction of a tensor's values per binary exponent of |x|, over steps."""
    import numpy as np  # a dependency of matplotlib

    pts = [(s, r) for s, r in pts if r.hist is not None]  # checks without a histogram: gaps
    counts = [magnitude_counts(r) for _, r in pts]
    exps = [e for c in counts for e in c]
    if not exps:  # measured, and nothing to place on a log2 scale: say so instead of empty axes
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no finite nonzero values\n(all zero or non-finite at every step)"
                if pts else "no histogram recorded", transform=ax.transAxes, ha="center",
                va="center", color="#d62728", fontsize=9)
        return None
    lo = min(min(exps), -24) - 6
    hi = max(max(exps), 16) + 3
    grid = np.full((hi - lo + 1, len(pts)), np.nan)
    for j, ((_, r), c) in enumerate(zip(pts, counts)):
        for e, n in c.items():
            grid[e - lo, j] = n / r.numel
    steps = np.array([s for s, _ in pts], dtype=float)
    mid = (steps[1:] + steps[:-1]) / 2
    first = steps[0] - (mid[0] - steps[0] if len(mid) else 0.5)
    last = steps[-1] + (steps[-1] - mid[-1] if len(mid) else 0.5)
    xedges = np.concatenate([[first], mid, [last]])
    yedges = np.arange(lo, hi + 2)  # the bin of exponent e spans log2|x| in [e, e + 1)
    mesh = ax.pcolormesh(xedges, yedges, np.ma.masked_invalid(grid), cmap="magma_r",
                         norm=mpl.colors.LogNorm(vmin=1e-6, vmax=1), shading="flat")
    box = {"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1}
    off = {"top": [], "bottom": []}
    for y, label, dtype in LIMITS:
        color = "#1f77b4" if dtype == "float16" else "#2ca02c"
        if lo <= y <= hi + 1:
            ax.axhline(y, color=color, lw=1, ls="--")
            # beside the chart, not over the values; constrained layout makes room for it
            ax.text(1.01, y, label, transform=ax.get_yaxis_transform(), va="center", ha="left",
                    fontsize=7, color=color, clip_on=False)
        else:
            off["top" if y > hi else "bottom"].append(label)
    for where, labels in off.items():  # limits beyond the chart, marked at its edge
        if labels:
            ax.text(0.01, 0.98 if where == "top" else 0.02,
                    ("\u2191 " if where == "top" else "\u2193 ") + "\n".join(labels) + " (off the chart)",
                    transform=ax.transAxes, va="top" if where == "top" else "bottom", ha="left",
                    fontsize=7, color="#2ca02c", bbox=box)
    ax.set_ylim(lo, hi + 1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("log2 |x|")
    return mesh


def _heatmaps_plot(mpl, selected: list[_Param]) -> str:
    fig = mpl.figure.Figure(figsize=(13, 3.8 * len(selected)), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.12, w_pad=0.1)  # inches between a panel's labels and the next title
    axes = fig.subplots(len(selected), 2, squeeze=False)
    meshes = [_heatmap(mpl, ax, p.rows.get(role, []), f"{p.name}: {what}")
              for row, p in zip(axes, selected)
              for ax, role, what in zip(row, ("grad", "param"), ("gradient", "weight"))]
    mesh = next((m for m in meshes if m is not None), None)
    if mesh is not None:  # one scale for all: LogNorm(1e-6, 1)
        bar = fig.colorbar(mesh, ax=axes, label="fraction of the tensor's values", shrink=0.6, aspect=40)
        bar.ax.yaxis.set_major_formatter(mpl.ticker.LogFormatter())
    return _png(fig)


def _timeline_plot(mpl, reports: list[Report]) -> str:
    fired = [(r.step, f) for r in reports for f in r.findings]
    checks = list(dict.fromkeys(f.check for _, f in fired))
    skipped = [r.step for r in reports if r.skipped]
    lanes = checks + (["step skipped"] if skipped else [])
    fig = mpl.figure.Figure(figsize=(13, 0.5 * len(lanes) + 1.4), layout="constrained")
    ax = fig.subplots()
    colors = {"error": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}
    for severity, color in colors.items():
        pts = [(s, checks.index(f.check)) for s, f in fired if f.severity == severity]
        if pts:
            ax.scatter(*zip(*pts), color=color, marker="|", s=300, linewidths=2, label=severity)
    if skipped:
        ax.scatter(skipped, [len(checks)] * len(skipped), color="gray", marker="|", s=300,
                   linewidths=2, label="skipped")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.set_xlim(reports[0].step - 0.5, reports[-1].step + 0.5)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


# -- tables ------------------------------------------------------------------------
def _fmt(x) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.3g}"
    return str(x)


def _table(head: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(f'<tr class="{html.escape(c)}">' + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                   for r, c in zip(rows, classes or [""] * len(rows)))
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _worst_table(ranked: list[tuple[_Param, dict]], limit: int) -> str:
    head = ["parameter", "findings", "checks", "non-finite values", "max grad norm",
            "max |grad|", "max zero+subnormal", "max saturated", "last weight norm"]
    rows = [[p.name, w["findings"], w["checks"], w["nonfinite"], w["max_grad_norm"],
             w["max_grad_absmax"], f"{100 * w['max_zero']:.1f}%" if math.isfinite(w["max_zero"]) else "–",
             w["saturated"], w["param_norm"]] for p, w in ranked[:limit]]
    return _table(head, rows, ["bad" if w["findings"] or w["nonfinite"] else "" for _, w in ranked[:limit]])


def _findings_table(reports: list[Report], limit: int) -> str:
    fired = [(r.step, f, r.skipped) for r in reports for f in r.findings]
    rows = [[s, f.severity, f.check, f.message, "yes" if skipped else ""]
            for s, f, skipped in fired[:limit]]
    more = (f"<p>… and {len(fired) - limit} more findings (all of them are in the log).</p>"
            if len(fired) > limit else "")
    return _table(["step", "severity", "check", "message", "step skipped"], rows,
                  [f.severity if f.severity in _SEVERITIES else "" for _, f, _ in fired[:limit]]) + more


def _origins(reports: list[Report]) -> list[str]:
    """Where non-finite values first appeared (`torchhealth.watch`), per step."""
    found = [r.origin for r in reports if r.origin is not None]
    if not found:
        return []
    rows = [[o["step"], o["module"], o["pass"], o["nan"], o["posinf"], o["neginf"], o["numel"]]
            for o in found]
    return ["<p><b>Where it broke</b>: the first module whose output (forward) or output gradient "
            "(backward) held NaN or Inf, on each step it happened.</p>",
            _table(["step", "module", "pass", "NaN", "+Inf", "-Inf", "of"], rows)]


# -- torch.distributed: how many ranks the records cover, and which rank broke ---------
def _ranks_line(reports: list[Report]) -> list[str]:
    """The summary's line on ranks (nothing for a single-process run)."""
    sizes = sorted({r.world_size for r in reports})
    if sizes == [1]:
        return []
    bad = sorted({k for r in reports for f in r.findings for k in f.ranks or ()})
    culprits = (f"; non-finite gradients produced on rank(s) {', '.join(map(str, bad))}" if bad else "")
    return [f"<p>Each record covers {' or '.join(map(str, sizes))} ranks (statistics combined "
            f"across torch.distributed processes){html.escape(culprits)}.</p>"]


def _rank_origins(reports: list[Report]) -> list[str]:
    """Beside the origin: the ranks whose own gradients were non-finite, per step."""
    rows = [[r.step, ", ".join(map(str, f.ranks)) or "none (after communication)",
             r.world_size, ", ".join(f.names)]
            for r in reports for f in r.findings if f.ranks is not None]
    if not rows:
        return []
    return ["<p><b>Which rank</b>: the ranks whose local gradients held NaN or Inf before "
            "communication spread them to every rank.</p>",
            _table(["step", "rank(s)", "of ranks", "parameters"], rows)]


# -- the page ------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1280px;color:#222;padding:0 16px}
h1{margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0}.ok{color:#2ca02c}.bad,.error{background:#fde8e8}.warning{background:#fff4e0}
table{border-collapse:collapse;font-size:13px;width:100%}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td:first-child{font-family:ui-monospace,monospace;white-space:nowrap}
img{max-width:100%}.note{background:#f4f4f4;padding:8px 12px;border-left:4px solid #999}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:22px}
"""


def _sections(mpl, reports: list[Report], params: dict[str, _Param], selected: list[_Param],
              fired: bool, findings: int) -> list[str]:
    """The plots and the findings table. Names, checks and messages come from the
    log: `render` has matplotlib draw them as they are (no $...$ mathtext)."""
    parts = []
    curves = _scalars_plot(mpl, reports) if mpl else None
    if curves:
        parts += ["<h2>Training curves</h2>", "<p>The scalars logged with the checks "
                  "(loss, learning rate, ...); red: a check fired.</p>", curves]
    parts.append("<h2>Gradient and weight norms</h2><p>Red lines: a check fired on that step; "
                 "gaps: non-finite values.</p>")
    if mpl:
        parts.append(_norms_plot(mpl, reports, params))
    parts.append("<h2>Log2-magnitude histograms over steps</h2>")
    if not selected:
        parts.append(f'<p class="note">{NO_HISTOGRAMS}</p>')
    else:
        parts.append("<p>The fraction of each tensor's values in every binade [2^e, 2^(e+1)) at "
                     "each step with a histogram, for the worst parameters. Values drifting toward "
                     "the top line overflow float16; below the float16 smallest normal they lose "
                     "precision and under its subnormal floor they flush to zero. bfloat16 has "
                     "float32's exponent range, so it overflows and underflows only far outside "
                     "these charts.</p>")
        if mpl:
            parts.append(_heatmaps_plot(mpl, selected))
    parts.append("<h2>Checks that fired</h2>")
    parts += _origins(reports) + _rank_origins(reports)
    if fired:
        if mpl:
            parts.append(_timeline_plot(mpl, reports))
        parts.append(_findings_table(reports, findings))
    else:
        parts.append("<p>No check fired in this run.</p>")
    return parts


def render(reports: list[Report], *, title: str = "torchhealth report", source: str | None = None,
           heatmaps: int = 4, worst: int = 15, findings: int = 200) -> str:
    """The report of `reports` (one run, in step order) as one HTML document.

    `heatmaps` parameters get a histogram heatmap (the worst ones, see the
    table), `worst` rows go in the table of worst parameters and at most
    `findings` findings are listed one by one.
    """
    if not reports:
        raise ValueError("render: no reports to show (the log is empty)")
    params = _params(reports)
    ranked = _ranked(params)
    fired = Counter(f.check for r in reports for f in r.findings)
    skipped = sum(r.skipped for r in reports)
    status = ('<span class="ok">healthy: no check fired</span>' if not fired else
              "checks fired: " + ", ".join(f"{html.escape(c)} ({n}x)" for c, n in fired.most_common()))
    cards = [("records", len(reports)), ("steps", f"{reports[0].step}–{reports[-1].step}"),
             ("parameters", len(params)), ("findings", sum(fired.values())), ("steps skipped", skipped)]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="sub">{html.escape(source or "")} {status}</p>', *_ranks_line(reports),
             '<div class="cards">' + "".join(f"<div class=card><b>{html.escape(str(v))}</b>"
                                              f"{html.escape(k)}</div>" for k, v in cards) + "</div>"]
    try:
        mpl = require("matplotlib", "report")
        for sub in ("figure", "colors", "cm", "ticker"):
            require(f"matplotlib.{sub}", "report")
    except ImportError:
        mpl = None
        parts.append(f'<p class="note">The plots need matplotlib, which is not installed: '
                     f"<code>{INSTALL_HINT}</code>, then run <code>torchhealth report</code> again.</p>")
    measured = [p for p, _ in ranked if any(r.hist is not None for rows in p.rows.values() for _, r in rows)]
    with mpl.rc_context({"text.parse_math": False}) if mpl else contextlib.nullcontext():
        parts += _sections(mpl, reports, params, measured[:heatmaps], fired or skipped, findings)
    parts.append("<h2>Worst parameters</h2>" + _worst_table(ranked, worst))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def write_report(reports: list[Report], path: str | os.PathLike, **kwargs) -> Path:
    """Writes `render(reports, **kwargs)` to `path` and returns the path. The
    page goes to a temporary file in the same folder, renamed over `path` once
    complete: a failed write leaves any previous report as it was."""
    path = Path(path)
    page = render(reports, **kwargs).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(page)
        # mkstemp makes the file private; a report is as readable as the one it replaces
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

