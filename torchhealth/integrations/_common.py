"""What the framework callbacks share."""
from __future__ import annotations

import sys
import weakref

import torch


def skip_by_dropping_gradients(optimizer: torch.optim.Optimizer, skip) -> bool:
    """Makes the coming ``optimizer.step()`` a no-op by setting every gradient
    to None: torch's optimizers then leave each parameter and its state
    (moments, step counts) exactly as they were. Frameworks call the step
    themselves, after the callback, so this is the one way a callback can skip
    it. `skip`: None, a bool or a 0-d bool tensor (reading it is one flag's sync)."""
    if skip is None:
        return False
    if isinstance(skip, torch.Tensor):
        skip = bool(skip.item())
    if skip:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
    return bool(skip)


def log_learning_rates(monitor, optimizer: torch.optim.Optimizer) -> None:
    """The learning rate of the step about to be taken, as the Report's user
    scalar ``lr`` (``lr/group<i>`` for each group when the groups differ), so
    the HTML report draws it beside the checks. A tensor lr is not read here."""
    rates = [g["lr"] for g in optimizer.param_groups if "lr" in g]
    if not rates:
        return
    same = all(r is rates[0] or (not torch.is_tensor(r) and r == rates[0]) for r in rates)
    if same:
        monitor.log(lr=rates[0])
    else:
        monitor.log(**{f"lr/group{i}": r for i, r in enumerate(rates)})


def unwrap(optimizer):
    """The torch optimizer inside a framework's wrapper (Lightning's
    LightningOptimizer, accelerate's AcceleratedOptimizer)."""
    seen = set()
    while not isinstance(optimizer, torch.optim.Optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def unscale_for_check(scaler, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """With an enabled GradScaler: makes sure `optimizer`'s gradients are
    unscaled (calling ``scaler.unscale_(optimizer)`` if nobody has yet, as for
    optimizers that would unscale inside their fused ``step()``; the scaler
    remembers it, so its ``step`` then passes no scale and only ``found_inf``)
    and returns the scaler's found_inf for this step (0-d, on the device).
    None without a scaler."""
    if scaler is None or not scaler.is_enabled():
        return None
    # GradScaler has no public "was this optimizer unscaled, and what did it
    # find" query: its private per-optimizer state holds both (same layout in
    # torch 2.4 to 2.14.1; tests/test_integrations.py covers it under AMP).
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"].name == "READY":
        scaler.unscale_(optimizer)
    found = list(state["found_inf_per_device"].values())
    if not found:
        return None
    return sum(f.to(found[0].device) for f in found[1:]) + found[0] if len(found) > 1 else found[0]


# HealthCheckedOptimizer -> weak references to the accelerate AcceleratedOptimizers
# around it (kept outside the optimizer, which must stay picklable).
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def accelerate_wrappers(optimizer) -> list:
    """The accelerate ``AcceleratedOptimizer`` objects that step `optimizer`
    (empty when accelerate is not imported). accelerate keeps its own skip flag
    per wrapper and its scheduler and ``Accelerator.optimizer_step_was_skipped``
    read only that, and nothing hands the inner optimizer its wrapper: it is found
    the first time it steps `optimizer`, as the ``self`` of a calling ``step``
    frame (``AcceleratedOptimizer.step``, through ``GradScaler.step`` under
    mixed precision), then remembered."""
    module = sys.modules.get("accelerate.optimizer")
    if module is None:
        return []
    found = [w for w in (r() for r in _WRAPPERS.get(optimizer, ())) if w is not None]
    if found:
        return found
    frame, depth = sys._getframe(1), 0
    while frame is not None and depth < 8:
        if frame.f_code.co_name == "step":
            caller = frame.f_locals.get("self")
            if isinstance(caller, module.AcceleratedOptimizer) and caller.optimizer is optimizer:
                _WRAPPERS[optimizer] = [weakref.ref(caller)]
                return [caller]
        frame, depth = frame.f_back, depth + 1
    return []


def tell_wrappers(wrappers: list, skipped: bool) -> None:
    """Sets accelerate's skip flag on each wrapper. Its flag is private
    (``_is_overflow``, the one ``step_was_skipped`` returns; accelerate 0.2x to
    1.15): without a GradScaler accelerate never sets it; with one it sets it
    after ``scaler.step`` returns, to whether the inner ``step`` was not reached
    (``_accelerate_step_called``), which the wrapper's step always is, so that
    one says whether the step was taken. Tested in tests/test_accelerate.py."""
    for w in wrappers:
        w._is_overflow = skipped
        if getattr(w, "scaler", None) is not None:
            w._accelerate_step_called = not skipped
