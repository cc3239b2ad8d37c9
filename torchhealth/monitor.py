"""`HealthMonitor`: the one object that reads a model's tensors, checks them and
produces Reports. `HealthCheckedOptimizer` and the framework callbacks are thin
glue around it. (Over 300 lines because this docstring is the reference for the
pipeline and the sync modes; each stage is one short method.)

Usage (what an integration does around each optimizer step)::

    monitor = HealthMonitor(optimizer, model=model, check_every=1, sync="auto")  # MonitorOptions
    monitor.on_report(sink)                  # every Report, in step order
    ...
    loss.backward()
    monitor.log(loss=loss, lr=lr)           # optional: the user's numbers, in this step's Report
    result = monitor.check(step)            # CheckResult, or None between checks
    # result.skip: should this step be skipped (bool, or a 0-d device tensor)
    # policy.predicated_step(optimizer, result.skip if result else None)
    ...
    monitor.flush()                         # at the end: deliver what is pending
    monitor.last_report                     # the newest Report (built lazily)

`HealthMonitor.check` is the pipeline, a stage a function (`_prepare` and
`_commit`), everything before the host copy on the device and without
synchronising:

1. collect (`torchhealth.collect`): the parameters, gradients and (opt-in)
   optimizer state tensors, with their names and roles;
2. stats: one fused `tensor_stats` call per device, combined across ranks for
   DTensors (`torchhealth.distributed`); activation statistics, from
   `torchhealth.watch`, were made at the end of their own passes;
3. checks (`torchhealth.checks`): signals, against running state kept on the device;
4. policy (`torchhealth.policy.decide`): the skip flag and the escalation;
5. host copy (`torchhealth.result.CheckResult`): one packed copy, read as
   ``sync`` says (below); then the in-place actions on gradients (zeroing
   non-finite values, clipping to ``max_grad_norm`` with the norm the
   statistics hold);
6. deliver: Reports (`torchhealth.result.build_report`) to the callbacks, in
   step order, and the host-side policy (warn, raise).

The verdict reaches the host as ``sync`` says:

- ``"never"``: results are copied without blocking (into pinned memory on CUDA)
  and delivered at a later check once the copy has landed: warnings, raises and
  callbacks arrive one step late and name the step they are about. A "skip"
  needs no sync for optimizers that accept ``found_inf`` (fused Adam, AdamW,
  SGD, Adagrad); any other optimizer reads that one flag.
- ``"step"``: the verdict of this step is read right away (one sync), so a raise
  happens before the optimizer step and a skip costs nothing more.
- ``"auto"`` (default): ``"step"`` when every tensor is on the CPU (reading
  costs nothing there), else ``"never"``.

Either way at most one host synchronisation per step. A `Report` is only built
(from the host copy) when a check fired, a callback is registered, or someone
reads ``last_report`` / ``CheckResult.report()``.

Names come from ``model.named_parameters()``, from named parameter groups
(``"param_names"``, e.g. ``torch.optim.AdamW(model.named_parameters())``), or
default to ``group{i}.param{j}``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from .checks import RunningState, Signal, grad_norm_of, run_checks
from .policy import Decision, act_, decide, dispatch, grad_norm_
from . import distributed, user_scalars
from ._ops import tensor_stats
from .collect import Collected, Collector, at_backward_end, uncompiled
from .options import MonitorOptions
from .report import Report
from .result import CheckResult
from .stats import TensorStats

__all__ = ["CheckResult", "HealthMonitor"]


class _Handle:
    def __init__(self, callbacks: list, fn):
        self._callbacks, self._fn = callbacks, fn

    def remove(self) -> None:
        if self._fn in self._callbacks:
            self._callbacks.remove(self._fn)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _Handles:
    def __init__(self, handles: list):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclasses.dataclass
class _Prepared:
    """A check computed on the device and not yet committed: the monitor's
    running state and counters move on only when `HealthMonitor.check` uses it."""

    step: int
    batch: Collected
    stats: TensorStats
    signals: list[Signal]
    grad_norm: torch.Tensor
    decision: Decision
    state: RunningState
    late: bool  # the verdict reaches the host after the optimizer step (see `HealthMonitor._mode`)
    origin: distributed.NonfiniteOrigin | None = None  # which ranks' local gradients were non-finite
    # Checked at the end of backward: the gradients' version counters then.
    versions: list[int] | None = None


class HealthMonitor:
    """Reads, checks and reports the health of a set of parameters.

    Args:
        source: a `torch.optim.Optimizer` (its live ``param_groups`` and, with
            ``optimizer_state``, its ``state``), an ``nn.Module``, or an
            iterable of parameters, ``(name, parameter)`` pairs or param groups.
        model: names parameters via ``model.named_parameters()`` and tells
            embedding tables apart (exempt from the zero-fraction check); a
            module given as `source` is its own model.
        options: a `MonitorOptions`; ``**settings`` (its field names:
            ``check_every``, ``thresholds``, ``policy``, ``sync``,
            ``optimizer_state``, ``histogram``, ``max_grad_norm``,
            ``escalate_after``) override it.

    API: `check` (once per optimizer step), `log`, `on_report`, `flush`,
    ``last_report``, `state_dict` / `load_state_dict`.
    """

    def __init__(self, source, *, model: torch.nn.Module | None = None,
                 options: MonitorOptions | None = None, **settings):
        self.options = MonitorOptions.build(options, **settings)
        if model is None and isinstance(source, torch.nn.Module):
            model = source
        model = uncompiled(model)  # a torch.compile wrapper: its module names and DDP/FSDP2 hooks
        self.collector = Collector(source, model, self.options.optimizer_state)
        self.checks = 0  # checks run so far
        self._callbacks: list[tuple[Callable[[Report], None], bool]] = []
        self._pending: list[CheckResult] = []
        self._last: CheckResult | None = None
        self._state: RunningState | None = None
        self._saved_state: dict | None = None
        self._prepared: _Prepared | None = None  # from the end of the last backward
        self._queued = False  # a backward-end callback is queued
        self._scaled = False  # gradients are scaled at the end of backward (GradScaler)
        self._backwards = 0
        self._activations = None  # a torchhealth.watch.Watch feeding this monitor
        self.micro_batches = 0  # backward passes before the last check (with check_at_backward_end)
        self._scalars: dict[str, float | torch.Tensor] = {}  # logged for the next check
        # Under DDP/FSDP2: flags set inside the gradients' communication, gathered
        # by the checks that need them (torchhealth.distributed.track_origin).
        self.origin_tracker = distributed.origin_tracker_for(model)
        self.world_size = _world_size()  # ranks each Report covers

    # The settings, readable as attributes (they are `options`' fields).
    check_every = property(lambda self: self.options.check_every)
    thresholds = property(lambda self: self.options.thresholds)
    policy = property(lambda self: self.options.policy)
    sync = property(lambda self: self.options.sync)
    histogram = property(lambda self: self.options.histogram)
    max_grad_norm = property(lambda self: self.options.max_grad_norm)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.collector.optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.collector.param_groups

    # -- public API ------------------------------------------------------------------
    def on_report(self, callback: Callable[[Report], None], *, all_ranks: bool = False) -> _Handle:
        """Calls ``callback(report)`` for every check, in step order (one step
        late with sync="never"). Under `torch.distributed`, only on rank 0 unless
        ``all_ranks`` (every rank holds the same Report). Returns a handle whose
        ``remove()`` detaches it."""
        entry = (callback, all_ranks)
        self._callbacks.append(entry)
        return _Handle(self._callbacks, entry)

    def log(self, **scalars) -> None:
        """Adds the user's numbers (``loss=loss, lr=sched.get_last_lr()[0]``) to
        the Report of the step being taken: call it before that step's `check`
        (before ``opt.step()``). Each is a real number or a one-element tensor;
        a tensor is not read here (no host sync): it travels to the host with
        the check's statistics, and on a step that is not checked it is
        dropped unread. NaN and inf are kept. Logging a name again in one step
        keeps the last value. TypeError/ValueError naming the scalar otherwise."""
        checked = {k: user_scalars.checked(k, v) for k, v in scalars.items()}
        self._scalars.update(checked)

    def due(self, step: int) -> bool:
        return self.options.due(step)

    def check(self, step: int | None = None, *,
              found_inf: torch.Tensor | None = None) -> CheckResult | None:
        """Checks the current gradients, parameters and state; call it after
        backward and before the optimizer step. Delivers earlier results whose
        copy has landed first (sync="never"). Returns None when `step` is not
        due. ``found_inf``: a GradScaler's flag for this step (non-finite
        gradients are then the scaler's business, not a finding).

        Raises `HealthCheckError` for a "raise" finding or an escalation: of
        this step with sync="step", of an earlier step with sync="never".
        """
        if self.origin_tracker is not None:  # the next backward reads the local gradients if checked
            self.origin_tracker.armed = step is None or self.options.due(step + 1)
        step = self.checks * self.options.check_every if step is None else step
        self._deliver(block=False)
        if not self.options.due(step):
            self._scalars.clear()  # a step without a Report: its numbers go nowhere
            if self.origin_tracker is not None:  # a check names the ranks of its own step only
                self.origin_tracker.reset()
            return None
        prepared, self._prepared = self._prepared, None
        if found_inf is not None:  # gradients were scaled at the end of backward
            self._scaled = True
        if prepared is None or prepared.step != step or found_inf is not None:
            prepared = self._prepare(step, found_inf)
        return self._commit(prepared)

    def check_at_backward_end(self, next_step: Callable[[], int]) -> _Handle:
        """Runs the statistics, checks and policy when backward finishes, before
        any other code can change the gradients (clipping spreads one NaN to
        every gradient), for the step that ``next_step()`` names; `check` then
        uses that verdict without reading the gradients again. With gradient
        accumulation the last backward before `check` is the one that counts
        (``micro_batches`` says how many there were). Under a GradScaler
        (`check` given ``found_inf``) gradients are still scaled at the end of
        backward, so checks run at `check` time instead, as they do under
        compiled autograd (whose engine runs no end-of-backward callback).
        Returns a handle whose ``remove()`` detaches the hooks."""
        hooks = [p.register_post_accumulate_grad_hook(self._grad_ready)
                 for group in self.param_groups for p in group["params"]
                 if isinstance(p, torch.Tensor) and p.requires_grad]
        self._next_step = next_step
        return _Handles(hooks)

    def attach_activations(self, watch) -> None:
        """Makes `watch` (a `torchhealth.watch.Watch`, or None to detach) a source
        of this monitor: its passes of a step join that step's check."""
        if watch is not None and self._activations not in (None, watch):
            raise ValueError("this monitor already takes activations from another watch; "
                             "remove() it first")
        self._activations = watch

    def _grad_ready(self, param) -> None:
        # The first gradient of a backward pass queues one callback that the
        # autograd engine runs once the whole pass is done (as DDP and FSDP do).
        # Compiled autograd traces this hook and runs no such callback: none is
        # queued there, and `check` does the work at step time.
        if not self._queued:
            self._queued = at_backward_end(self._backward_end)

    def _backward_end(self) -> None:
        self._queued = False
        step = self._next_step()
        if self._prepared is None or self._prepared.step != step:
            self._backwards = 0
        self._backwards += 1
        if self._scaled or not self.options.due(step):
            return
        prepared = self._prepare(step, None)
        prepared.versions = [g._version for g in prepared.batch.grads]
        self._prepared = prepared

    # -- stages -----------------------------------------------------------------------
    # The stages run in inference mode: a check makes a few hundred small ops
    # (`torchhealth.checks`), each cheaper without autograd's bookkeeping, and
    # none of its tensors is ever differentiated. In-place actions on the
    # gradients (normal tensors) are allowed there and still bump their
    # version counters. What leaves the monitor as a tensor is only read (the
    # skip flag, `CheckResult.skip`), or copied first (`state_dict`).
    @torch.inference_mode()
    def _prepare(self, step: int, found_inf: torch.Tensor | None) -> _Prepared:
        """collect -> stats -> checks -> policy, on the device; nothing is kept yet."""
        batch = self.collector.collect()
        stats = self._stats(batch.tensors, batch.devices)
        state = self._running_state(batch, stats.device)
        if found_inf is not None:
            found_inf = found_inf.to(stats.device, non_blocking=True)
        # After the statistics' collectives, in the same order on every rank. With
        # sync="step" it waits for the verdict instead (see `_commit`).
        late = self._mode(batch.devices) != "step"
        origin = self.origin_tracker.gather() if self.origin_tracker is not None and late else None
        signals, state = run_checks(stats, batch.layout, self.options.thresholds, state, found_inf)
        grad_norm = grad_norm_of(signals)
        decision = decide(signals, self.options.policy, found_inf, state.skips,
                          self.options.escalate_after)
        return _Prepared(step, batch, stats, signals, grad_norm, decision,
                         dataclasses.replace(state, skips=decision.consecutive_skips), late, origin)

    def _activation_passes(self, step: int) -> list:
        return self._activations.take(step) if self._activations is not None else []

    def _commit(self, p: _Prepared) -> CheckResult:
        """host copy -> in-place actions -> delivery; the running state moves on."""
        with torch.inference_mode():
            result = self._result(p)
        self.checks += 1
        self._pending.append(result)
        self._last = result
        if not result.late:
            self._deliver(block=True)
        return result

    def _result(self, p: _Prepared) -> CheckResult:
        """The host copy and the in-place actions of `_commit` (in inference mode)."""
        self._state = p.state
        self.micro_batches, self._backwards = self._backwards, 0
        late = p.late
        # Checked at the end of backward and changed in place since (clipping):
        # the norm of the gradients the step will use, to report beside the raw
        # one. In-place ops bump a tensor's version counter, so unchanged
        # gradients cost no second pass (edits through ``.data`` bypass the
        # counter and go unseen). Sparse gradients may hold duplicate indices:
        # left out.
        changed = p.versions is not None and any(
            g._version != v for g, v in zip(p.batch.grads, p.versions))
        applied = (grad_norm_(p.batch.grads, p.grad_norm.device)
                   if changed and not any(g.is_sparse for g in p.batch.grads) else None)
        result = CheckResult(p.step, p.stats, p.batch.layout, p.signals, p.decision, p.grad_norm,
                             self.options, late=late, activations=self._activation_passes(p.step),
                             applied_norm=applied, scalars=self._scalars, origin=p.origin,
                             world_size=self.world_size)
        self._scalars = {}
        if self.origin_tracker is not None and not late:
            # The host reads this verdict now, so the ranks are gathered only when
            # there is one to name: when a gradient is non-finite after
            # communication, which every rank sees alike (a healthy step costs no
            # collective). sync="never" gathers at every check, in `_prepare`.
            if result.nonfinite_grads:
                result.origin = self.origin_tracker.gather()
                result.origin.gather_modules(result.local_origin())
            else:
                self.origin_tracker.reset()
        act_(p.batch.grads, self.options.policy, p.grad_norm, self.options.max_grad_norm,
             None if late else result.nonfinite_grads)
        return result

    def flush(self) -> None:
        """Delivers every pending result now (waits for its copy)."""
        self._deliver(block=True)

    @property
    def last_report(self) -> Report | None:
        """The Report of the newest check (delivers pending results first)."""
        self.flush()
        return None if self._last is None else self._last.report()

    def state_dict(self) -> dict:
        """Running state (the gradient-norm baseline, dead counters and the
        consecutive-skip count) and the number of checks, for checkpoints."""
        state = self._state.state_dict() if self._state is not None else self._saved_state
        # Copies: the running state is made in inference mode (see `_prepare`),
        # and a checkpoint loader fills its template in place.
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v
                 for k, v in state.items()} if state is not None else None
        return {"checks": self.checks, "running": state}

    def load_state_dict(self, d: Mapping) -> None:
        self.checks = int(d["checks"])
        self._saved_state = d.get("running")
        self._state = None  # rebuilt on the right device at the next check

    def _mode(self, devices: list[torch.device]) -> str:
        if self.options.sync != "auto":
            return self.options.sync
        return "step" if all(d.type == "cpu" for d in devices) else "never"

    def _running_state(self, batch, device) -> RunningState:
        num_params = len(batch.layout.param_names)
        if batch.changed_params:
            self._state = None
        if self._state is not None and self._state.dead.numel() == num_params:
            return self._state
        saved, self._saved_state = self._saved_state, None
        if saved is not None and saved["dead"].numel() == num_params:
            return RunningState.from_state_dict(saved).to(device)
        return RunningState.zeros(num_params, device)

    def _stats(self, tensors: list[torch.Tensor], devices: list[torch.device]) -> TensorStats:
        """One fused tensor_stats call per device; rows end up on the first
        tensor's device (tiny device-to-device copies, no host sync)."""
        if not tensors:
            raise ValueError("HealthMonitor: nothing to check (no floating-point parameters)")
        histogram = self.options.histogram_due(self.checks)
        if distributed.holds_dtensor(tensors):
            # The combine stage: rows of the global tensors (FSDP2, tensor parallel,
            # HSDP), identical on every rank, so every rank reaches the same verdict.
            # Plain tensors beside them are taken as replicated (DDP).
            return distributed.global_stats(tensors, histogram=histogram, plain="replicated")
        if len(devices) == 1:
            return tensor_stats(tensors, histogram=histogram)
        parts = [tensor_stats([t for t in tensors if t.device == d], histogram=histogram)
                 for d in devices]
        return TensorStats.cat([s.to(devices[0], non_blocking=True) for s in parts])

    def _deliver(self, block: bool) -> None:
        # In order; a result still in flight holds back the ones after it.
        while self._pending and (block or self._pending[0].ready or len(self._pending) > 2):
            result = self._pending.pop(0)
            if not (self._callbacks or result.fired):
                continue
            report = result.report()
            rank0 = _rank() == 0
            for cb, all_ranks in list(self._callbacks):
                if rank0 or all_ranks:
                    cb(report)
            # Every rank raises together (same numbers, same verdict); rank 0 warns.
            dispatch(report, self.options.policy, late=result.late, warn=rank0,
                     escalated=self.options.escalate_after if result.escalated else None)
