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

`PendingPass` collects a pass's tensors from `torchhealth.watch`'s hooks and
reads them in batches into a `PassStats`.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ._ops import SUPPORTED_DTYPES, native_batch, tensor_stats
from .report import Finding, Row, rows_from_stats
from .stats import BINS_PER_SIGN, COLS, EXP_MIN, SATURATED, TensorStats

EPS_EXP = -10
EPS = math.ldexp(1.0, EPS_EXP)
SIGMOID, TANH, PROB, RELU, OTHER = "sigmoid", "tanh", "prob", "relu", "other"
KINDS = {torch.nn.Sigmoid: SIGMOID, torch.nn.Tanh: TANH, torch.nn.Softmax: PROB, torch.nn.Softmin: PROB,
         torch.nn.ReLU: RELU, torch.nn.ReLU6: RELU}
CHECKS = ("saturation", "range", "dead_units")
BOUNDED = frozenset((SIGMOID, TANH))  # kinds with asymptotes, read with saturation=1 - EPS


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


# Bytes of held tensors after which the next distinct tensor starts a batched read
# before the pass ends: holding every output gradient of a backward pass until it
# ends would keep memory alive that the autograd engine otherwise frees and reuses
# at once (on a GPU, up to the activations' size again); a read per this many bytes
# bounds that. On a GPU, large enough that a small model's pass is still one call
# (and a large model's a few per GPU-sized activation), small next to a training
# step's memory. On the CPU, smaller: what watch holds there is memory that malloc
# hands back to the kernel and faults in again on the next step; and smaller batches
# are read while still in cache, but each read has a fixed cost of its own (the
# call from Python, run between the model's operations with the caches cold). No
# budget measured from 1 to 64 MiB did better than 8 (benchmarks/RESULTS.md, issue 9).
READ_BYTES = 64 << 20
READ_BYTES_CPU = 8 << 20
NATIVE_BATCH = native_batch()  # _C.Batch, or None (the reference backend): Batch


class Batch:
    """A pass's tensors awaiting a batched read, and the rows read so far: the
    Python reference of ``_C.Batch`` (csrc/python_call.cpp), which `PendingPass`
    uses when the extension is built (the same rows and reads: tests/test_watch_reads.py;
    its weak reference is to the tensor's TensorImpl, which autograd may keep alive
    after the Python object is gone, so it may find a repeat that this one reads
    again, with the same row).

    ``add(name, kind, tensor)`` only holds the tensor until the batch holds
    ``budget_cpu`` bytes (``budget`` off the CPU); ``flush()`` reads what it holds.
    Each distinct tensor is read once: a row whose tensor is an earlier one of the
    same batch (a container returning its child's output, a gradient that reaches
    several outputs through a residual sum) repeats that tensor's row, and a full
    batch is read only when a tensor that repeats none of it arrives, so such a
    repeat, which comes right after its original, still finds it. A repeat of a
    tensor read in an earlier batch of the pass (a model's output returning its
    head's logits after the loss) repeats that row too, if the tensor is still
    alive (a weak reference: nothing is held) and unchanged since (its version
    counter; one changed in place is read again, as it would have been). Outputs of
    ``bounded_kinds`` (sigmoid/tanh) go in a call of their own with the
    ``saturation`` threshold and a histogram, so that the one read also counts
    their values near an asymptote. Tensors of other dtypes (integers) give no
    row. ``read(tensors, histogram, saturation)`` gives a batch's rows; ``calls``
    the number of tensors of each read."""

    def __init__(self, histogram: bool, budget_cpu: int, budget: int, bounded_kinds: frozenset,
                 saturation: float, read):
        self.histogram, self.budget_cpu, self.budget = histogram, budget_cpu, budget
        self.bounded_kinds, self.saturation, self.read = bounded_kinds, saturation, read
        self.items: list = []  # (name, kind, tensor) not read yet
        self.bytes = 0
        self.full = False
        self.names: list[str] = []
        self.kinds: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[torch.dtype] = []
        self.rows: list[int] = []  # per row: its tensor's row in the statistics read
        self.parts: list[tuple[torch.Tensor, bool]] = []  # each read's rows, and whether of bounded kinds
        self.calls: list[int] = []
        self.read_rows = 0
        # per tensor read in an earlier batch, by _key: (weak reference, version, row, bounded)
        self.earlier: dict[tuple, tuple] = {}

    def add(self, name: str, kind: str, t: torch.Tensor) -> None:
        if self.full:
            key = _key(t)
            if not any(t is u or key == _key(u) for _, _, u in self.items):
                self.flush()
        self.items.append((name, kind, t))
        self.bytes += t.numel() * t.element_size()
        self.full = self.bytes >= (self.budget_cpu if t.is_cpu else self.budget)

    def flush(self) -> None:
        slot: dict = {}
        unique: list[torch.Tensor] = []
        keys: list[tuple] = []
        bounded: list[bool] = []
        index = []  # per row: its tensor's index in unique, or -1 - row for one read earlier
        for name, kind, t in self.items:
            if t.dtype not in SUPPORTED_DTYPES:
                continue
            # Every tensor of the batch is still held, so equal keys mean the same elements.
            key, asymptote = _key(t), kind in self.bounded_kinds
            i = slot.setdefault(key, len(unique))
            if i == len(unique):
                seen = self.earlier.get(key)
                if (seen is not None and (old := seen[0]()) is not None and _key(old) == key
                        and t._version == seen[1] and (seen[3] or not asymptote)):
                    del slot[key]
                    i = -1 - seen[2]
                else:
                    unique.append(t)
                    keys.append(key)
                    bounded.append(False)
            if i >= 0:
                bounded[i] = bounded[i] or asymptote
            index.append(i)
            self.names.append(name)
            self.kinds.append(kind)
            self.shapes.append(tuple(t.shape))
            self.dtypes.append(t.dtype)
        self.items, self.bytes, self.full = [], 0, False
        plain = [i for i, b in enumerate(bounded) if not b]
        sat = [i for i, b in enumerate(bounded) if b]
        position = [0] * len(unique)
        for p, i in enumerate(plain + sat):
            position[i] = self.read_rows + p
            self.earlier[keys[i]] = (weakref.ref(unique[i]), unique[i]._version, position[i], bounded[i])
        self.rows += [position[i] if i >= 0 else -1 - i for i in index]
        self.read_rows += len(unique)
        for which, is_bounded in ((plain, False), (sat, True)):
            if which:
                self.calls.append(len(which))
                self.parts.append((self.read([unique[i] for i in which], self.histogram or is_bounded,
                                             self.saturation if is_bounded else None), is_bounded))

    def result(self) -> tuple:
        """(names, kinds, shapes, dtypes, rows, parts) of every row so far."""
        return self.names, self.kinds, self.shapes, self.dtypes, self.rows, self.parts


