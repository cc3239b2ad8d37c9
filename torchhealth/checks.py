"""Health checks: pure functions from `TensorStats` (+ small running state) to
`Signal`s, computed on the statistics' device without synchronising. Their
data types are in `torchhealth.check_types`. (Over 300 lines: this docstring
documents every default and the reason for its value.)

Written here once, in PyTorch ops (`reference_checks`, which every device
runs); on the CPU, `run_checks` makes one call of the extension's op instead
(csrc/cpu/checks_cpu.cpp, the same arithmetic as loops over the rows, tested
bit for bit against this reference), since there each of the ~170 small ops
costs microseconds whatever the number of rows.

A `Signal` is a check that may have fired: a 0-d bool ``fired``, a bool mask of
the tensors (or parameters) that triggered it, the measured value and its
threshold, all still on the device. `finding` turns one into a host-side
`Finding` once a `Report` has been built.

Checks and their defaults (every threshold lives in `Thresholds`), each with
the reason for its value:

========== =========================================================== ========
check      fires when                                                  severity
========== =========================================================== ========
nonfinite  a gradient, parameter or (opt-in) optimizer state tensor     error
           holds NaN or +-Inf
exploding  total gradient norm > ``max_norm`` (1e4); one parameter's    error
           gradient norm > ``max_param_norm`` (1e4); total norm above
           ``spike_factor`` (10x) the running baseline and more than
           ``spike_zscore`` (4) deviations above it (after ``warmup``
           (10) checks)
vanishing  total gradient norm < ``min_norm`` (1e-8); a parameter whose warning
           gradient RMS is below `relative_rms_limit` x the largest
           gradient RMS; a parameter whose gradient is more than
           ``max_zero_fraction`` (99%) zeros and subnormals (embedding
           tables and sparse gradients exempt: they are mostly zero by
           design)
  (info)   a gradient zero by construction (`structural`): recorded      info
           once, then left out of the vanishing and dead checks
headroom   a float16/bfloat16/float8 tensor with                       warning
           ``|x| >= headroom * dtype max`` (0.5: one bit from overflow;
           448 for float8_e4m3fn); such a parameter
           growing toward the maximum fast enough to reach it within
           ``overflow_horizon`` (20) checks at its last rate; or more than
           ``max_subnormal_fraction`` (1%) of its nonzero values subnormal
           with a norm below sqrt(subnormals) x the smallest normal
dead       a trainable parameter whose gradient was None or all zero   warning
           for ``dead_after`` (3) consecutive checks
  (info)   a trainable parameter with no gradient (None) in its first    info
           ``dead_after`` checks while others had one (`unreached`):
           recorded once, left out of the dead check until it gets one
========== =========================================================== ========

Why these values:

- ``max_norm``/``max_param_norm`` 1e4: healthy gradient norms of models from
  thousands to billions of parameters sit around 1e-2..1e2 (the loss is O(1)
  and per-element gradients shrink as models grow); 1e4 is two orders above
  the top of that range.
- ``spike_factor`` 10 and ``spike_zscore`` 4 together: a factor alone fires on
  noisy small-batch runs, a z-score alone on very steady ones; ``warmup`` 10
  checks gives the log-norm mean and variance something to stand on.
- ``min_norm`` 1e-8: an SGD step that small moves nothing (lr 1e-3 times
  1e-8 is below half a float32 ulp of a weight of size 1e-3).
- ``min_relative_rms`` 1e-6 for up to ``relative_rms_tensors`` (100) gradient
  tensors, then divided by sqrt(tensors / 100) (`relative_rms_limit`): the
  smallest healthy relative RMS shrinks as models grow (measured at init: tiny
  GPT-2, 3e-3 at 28 tensors and 6e-4 at 292; tiny BERT about 1e-5 at every
  depth, from its query biases), so a fixed ratio would cry wolf on big models.
  The same ratio holds for float32, bfloat16 and float16 gradients: all three
  represent 1e-6 of a typical gradient (bfloat16 and float32 share an exponent
  range; float16 values that small are subnormal, which the headroom check
  reports).
- ``max_zero_fraction`` 0.99: ReLU networks legitimately zero most of a
  layer's gradient, not all of it.
- ``headroom`` 0.5 (one bit from overflow) and ``max_subnormal_fraction`` 1%:
  the point where float16/bfloat16 values start to lose range or precision;
  the underflow part also asks that the subnormals' lost precision reach
  ordinary rounding's (see `headroom`): without that, a healthy float16
  gradient, whose smallest few percent of values are always subnormal,
  warned on every step.
- ``overflow_horizon`` 20 (checks): a float16 drift pushed by a too-large
  update (the demo's ``fp16``) crosses half the maximum only a few steps
  before it overflows; extrapolating its growth warns about ten steps
  earlier, when the values pass 1/64 of the maximum (1024 in float16, the
  least a parameter must reach to be watched: healthy weights are far below
  it), while a healthy parameter's largest value does not grow by 5% of the
  dtype's range per step.
- ``dead_after`` 3: one all-zero gradient can be a batch that missed a
  branch; three in a row is a pattern.
- ``structural_rms`` 1e-2: see `structural`; the rounding bound of a
  gradient the module structure explains. A gradient that cancels exactly in
  real arithmetic keeps a residue of about eps x its module's gradient scale:
  measured 1e-7..1e-5 in float32, 1e-3..3e-3 under bfloat16/float16 autocast
  (whose parameters and gradients are float32 but whose sums are not), while a
  real bias gradient is 0.1..10x its weight's. Without a structural reason
  the bound is ``sqrt(eps)`` of the gradient's dtype (3e-4 for float32), at
  most ``structural_rms``.

Gradients zero by construction (`structural`): a bias that a per-channel norm
(BatchNorm, InstanceNorm, GroupNorm with one channel per group) cancels, an
attention key bias (softmax ignores the constant it adds to each query's
scores), and a parameter the loss reaches only through an operation that
cancels it (a gradient nonzero but at rounding level next to its module's). The
module structure proposes (`torchhealth.collect.structural_facts`), the
statistics confirm; the statistics alone recognise only the rounding-level
case.

Parameters the loss does not reach (`unreached`): a gradient that has been
None at every check from the first on, while other parameters had one (a
branch this configuration does not take, a head this loss does not use, an
expert never routed to), is recorded once as info after ``dead_after`` checks
and left out of the dead check; once it gets a gradient it is checked like any
other, so a layer that stops learning later (detached by mistake, a dead
ReLU) is the dead check's. An all-zero gradient is not None: with
``zero_grad(set_to_none=False)`` an unused parameter keeps zeros and the
dead check fires (statistics cannot tell it from a cut path); freeze it
(``requires_grad_(False)``) to say it is meant.

One cause, one finding: non-finite gradient values give no exploding finding
(the total norm and the spike test are left out on such a step, and the
baseline does not learn from it; rows holding NaN/Inf are left out of the
per-parameter norm limit and from the headroom check, which warns before an
overflow, not after it); an exploding total norm or spike gives no relative
vanishing finding on the same step (everything is small next to it). The
Report marks its first warning or error, in this order, as ``primary``.

Norms are over finite values only (see `TensorStats.l2norm`); non-finite values
are the nonfinite check's business.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import _ops
from .report import Finding, Row
from .stats import TensorStats

from .check_types import (CHECKS, INFO_KINDS, LEARNS, SEVERITY, STRUCTURAL, UNDECIDED, UNREACHED, Layout,  # noqa: F401
                          RunningState, Signal, SignalList, Thresholds, stacked)



# -- the checks ---------------------------------------------------------------------
# Every small op costs microseconds on the CPU, whatever the number of rows, and
# the checks run on every step: row quantities that several checks read are
# made once per `TensorStats` (`TensorStats.derived`), constants once per
# `Layout` (`Layout.masks`), and a check that cannot fire for a layout returns
# constant signals.
def _signal(check, kind, mask, value, threshold, axis="rows") -> Signal:
    value = value if value.dtype == torch.float64 else value.double()
    return Signal(check, kind, mask.any(), mask, value, float(threshold), axis)


def _never(check, kind, m: dict, value: str, threshold, axis="rows") -> Signal:
    """A signal that cannot fire for this layout (constant tensors, never
    changed in place); ``value`` names the constant it reports."""
    return Signal(check, kind, m["false"], m["no_rows"], m[value], float(threshold), axis)


# _no_row_sqrt: per-row norms are compared as squares (sumsq against limit**2)
# and only 0-d results take a sqrt/log/exp. On the CPU a transcendental op over
# a multi-element float64 tensor may enter the thread pool, whose wake-up costs
# far more than these few values on a loaded machine (benchmarks/RESULTS.md);
# elementwise comparisons and reductions stay inline.


def _masked_max(x: torch.Tensor, mask: torch.Tensor, m: dict) -> torch.Tensor:
    """The largest float64 ``x`` where ``mask`` (-inf for none)."""
    return torch.where(mask, x, m["ninf"]).amax() if x.numel() else m["ninf"]


def _ok(stats: TensorStats) -> torch.Tensor:
    """Rows without NaN or Inf."""
    return stats.derived("ok", lambda s: s.nonfinite == 0)


def _grads(stats: TensorStats, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient rows without NaN/Inf, and gradient rows with some."""
    grad = layout.masks(stats.device)["grad"]
    return (stats.derived(("grad_ok", id(layout)), lambda s: grad & _ok(s)),
            stats.derived(("grad_bad", id(layout)), lambda s: grad & ~_ok(s)))


