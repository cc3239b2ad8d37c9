"""Which rank produced a non-finite gradient, seen before communication spreads it.

An all-reduce (DDP) or reduce-scatter (FSDP2) turns one rank's NaN into every
rank's NaN, so the origin is recorded inside the communication path, on the
local gradients, as a device flag (no host sync), like Megatron-LM's
``check_for_nan_in_grad``. After backward, `gather` combines every rank's flags
in one small SUM all-reduce of ``4 * (world_size + slots)`` bytes.

`HealthMonitor` given a DDP or FSDP2 model installs a tracker itself
(`origin_tracker_for`; `track_origin` to choose its arguments) and gathers it
after the statistics at every check with sync="never"; with sync="step" only
when the verdict it has just read shows a non-finite gradient (the same on
every rank, after communication). It resets the flags on every other check and
on steps that are not checked, so a Report names the ranks of the step it describes,
and disarms the tracker (``armed``) for a step it will not check, whose local
gradients are then not read. A disarmed tracker re-arms itself when that backward
pass ends, so a monitor told of its due steps only (``check(step)`` called on
those alone) still reads them.

- DDP: a communication hook (``register_comm_hook``) checks each gradient of a
  bucket and then runs the normal all-reduce. Slots are parameters. On the CPU
  a bucket whose sum is finite holds no NaN/Inf (`_surely_finite`); any other
  bucket, and every bucket on an accelerator, goes through one call of the
  fused statistics (histogram off) that flags each gradient exactly.
- FSDP2 has no DDP-style comm hook; its public ``set_custom_reduce_scatter``
  replaces the reduce-scatter of each ``fully_shard`` module, whose input is
  this rank's unsharded local gradients of that module, tested as a DDP
  bucket is. Slots are FSDP modules (the parameters each one owns). It
  replaces any custom reduce-scatter already set, and is not called when the
  shard group has one rank.
"""
from __future__ import annotations

import math
import sys
import warnings
import weakref

import torch
import torch.distributed as dist

from ..collect import at_backward_end


