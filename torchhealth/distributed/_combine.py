"""Combining `TensorStats` rows across ranks, and `tensor_stats` of DTensors.

Each rank sends its rows once, 96 bytes per tensor (4,560 with histograms),
in one of two exact ways:

- **one all-gather** of the rows as they are, merged on every rank
  (`TensorStats.combine`), when what each rank receives (ranks x payload)
  is at most `GATHER_BYTES`: one collective instead of two, and small
  collectives cost their latency, not their bytes;
- else **one SUM and one MAX all-reduce** of two float64 payloads,
  ``[counts (7), sum, sumsq, histogram (BINS)]`` and ``[-min, max, absmax]``:
  what each rank receives stays the size of what it sends, however many ranks
  there are. Counts and histogram bins are integers below 2**53, so float64
  carries them exactly; minima travel negated so one MAX covers all three
  extremes.

A rank that must not be counted (a replica of a tensor another rank already
contributes) sends identity rows, which change nothing (all-reduce), or its
rows are not read (all-gather: such rows are group rank 0's).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..stats import (ABSMAX, BINS, COLS, MAX, MIN, NUM_COUNTS, SUM, SUMSQ, TensorStats)

# Columns of the SUM payload; the histogram follows them when present.
_SUM_SCALARS = NUM_COUNTS + 2
_MAX_COLS = 3
# Largest all-gather (bytes each rank receives) used instead of the two
# all-reduces: 1 MiB, e.g. 8 ranks of 1,300 tensors without histograms.
GATHER_BYTES = 1 << 20


def payload_bytes(num_tensors: int, *, histogram: bool) -> int:
    """Bytes each rank sends to combine ``num_tensors`` rows: 96 per tensor
    without histograms, 4560 with (the all-gather sends the rows; the SUM
    all-reduce carries 72 and 8 per bin, the MAX one 24). An all-gather
    receives this from every rank."""
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
    """Combined statistics whose collectives were issued with ``async_op=True``.

    `wait` makes the current stream wait for them (on CUDA this does not block
    the host) and returns the combined `TensorStats`.
    """

    def __init__(self, works: list, finish: Callable[[], TensorStats]):
        self._works, self._finish, self._result = works, finish, None

    def wait(self) -> TensorStats:
        for w in self._works:
            w.wait()
        self._works = []
        if self._result is None:
            self._result = self._finish()
        return self._result


def _gathers(stats: TensorStats, group) -> bool:
    return dist.get_world_size(group) * stats.data.numel() * 8 <= GATHER_BYTES


def _start(stats: TensorStats, group, replicated: torch.Tensor | None) -> PendingStats:
    """Issues the collectives that combine ``stats`` over ``group``;
    ``replicated``: rows only group rank 0 contributes (None: none)."""
    if _gathers(stats, group):
        rows = stats.data.contiguous()
        world = dist.get_world_size(group)
        pieces = rows.new_empty((world * rows.shape[0], rows.shape[1]))
        work = dist.all_gather_into_tensor(pieces, rows, group=group, async_op=True)

        def finish() -> TensorStats:
            stacked = pieces.view(world, *rows.shape)
            combined = TensorStats.combine(stacked)
            if replicated is None:
                return combined
            return TensorStats(torch.where(replicated[:, None], stacked[0], combined.data))
        return PendingStats([work], finish)
    to_sum, to_max = _split(stats)
    if replicated is not None and dist.get_rank(group) != 0:
        to_sum, to_max = _identity_rows(to_sum, to_max, ~replicated)
    works = [dist.all_reduce(to_sum, op=dist.ReduceOp.SUM, group=group, async_op=True),
             dist.all_reduce(to_max, op=dist.ReduceOp.MAX, group=group, async_op=True)]
    return PendingStats(works, lambda: _join(to_sum, to_max))


def _reduce(stats: TensorStats, groups: Sequence, async_op: bool,
            replicated: torch.Tensor | None = None) -> TensorStats | PendingStats:
    # Several groups (an N-D mesh that no single group spans) combine one mesh
    # dimension after another; the order is the same on every rank.
    pending = _start(stats, groups[0], replicated)
    for group in groups[1:]:
        pending = _start(pending.wait(), group, None)
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

    Issues one all-gather, or one SUM and one MAX all-reduce (module
    docstring), on ``stats``' device, and never reads a value on the host;
    every rank of ``group`` must call it with the same number of rows and
    histogram setting (so every rank takes the same way). Payload: `payload_bytes`.
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
    if isinstance(replicated, torch.Tensor):
        if replicated.dtype != torch.bool or replicated.shape != (len(stats),):
            raise ValueError(f"all_reduce_stats: replicated must be a bool tensor of shape "
                             f"[{len(stats)}], got {replicated.dtype} {list(replicated.shape)}")
        replicated = replicated.to(stats.device)
    elif replicated:
        replicated = torch.ones(len(stats), dtype=torch.bool, device=stats.device)
    else:
        replicated = None
    return _reduce(stats, [group], async_op, replicated)
