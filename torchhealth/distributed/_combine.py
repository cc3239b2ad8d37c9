"""Combining `TensorStats` rows across ranks, and `tensor_stats` of DTensors.

Every row travels as two float64 payloads: one SUM all-reduce of
``[counts (7), sum, sumsq, histogram (BINS)]`` and one MAX all-reduce of
``[-min, max, absmax]``. Counts and histogram bins are integers below 2**53,
so float64 carries them exactly; minima travel negated so one MAX covers all
three extremes. A rank that must not be counted (a replica of a tensor another
rank already contributes) sends identity rows, which change nothing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..stats import (ABSMAX, BINS, COLS, MAX, MIN, NUM_COUNTS, SUM, SUMSQ, TensorStats)

# Columns of the SUM payload; the histogram follows them when present.
_SUM_SCALARS = NUM_COUNTS + 2
_MAX_COLS = 3


def payload_bytes(num_tensors: int, *, histogram: bool) -> int:
    """Bytes each rank sends to combine ``num_tensors`` rows: 96 per tensor
    without histograms (72 in the SUM, 24 in the MAX all-reduce), 4560 with."""
    sum_cols = _SUM_SCALARS + (BINS if histogram else 0)
    return num_tensors * 8 * (sum_cols + _MAX_COLS)


def _split(stats: TensorStats) -> tuple[torch.Tensor, torch.Tensor]:
    scalars = [stats.counts.to(torch.float64), stats.sum[:, None], stats.sumsq[:, None]]
    hist = [stats.hist.to(torch.float64)] if stats.has_histogram else []
    to_sum = torch.cat(scalars + hist, dim=1)
    to_max = torch.stack([-stats.min, stats.max, stats.absmax], dim=1)
    return to_sum, to_max


def _join(to_sum: torch.Tensor, to_max: torch.Tensor) -> TensorStats:
    histogram = to_sum.shape[1] > _SUM_SCALARS
    data = to_sum.new_empty((to_sum.shape[0], COLS + (BINS if histogram else 0)), dtype=torch.int64)
    data[:, :NUM_COUNTS] = to_sum[:, :NUM_COUNTS].to(torch.int64)
    floats = data[:, MIN:COLS].view(torch.float64)  # the five float64 fields, by bit pattern
    floats[:, MIN - MIN] = -to_max[:, 0]
    floats[:, MAX - MIN] = to_max[:, 1]
    floats[:, ABSMAX - MIN] = to_max[:, 2]
    floats[:, SUM - MIN] = to_sum[:, NUM_COUNTS]
    floats[:, SUMSQ - MIN] = to_sum[:, NUM_COUNTS + 1]
    if histogram:
        data[:, COLS:] = to_sum[:, _SUM_SCALARS:].to(torch.int64)
    return TensorStats(data)


def _identity_rows(to_sum: torch.Tensor, to_max: torch.Tensor, keep: torch.Tensor):
    ident_max = to_max.new_tensor([-math.inf, -math.inf, 0.0]).expand_as(to_max)
    return (torch.where(keep[:, None], to_sum, torch.zeros_like(to_sum)),
            torch.where(keep[:, None], to_max, ident_max))


class PendingStats:
    """Combined statistics whose all-reduces were issued with ``async_op=True``.

    `wait` makes the current stream wait for them (on CUDA this does not block
    the host) and returns the combined `TensorStats`.
    """

    def __init__(self, to_sum: torch.Tensor, to_max: torch.Tensor, works: list):
        self._to_sum, self._to_max, self._works = to_sum, to_max, works

    def wait(self) -> TensorStats:
        for w in self._works:
            w.wait()
        self._works = []
        return _join(self._to_sum, self._to_max)


def _reduce(to_sum: torch.Tensor, to_max: torch.Tensor, groups: Sequence, async_op: bool):
    # Several groups (an N-D mesh that no single group spans) reduce one mesh
    # dimension after another; the order is the same on every rank.
    works = []
    for i, group in enumerate(groups):
        if i:
            for w in works:
                w.wait()
            works = []
        works.append(dist.all_reduce(to_sum, op=dist.ReduceOp.SUM, group=group, async_op=True))
        works.append(dist.all_reduce(to_max, op=dist.ReduceOp.MAX, group=group, async_op=True))
    pending = PendingStats(to_sum, to_max, works)
    return pending if async_op else pending.wait()


def all_reduce_stats(stats: TensorStats, group=None, *, replicated: bool | torch.Tensor = False,
                     async_op: bool = False) -> TensorStats | PendingStats:
    """Combine every rank's rows into the statistics of the union of the tensors.

    Row ``i`` of every rank describes a piece of the same tensor; the result,
    identical on every rank of ``group``, is `TensorStats.merge` of all pieces:
    counts, histograms and sums add, extremes take the extreme (exact except for
    the float64 sums, see ``SUM_RTOL``). Rows marked ``replicated`` (True for all
    rows, or a bool tensor of one flag per row on the stats' device) are copies
    held by every rank and are counted once: only group rank 0 contributes them.

    Issues one SUM and one MAX all-reduce on ``stats``' device, in that order,
    and never reads a value on the host; every rank of ``group`` must call it
    with the same number of rows and histogram setting. Payload: `payload_bytes`.
    With ``async_op=True`` it returns a `PendingStats`; call ``.wait()``.
    """
    if not isinstance(stats, TensorStats):
        raise TypeError(f"all_reduce_stats: stats must be a TensorStats, got {type(stats).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce_stats: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    if group is not None and group != dist.group.WORLD and dist.get_rank(group) < 0:
        raise ValueError(f"all_reduce_stats: this rank ({dist.get_rank()}) is not a member of the "
                         "process group it was given; every rank that calls must belong to it")
    to_sum, to_max = _split(stats)
    if isinstance(replicated, torch.Tensor):
        if replicated.dtype != torch.bool or replicated.shape != (len(stats),):
            raise ValueError(f"all_reduce_stats: replicated must be a bool tensor of shape "
                             f"[{len(stats)}], got {replicated.dtype} {list(replicated.shape)}")
        if dist.get_rank(group) != 0:
            to_sum, to_max = _identity_rows(to_sum, to_max, ~replicated.to(stats.device))
    elif replicated and dist.get_rank(group) != 0:
        to_sum, to_max = _identity_rows(to_sum, to_max, torch.zeros(
            len(stats), dtype=torch.bool, device=stats.device))
    return _reduce(to_sum, to_max, [group], async_op)
