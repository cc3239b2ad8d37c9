"""The HTML tables of the report (`torchhealth.html_report`): the worst
parameters, the findings, where a run broke and which rank broke it."""
from __future__ import annotations

import html
import math

from .report import Report

SEVERITIES = ("error", "warning", "info")  # the ones with a style


def _fmt(x) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.3g}"
    return str(x)


def _table(head: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(f'<tr class="{html.escape(c)}">' + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                   for r, c in zip(rows, classes or [""] * len(rows)))
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def worst_table(ranked: list[tuple], limit: int) -> str:
    head = ["parameter", "findings", "checks", "non-finite values", "max grad norm",
            "max |grad|", "max zero+subnormal", "max saturated", "last weight norm"]
    rows = [[p.name, w["findings"], w["checks"], w["nonfinite"], w["max_grad_norm"],
             w["max_grad_absmax"], f"{100 * w['max_zero']:.1f}%" if math.isfinite(w["max_zero"]) else "–",
             w["saturated"], w["param_norm"]] for p, w in ranked[:limit]]
    return _table(head, rows, ["bad" if w["findings"] or w["nonfinite"] else "" for _, w in ranked[:limit]])


def findings_table(reports: list[Report], limit: int) -> str:
    fired = [(r.step, f, r.skipped) for r in reports for f in r.findings]
    rows = [[s, f.severity, f.check, f.message, "yes" if skipped else ""]
            for s, f, skipped in fired[:limit]]
    more = (f"<p>… and {len(fired) - limit} more findings (all of them are in the log).</p>"
            if len(fired) > limit else "")
    return _table(["step", "severity", "check", "message", "step skipped"], rows,
                  [f.severity if f.severity in SEVERITIES else "" for _, f, _ in fired[:limit]]) + more


def origins(reports: list[Report]) -> list[str]:
    """Where non-finite values first appeared (`torchhealth.watch`), per step."""
    found = [r.origin for r in reports if r.origin is not None]
    if not found:
        return []
    ranked = any("rank" in o for o in found)  # torch.distributed: the rank where it was born
    rows = [[o["step"], o["module"], o["pass"], o["nan"], o["posinf"], o["neginf"], o["numel"]]
            + ([o.get("rank", "")] if ranked else []) for o in found]
    return ["<p><b>Where it broke</b>: the first module whose output (forward) or output gradient "
            "(backward) held NaN or Inf, on each step it happened.</p>",
            _table(["step", "module", "pass", "NaN", "+Inf", "-Inf", "of"] + (["rank"] if ranked else []),
                   rows)]


# -- torch.distributed: how many ranks the records cover, and which rank broke ---------
def ranks_line(reports: list[Report]) -> list[str]:
    """The summary's line on ranks (nothing for a single-process run)."""
    sizes = sorted({r.world_size for r in reports})
    if sizes == [1]:
        return []
    bad = sorted({k for r in reports for f in r.findings for k in f.ranks or ()})
    culprits = (f"; non-finite gradients produced on rank(s) {', '.join(map(str, bad))}" if bad else "")
    return [f"<p>Each record covers {' or '.join(map(str, sizes))} ranks (statistics combined "
            f"across torch.distributed processes){html.escape(culprits)}.</p>"]


def rank_origins(reports: list[Report]) -> list[str]:
    """Beside the origin: the ranks whose own gradients were non-finite, per step."""
    rows = [[r.step, ", ".join(map(str, f.ranks)) or "none (after communication)",
             r.world_size, ", ".join(f.names)]
            for r in reports for f in r.findings if f.ranks is not None]
    if not rows:
        return []
    return ["<p><b>Which rank</b>: the ranks whose local gradients held NaN or Inf before "
            "communication spread them to every rank.</p>",
            _table(["step", "rank(s)", "of ranks", "parameters"], rows)]
