"""The HTML report of a logged run: one self-contained file (plots embedded as
base64 PNGs, nothing fetched from the network), built from Reports only.

Sections: a summary; the user's scalars (loss, learning rate: `HealthMonitor.log`)
when the Reports carry any; gradient and weight norms per parameter over steps;
for the worst parameters, or the ones named, a heatmap of the log2-magnitude
histogram over steps with the float16 and bfloat16 limits marked; a timeline of
the checks that fired; a table of the worst parameters. The tables are built
by `torchhealth.report_tables`; the figures by `torchhealth.report_plots`, which
needs matplotlib (the optional extra ``torchhealth[report]``); without it the
report keeps its tables and says how to get the plots.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import html
import math
import numbers
import os
import stat
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import report_plots as plots
from . import report_tables as tables
from ._optional import require
from .report import Report, Row

INSTALL_HINT = "pip install torchhealth[report]"
NO_HISTOGRAMS = ("Histograms were not recorded in this run, so there is nothing to draw here. "
                 "Turn them on with <code>histogram=True</code> (e.g. "
                 "<code>HealthCheckedOptimizer(opt, model=model, histogram=True)</code>).")
# Heatmap rows in one figure at the most: each is 3.8 inches tall, and an image
# taller than 2^16 pixels cannot be saved.
MAX_HEATMAPS = 40


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


# -- which heatmaps --------------------------------------------------------------------
def match_names(names: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The `names` that `patterns` (exact names or `fnmatch` glob patterns)
    match, in the patterns' order and then the names' own, each once. A
    pattern that matches none is a ValueError listing the closest names."""
    names = list(dict.fromkeys(names))
    out: dict[str, None] = {}
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise TypeError(f"heatmaps: a pattern must be a non-empty string, got {pat!r}")
        hits = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            close = difflib.get_close_matches(pat, names, n=5, cutoff=0.5)
            hint = (f"close names: {', '.join(close)}" if close else
                    f"the names are like {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}")
            raise ValueError(f"no parameter matches the heatmap pattern {pat!r}; {hint}")
        out.update(dict.fromkeys(hits))
    return list(out)


@dataclass
class _Heatmaps:
    selected: list[_Param]  # to draw, in order
    which: str  # how they were chosen, for the page
    note: str | None = None  # why some (or all) are not drawn


def _choose_heatmaps(heatmaps, ranked: list[tuple[_Param, dict]], params: dict[str, _Param]) -> _Heatmaps:
    if isinstance(heatmaps, bool) or not isinstance(heatmaps, (numbers.Integral, str, Iterable)):
        raise TypeError(f"heatmaps must be a number of parameters or names and glob patterns, "
                        f"got {type(heatmaps).__name__} {heatmaps!r}")
    measured = {n for n, p in params.items() if any(r.hist is not None for rows in p.rows.values() for _, r in rows)}
    if isinstance(heatmaps, numbers.Integral):
        if heatmaps < 0:
            raise ValueError(f"heatmaps must be >= 0 (how many of the worst parameters), got {heatmaps}")
        chosen = [p for p, _ in ranked if p.name in measured][:heatmaps]
        which, note = "for the worst parameters", ("No heatmap was asked for (heatmaps=0)."
                                                   if heatmaps == 0 and measured else None)
    else:
        names = match_names(params, [heatmaps] if isinstance(heatmaps, str) else heatmaps)
        chosen = [params[n] for n in names if n in measured]
        which, note = "for the parameters asked for", None
        if measured and len(chosen) < len(names):
            note = (f"{len(names) - len(chosen)} of the {len(names)} parameters asked for have no "
                    f"histogram in this log: {html.escape(', '.join(n for n in names if n not in measured)[:300])}")
    if len(chosen) > MAX_HEATMAPS:
        note = (f"{len(chosen)} parameters chosen; the first {MAX_HEATMAPS} are drawn "
                "(ask for fewer: <code>heatmaps=</code>, <code>--heatmap</code>).")
        chosen = chosen[:MAX_HEATMAPS]
    return _Heatmaps(chosen, which, note)


# -- tables ------------------------------------------------------------------------
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


