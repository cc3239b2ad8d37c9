"""`HealthMonitor`: the one object that reads a model's tensors, checks them and
produces Reports. `HealthCheckedOptimizer` and the framework callbacks are thin
glue around it.

Usage (what an integration does around each optimizer step)::

    monitor = HealthMonitor(optimizer, model=model, check_every=1, sync="auto")
    monitor.on_report(sink)                  # every Report, in step order
    ...
    loss.backward()
    result = monitor.check(step)            # CheckResult, or None between checks
    # result.skip: should this step be skipped (bool, or a 0-d device tensor)
    # policy.predicated_step(optimizer, result.skip if result else None)
    ...
    monitor.flush()                         # at the end: deliver what is pending
    monitor.last_report                     # the newest Report (built lazily)

What one check does, on the device and without synchronising: one fused
`tensor_stats` call per device over every parameter, gradient and (opt-in)
optimizer state tensor; the checks of `torchhealth.checks` against running state
kept on the device; the device-side policy actions (skip flag, zeroing
non-finite gradient values, clipping to ``max_grad_norm`` with the total norm
the statistics already hold). Then the verdict goes to the host, as ``sync``
says:

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

import logging
from collections.abc import Callable, Iterable, Mapping

import torch

from . import checks as C
from . import policy as P
from ._ops import tensor_stats
from .report import Report
from .stats import TensorStats

log = logging.getLogger("torchhealth")
SYNC_MODES = ("auto", "never", "step")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Handle:
    def __init__(self, callbacks: list, fn):
        self._callbacks, self._fn = callbacks, fn

    def remove(self) -> None:
        if self._fn in self._callbacks:
            self._callbacks.remove(self._fn)


class CheckResult:
    """One check, still on the device. ``skip`` says whether this step must be
    skipped (a "skip" finding, or the GradScaler's ``found_inf``): a bool once the
    verdict is on the host, else a 0-d bool tensor; None when nothing can skip. `report()` builds the
    host-side Report, reading the device if the copy has not landed yet."""

    def __init__(self, step, stats, rows, signals, policy, *, skip, found_inf, grad_norm,
                 max_grad_norm, zeroed):
        self.step, self.stats, self.rows, self.signals = step, stats, rows, signals
        self.policy, self.skip, self.found_inf = policy, skip, found_inf
        self.grad_norm, self.max_grad_norm, self.zeroed = grad_norm, max_grad_norm, zeroed
        self._report: Report | None = None
        self._host: list | None = None
        self.late = False  # whether the verdict reaches the host after the optimizer step
        # One packed int64 tensor holds everything the host may need, so that
        # getting it there is a single copy (and, on CUDA, a single event).
        flags = [s.fired for s in signals] + [
            skip if skip is not None else grad_norm.new_zeros((), dtype=torch.bool),
            found_inf.reshape(()) > 0 if found_inf is not None else grad_norm.new_zeros((), dtype=torch.bool)]
        values = torch.stack([s.value for s in signals] + [grad_norm])
        masks = torch.cat([s.mask for s in signals])
        packed = torch.cat([stats.data.reshape(-1), torch.stack(flags).long(),
                            values.view(torch.int64), masks.long()])
        self._event = None
        if packed.device.type == "cuda":
            self._packed = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._packed.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif packed.device.type == "cpu":
            self._packed = packed
        else:  # other accelerators: a plain (blocking) copy
            self._packed = packed.cpu()

    @property
    def ready(self) -> bool:
        """Whether the host copy has landed (reading it would not block)."""
        return self._event is None or self._event.query()

    def _read(self):
        if self._host is None:
            if self._event is not None:
                self._event.synchronize()
            p = self._packed
            n_stats, n_sig = self.stats.data.numel(), len(self.signals)
            stats = TensorStats(p[:n_stats].view(self.stats.data.shape))
            flags = p[n_stats:n_stats + n_sig + 2].bool().tolist()
            values = p[n_stats + n_sig + 2:n_stats + 2 * n_sig + 3].view(torch.float64).tolist()
            masks = p[n_stats + 2 * n_sig + 3:].bool().tolist()
            split, at = [], 0
            for s in self.signals:
                split.append(masks[at:at + s.mask.numel()])
                at += s.mask.numel()
            self._host = [stats, flags, values, split]
        return self._host

    @property
    def fired(self) -> bool:
        """Whether any check whose policy is not "ignore" fired (reads the host copy)."""
        flags = self._read()[1]
        return any(f and self.policy[s.check] != "ignore" for s, f in zip(self.signals, flags))

    @property
    def skipped(self) -> bool:
        """Whether this step is skipped, by the policy or by a GradScaler (reads
        the host copy)."""
        return self._read()[1][-2]

    def report(self) -> Report:
        """The host-side Report of this check (built once)."""
        if self._report is None:
            stats, flags, values, masks = self._read()
            r = self.rows
            report = Report.from_stats(self.step, stats, r.names, r.roles, r.shapes, r.dtypes)
            skip, scaler_skip = flags[-2], flags[-1]
            actions: list[str] = []
            for s, fired, value, mask in zip(self.signals, flags, values, masks):
                f = C.finding(s, fired, mask, value, report.rows, r.param_names)
                if f is None:
                    continue
                report.findings.append(f)
                action = self.policy[s.check]
                label = f"{P.describe(action)}: {s.check}"
                if label not in actions and action != "ignore":
                    actions.append(label)
            if scaler_skip:
                actions.append("GradScaler skipped the step (inf/NaN from loss scaling; "
                               "not a model fault)")
            # With sync="never" zeroing runs on every check (a no-op on finite
            # values); it is an action only where there was something to zero.
            if self.zeroed and any(f for s, f in zip(self.signals, flags)
                                   if s.check == "nonfinite" and s.kind == "grad"):
                actions.append("zeroed non-finite gradient values")
            grad_norm = values[-1]
            if self.max_grad_norm is not None and grad_norm > self.max_grad_norm:
                actions.append(f"clipped gradients: norm {grad_norm:.4g} -> {self.max_grad_norm:.4g}")
            report.actions = actions
            report.skipped = bool(skip)
            self._report = report
        return self._report


class HealthMonitor:
    """Reads, checks and reports the health of a set of parameters.

    Args:
        source: a `torch.optim.Optimizer` (its live ``param_groups`` and, with
            ``optimizer_state=True``, its ``state``), an ``nn.Module``, or an
            iterable of parameters, ``(name, parameter)`` pairs or param groups.
        model: names parameters via ``model.named_parameters()`` and tells
            embedding tables apart (exempt from the zero-fraction check); a
            module given as `source` is its own model.
        check_every: check on steps where ``step % check_every == 0``.
        thresholds: a `torchhealth.checks.Thresholds` (defaults documented there).
        policy: a `torchhealth.policy` action for every check, or a dict of
            check -> action (missing checks keep `policy.DEFAULT`).
        sync: "auto", "never" or "step" (see the module docstring).
        optimizer_state: also read optimizer state tensors shaped like their
            parameter (e.g. Adam's ``exp_avg``/``exp_avg_sq``): True, or a
            collection of state keys.
        histogram: also compute log2 histograms (for sinks and reports; the
            checks do not need them).
        max_grad_norm: clip gradients to this total norm, reusing the statistics.

    API: `check` (once per optimizer step), `on_report`, `flush`,
    ``last_report``, `state_dict` / `load_state_dict`.
    """

    def __init__(self, source, *, model: torch.nn.Module | None = None, check_every: int = 1,
                 thresholds: C.Thresholds | None = None, policy=None, sync: str = "auto",
                 optimizer_state: bool | Iterable[str] = False, histogram: bool = False,
                 max_grad_norm: float | None = None):
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.optimizer = source if isinstance(source, torch.optim.Optimizer) else None
        if model is None and isinstance(source, torch.nn.Module):
            model = source
        if self.optimizer is None:
            named = list(source.named_parameters()) if isinstance(source, torch.nn.Module) else None
            items = named if named is not None else list(source)
            if items and isinstance(items[0], dict):
                self._groups = items
            elif items and isinstance(items[0], tuple):
                self._groups = [{"params": [p for _, p in items], "param_names": [n for n, _ in items]}]
            else:
                self._groups = [{"params": items}]
        self._names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        # Embedding tables get mostly-zero gradients by design.
        self._sparse_ids = {id(m.weight) for m in model.modules()
                            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))} \
            if model is not None else set()
        self.check_every = check_every
        self.thresholds = thresholds or C.Thresholds()
        self.policy = P.resolve(policy)
        self.sync = sync
        self.optimizer_state = optimizer_state
        self.histogram = histogram
        self.max_grad_norm = max_grad_norm
        self.checks = 0  # checks run so far
        self._callbacks: list[Callable[[Report], None]] = []
        self._pending: list[CheckResult] = []
        self._last: CheckResult | None = None
        self._rows_key = None
        self._rows: C.Rows | None = None
        self._params_key = None
        self._state: C.RunningState | None = None
        self._saved_state: dict | None = None

    # -- public API ------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups if self.optimizer is not None else self._groups

    def on_report(self, callback: Callable[[Report], None]) -> _Handle:
        """Calls ``callback(report)`` for every check, in step order (one step
        late with sync="never"). Returns a handle whose ``remove()`` detaches it."""
        self._callbacks.append(callback)
        return _Handle(self._callbacks, callback)

    def due(self, step: int) -> bool:
        return step % self.check_every == 0

    def check(self, step: int | None = None, *,
              found_inf: torch.Tensor | None = None) -> CheckResult | None:
        """Checks the current gradients, parameters and state; call it after
        backward and before the optimizer step. Delivers earlier results whose
        copy has landed first (sync="never"). Returns None when `step` is not
        due. ``found_inf``: a GradScaler's flag for this step (non-finite
        gradients are then the scaler's business, not a finding).

        Raises `HealthCheckError` for a "raise" finding: of this step with
        sync="step", of an earlier step with sync="never".
        """
        step = self.checks * self.check_every if step is None else step
        self._deliver(block=False)
        if not self.due(step):
            return None
        tensors, rows, grads = self._gather()
        stats = self._stats(tensors)
        device = stats.device
        if self._state is None or self._state.dead.numel() != len(rows.param_names):
            self._state = self._initial_state(len(rows.param_names), device)
        if found_inf is not None:
            found_inf = found_inf.to(device, non_blocking=True)
        grad_norm = C.total_grad_norm(stats, rows)
        signals, self._state = C.run_checks(stats, rows, self.thresholds, self._state, found_inf,
                                            grad_norm)
        self.checks += 1
        mode = self.sync if self.sync != "auto" else (
            "step" if all(t.device.type == "cpu" for t in tensors) else "never")
        skipping = [s.fired for s in signals if self.policy[s.check] == "skip"]
        if found_inf is not None:
            skipping.append(found_inf.reshape(()) > 0)
        skip = torch.stack(skipping).any() if skipping else None
        result = CheckResult(step, stats, rows, signals, self.policy, skip=skip, found_inf=found_inf,
                             grad_norm=grad_norm, max_grad_norm=self.max_grad_norm, zeroed=False)
        result.late = mode != "step"
        if mode == "step":
            flags = result._read()[1]
            result.skip = flags[-2] if skip is not None else None
            zero = self.policy["nonfinite"] == "zero" and any(
                f for s, f in zip(signals, flags) if s.check == "nonfinite" and s.kind == "grad")
        else:
            zero = self.policy["nonfinite"] == "zero"  # predicated per element: no sync
        if zero:
            P.zero_nonfinite_(grads)
            result.zeroed = True
        if self.max_grad_norm is not None:
            P.clip_(grads, grad_norm, self.max_grad_norm)
        self._pending.append(result)
        self._last = result
        if mode == "step":
            self._deliver(block=True)
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
        """Running state (the gradient-norm baseline and dead counters) and the
        number of checks, for checkpoints."""
        state = self._state.state_dict() if self._state is not None else self._saved_state
        return {"checks": self.checks, "running": state}

    def load_state_dict(self, d: Mapping) -> None:
        self.checks = int(d["checks"])
        self._saved_state = d.get("running")
        self._state = None  # rebuilt on the right device at the next check

    # -- internals --------------------------------------------------------------------
    def _initial_state(self, num_params: int, device) -> C.RunningState:
        saved, self._saved_state = self._saved_state, None
        if saved is not None and saved["dead"].numel() == num_params:
            return C.RunningState.from_state_dict(saved).to(device)
        return C.RunningState.zeros(num_params, device)

    def _deliver(self, block: bool) -> None:
        # In order; a result still in flight holds back the ones after it.
        while self._pending and (block or self._pending[0].ready or len(self._pending) > 2):
            result = self._pending.pop(0)
            if not (self._callbacks or result.fired):
                continue
            report = result.report()
            for cb in list(self._callbacks):
                cb(report)
            P.dispatch(report, self.policy, late=result.late, stacklevel=4)

    def _state_tensors(self, p) -> list[tuple[str, torch.Tensor]]:
        if not self.optimizer_state or self.optimizer is None:
            return []
        keys = None if self.optimizer_state is True else set(self.optimizer_state)
        st = self.optimizer.state.get(p)
        if not st:
            return []
        return [(k, v) for k, v in st.items()
                if isinstance(v, torch.Tensor) and v.dtype in _FLOATS and v.shape == p.shape
                and v.layout == torch.strided and (keys is None or k in keys)]

    def _gather(self) -> tuple[list[torch.Tensor], C.Rows, list[torch.Tensor]]:
        """The tensors to read, grouped by device; what each row is; the
        gradients themselves (for in-place actions)."""
        entries = []  # (tensor, param index, role)
        params = []
        grads = []
        for gi, group in enumerate(self.param_groups):
            gnames = group.get("param_names")
            for pj, p in enumerate(group["params"]):
                if p.dtype not in _FLOATS:
                    continue
                name = self._names.get(id(p)) or (gnames[pj] if gnames else f"group{gi}.param{pj}")
                j = len(params)
                params.append((p, name))
                entries.append((p, j, "param"))
                g = p.grad
                if g is not None:
                    grads.append(g)
                    if g.is_sparse:  # duplicate indices add up: read the true gradient
                        g = (g if g.is_coalesced() else g.coalesce())._values()
                    entries.append((g, j, "grad"))
                for k, v in self._state_tensors(p):
                    entries.append((v, j, f"state.{k}"))
        entries.sort(key=lambda e: str(e[0].device))  # stable: one block of rows per device
        # Rows are cached while nothing about them changes.
        key = tuple((j, role, t.dtype, t.device, tuple(t.shape)) for t, j, role in entries) + \
            tuple((id(p), p.requires_grad) for p, _ in params)
        if key != self._rows_key:
            self._rows = C.Rows(
                names=[params[j][1] for _, j, _ in entries], roles=[r for _, _, r in entries],
                dtypes=[t.dtype for t, _, _ in entries], shapes=[tuple(t.shape) for t, _, _ in entries],
                param_index=[j for _, j, _ in entries], param_names=[n for _, n in params],
                trainable=[p.requires_grad for p, _ in params],
                sparse=[id(p) in self._sparse_ids or (p.grad is not None and p.grad.is_sparse)
                        for p, _ in params])
            self._rows_key = key
            if tuple(id(p) for p, _ in params) != self._params_key:
                if self._params_key is not None:
                    log.info("torchhealth: the parameter set changed; dead-parameter counters restart")
                    self._state = None
                self._params_key = tuple(id(p) for p, _ in params)
        return [t for t, _, _ in entries], self._rows, grads

    def _stats(self, tensors: list[torch.Tensor]) -> TensorStats:
        """One fused tensor_stats call per device; rows end up on the first
        tensor's device (tiny device-to-device copies, no host sync). This is
        the one place statistics are made: a distributed reduction belongs
        here (counts and histograms sum, extremes take the extreme, exactly as
        `TensorStats.merge`), so that every rank then runs the same checks."""
        if not tensors:
            raise ValueError("HealthMonitor: nothing to check (no floating-point parameters)")
        devices = list(dict.fromkeys(t.device for t in tensors))
        if len(devices) == 1:
            return tensor_stats(tensors, histogram=self.histogram)
        parts = [tensor_stats([t for t in tensors if t.device == d], histogram=self.histogram)
                 for d in devices]
        return TensorStats.cat([s.to(devices[0], non_blocking=True) for s in parts])