def _mean_square(stats: TensorStats) -> torch.Tensor:
    """Mean square of each row's finite values (0 for none), float64."""
    return stats.derived("ms", lambda s: s.sumsq / s.finite.clamp(min=1).double())


def _grad_sumsq(stats: TensorStats, layout: Layout) -> torch.Tensor:
    """Each row's sum of squares of finite values if it is a gradient, else 0."""
    m = layout.masks(stats.device)
    return stats.derived(("grad_sumsq", id(layout)), lambda s: torch.where(m["grad"], s.sumsq, m["zero"]))


def _per_param(rows: torch.Tensor, m: dict, none: str) -> torch.Tensor:
    """Per parameter: its gradient row's value of the bool ``rows``, or the
    constant ``m[none]`` (``"false1"``/``"true1"``) if it has no gradient."""
    return torch.cat([rows, m[none]]).index_select(0, m["param_grad"])


def total_grad_norm(stats: TensorStats, layout: Layout) -> torch.Tensor:
    """L2 norm over every finite gradient value (float64, 0-d)."""
    return _grad_sumsq(stats, layout).sum().sqrt()


def nonfinite(stats: TensorStats, layout: Layout, found_inf: torch.Tensor | None = None) -> list[Signal]:
    """NaN or +-Inf in gradients, parameters and optimizer state. Non-finite
    gradients are not a model fault when a GradScaler already found them
    (``found_inf`` > 0): loss scaling overflowed and the scaler skips the step."""
    m = layout.masks(stats.device)
    bad = ~_ok(stats)
    grad_bad = _grads(stats, layout)[1]
    if found_inf is not None:
        grad_bad = grad_bad & ~(found_inf > 0)
    count = stats.nonfinite.double()
    kinds = [("grad", grad_bad), ("param", bad & m["param"])] + \
        ([("state", bad & m["state"])] if layout.has_state else [])
    signals = [_signal("nonfinite", kind, mask, torch.where(mask, count, m["zero"]).sum(), 0)
               for kind, mask in kinds]
    return signals if layout.has_state else signals + [_never("nonfinite", "state", m, "zero", 0)]


