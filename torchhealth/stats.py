"""`TensorStats`: per-tensor health statistics, one row per tensor.

The kernels (C++, CUDA) and the pure-PyTorch reference all return one int64
tensor of shape ``[T, COLS + BINS]`` (``[T, COLS]`` without the histogram), laid
out as in ``csrc/stats.h``: seven counts, five float64 values stored by bit
pattern, then the histogram. `TensorStats` wraps it and gives named fields; it
never copies or synchronises until you read a value on the host.

Semantics of every field:

- ``numel``: number of elements.
- ``nan``, ``posinf``, ``neginf``: non-finite values. Every other field is over
  the finite values only.
- ``zero``: values equal to +0 or -0.
- ``subnormal``: nonzero values whose magnitude is below the smallest normal of
  the tensor's own dtype (2^-6 for float8_e4m3fn, 2^-14 for float8_e5m2 and
  float16, 2^-126 for bfloat16 and float32, 2^-1022 for float64).
- ``saturated``: finite values with ``|x| >= threshold``. The threshold is half
  the dtype's largest finite value (32752 for float16, i.e. within a factor of 2
  of 65504; 224 for float8_e4m3fn, 28672 for float8_e5m2) unless
  ``saturation=`` gives an absolute one. float8_e4m3fn has no infinities: its
  bit patterns 0x7f and 0xff are NaN.
- ``min``, ``max``, ``absmax``: exact, as float64. A zero of either sign is
  reported as +0.0. With no finite value: ``min=+inf``, ``max=-inf``,
  ``absmax=0`` (the identities of `merge`, so rows combine exactly).
- ``sum``, ``sumsq``: accumulated in float64 (0 with no finite value). Bound:
  ``|sum - exact| <= SUM_RTOL * sum(|x|)`` and likewise for ``sumsq``; float64
  inputs may overflow to inf.
- ``hist``: int64 ``[T, BINS]``, an exact histogram of the finite nonzero
  values by sign and binary exponent; see `histogram_bins`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Columns of a row; must match csrc/stats.h (tests/test_backend.py::test_python_layout_matches_the_header checks it).
NUMEL, NAN, POSINF, NEGINF, ZERO, SUBNORMAL, SATURATED = range(7)
NUM_COUNTS = 7
MIN, MAX, ABSMAX, SUM, SUMSQ = range(7, 12)
COLS = 12
EXP_MIN, EXP_MAX = -149, 127
BINS_PER_SIGN = EXP_MAX - EXP_MIN + 3
BINS = 2 * BINS_PER_SIGN
SUM_RTOL = 1e-6


@dataclass(frozen=True)
class HistogramBins:
    """The histogram grid shared by every dtype, as data for tools that draw it.

    Bin ``i`` holds values with sign ``sign[i]`` and ``lo[i] <= |x| < hi[i]``.
    For the regular bins ``lo = 2**exponent`` and ``hi = 2**(exponent + 1)``.
    Per sign the first bin is the underflow bin (``0 < |x| < 2**-149``, exponent
    ``EXP_MIN - 1``) and the last the overflow bin (``|x| >= 2**128``, exponent
    ``EXP_MAX + 1``); only float64 values reach them. Negative bins come first,
    then positive, each in ascending exponent order.
    """

    sign: torch.Tensor  # int64 [BINS], -1 or +1
    exponent: torch.Tensor  # int64 [BINS]
    lo: torch.Tensor  # float64 [BINS], magnitude
    hi: torch.Tensor  # float64 [BINS], magnitude


def histogram_bins() -> HistogramBins:
    """The sign, exponent and magnitude edges of each histogram column."""
    exps = torch.arange(EXP_MIN - 1, EXP_MAX + 2, dtype=torch.int64)
    lo = torch.tensor([0.0] + [math.ldexp(1.0, e) for e in range(EXP_MIN, EXP_MAX + 2)],
                      dtype=torch.float64)
    hi = torch.tensor([math.ldexp(1.0, e) for e in range(EXP_MIN, EXP_MAX + 2)] + [math.inf],
                      dtype=torch.float64)
    sign = torch.cat([torch.full((BINS_PER_SIGN,), -1), torch.full((BINS_PER_SIGN,), 1)])
    return HistogramBins(sign=sign, exponent=exps.repeat(2), lo=lo.repeat(2), hi=hi.repeat(2))


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64).contiguous().view(torch.int64)


class TensorStats:
    """Health statistics of T tensors: one row per tensor, on their device.

    Fields are 1-D tensors of length T (``hist`` is ``[T, BINS]``, or None when
    computed with ``histogram=False``). See the module docstring for exact
    semantics. Nothing here synchronises with the device.
    """

    __slots__ = ("data", "_memo")

    def __init__(self, data: torch.Tensor):
        if data.dtype != torch.int64 or data.dim() != 2 or data.shape[1] not in (COLS, COLS + BINS):
            raise ValueError(f"TensorStats: expected int64 [T, {COLS}] or [T, {COLS + BINS}], "
                             f"got {data.dtype} {list(data.shape)}")
        self.data = data
        # Columns and derived fields, made once: the checks read each several times,
        # and every small op costs microseconds on the CPU (`data` is never
        # changed in place).
        self._memo: dict = {}

    # -- raw fields ------------------------------------------------------------
    def _int(self, col: int) -> torch.Tensor:
        return self.derived(col, lambda s: s.data[:, col])

    def _float(self, col: int) -> torch.Tensor:
        return self.derived(col, lambda s: s.data[:, col].view(torch.float64))

    numel = property(lambda self: self._int(NUMEL))
    nan = property(lambda self: self._int(NAN))
    posinf = property(lambda self: self._int(POSINF))
    neginf = property(lambda self: self._int(NEGINF))
    zero = property(lambda self: self._int(ZERO))
    subnormal = property(lambda self: self._int(SUBNORMAL))
    saturated = property(lambda self: self._int(SATURATED))
    min = property(lambda self: self._float(MIN))
    max = property(lambda self: self._float(MAX))
    absmax = property(lambda self: self._float(ABSMAX))
    sum = property(lambda self: self._float(SUM))
    sumsq = property(lambda self: self._float(SUMSQ))

    @property
    def counts(self) -> torch.Tensor:
        """int64 [T, 7]: numel, nan, posinf, neginf, zero, subnormal, saturated."""
        return self.data[:, :NUM_COUNTS]

    @property
    def hist(self) -> torch.Tensor | None:
        return self.data[:, COLS:] if self.has_histogram else None

    @property
    def has_histogram(self) -> bool:
        return self.data.shape[1] == COLS + BINS

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __len__(self) -> int:
        return self.data.shape[0]

    # -- derived fields ----------------------------------------------------------
    def derived(self, key, fn: Callable[[TensorStats], torch.Tensor]) -> torch.Tensor:
        """``fn(self)``, computed once per `TensorStats` and `key` (this class's
        columns and fields, and the per-row quantities the checks share)."""
        t = self._memo.get(key)
        if t is None:
            t = self._memo[key] = fn(self)
        return t

    @property
    def nonfinite(self) -> torch.Tensor:
        return self.derived("nonfinite", lambda s: s.data[:, NAN:NEGINF + 1].sum(1))

    @property
    def finite(self) -> torch.Tensor:
        return self.derived("finite", lambda s: s.numel - s.nonfinite)

    @property
    def nonfinite_fraction(self) -> torch.Tensor:
        """Non-finite values over numel (0 for an empty tensor)."""
        return self.nonfinite.double() / self.numel.clamp(min=1).double()

    @property
    def l2norm(self) -> torch.Tensor:
        """Euclidean norm of the finite values."""
        return self.sumsq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the finite values (NaN when there are none)."""
        return self.sum / self.finite.double()

    @property
    def rms(self) -> torch.Tensor:
        """Root mean square of the finite values (NaN when there are none)."""
        return (self.sumsq / self.finite.double()).sqrt()

    @property
    def magnitude_hist(self) -> torch.Tensor | None:
        """int64 [T, BINS_PER_SIGN]: the histogram of |x|, both signs added."""
        h = self.hist
        return None if h is None else h[:, :BINS_PER_SIGN] + h[:, BINS_PER_SIGN:]

    # -- combining ---------------------------------------------------------------
    @staticmethod
    def _pack(counts: torch.Tensor, values: torch.Tensor, hist: torch.Tensor | None) -> TensorStats:
        parts = [counts, _as_bits(values)] + ([hist] if hist is not None else [])
        return TensorStats(torch.cat(parts, dim=1))

    def total(self) -> TensorStats:
        """One row that combines every row exactly, as if all tensors were one."""
        return TensorStats.combine(self.data[:, None])

    def merge(self, other: TensorStats) -> TensorStats:
        """Row-wise combination of the same tensors' statistics from two sources
        (e.g. two shards, two ranks): counts and histograms add, extremes take
        the extreme, sums add. Exact for everything but the float sums."""
        if self.data.shape != other.data.shape:
            raise ValueError(f"TensorStats.merge: shapes differ, {list(self.data.shape)} "
                             f"and {list(other.data.shape)}")
        return TensorStats.combine(torch.stack([self.data, other.data]))

    @staticmethod
    def combine(pieces: torch.Tensor) -> TensorStats:
        """`merge` of a stack of results, ``pieces[k]`` the ``data`` of source k
        (int64 ``[K, T, cols]``, e.g. gathered from K ranks): rows of T tensors.
        Every holder of the same pieces gets the same bits (one op each, on the
        same data). K = 0 gives the identity rows."""
        if pieces.dim() != 3:
            raise ValueError(f"TensorStats.combine: pieces must be [K, T, cols], got {list(pieces.shape)}")
        if pieces.shape[0] == 0:
            rows = pieces.new_zeros(pieces.shape[1:])
            rows[:, MIN:COLS] = _as_bits(torch.tensor([math.inf, -math.inf, 0.0, 0.0, 0.0],
                                                      dtype=torch.float64, device=pieces.device))
            return TensorStats(rows)
        v = pieces[..., MIN:COLS].view(torch.float64)
        values = torch.stack([v[..., 0].amin(0), v[..., 1].amax(0), v[..., 2].amax(0),
                              v[..., 3].sum(0), v[..., 4].sum(0)], dim=1)
        hist = pieces[..., COLS:].sum(0) if pieces.shape[2] > COLS else None
        return TensorStats._pack(pieces[..., :NUM_COUNTS].sum(0), values, hist)

    @staticmethod
    def cat(stats: list[TensorStats]) -> TensorStats:
        """Rows of several results, in order (all on one device, all with or all
        without histograms)."""
        return TensorStats(torch.cat([s.data for s in stats], dim=0))

    def __getitem__(self, index) -> TensorStats:
        rows = self.data[index]
        return TensorStats(rows if rows.dim() == 2 else rows[None])

    def to(self, device, non_blocking: bool = False) -> TensorStats:
        return TensorStats(self.data.to(device, non_blocking=non_blocking))

    def cpu(self) -> TensorStats:
        return self.to("cpu")

    def __repr__(self) -> str:
        return (f"TensorStats(rows={len(self)}, device={self.device}, "
                f"histogram={self.has_histogram})")
