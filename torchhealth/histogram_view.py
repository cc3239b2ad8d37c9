"""torchhealth's log2 histogram grid seen as ordinary histograms: bucket edges
in value order (for TensorBoard and W&B) and per-exponent magnitudes (for
heatmaps). Everything is read from a Row's stored bins; nothing is recomputed."""
from __future__ import annotations

import math
from functools import lru_cache

from . import stats as S
from .report import Row


@lru_cache(maxsize=1)
def _grid() -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    bins = S.histogram_bins()
    return tuple(bins.exponent.tolist()), tuple(bins.lo.tolist()), tuple(bins.hi.tolist())


def exponent(column: int) -> int:
    """The binary exponent of a histogram column: its magnitudes are in
    [2**exponent, 2**(exponent + 1)) (the first and last per sign are the
    underflow and overflow bins)."""
    return _grid()[0][column]


def magnitude_counts(row: Row) -> dict[int, int]:
    """Count of finite nonzero values per binary exponent of |x|, both signs added."""
    out: dict[int, int] = {}
    for col, n in (row.hist or {}).items():
        e = exponent(col)
        out[e] = out.get(e, 0) + n
    return out


def value_histogram(row: Row, max_bins: int | None = None) -> tuple[list[float], list[int]]:
    """``(edges, counts)`` in ascending value order, ``len(edges) == len(counts) + 1``,
    like ``numpy.histogram``. Each sign keeps its populated range of log2 bins;
    one bucket between the two sides holds the zeros. The outer edges of the
    underflow and overflow bins are the row's min and max. With `max_bins`,
    neighbouring buckets are merged pairwise until there are at most that many.
    Empty lists when the row holds no finite value or no histogram."""
    if row.hist is None:  # measured without histograms: the zero count alone is no histogram
        return [], []
    _, lo, hi = _grid()
    hist = row.hist
    neg = sorted(c for c in hist if c < S.BINS_PER_SIGN)
    pos = sorted(c for c in hist if c >= S.BINS_PER_SIGN)
    buckets: list[tuple[float, float, int]] = []  # (left, right, count)
    if neg:  # ascending value: largest magnitude first
        buckets += [(-hi[c], -lo[c], hist.get(c, 0)) for c in range(neg[-1], neg[0] - 1, -1)]
    if row.zero or (neg and pos):
        left = buckets[-1][1] if buckets else 0.0
        right = lo[pos[0]] if pos else 0.0
        buckets.append((left, right, row.zero))
    buckets += [(lo[c], hi[c], hist.get(c, 0)) for c in range(pos[0], pos[-1] + 1)] if pos else []
    if not buckets:
        return [], []
    edges = [buckets[0][0]] + [b[1] for b in buckets]
    edges = [row.min if e == -math.inf else row.max if e == math.inf else e for e in edges]
    counts = [b[2] for b in buckets]
    while max_bins is not None and len(counts) > max_bins:
        counts = [sum(counts[i:i + 2]) for i in range(0, len(counts), 2)]
        edges = edges[::2] + ([edges[-1]] if len(edges) % 2 == 0 else [])
    return edges, counts