def exploding(stats: TensorStats, layout: Layout, th: Thresholds, state: RunningState,
              found_inf: torch.Tensor | None = None,
              total: torch.Tensor | None = None) -> tuple[list[Signal], RunningState]:
    """Absolute limits on the total and per-parameter gradient norms, and
    spikes of the total norm against the running baseline. The baseline learns
    only from finite, non-spiking norms of steps the scaler did not skip."""
    m = layout.masks(stats.device)
    total = total_grad_norm(stats, layout) if total is None else total
    grad_ok, grad_bad = _grads(stats, layout)
    # A norm over the finite part of a gradient that also holds Inf/NaN says
    # nothing the nonfinite check has not said: no finding from those values.
    clean = ~grad_bad.any()
    big = grad_ok & (stats.sumsq > th.max_param_norm ** 2)  # see _no_row_sqrt
    x = total.log()
    d = x - state.mean
    warm = state.count >= th.warmup
    margin = (state.var.clamp(min=0).sqrt() * th.spike_zscore).clamp(min=math.log(th.spike_factor))
    spike = warm & clean & (d > margin)
    ratio = torch.where(warm, d.exp(), m["zero"])
    learn = (x.abs() < m["inf"]) & clean & ~spike  # x finite (NaN compares False)
    if found_inf is not None:
        learn = learn & ~(found_inf > 0)
    count = state.count + learn
    # Exact running mean while warming up, then an EMA: early steps do not
    # leave a zero-initialised baseline behind.
    alpha = (1.0 / count.clamp(min=1).double()).clamp(min=1.0 - th.spike_decay)
    delta = torch.where(learn, d, m["zero"])
    mean = state.mean + alpha * delta  # unchanged when not learning (delta = 0)
    var = torch.where(learn, (1 - alpha) * (state.var + alpha * delta * delta), state.var)
    signals = [
        _signal("exploding", "total", (clean & (total > th.max_norm))[None], total, th.max_norm),
        _signal("exploding", "param", big,
                (_grad_sumsq(stats, layout).amax() if len(layout) else m["zero"]).sqrt(), th.max_param_norm),
        Signal("exploding", "spike", spike, spike[None], ratio, th.spike_factor),
    ]
    return signals, dataclasses.replace(state, count=count, mean=mean, var=var)