class NonfiniteOrigin:
    """Result of `gather`, on the device until read.

    ``ranks``: bool ``[world]``, True for the ranks of ``group`` whose local
    gradients held NaN or Inf before communication. ``slot_ranks``: int32
    ``[slots]``, how many ranks saw a non-finite local gradient in each slot.
    ``slot_names``: the parameter names of each slot. The all-reduce behind
    them may still be in flight: the first use of ``ranks`` or ``slot_ranks``
    waits for it (on CUDA the stream waits, not the host).
    """

    def __init__(self, payload: torch.Tensor, world: int, slot_names, group=None, work=None):
        self._payload, self._world, self._work = payload, world, work
        self.slot_names, self.group = slot_names, group
        # Every rank's `torchhealth.watch` origin, once `gather_modules` has run.
        self.modules: list[dict] | None = None

    def gather_modules(self, origin: dict | None) -> None:
        """Gathers every rank's `torchhealth.watch` origin (the first module whose
        output or output gradient held NaN/Inf on that rank, or None) into
        ``modules``, each with its global ``"rank"``: activations are each rank's
        own, so only the rank that produced a NaN saw where it was born. A host-side
        gather of small objects (`all_gather_object`): the monitor calls it only
        once the host has read a non-finite gradient (sync="step"), which every
        rank reads alike after communication."""
        found = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(found, origin, group=self.group)
        ranks = [dist.get_global_rank(self.group, r) if self.group is not None else r
                 for r in range(len(found))]
        self.modules = [{**o, "rank": r} for r, o in zip(ranks, found) if o is not None]

    def first_module(self, ranks: list[int]) -> dict | None:
        """The gathered origin to report: that of the lowest rank among
        ``ranks`` (those whose local gradients were non-finite) that has one,
        else of the lowest rank that has one."""
        found = self.modules or []
        return next((o for o in found if o["rank"] in ranks), found[0] if found else None)

    def _landed(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._payload

    @property
    def ranks(self) -> torch.Tensor:
        return self._landed()[:self._world] > 0

    @property
    def slot_ranks(self) -> torch.Tensor:
        return self._landed()[self._world:]

    def describe(self) -> dict:
        """Host-side summary (reads the device tensors: call it where the
        monitor copies to the host): global ranks and parameter names."""
        return self.describe_flags(self.ranks.cpu().tolist(), (self.slot_ranks > 0).cpu().tolist())

    def describe_flags(self, ranks: list[bool], slots: list[bool]) -> dict:
        """`describe` of host copies of ``ranks`` and ``slot_ranks > 0``."""
        hit = [r for r, bad in enumerate(ranks) if bad]
        if self.group is not None and dist.is_initialized():
            hit = [dist.get_global_rank(self.group, r) for r in hit]
        return {"ranks": hit, "parameters": [n for s, bad in enumerate(slots) if bad
                                             for n in self.slot_names[s]]}


class _OriginTracker:
    def __init__(self, slot_names, device, group):
        self.slot_names = tuple(tuple(n) for n in slot_names)
        self.group = group
        self._flags = torch.zeros(len(self.slot_names), dtype=torch.int32, device=device)
        # Whether communication reads the local gradients (the monitor clears it
        # for a step it will not check, which the flags would not reach).
        self.armed = True
        self._rearming = False

    def reading(self) -> bool:
        """Whether communication reads the local gradients now (`armed`). A
        disarmed tracker stays so for the backward pass under way only: its end
        re-arms it, so that a step nobody said was unchecked is read."""
        if not self.armed and not self._rearming:
            self._rearming = at_backward_end(self._rearm)
        return self.armed

    def _rearm(self) -> None:
        self.armed, self._rearming = True, False

    def reset(self) -> None:
        """Forget the flags (call once per optimizer step; `gather` does by default)."""
        self._flags.zero_()

    def local_flags(self) -> torch.Tensor:
        """int32 ``[slots]``: non-finite local gradients seen on this rank since reset."""
        return self._flags

    def gather(self, *, reset: bool = True) -> NonfiniteOrigin:
        """Combine every rank's flags (one SUM all-reduce; every rank of the
        group must call it on the same steps). No host sync: the all-reduce
        runs while the caller goes on (the monitor's checks), until the
        result is first read."""
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        bad = (self._flags > 0).to(torch.int32)
        payload = torch.zeros(world + len(bad), dtype=torch.int32, device=bad.device)
        payload[rank] = bad.amax() if len(bad) else 0
        payload[world:] = bad
        work = dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        if reset:
            self.reset()
        return NonfiniteOrigin(payload, world, self.slot_names, self.group, work)

    def nonfinite_ranks(self, *, reset: bool = True) -> torch.Tensor:
        """bool ``[world]``: the ranks whose local gradients were non-finite."""
        return self.gather(reset=reset).ranks


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _nonfinite(tensors) -> torch.Tensor:
    """int32 per tensor: 1 if it holds a NaN or Inf. The fused statistics
    (histogram off) read each value once, at memory speed, in one call for the
    whole bucket (``_foreach_norm(inf)`` and ``isfinite().all()`` cost many
    times more: benchmarks/RESULTS.md, issue 8)."""
    from .._ops import tensor_stats

    if any(t.is_complex() for t in tensors):  # the only gradients the statistics do not take
        return torch.stack([(~torch.isfinite(t).all()).to(torch.int32) for t in tensors])
    return (tensor_stats(tensors, histogram=False).nonfinite > 0).to(torch.int32)


def _surely_finite(flat: torch.Tensor) -> bool:
    """True only if every value of ``flat`` (one buffer holding a bucket's
    gradients) is finite, known on the host without a device sync: on the CPU,
    from its sum (a NaN or Inf anywhere makes any sum non-finite; a sum that
    overflows from finite values only sends the bucket to the exact per-tensor
    test). `torch.sum` reads a buffer 2-3x faster than the fused statistics, and
    healthy steps are nearly all steps. False elsewhere: on an accelerator,
    reading the sum would be a host sync. The sum is read as a Python number:
    `torch.isfinite` of a 0-d tensor is several ops."""
    return flat.device.type == "cpu" and math.isfinite(flat.sum().item())


def _record(tracker, flat: torch.Tensor, slots_and_tensors) -> None:
    """Adds 1 to the flags of the slots whose tensor holds a NaN or Inf, where
    ``slots_and_tensors()`` gives the slots (int64) and the tensors (views into
    the buffer ``flat``); it is called only when the buffer's sum leaves doubt:
    a DDP bucket's views and slot key cost about half as much as the sum."""
    if not _surely_finite(flat):
        slots, tensors = slots_and_tensors()
        tracker._flags.index_add_(0, slots, _nonfinite(tensors))


def _checked_allreduce(tracker, bucket):  # unannotated: DDP checks annotations by identity
    if tracker.reading():
        _record(tracker, bucket.buffer(),
                lambda: (tracker._slots_of(bucket.parameters()), bucket.gradients()))
    return tracker._inner(tracker._inner_state, bucket)


class DDPNonfiniteTracker(_OriginTracker):
    """Registers a comm hook on ``ddp_model`` that records, per parameter, whether
    this rank's gradient was non-finite before the all-reduce.

    ``hook``/``hook_state``: the communication hook to run after the check
    (default: the plain all-reduce on the model's process group).
    """

    def __init__(self, ddp_model, *, hook=None, hook_state=None):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        # Named as the DDP module names them ("module." first), as the monitor does.
        params = [(n, p) for n, p in ddp_model.named_parameters() if p.requires_grad]
        super().__init__([(n,) for n, _ in params], _device_of(ddp_model), ddp_model.process_group)
        self._slot = {id(p): i for i, (_, p) in enumerate(params)}
        self._slot_cache: dict = {}
        self._inner = hook or allreduce_hook
        self._inner_state = hook_state if hook is not None else ddp_model.process_group
        ddp_model.register_comm_hook(self, _checked_allreduce)

    def _slots_of(self, params) -> torch.Tensor:
        """The slots of a bucket's parameters, cached: buckets are rebuilt
        only once, after the first iteration."""
        key = tuple(id(p) for p in params)
        idx = self._slot_cache.get(key)
        if idx is None:
            idx = self._slot_cache[key] = torch.tensor([self._slot[k] for k in key], dtype=torch.int64,
                                                       device=self._flags.device)
        return idx


def _owned_parameters(model: torch.nn.Module, fsdp_cls) -> dict[int, list[str]]:
    """Parameter names per FSDP module (by id): the innermost one owns each."""
    owners = {name: m for name, m in model.named_modules() if isinstance(m, fsdp_cls)}
    owned: dict[int, list[str]] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            owner = owners.get(".".join(parts[:cut]))
            if owner is not None:
                owned.setdefault(id(owner), []).append(name)
                break
    return owned


class FSDPNonfiniteTracker(_OriginTracker):
    """Installs a checking reduce-scatter on every ``fully_shard`` module of
    ``model`` that records whether this rank's unsharded local gradients of that
    module were non-finite before they were reduced. ``group``: the group over
    which `gather` names ranks (default: the whole world)."""

    def __init__(self, model: torch.nn.Module, group=None):
        from torch.distributed.fsdp import FSDPModule

        owned = _owned_parameters(model, FSDPModule)
        modules = [m for m in model.modules() if isinstance(m, FSDPModule) and id(m) in owned]
        if not modules:
            raise ValueError("FSDPNonfiniteTracker: model has no fully_shard module owning parameters")
        super().__init__([owned[id(m)] for m in modules], _device_of(model), group)
        for slot, m in enumerate(modules):
            m.set_custom_reduce_scatter(_make_checked_reduce_scatter(self, slot))


def _make_checked_reduce_scatter(tracker: FSDPNonfiniteTracker, slot: int):
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

    slots = torch.tensor([slot], dtype=torch.int64, device=tracker._flags.device)

    class CheckedReduceScatter(ReduceScatter):
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            if tracker.reading():
                _record(tracker, input_tensor, lambda: (slots, [input_tensor]))
            return dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group,
                                              async_op=async_op)

    return CheckedReduceScatter()


_TRACKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fsdp_modules(model: torch.nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules())


def track_origin(model: torch.nn.Module, **kwargs) -> _OriginTracker:
    """The origin tracker of ``model`` (a DDP module, or a model holding
    ``fully_shard`` modules), installed on the first call and returned again
    by later ones. `HealthMonitor` (and so `HealthCheckedOptimizer`) given this
    model as ``model=`` uses it: its Reports then name the ranks whose local
    gradients were non-finite. Call it yourself, before the wrapper is made, to
    pass arguments: ``hook=``/``hook_state=`` (DDP: your communication hook, run
    after the check) or ``group=`` (FSDP2: the group whose ranks are named)."""
    tracker = _TRACKERS.get(model)
    if tracker is not None:
        if kwargs:
            raise ValueError("track_origin: this model already has an origin tracker; pass "
                             "arguments on the first call, before the optimizer is wrapped")
        return tracker
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        tracker = DDPNonfiniteTracker(model, **kwargs)
    elif _fsdp_modules(model):
        tracker = FSDPNonfiniteTracker(model, **kwargs)
    else:
        raise TypeError(f"track_origin: model is a {type(model).__name__}, neither a "
                        "DistributedDataParallel module nor a model holding fully_shard modules")
    _TRACKERS[model] = tracker
    return tracker


def origin_tracker_for(model: torch.nn.Module | None) -> _OriginTracker | None:
    """The tracker `HealthMonitor` uses for ``model``: the one `track_origin`
    installed, else one installed now when torch.distributed runs several
    processes and ``model`` is a DDP or FSDP2 model; None otherwise, or (with
    a warning saying why) when the communication path already has a custom hook."""
    if model is None or not (dist.is_available() and dist.is_initialized()):
        return None
    if model in _TRACKERS:
        return _TRACKERS[model]
    if dist.get_world_size() < 2:
        return None
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and getattr(model, "_comm_hooks", None):
        warnings.warn("torchhealth: this DDP model already has a communication hook, so Reports "
                      "will not say which rank produced a non-finite gradient; call "
                      "torchhealth.distributed.track_origin(model, hook=..., hook_state=...) "
                      "instead of model.register_comm_hook(...) to keep both", stacklevel=3)
        return None
    if not isinstance(model, DistributedDataParallel) and not _fsdp_modules(model):
        return None
    try:
        return track_origin(model)
    except ValueError as e:  # e.g. FSDP2 with several parameter groups per module
        warnings.warn(f"torchhealth: Reports will not say which rank produced a non-finite "
                      f"gradient: {e}", stacklevel=3)
        return None
