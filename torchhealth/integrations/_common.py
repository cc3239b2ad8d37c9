"""What the framework callbacks share."""
from __future__ import annotations

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