def relative_rms_limit(layout: Layout, th: Thresholds) -> float:
    """The relative-RMS limit of the vanishing check for this model:
    ``min_relative_rms`` up to ``relative_rms_tensors`` gradient tensors, then
    lower by the square root of how many more there are. The gradient RMS of
    healthy layers spreads wider as a model grows (more depth, more kinds of
    tensor), and the largest of many RMS values sits further out."""
    return th.min_relative_rms * min(1.0, math.sqrt(th.relative_rms_tensors / max(layout.num_grads, 1)))


def vanishing(stats: TensorStats, layout: Layout, th: Thresholds,
              total: torch.Tensor | None = None, exclude: torch.Tensor | None = None,
              exploded: torch.Tensor | None = None) -> list[Signal]:
    """A tiny total gradient norm, a parameter whose gradient RMS is tiny next
    to the largest one (below `relative_rms_limit`), or a gradient that is
    nearly all zeros/subnormals. ``exclude``: rows whose gradient is zero by
    construction (`structural`); ``exploded``: the total norm exploded on this
    step, so every other gradient is small next to it: no relative finding."""
    m = layout.masks(stats.device)
    g, grad_bad = _grads(stats, layout)  # non-finite gradients are another check's
    if exclude is not None:
        g = g & ~exclude
    total = total_grad_norm(stats, layout) if total is None else total
    any_grad = g.any() & ~grad_bad.any()
    # Mean squares against the squared limit: the same test as on RMS values,
    # without a sqrt over every row (see `_no_row_sqrt`).
    ms = _mean_square(stats)
    top = _masked_max(ms, g, m)
    rel2 = ms / top.clamp(min=torch.finfo(torch.float64).tiny)
    limit = relative_rms_limit(layout, th)
    small = g & (rel2 < limit ** 2) & (top > 0)
    if exploded is not None:
        small = small & ~exploded
    frac = (stats.zero + stats.subnormal).double() / stats.numel.clamp(min=1).double()
    sparse = g & m["dense"] & (frac > th.max_zero_fraction)  # frac > 0: numel > 0
    low = any_grad & (total < th.min_norm)
    return [
        _signal("vanishing", "total", low[None], total, th.min_norm),
        _signal("vanishing", "relative", small,
                torch.where(small, rel2, m["inf"]).amin().sqrt() if len(layout)
                else m["inf"],
                limit),
        _signal("vanishing", "zeros", sparse, _masked_max(frac, sparse, m), th.max_zero_fraction),
    ]


