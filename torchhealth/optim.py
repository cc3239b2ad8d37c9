"""`HealthCheckedOptimizer`: any optimizer, with health checks around `step()`.

    opt = HealthCheckedOptimizer(torch.optim.AdamW(model.parameters()), model=model)
    sched = SkipAwareScheduler(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000))
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()                  # checks, acts on the policy, then steps (or skips)
        sched.step()                # does not advance after a skipped step (torchhealth.scheduler)
    print(opt.last_report)          # str(report): a table; report.to_dict(): JSON

It is thin glue around `HealthMonitor`, which holds the names, cadence, running
state, sync mode and policy. The wrapper shares the inner optimizer's
``param_groups``, ``state`` and ``defaults`` (learning-rate changes reach it;
every ``torch.optim.lr_scheduler`` accepts it); with no check firing, training is
bit-identical to the inner optimizer alone (unless ``max_grad_norm`` clips).
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from .hostcopy import HostCopy
from .integrations._common import accelerate_wrappers, tell_wrappers
from .policy import predicated_step, unscale_
from .monitor import HealthMonitor
from .options import MonitorOptions, backward_end_by_default
from .report import Report

_KEY = "torchhealth"


def _delegated(name: str):
    # Optimizer.__init__ (torch 2.4 to 2.14.1) assigns param_groups, state and
    # defaults on self before the inner optimizer can be attached, so until
    # then the attribute lives in the wrapper's __dict__; afterwards it is the
    # inner optimizer's. Tested by every test that wraps an optimizer.
    def get(self):
        inner = self.__dict__.get("_inner")
        return getattr(inner, name) if inner is not None else self.__dict__[f"_own_{name}"]

    def set_(self, value):
        inner = self.__dict__.get("_inner")
        if inner is not None:
            setattr(inner, name, value)
        else:
            self.__dict__[f"_own_{name}"] = value

    return property(get, set_, doc=f"The inner optimizer's ``{name}`` (shared, not copied).")


class HealthCheckedOptimizer(Optimizer):
    """Wraps `optimizer`: before every step, checks gradients, parameters and
    (opt-in) optimizer state through `HealthMonitor`, acts on the policy, then
    steps the inner optimizer or skips the step.

    Args (after the optimizer, keyword only): ``model`` (names the parameters),
    ``on_report`` (a callback for every Report), ``monitor`` (use this
    `HealthMonitor` instead of making one), ``options`` (a `MonitorOptions`)
    and any of its settings by name (``check_every``, ``policy``, ``sync``,
    ``thresholds``, ``optimizer_state``, ``histogram``, ``max_grad_norm``,
    ``escalate_after``), validated here.

    GradScaler: call ``scaler.unscale_(opt)`` / ``scaler.step(opt)`` on the
    wrapper. It declares ``_step_supports_amp_scaling`` so it sees every step,
    including those the scaler skips: still-scaled gradients are unscaled in place
    first (as ``unscale_`` would), so statistics describe true gradients, and the
    scaler's ``found_inf`` reaches the inner optimizer (on the device for fused
    Adam/AdamW/SGD/Adagrad, else as one flag read). Such a step is recorded as
    skipped by the scaler, not as a non-finite finding, and counted once.
    ``grad_scale`` itself stops at the wrapper: statistics of still-scaled
    gradients could not give exact subnormal and saturation counts, and for the
    power-of-two scales GradScaler uses, unscaling first is bit-identical to a
    fused optimizer unscaling inside its kernel (tests/test_optim.py checks it).

    accelerate: prepared by ``accelerator.prepare``, each step sets the
    ``AcceleratedOptimizer``'s own skip flag, which its ``AcceleratedScheduler``
    and ``Accelerator.optimizer_step_was_skipped`` read (a host bool: a skip
    decided on the device is read for it).

    Attributes: ``step_was_skipped``, ``last_report``, ``monitor``,
    ``optimizer`` (the inner one), ``steps`` and ``skipped_steps`` (saved in
    ``state_dict()`` under the "torchhealth" key, which a plain optimizer ignores).
    It can be deep-copied and pickled like a plain optimizer (report callbacks
    must then be picklable too).
    """

    _step_supports_amp_scaling = True

    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    def __init__(self, optimizer: Optimizer, *, model: torch.nn.Module | None = None,
                 on_report=None, monitor: HealthMonitor | None = None,
                 options: MonitorOptions | None = None, **settings):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"HealthCheckedOptimizer wraps a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if isinstance(optimizer, HealthCheckedOptimizer):
            raise TypeError("HealthCheckedOptimizer: the optimizer is already wrapped")
        if monitor is not None and (options is not None or settings):
            raise TypeError("HealthCheckedOptimizer: give either monitor= or settings, not both")
        self.__dict__["_inner"] = None
        # Optimizer.__init__ sets up hooks and profiling; an empty placeholder
        # group stands in until the inner optimizer's groups take over.
        super().__init__([{"params": []}], {})
        self.__dict__["_inner"] = optimizer
        for name in ("param_groups", "state", "defaults"):
            self.__dict__.pop(f"_own_{name}", None)
        self.monitor = monitor or HealthMonitor(optimizer, model=model, options=options, **settings)
        if on_report is not None:
            self.monitor.on_report(on_report)
        self.steps = 0
        self._skipped = 0  # int, or a 0-d device tensor until read
        self._last_skip: bool | torch.Tensor = False
        self._skip_copy: HostCopy | None = None  # the host copy of a skip decided on the device
        self._backward_hooks = (self.monitor.check_at_backward_end(self._next_step)
                                if backward_end_by_default(self.monitor.options, model) else None)

    def _next_step(self) -> int:
        return self.steps

    # Optimizer.__getstate__/__setstate__ keep only defaults, state and
    # param_groups (and would recreate hooks); the wrapper's attributes live
    # in its __dict__ and the three shared ones in the inner optimizer.
    def __getstate__(self) -> dict:
        # A copy in flight (a CUDA event) cannot be pickled; a copy of the
        # optimizer starts with the last step's skip as a plain bool.
        state = dict(self.__dict__)
        if state.get("_skip_copy") is not None:
            state["_skip_copy"], state["_last_skip"] = None, self.step_was_skipped
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._inner

    # -- the step ----------------------------------------------------------------------
    def step(self, closure=None):
        """Checks, then steps the inner optimizer unless the policy or a
        GradScaler skips it. With a closure (e.g. LBFGS) the closure is evaluated
        once here for the check and that first evaluation is handed on to the
        inner optimizer, so it is not computed twice."""
        grad_scale = self.__dict__.get("grad_scale")
        found_inf = self.__dict__.get("found_inf")
        inner_closure = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            inner_closure = _replay_first(closure, loss)
        if grad_scale is not None:
            unscale_(self._grads(), grad_scale)
        step = self.steps
        self.steps += 1  # counted even if the check raises: step() was called
        result = self.monitor.check(step, found_inf=found_inf)
        if result is not None:
            skip = result.skip
        else:
            skip = None if found_inf is None else found_inf.reshape(()) > 0
        out, skipped = predicated_step(self._inner, skip, inner_closure)
        self._last_skip = skipped
        # A skip left on the device (sync="never", an optimizer taking found_inf)
        # reaches the host in the check's own copy, or in a copy of the flag.
        self._skip_copy = None if not isinstance(skipped, torch.Tensor) else \
            result.copy if result is not None else HostCopy({"skip": skipped})
        wrappers = accelerate_wrappers(self)
        if wrappers:
            tell_wrappers(wrappers, self.step_was_skipped)
        if skipped is not False:
            self._skipped = self._skipped + skipped  # a device tensor stays one
        return loss if closure is not None and out is None else out

    def log(self, **scalars) -> None:
        """The user's numbers for this step's Report, e.g. ``opt.log(loss=loss,
        lr=sched.get_last_lr()[0])`` before ``opt.step()``: see `HealthMonitor.log`."""
        self.monitor.log(**scalars)

    def _grads(self):
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    @property
    def step_was_skipped(self) -> bool:
        """Whether the last `step()` skipped the inner optimizer (policy or
        GradScaler). Reads one device flag if the skip was decided on the device
        (`SkipAwareScheduler` does not: it waits for the check's host copy)."""
        s = self._last_skip
        return bool(s.item()) if isinstance(s, torch.Tensor) else bool(s)

    def _skip_verdict(self) -> bool | HostCopy:
        """Whether the last step was skipped, when the host knows it without
        waiting for the device; else the copy in flight that will say it."""
        if not isinstance(self._last_skip, torch.Tensor):
            return bool(self._last_skip)
        copy = self._skip_copy
        return bool(copy.value("skip")) if copy.ready else copy

    @property
    def skipped_steps(self) -> int:
        s = self._skipped
        return int(s.item()) if isinstance(s, torch.Tensor) else int(s)

    @property
    def last_report(self) -> Report | None:
        """The newest Report (delivers pending results first; see HealthMonitor)."""
        return self.monitor.last_report

    def flush(self) -> None:
        """Delivers pending reports now (at the end of training with sync="never")."""
        self.monitor.flush()

    # -- the rest of the Optimizer API, forwarded --------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self._inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("_inner") is None:  # the placeholder, from Optimizer.__init__
            return super().add_param_group(param_group)
        self._inner.add_param_group(param_group)

    def state_dict(self) -> dict:
        """The inner optimizer's state dict plus the wrapper's counters and the
        monitor's running state under "torchhealth" (ignored by a plain optimizer)."""
        _run_state_dict_hooks(self, "state_dict_pre")
        sd = self._inner.state_dict()
        sd[_KEY] = {"steps": self.steps, "skipped_steps": self.skipped_steps,
                    "monitor": self.monitor.state_dict()}
        return _run_state_dict_hooks(self, "state_dict_post", sd)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads the wrapper's own state dict or a plain optimizer's."""
        state_dict = dict(_run_state_dict_hooks(self, "load_state_dict_pre", state_dict))
        ours = state_dict.pop(_KEY, None)
        self._inner.load_state_dict(state_dict)
        if ours is not None:
            self.steps = int(ours["steps"])
            self._skipped = int(ours["skipped_steps"])
            self.monitor.load_state_dict(ours["monitor"])
        _run_state_dict_hooks(self, "load_state_dict_post")

    def __repr__(self) -> str:
        return f"HealthCheckedOptimizer({self._inner!r})"


def _run_state_dict_hooks(opt: Optimizer, kind: str, state_dict: dict | None = None):
    """Runs the hooks that users register with ``opt.register_<kind>_hook``:
    the wrapper builds its own state dict, so it runs them itself, as
    ``Optimizer.state_dict``/``load_state_dict`` do. They live in private
    dictionaries (``_optimizer_<kind>_hooks``, same names and call signatures
    in torch 2.4 to 2.14.1): ``hook(opt)`` without a state dict, else
    ``hook(opt, state_dict)``, whose non-None result replaces the state dict."""
    for hook in getattr(opt, f"_optimizer_{kind}_hooks").values():
        out = hook(opt) if state_dict is None else hook(opt, state_dict)
        if out is not None and state_dict is not None:
            state_dict = out
    return state_dict


def _replay_first(closure, loss):
    """A closure whose first call returns `loss` (already computed, gradients
    in place) and whose later calls re-evaluate `closure`."""
    first = [True]

    def replay():
        if first[0]:
            first[0] = False
            return loss
        return closure()

    return replay