def read(tensors: list[torch.Tensor], histogram: bool, saturation: float | None) -> torch.Tensor:
    """The rows of one batch (`tensor_stats`): a `Batch`'s reads, and those of
    ``_C.Batch`` that are not of plain tensors (a tensor subclass, such as a
    DTensor) or that the op refuses (this names the tensor)."""
    return tensor_stats(tensors, histogram=histogram, saturation=saturation).data


class PendingPass:
    """A pass's rows: a `Batch` (``_C.Batch`` when the extension is built) that
    the hooks feed through ``add``, and at the pass's end the `PassStats` of its
    rows. The hooks only add (they run between the model's own ops, with the
    interpreter's caches cold, so each Python operation there costs many times
    what it does in a loop); the batch does the rest."""

    def __init__(self, step: int, histogram: bool):
        self.step, self.histogram = step, histogram
        self.batch = (NATIVE_BATCH or Batch)(histogram, READ_BYTES_CPU, READ_BYTES, BOUNDED, 1 - EPS, read)
        self.add, self.flush = self.batch.add, self.batch.flush

    def finish(self, name: str) -> PassStats | None:
        """The pass's rows, in order, or None if it held no tensor."""
        self.flush()
        modules, kinds, shapes, dtypes, rows, parts = self.batch.result()
        if not rows:
            return None
        stats, high, tiny = zip(*(self._part(TensorStats(data), bounded) for data, bounded in parts))
        rows = torch.tensor(rows, device=stats[0].device)
        all_stats = stats[0] if len(stats) == 1 else TensorStats.cat(list(stats))
        if all(h is None for h in high):  # no sigmoid/tanh output in the pass: nothing is near
            near = rows.new_zeros(len(rows))
        else:
            def cat(counts):
                return torch.cat([c if c is not None else s.numel.new_zeros(len(s))
                                  for s, c in zip(stats, counts)])[rows]

            near = near_counts(kinds, cat(high), cat(tiny))
        return PassStats(self.step, name, list(modules), list(kinds), list(shapes), list(dtypes),
                         all_stats[rows], near)

    def _part(self, stats: TensorStats, bounded: bool) -> tuple:
        """(rows as a call with the default saturation gives them, values with
        |x| >= 1 - EPS, values within EPS of 0) of one read; for a read with no
        sigmoid/tanh outputs, None for the counts (zeros, made only if needed)."""
        if not bounded:
            return stats, None, None
        return bounded_rows(stats, self.histogram), stats.saturated, tiny_counts(stats)