def _sections(mpl, reports: list[Report], params: dict[str, _Param], heatmaps: _Heatmaps,
              fired: bool, findings: int) -> list[str]:
    """The plots and the findings table. Names, checks and messages come from the
    log: `render` has matplotlib draw them as they are (no $...$ mathtext)."""
    parts = []
    curves = plots.scalars_plot(mpl, reports) if mpl else None
    if curves:
        parts += ["<h2>Training curves</h2>", "<p>The scalars logged with the checks "
                  "(loss, learning rate, ...); red lines: a check fired; red marks at the top: "
                  "NaN or infinite values (gaps in the line).</p>", curves]
    parts.append("<h2>Gradient and weight norms</h2><p>Red lines: a check fired on that step; "
                 "gaps: non-finite values.</p>")
    if mpl:
        parts.append(plots.norms_plot(mpl, reports, params))
    parts.append("<h2>Log2-magnitude histograms over steps</h2>")
    if not heatmaps.selected:
        parts.append(f'<p class="note">{heatmaps.note or NO_HISTOGRAMS}</p>')
    else:
        parts.append("<p>The fraction of each tensor's values in every binade [2^e, 2^(e+1)) at "
                     f"each step with a histogram, {heatmaps.which}. Values drifting toward "
                     "the top line overflow float16; below the float16 smallest normal they lose "
                     "precision and under its subnormal floor they flush to zero. bfloat16 has "
                     "float32's exponent range, so it overflows and underflows only far outside "
                     "these charts.</p>")
        if heatmaps.note:
            parts.append(f'<p class="note">{heatmaps.note}</p>')
        if mpl:
            parts.append(plots.heatmaps_plot(mpl, heatmaps.selected))
    parts.append("<h2>Checks that fired</h2>")
    parts += tables.origins(reports) + tables.rank_origins(reports)
    if fired:
        if mpl:
            parts.append(plots.timeline_plot(mpl, reports))
        parts.append(tables.findings_table(reports, findings))
    else:
        parts.append("<p>No check fired in this run.</p>")
    return parts


def render(reports: list[Report], *, title: str = "torchhealth report", source: str | None = None,
           heatmaps: int | str | Iterable[str] = 4, worst: int = 15, findings: int = 200) -> str:
    """The report of `reports` (one run, in step order) as one HTML document.

    `heatmaps`: which parameters get a histogram heatmap: a number N (the N
    worst, as ranked in the table of worst parameters), or parameter names
    and glob patterns (``"layers.*.weight"``, `fnmatch` rules), drawn in the
    order given (a pattern that matches no parameter is a ValueError naming
    the closest names). `worst` rows go in the table of worst parameters and
    at most `findings` findings are listed one by one.
    """
    if not reports:
        raise ValueError("render: no reports to show (the log is empty)")
    params = _params(reports)
    ranked = _ranked(params)
    chosen = _choose_heatmaps(heatmaps, ranked, params)
    fired = Counter(f.check for r in reports for f in r.findings)
    skipped = sum(r.skipped for r in reports)
    status = ('<span class="ok">healthy: no check fired</span>' if not fired else
              "checks fired: " + ", ".join(f"{html.escape(c)} ({n}x)" for c, n in fired.most_common()))
    cards = [("records", len(reports)), ("steps", f"{reports[0].step}–{reports[-1].step}"),
             ("parameters", len(params)), ("findings", sum(fired.values())), ("steps skipped", skipped)]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="sub">{html.escape(source or "")} {status}</p>', *tables.ranks_line(reports),
             '<div class="cards">' + "".join(f"<div class=card><b>{html.escape(str(v))}</b>"
                                              f"{html.escape(k)}</div>" for k, v in cards) + "</div>"]
    try:
        mpl = require("matplotlib", "report")
        for sub in ("figure", "colors", "cm", "ticker", "transforms"):
            require(f"matplotlib.{sub}", "report")
    except ImportError:
        mpl = None
        parts.append(f'<p class="note">The plots need matplotlib, which is not installed: '
                     f"<code>{INSTALL_HINT}</code>, then run <code>torchhealth report</code> again.</p>")
    with mpl.rc_context({"text.parse_math": False}) if mpl else contextlib.nullcontext():
        parts += _sections(mpl, reports, params, chosen, fired or skipped, findings)
    parts.append("<h2>Worst parameters</h2>" + tables.worst_table(ranked, worst))
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

