"""The figures of the HTML report (`torchhealth.html_report`), drawn with
matplotlib (passed in as ``mpl``, so that the report works without it) and
returned as embedded PNG ``<img>`` tags. Each is a function of the Reports or
of one parameter's history (an object with ``name`` and ``rows``: role ->
``[(step, Row)]``, see `html_report`)."""
from __future__ import annotations

import base64
import html
import io
import math

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


def png(fig, alt: str) -> str:
    """`fig` as an ``<img>`` with its data inline; `alt` says what it shows."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def fault_steps(reports: list[Report]) -> list[int]:
    return [r.step for r in reports if not r.ok]


def plot_norm(rows: list[Row]) -> float:
    """The L2 norm to plot: NaN (a gap) when a value is non-finite, since the
    statistics' norm covers the finite values only, and for 0 (log axis)."""
    if any(r.nonfinite for r in rows):
        return math.nan
    n = math.sqrt(sum(r.sumsq for r in rows))
    return n if n > 0 else math.nan


def norms_plot(mpl, reports: list[Report], params: dict) -> str:
    """Gradient and weight norms of every parameter (`params`: name -> history) and in total."""
    fig = mpl.figure.Figure(figsize=(13, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    cmap = mpl.colormaps["viridis"]
    names = list(params)
    for ax, role, title in ((axes[0], "grad", "gradient norm"), (axes[1], "param", "weight norm")):
        drawn = False  # a log axis needs one positive value: not so in a run NaN or zero throughout
        for i, name in enumerate(names):
            steps, norms = params[name].series(role, lambda r: plot_norm([r]))
            drawn = drawn or any(math.isfinite(n) for n in norms)
            ax.plot(steps, norms, lw=1, color=cmap(i / max(len(names) - 1, 1)),
                    label=name if len(names) <= 10 else None)
        total = [(r.step, plot_norm([w for w in r.rows if w.role == role]))
                 for r in reports if any(w.role == role for w in r.rows)]
        if total:
            ax.plot(*zip(*total), color="black", lw=2, label="total")
        for s in fault_steps(reports):
            ax.axvline(s, color="#d62728", alpha=0.5, lw=1.5, zorder=0)
        if drawn:
            log_y(mpl, ax)
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
        bar.set_ticks(ticks, labels=[short(names[i]) for i in ticks], fontsize=7)
    return png(fig, "gradient and weight norms per parameter")


def log_y(mpl, ax) -> None:
    """A log y axis labelled in plain text ("1e-05"): the default labels are
    mathtext, which the report turns off so that names from the log draw as they are."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(mpl.ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(mpl.ticker.LogFormatter(labelOnlyBase=False))


def short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "\u2026" + name[-(width - 1):]


def scalars_plot(mpl, reports: list[Report]) -> str | None:
    """The user's scalars (loss, learning rate, ...) over steps, one panel each;
    None when no Report carries any. A non-finite value is a gap in the line
    and a red mark at the top of the panel, named in its legend."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in reports:
        for k, v in r.scalars.items():
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
        ax.plot(steps, [v if math.isfinite(v) else math.nan for v in values], lw=1.2, color="#1f77b4",
                marker="." if len(steps) < 50 else None)
        _mark_nonfinite(mpl, ax, steps, values)
        for s in fault_steps(reports):
            ax.axvline(s, color="#d62728", alpha=0.5, lw=1.5, zorder=0)
        finite = [v for v in values if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) > 100 * min(finite):
            log_y(mpl, ax)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    return png(fig, "training curves: " + ", ".join(series))


def _mark_nonfinite(mpl, ax, steps: list[int], values: list[float]) -> None:
    """Marks the steps whose value is NaN, inf or -inf at the top of `ax`."""
    top = mpl.transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for kind, marker in (("nan", "x"), ("inf", "^"), ("-inf", "v")):
        at = [s for s, v in zip(steps, values) if not math.isfinite(v) and str(v) == kind]
        if at:
            ax.scatter(at, [0.95] * len(at), transform=top, marker=marker, color="#d62728", s=40,
                       zorder=3, clip_on=False, label=f"{kind} (step {at[0]}{', ...' if len(at) > 1 else ''})")
    if ax.collections:
        ax.legend(fontsize=7, loc="best")


def heatmap(mpl, ax, pts: list[tuple[int, Row]], title: str):
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


def heatmaps_plot(mpl, selected: list) -> str:
    """A gradient and a weight heatmap for each parameter history in `selected`
    (for a watched module's, its output gradient and output)."""
    fig = mpl.figure.Figure(figsize=(13, 3.8 * len(selected)), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.12, w_pad=0.1)  # inches between a panel's labels and the next title
    axes = fig.subplots(len(selected), 2, squeeze=False)
    meshes = [heatmap(mpl, ax, p.rows.get(role, []), f"{p.name}: {what}")
              for row, p in zip(axes, selected)
              for ax, (role, what) in zip(row, _panels(p))]
    mesh = next((m for m in meshes if m is not None), None)
    if mesh is not None:  # one scale for all: LogNorm(1e-6, 1)
        bar = fig.colorbar(mesh, ax=axes, label="fraction of the tensor's values", shrink=0.6, aspect=40)
        bar.ax.yaxis.set_major_formatter(mpl.ticker.LogFormatter())
    return png(fig, "log2-magnitude histograms over steps: " + ", ".join(p.name for p in selected))


def _panels(p) -> tuple[tuple[str, str], tuple[str, str]]:
    if "grad" in p.rows or "param" in p.rows:
        return ("grad", "gradient"), ("param", "weight")
    return ("activation_grad", "output gradient"), ("activation", "output")


def timeline_plot(mpl, reports: list[Report]) -> str:
    """One lane per check that fired (and one of skipped steps), marks by severity."""
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
    return png(fig, "timeline of the checks that fired")