def _key(t: torch.Tensor) -> tuple:
    """What makes two held tensors the same elements; a tensor that is not
    strided (sparse, which the read refuses, naming it) is only itself."""
    if t.layout != torch.strided:
        return (id(t),)
    return t.data_ptr(), t.dtype, t.shape, t.stride(), t.device


def flagged(p: PassStats, data: torch.Tensor, near: torch.Tensor, max_saturated_fraction: float,
            max_dead_fraction: float) -> dict[str, torch.Tensor]:
    """Per row of pass `p`, from its host copy (``data``, ``near``): which rows
    hold NaN/Inf (``"nonfinite"``) and, in a forward pass, which trip each check
    of `CHECKS`. Whole columns at once: a healthy step decides that nothing fired
    without making a `Row` per activation."""
    s = TensorStats(data)
    out = {"nonfinite": s.nonfinite > 0}
    if p.name != "forward":
        return out
    finite = s.finite.clamp(min=1).double()

    def kind(*kinds: str) -> torch.Tensor:
        return torch.tensor([k in kinds for k in p.kinds], dtype=torch.bool)

    out["saturation"] = kind(SIGMOID, TANH) & (near.double() / finite > max_saturated_fraction)
    out["range"] = kind(PROB, SIGMOID) & (s.finite > 0) & ((s.min < 0) | (s.max > 1))
    out["dead_units"] = kind(RELU) & (s.zero.double() / finite > max_dead_fraction)
    return out


def any_finding(passes: list[tuple[PassStats, torch.Tensor, torch.Tensor]],
                max_saturated_fraction: float, max_dead_fraction: float) -> bool:
    """Whether `activation_findings` of the same passes would find anything. A
    monitor asks it on every step: a pass with no NaN/Inf and no module of a
    checked kind costs its NaN/Inf count alone."""
    for p, data, near in passes:
        if bool(TensorStats(data).nonfinite.any()):
            return True
        if p.name == "forward" and any(k != OTHER for k in p.kinds):
            flags = flagged(p, data, near, max_saturated_fraction, max_dead_fraction)
            if any(bool(flags[c].any()) for c in CHECKS):
                return True
    return False


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
        flags = {k: m.tolist() for k, m in
                 flagged(p, data, near, max_saturated_fraction, max_dead_fraction).items()}
        bad = [r for r, f in zip(prows, flags["nonfinite"]) if f]
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
        for i, (r, kind, n) in enumerate(zip(prows, p.kinds, near.tolist())):
            finite = max(r.numel - r.nonfinite, 1)
            if flags["saturation"][i]:
                findings.append(Finding("saturation", "warning",
                                        f"{r.name} ({kind}): {100 * n / finite:.1f}% of outputs within "
                                        f"2^{EPS_EXP} of an asymptote (their gradients vanish)",
                                        [r.name], n / finite, max_saturated_fraction))
            if flags["range"][i]:
                findings.append(Finding("range", "error",
                                        f"{r.name} ({kind}): probabilities outside [0, 1] "
                                        f"(min {r.min:.4g}, max {r.max:.4g})", [r.name]))
            if flags["dead_units"][i]:
                findings.append(Finding("dead_units", "warning",
                                        f"{r.name}: {100 * r.zero / finite:.1f}% of outputs are exactly "
                                        f"zero (units that pass no gradient)",
                                        [r.name], r.zero / finite, max_dead_fraction))
    return rows, findings, origin


def host_passes(passes: list[PassStats], copy) -> list[tuple[PassStats, torch.Tensor, torch.Tensor]]:
    """Each pass with its rows and near counts from ``copy`` (a `HostCopy` of
    `pass_fields`), as `activation_findings` and `any_finding` take them."""
    return [(p, copy.tensor(f"act{i}"), copy.tensor(f"near{i}")) for i, p in enumerate(passes)]


def pass_fields(passes: list[PassStats]) -> dict[str, torch.Tensor]:
    """The host-copy fields of a step's passes (names ``act{i}``/``near{i}``):
    the rows, with their histograms on the steps that measured them."""
    out = {}
    for i, p in enumerate(passes):
        out[f"act{i}"] = p.stats.data
        out[f"near{i}"] = p.near
    return out