def structural(stats: TensorStats, layout: Layout, th: Thresholds,
               state: RunningState) -> tuple[list[Signal], torch.Tensor, RunningState]:
    """Gradients that are zero by construction: an info signal naming the
    parameters newly recognised, the rows to exclude from the vanishing check
    (and, through the state, parameters to exclude from the dead check), and
    the new state.

    A parameter is recognised at the first check that sees its gradient, when
    that gradient is zero up to rounding next to its module's largest gradient
    (the weight beside a bias: both come from the same output gradient, so a
    bias gradient far below its weight's is a sum that cancels, not a small
    signal): an RMS ratio at most ``structural_rms`` (1e-2) when the module
    structure says why (``Layout.structural``: exact zeros included), else
    nonzero and at most ``min(sqrt(eps), structural_rms)`` of its dtype. It
    stays recognised while its gradient stays that small; once it is not, it
    is checked like any other parameter from then on. A gradient that is
    exactly zero without a structural reason is not recognised: a cut path (a
    dead ReLU, an output nobody uses) is the dead and vanishing checks' fault."""
    m = layout.masks(stats.device)
    g = _grads(stats, layout)[0]
    ms = torch.where(g, _mean_square(stats), m["zero"])
    ref = ms.new_zeros(layout.num_modules).scatter_reduce(0, m["module"], ms, "amax").index_select(
        0, m["module"])
    # Squared bounds (see _no_row_sqrt): structural_rms**2, or min(eps, structural_rms**2).
    bound2 = torch.where(m["candidate"], th.structural_rms ** 2, m["eps"].clamp(max=th.structural_rms ** 2))
    quiet_rows = g & (ref > 0) & (ms <= bound2 * ref) & (m["candidate"] | (ms > 0))
    quiet = _per_param(quiet_rows, m, "false1")
    seen = _per_param(g, m, "false1")
    old = state.structural
    was = old == STRUCTURAL
    first = ((old == UNDECIDED) | (old == UNREACHED)) & seen & m["trainable"]
    keep = was & (quiet | ~seen)
    status = torch.where(first | was, torch.where((first & quiet) | keep, STRUCTURAL, LEARNS), old)
    newly = first & quiet
    ratio2 = torch.where(quiet_rows, ms / ref.clamp(min=torch.finfo(torch.float64).tiny), m["zero"])
    value = (ratio2.amax() if ratio2.numel() else ratio2.new_zeros(())).sqrt()
    info = Signal("vanishing", "structural", m["false"], newly, value, th.structural_rms, axis="params")
    excluded = (status == STRUCTURAL).index_select(0, m["row_param"]) & m["grad"]
    return [info], excluded, dataclasses.replace(state, structural=status)


def headroom(stats: TensorStats, layout: Layout, th: Thresholds,
             state: RunningState) -> tuple[list[Signal], RunningState]:
    """Low-precision tensors (float16, bfloat16, float8) close to overflow (|x| within a factor
    1/headroom of the dtype's maximum), parameters on course to reach it
    (`overflow_horizon`), or tensors losing values to subnormals: more
    than ``max_subnormal_fraction`` of the nonzero values, and enough of them
    that their lost precision counts. A subnormal value is off by up to half
    the smallest subnormal (``tiny * eps / 2``), ordinary rounding loses
    ``eps / 2`` of the tensor's norm, so subnormals matter only once
    ``sqrt(subnormal) * tiny`` reaches the norm: a healthy float16 gradient
    whose smallest few percent of values are subnormal loses nothing
    measurable.

    On course to overflow: a parameter whose largest magnitude, already at
    least ``2**-6`` of the dtype's maximum (1024 in float16), grew since the
    last check fast enough to reach the maximum within ``overflow_horizon``
    checks at that rate (a linear extrapolation: weights pushed by a constant
    too-large update, the usual float16 drift, grow about linearly)."""
    m = layout.masks(stats.device)
    if not layout.has_lowp:  # peaks are of low-precision parameters only
        return [_never("headroom", "overflow", m, "ninf", th.headroom),
                _never("headroom", "course", m, "inf", th.overflow_horizon),
                _never("headroom", "underflow", m, "ninf", th.max_subnormal_fraction)], \
            dataclasses.replace(state, peak=torch.zeros_like(state.peak))
    lowp = m["lowp"]
    use = stats.absmax / m["dtype_max"]
    finite = _ok(stats)
    near = lowp & (use >= th.headroom) & finite  # overflowed: nonfinite's finding
    nonzero = (stats.finite - stats.zero).clamp(min=1).double()
    sub = stats.subnormal.double() / nonzero
    lost = stats.sumsq < stats.subnormal.double() * m["tiny"] * m["tiny"]  # see _no_row_sqrt
    under = lowp & (sub > th.max_subnormal_fraction) & lost
    prev = state.peak.index_select(0, m["row_param"])
    growth = use - prev
    left = torch.where(growth > 0, (1 - use) / growth.clamp(min=torch.finfo(torch.float64).tiny), m["inf"])
    course = lowp & m["param"] & finite & ~near & (prev > 0) & (use >= 2.0 ** -6) & (left <= th.overflow_horizon)
    rows = m["param_rows"]
    seen = torch.where(lowp & finite, use, m["zero"]).index_select(0, rows)
    peak = state.peak.index_put((m["row_param"].index_select(0, rows),), seen)
    soonest = torch.where(course, left, m["inf"])
    soonest = soonest.amin() if soonest.numel() else m["inf"]
    return [_signal("headroom", "overflow", near, _masked_max(use, lowp, m), th.headroom),
            _signal("headroom", "course", course, soonest, th.overflow_horizon),
            _signal("headroom", "underflow", under, _masked_max(sub, lowp, m), th.max_subnormal_fraction)], \
        dataclasses.replace(state, peak=peak)


