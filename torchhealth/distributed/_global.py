"""`global_stats`: one call for a mixed list (DTensors on several meshes and
plain tensors), rows in input order, identical on every rank."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import _ops
from ..stats import TensorStats
from ._combine import all_reduce_stats
from ._dtensor import by_mesh, dtensor_stats

_PLAIN = ("replicated", "sharded")


def global_stats(tensors: Sequence[torch.Tensor], *, histogram: bool = True,
                 saturation: float | None = None, plain: str = "replicated",
                 group=None) -> TensorStats:
    """Rows of every tensor's global statistics, in the order given.

    DTensors are grouped by mesh (`by_mesh`); each mesh costs one fused
    `tensor_stats` call and one all-gather over it (or, for large payloads,
    one SUM plus one MAX all-reduce: `torchhealth.distributed._combine`). Plain
    tensors are combined over ``group`` with `all_reduce_stats`:
    ``plain="replicated"`` when every rank holds the same tensor (DDP
    parameters and gradients after the all-reduce: rank 0's rows, so every rank
    reads the same numbers), ``"sharded"`` when each rank holds a piece.
    Every rank must call it with the same tensors in the same order.
    """
    if plain not in _PLAIN:
        raise ValueError(f"global_stats: plain must be one of {_PLAIN}, got {plain!r}")
    groups = by_mesh(tensors) if tensors else []
    parts = []
    for indices in groups:
        chosen = [tensors[i] for i in indices]
        if _is_plain(chosen[0]):
            local = _ops.tensor_stats(chosen, histogram=histogram, saturation=saturation)
            parts.append(all_reduce_stats(local, group, replicated=plain == "replicated"))
        else:
            parts.append(dtensor_stats(chosen, histogram=histogram, saturation=saturation))
    if len(parts) <= 1:
        return parts[0] if parts else _ops.tensor_stats([], histogram=histogram)
    rows = TensorStats.cat(parts)
    order = [i for indices in groups for i in indices]
    if order == sorted(order):
        return rows
    return rows[_inverse(tuple(order), rows.device)]


@functools.lru_cache(maxsize=16)
def _inverse(order: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Cached: the same model gives the same order every step, and a fresh index
    # copied to a GPU on every call would wait for the device.
    inverse = torch.empty(len(order), dtype=torch.int64)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return inverse.to(device)


def _is_plain(t) -> bool:
    from torch.distributed.tensor import DTensor

    return not isinstance(t, DTensor)
