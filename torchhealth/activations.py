"""Activation statistics of one forward or backward pass, and the checks on them.

`PassStats` holds, on the device, one `TensorStats` row per module output (or
output gradient) in execution order, plus, for bounded activations, how many
values sit within ``EPS`` of an asymptote. `activation_findings` turns the host
copy of one step's passes into Report rows, findings and the origin:

- **origin**: the first row, in execution order, holding NaN or Inf: the
  module that produced it (forward: its output; backward: the gradient flowing
  into its output, so a non-finite gradient at the model's last output was born
  in the loss). The forward pass has a row ``<input>`` for the model's inputs.
- **saturation**: sigmoid/tanh outputs with more than
  ``Thresholds.max_saturated_fraction`` of values within ``EPS`` = 2^-10 of an
  asymptote (0 or 1 for sigmoid, -1 or 1 for tanh): their gradients vanish.
- **range**: softmax/softmin/sigmoid outputs outside [0, 1].
- **dead_units**: ReLU/ReLU6 outputs more than ``Thresholds.max_dead_fraction``
  exactly zero: those units pass no gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .report import Finding, Row, rows_from_stats
from .stats import BINS_PER_SIGN, COLS, EXP_MIN, SATURATED, TensorStats

EPS_EXP = -10
EPS = math.ldexp(1.0, EPS_EXP)
SIGMOID, TANH, PROB, RELU, OTHER = "sigmoid", "tanh", "prob", "relu", "other"
KINDS = {torch.nn.Sigmoid: SIGMOID, torch.nn.Tanh: TANH, torch.nn.Softmax: PROB, torch.nn.Softmin: PROB,
         torch.nn.ReLU: RELU, torch.nn.ReLU6: RELU}
CHECKS = ("saturation", "range", "dead_units")


def kind_of(module: torch.nn.Module) -> str:
    return KINDS.get(type(module), OTHER)


@dataclass
class PassStats:
    """One pass's rows on the device. ``near[i]`` counts the values of row i
    within EPS of an asymptote (0 for modules that have none)."""

    step: int
    name: str  # "forward" or "backward"
    modules: list[str]
    kinds: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    stats: TensorStats
    near: torch.Tensor  # int64 [rows]

    @property
    def role(self) -> str:
        return "activation" if self.name == "forward" else "activation_grad"


def tiny_counts(stats: TensorStats) -> torch.Tensor:
    """Per row: values within EPS of 0 (zeros and the histogram bins below
    2^EPS_EXP). Needs histograms."""
    low = 1 + EPS_EXP - EXP_MIN  # per sign: the underflow column, then exponents EXP_MIN .. EPS_EXP - 1
    hist = stats.hist
    return hist[:, BINS_PER_SIGN:BINS_PER_SIGN + low].sum(1) + hist[:, :low].sum(1) + stats.zero


def bounded_rows(stats: TensorStats, histogram: bool) -> TensorStats:
    """The rows of sigmoid/tanh outputs as a call with the default saturation
    threshold gives them, from a call made with ``saturation=1 - EPS``: their
    values lie in [-1, 1], below half of any dtype's maximum, so none is saturated."""
    data = stats.data if histogram else stats.data[:, :COLS]
    saturated = torch.arange(data.shape[1], device=data.device) == SATURATED
    return TensorStats(torch.where(saturated, 0, data))


def near_counts(kinds: list[str], high: torch.Tensor, tiny: torch.Tensor) -> torch.Tensor:
    """Per row: values within EPS of an asymptote (0 or 1 for sigmoid, -1 or 1 for
    tanh, none for other modules), from the counts of each row's tensor of values
    with |x| >= 1 - EPS (`high`) and of values within EPS of 0 (`tiny_counts`)."""
    device = high.device
    sig = torch.tensor([k == SIGMOID for k in kinds], device=device)
    bounded = torch.tensor([k in (SIGMOID, TANH) for k in kinds], device=device)
    return torch.where(bounded, high, 0) + torch.where(sig, tiny, 0)


def activation_findings(passes: list[tuple[PassStats, torch.Tensor, torch.Tensor]],
                        max_saturated_fraction: float, max_dead_fraction: float
                        ) -> tuple[list[Row], list[Finding], dict | None]:
    """Rows, findings and origin of one step from the host copies of its passes:
    ``(pass, stats_data_on_host, near_on_host)``."""
    rows, findings, origin = [], [], None
    for p, data, near in passes:
        prows = rows_from_stats(TensorStats(data), p.modules, [p.role] * len(p.modules), p.shapes,
                                p.dtypes)
        rows += prows
        bad = [r for r in prows if r.nonfinite]
        if bad and origin is None:
            r = bad[0]
            origin = {"module": r.name, "pass": p.name, "step": p.step, "numel": r.numel,
                      "nan": r.nan, "posinf": r.posinf, "neginf": r.neginf}
            where = ("the loss (the gradient of the model's output)"
                     if p.name == "backward" and r.name == p.modules[0] else f"module {r.name}")
            findings.append(Finding(
                "nonfinite", "error",
                f"first non-finite {'output' if p.name == 'forward' else 'output gradient'} in the "
                f"{p.name} pass: {where} ({r.nan} NaN, {r.posinf} +Inf, {r.neginf} -Inf of {r.numel})",
                [r.name], float(r.nonfinite), 0.0))
        if p.name != "forward":
            continue
        for r, kind, n in zip(prows, p.kinds, near.tolist()):
            finite = max(r.numel - r.nonfinite, 1)
            if kind in (SIGMOID, TANH) and n / finite > max_saturated_fraction:
                findings.append(Finding("saturation", "warning",
                                        f"{r.name} ({kind}): {100 * n / finite:.1f}% of outputs within "
                                        f"2^{EPS_EXP} of an asymptote (their gradients vanish)",
                                        [r.name], n / finite, max_saturated_fraction))
            if kind in (PROB, SIGMOID) and r.numel > r.nonfinite and (r.min < 0 or r.max > 1):
                findings.append(Finding("range", "error",
                                        f"{r.name} ({kind}): probabilities outside [0, 1] "
                                        f"(min {r.min:.4g}, max {r.max:.4g})", [r.name]))
            if kind == RELU and r.zero / finite > max_dead_fraction:
                findings.append(Finding("dead_units", "warning",
                                        f"{r.name}: {100 * r.zero / finite:.1f}% of outputs are exactly "
                                        f"zero (units that pass no gradient)",
                                        [r.name], r.zero / finite, max_dead_fraction))
    return rows, findings, origin


def pass_fields(passes: list[PassStats]) -> dict[str, torch.Tensor]:
    """The host-copy fields of a step's passes (names ``act{i}``/``near{i}``):
    the rows, with their histograms on the steps that measured them."""
    out = {}
    for i, p in enumerate(passes):
        out[f"act{i}"] = p.stats.data
        out[f"near{i}"] = p.near
    return out
