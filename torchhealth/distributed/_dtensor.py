"""`tensor_stats` of DTensors: the statistics of each global tensor, on every rank.

Each rank computes the rows of its local shards in one fused call and the rows
are combined over the mesh with `_combine` (one all-gather, or for large payloads
one SUM and one MAX all-reduce).
Pieces are counted once: over a ``Replicate()`` mesh dimension only the ranks at
coordinate 0 contribute their shard (the others pass an empty tensor, whose row
is the identity of the merge); ``Shard``/strided-shard dimensions hold disjoint
pieces, uneven or empty, which all contribute. ``Partial()`` placements (a
pending sum) are refused: the statistics of a sum are not the sum of the
statistics, and reducing it here would add a collective per tensor.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import _ops
from ..stats import TensorStats
from ._combine import PendingStats, _reduce


def holds_dtensor(tensors) -> bool:
    """Whether ``tensors`` (a list or tuple) holds a DTensor; cheap when DTensor
    was never imported, since then none can exist."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not isinstance(tensors, (list, tuple)):
        return False
    return any(issubclass(c, module.DTensor) for c in set(map(type, tensors)))


def _contributes(placements, coordinate, index: int) -> bool:
    from torch.distributed.tensor.placement_types import _StridedShard

    keep = True
    for dim, p in enumerate(placements):
        if p.is_partial():
            raise ValueError(
                f"tensor_stats: tensors[{index}] has placement {p} on mesh dimension {dim}: a "
                "pending sum, whose statistics are not the sum of its shards' statistics; reduce "
                "it first, e.g. t.redistribute(placements=[Replicate() if p.is_partial() else p "
                "for p in t.placements])")
        if p.is_replicate():
            keep = keep and coordinate[dim] == 0
        elif not (p.is_shard() or isinstance(p, _StridedShard)):
            raise ValueError(f"tensor_stats: tensors[{index}] has placement {p} on mesh dimension "
                             f"{dim}; torchhealth reads Shard, Replicate and strided-shard placements")
    return keep


def mesh_groups(mesh) -> list:
    """Process groups whose collectives, in order, combine over the whole mesh:
    one group when a single one spans it, else one per mesh dimension."""
    if mesh.ndim == 1:
        return [mesh.get_group()]
    if mesh.size() == dist.get_world_size():
        return [dist.group.WORLD]
    return [mesh.get_group(d) for d in range(mesh.ndim)]


def local_pieces(tensors: Sequence) -> tuple[object, list[torch.Tensor]]:
    """The common mesh of ``tensors`` and, per tensor, the local piece this rank
    contributes (its shard, or an empty tensor for a replica not counted here)."""
    from torch.distributed.tensor import DTensor

    mesh, coordinate, pieces, seen = None, None, [], {}
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            raise TypeError(
                f"tensor_stats: tensors[{i}] is a plain {type(t).__name__} but other tensors are "
                "DTensors; call tensor_stats separately for local tensors (and combine them with "
                "torchhealth.distributed.all_reduce_stats if they are pieces of one tensor)")
        if mesh is None:
            mesh, first = t.device_mesh, i
            coordinate = mesh.get_coordinate()
            if coordinate is None:
                raise ValueError(f"tensor_stats: this rank ({dist.get_rank()}) is not part of the "
                                 f"device mesh of tensors[{i}], {mesh}")
        elif t.device_mesh is not mesh and t.device_mesh != mesh:
            raise ValueError(
                f"tensor_stats: tensors[{i}] is on {t.device_mesh} but tensors[{first}] is on "
                f"{mesh}; call tensor_stats once per mesh (torchhealth.distributed.by_mesh "
                "splits a list)")
        keep = seen.get(t.placements)
        if keep is None:
            keep = seen[t.placements] = _contributes(t.placements, coordinate, i)
        # The attribute, not to_local(): that is an autograd Function costing
        # more per tensor than the statistics of a small one.
        local = t._local_tensor
        pieces.append(local if keep else local.new_empty(0))
    return mesh, pieces


def by_mesh(tensors: Sequence) -> list[list[int]]:
    """Indices of ``tensors`` grouped by device mesh, in order of first
    appearance (plain tensors form a group of their own, keyed by None)."""
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(i)
    return list(groups.values())


def dtensor_stats(tensors: Sequence, *, histogram: bool = True, saturation: float | None = None,
                  async_op: bool = False) -> TensorStats | PendingStats:
    """`tensor_stats` of DTensors on one mesh: the rows of the global tensors,
    identical on every rank of the mesh. Every rank of the mesh must call it
    with the same tensors in the same order (it issues collectives)."""
    mesh, pieces = local_pieces(tensors)
    local = _ops.tensor_stats(pieces, histogram=histogram, saturation=saturation)
    return _reduce(local, mesh_groups(mesh), async_op)