def dead(stats: TensorStats, layout: Layout, th: Thresholds,
         state: RunningState) -> tuple[list[Signal], RunningState]:
    """Trainable parameters whose gradient was None or exactly zero (every
    element +-0) for ``dead_after`` consecutive checks, and an info signal
    naming the parameters newly found unreached (`UNREACHED`: None at every
    check so far while others had a gradient). Parameters whose gradient is
    zero by construction (`structural`) or that are unreached are not counted."""
    m = layout.masks(stats.device)
    missing = m["missing"]  # trainable, no gradient
    now = _per_param(stats.zero == stats.numel, m, "true1")  # None or all zero
    counts = torch.where(now & m["trainable"], state.dead + 1, 0)
    newly = (state.structural == UNDECIDED) & missing & (counts >= th.dead_after) & m["others_learn"]
    status = torch.where(newly, UNREACHED, state.structural)
    counts = torch.where((status == STRUCTURAL) | (status == UNREACHED), 0, counts)
    mask = counts >= th.dead_after
    value = counts.amax().double() if counts.numel() else counts.new_zeros((), dtype=torch.float64)
    info = Signal("dead", "unreached", m["false"], newly,
                  counts.new_full((), float(th.dead_after), dtype=torch.float64), th.dead_after, axis="params")
    signal = _signal("dead", "dead", mask, value, th.dead_after, axis="params")
    return [signal, info], dataclasses.replace(state, dead=counts, structural=status)


def run_checks(stats: TensorStats, layout: Layout, th: Thresholds, state: RunningState,
               found_inf: torch.Tensor | None = None,
               total: torch.Tensor | None = None) -> tuple[list[Signal], RunningState]:
    """Every check, in `CHECKS` order (the structural info signal after the
    vanishing ones); the new running state. ``total``: the total gradient
    norm if the caller already has it (`total_grad_norm`); the checks' own is
    `grad_norm_of` their signals.

    On the CPU with the extension built, one call of the op
    ``torchhealth::run_checks`` (csrc/cpu/checks_cpu.cpp); elsewhere, under
    `torch.compile` (which traces the PyTorch ops), and as the op's test
    oracle, `reference_checks`."""
    if stats.device.type == "cpu" and _ops.native_checks() and not torch.compiler.is_compiling():
        return _native_checks(stats, layout, th, state, found_inf, total)
    return reference_checks(stats, layout, th, state, found_inf, total)


# (check, kind, axis) of every signal, in `run_checks` order.
_SIGNALS = (("nonfinite", "grad", "rows"), ("nonfinite", "param", "rows"), ("nonfinite", "state", "rows"),
            ("exploding", "total", "rows"), ("exploding", "param", "rows"), ("exploding", "spike", "rows"),
            ("vanishing", "total", "rows"), ("vanishing", "relative", "rows"), ("vanishing", "zeros", "rows"),
            ("vanishing", "structural", "params"), ("headroom", "overflow", "rows"),
            ("headroom", "course", "rows"), ("headroom", "underflow", "rows"),
            ("dead", "dead", "params"), ("dead", "unreached", "params"))


