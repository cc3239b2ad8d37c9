"""torchhealth across processes: statistics of DTensors, combining rows across
ranks, and the rank that produced a non-finite gradient.

Every function here issues collectives: every rank of the group (or mesh) must
call it on the same steps with the same tensors in the same order.
"""
from ._checkpoint import checkpoint_state, load_checkpoint_state
from ._combine import PendingStats, all_reduce_stats, payload_bytes
from ._count import Collective, counted_collectives
from ._dtensor import by_mesh, dtensor_stats, holds_dtensor, mesh_groups
from ._global import global_stats
from ._origin import (DDPNonfiniteTracker, FSDPNonfiniteTracker, NonfiniteOrigin,
                      origin_tracker_for, track_origin)

__all__ = [
    "Collective", "DDPNonfiniteTracker", "FSDPNonfiniteTracker", "NonfiniteOrigin", "PendingStats",
    "all_reduce_stats", "by_mesh", "checkpoint_state", "counted_collectives", "load_checkpoint_state",
    "dtensor_stats", "global_stats", "holds_dtensor", "mesh_groups", "origin_tracker_for",
    "payload_bytes", "track_origin",
]