def grad_norm_of(signals: list[Signal]) -> torch.Tensor:
    """The total gradient norm that made `signals` (`run_checks`'): the value
    of its ("exploding", "total") signal (float64, 0-d)."""
    return stacked(signals)[1][_SIGNALS.index(("exploding", "total", "rows"))]


def _native_checks(stats: TensorStats, layout: Layout, th: Thresholds, state: RunningState,
                   found_inf: torch.Tensor | None, total: torch.Tensor | None) -> tuple[list[Signal], RunningState]:
    m = layout.masks(stats.device)
    constants, ints, meta = _native_arguments(layout, th)
    fired, values, masks, count, mean, var, dead_, structural_, peak = torch.ops.torchhealth.run_checks(
        stats.data, m["row_ints"], m["row_floats"], m["param_ints"], constants, ints, state.count, state.mean,
        state.var, state.dead, state.structural, state.peak, total, found_inf)
    return SignalList.packed(meta, fired, values, masks), dataclasses.replace(
        state, count=count, mean=mean, var=var, dead=dead_, structural=structural_, peak=peak)


def _native_arguments(layout: Layout, th: Thresholds) -> tuple[list[float], list[int], list[tuple]]:
    """The op's float and int constants for `layout` and `th`, and its
    signals' ``SignalList.packed`` metadata; made once, kept with the layout."""
    key = ("run_checks", th)
    cached = layout._device_cache.get(key)
    if cached is None:
        limit = relative_rms_limit(layout, th)
        # Each derived constant as the reference computes it, in csrc/cpu/checks_cpu.cpp's `Th` order.
        constants = [th.max_norm, th.max_param_norm ** 2, th.spike_factor, math.log(th.spike_factor),
                     th.spike_zscore, 1.0 - th.spike_decay, th.min_norm, limit, limit ** 2,
                     th.max_zero_fraction, th.headroom, th.overflow_horizon, th.max_subnormal_fraction,
                     th.structural_rms, th.structural_rms ** 2]
        rows, params = len(layout), len(layout.param_names)
        thresholds = (0, 0, 0, th.max_norm, th.max_param_norm, th.spike_factor, th.min_norm, limit,
                      th.max_zero_fraction, th.structural_rms, th.headroom, th.overflow_horizon,
                      th.max_subnormal_fraction, th.dead_after, th.dead_after)
        meta = [(check, kind, axis, float(t),
                 params if axis == "params" else 1 if kind in ("total", "spike") else rows)
                for (check, kind, axis), t in zip(_SIGNALS, thresholds)]
        cached = layout._device_cache[key] = (constants, [th.warmup, th.dead_after, layout.num_modules], meta)
    return cached


def reference_checks(stats: TensorStats, layout: Layout, th: Thresholds, state: RunningState,
                     found_inf: torch.Tensor | None = None,
                     total: torch.Tensor | None = None) -> tuple[list[Signal], RunningState]:
    """`run_checks` in PyTorch ops: every device's, and the CPU op's reference."""
    total = total_grad_norm(stats, layout) if total is None else total
    if found_inf is not None and found_inf.dim():  # a GradScaler's [1]: the state stays 0-d
        found_inf = found_inf.reshape(())
    signals = nonfinite(stats, layout, found_inf)
    ex, state = exploding(stats, layout, th, state, found_inf, total)
    info, excluded, state = structural(stats, layout, th, state)
    exploded = ex[0].fired | ex[2].fired  # the total norm or its spike
    va = vanishing(stats, layout, th, total, excluded, exploded)
    dd, state = dead(stats, layout, th, state)
    hr, state = headroom(stats, layout, th, state)
    return SignalList(signals + ex + va + info + hr + dd), state


def any_fired(signals: list[Signal], flags: list[bool], check: str, kind: str | None = None) -> bool:
    """Whether a signal of `check` (and `kind`) fired, given the host copies of
    every signal's ``fired`` flag (same order as `signals`)."""
    return any(f for s, f in zip(signals, flags) if s.check == check and kind in (None, s.kind))


# -- host side: a fired Signal as a Finding ---------------------------------------------
_TITLE = {
    ("nonfinite", "grad"): "non-finite gradients",
    ("nonfinite", "param"): "non-finite parameters",
    ("nonfinite", "state"): "non-finite optimizer state",
    ("exploding", "total"): "total gradient norm {value:.4g} above the limit {threshold:.4g}",
    ("exploding", "param"): "gradient norm above {threshold:.4g}",
    ("exploding", "spike"): "gradient norm spiked to {value:.3g}x its running baseline",
    ("vanishing", "total"): "total gradient norm {value:.3g} below {threshold:.3g}",
    ("vanishing", "relative"): "gradient RMS below {threshold:.3g}x the largest one",
    ("vanishing", "zeros"): "more than {pct:.0f}% of gradient values are zero or subnormal",
    ("headroom", "overflow"): "float16/bfloat16/float8 values within {bits:.0f} bit(s) of overflow",
    ("headroom", "course"): "float16/bfloat16/float8 parameters growing toward overflow: at this rate they "
                            "reach the dtype's maximum in {value:.0f} checks",
    ("headroom", "underflow"): "more than {pct:.0f}% of float16/bfloat16/float8 values are subnormal",
    ("dead", "dead"): "no gradient (None or all zero) for {threshold:.0f}+ consecutive checks",
    ("vanishing", "structural"): "gradient zero by construction, not a fault (excluded from the "
                                 "vanishing and dead checks from now on)",
    ("dead", "unreached"): "no gradient in any of the first {threshold:.0f} checks while the rest of the "
                           "model had one: the loss does not reach it in this configuration (not a "
                           "fault if that is meant; left out of the dead check until it gets a gradient)",
}
# Why a gradient the statistics alone found zero up to rounding is zero.
ROUNDING_ONLY = ("zero up to rounding next to the other gradients of its module since the first "
                 "check: the loss does not reach it in this configuration")


def _detail(signal: Signal, row: Row) -> str:
    if signal.check == "nonfinite":
        parts = [f"{n} {k}" for k, n in (("NaN", row.nan), ("+Inf", row.posinf),
                                          ("-Inf", row.neginf)) if n]
        return f"{', '.join(parts)} of {row.numel}"
    if signal.check == "exploding":
        return f"norm {row.l2norm:.4g}"
    if signal.check == "vanishing":
        frac = (row.zero + row.subnormal) / max(row.numel, 1)
        return f"rms {row.rms:.3g}, {100 * frac:.1f}% zero/subnormal"
    if signal.check == "headroom":
        return f"{row.dtype} absmax {row.absmax:.5g}, {row.saturated} saturated, {row.subnormal} subnormal"
    return ""


def finding(signal: Signal, fired: bool, mask: list[bool], value: float, rows: list[Row],
            param_names: list[str], limit: int = 4, notes: list[str] | None = None) -> Finding | None:
    """The host-side `Finding` of a signal whose device values were read into
    ``fired``/``mask``/``value``; ``rows`` are the Report's rows (same order as
    the statistics). None when the signal did not fire (an info signal: when
    its mask is empty). ``notes[j]``: why parameter ``j`` is named
    (`Layout.structural`), for info findings."""
    info = signal.severity == "info"
    if not (fired or (info and any(mask))):
        return None
    t = signal.threshold
    title = _TITLE[(signal.check, signal.kind)].format(
        value=value, threshold=t, pct=100 * t, bits=-math.log2(t) if 0 < t < 1 else 0)
    if signal.axis == "params":
        names = [n for n, hit in zip(param_names, mask) if hit]
        details = names
        if info and signal.kind == "structural":
            notes = notes or [""] * len(param_names)
            details = [f"{n} ({note or ROUNDING_ONLY})"
                       for n, note, hit in zip(param_names, notes, mask) if hit]
    elif signal.kind in ("total", "spike"):
        names, details = [], []
    else:
        hit = [r for r, h in zip(rows, mask) if h]
        names = list(dict.fromkeys(r.name for r in hit))
        details = [f"{r.name} ({r.role}: {_detail(signal, r)})" for r in hit]
    more = f", and {len(details) - limit} more" if len(details) > limit else ""
    message = title + (": " + "; ".join(details[:limit]) + more if details else "")
    return Finding(check=signal.check, severity=signal.severity, message=message, names=names,
                   value=float(value), threshold=t)
