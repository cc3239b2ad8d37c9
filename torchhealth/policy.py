"""Policies: what to do when a check fires.

Per check (see `torchhealth.checks.CHECKS`) one of:

- ``"ignore"``: record the finding in the Report, nothing else.
- ``"warn"``: also emit a `HealthWarning`.
- ``"raise"``: raise `HealthCheckError` naming the step, the tensors and their
  statistics. Raised from Python once the verdict reaches the host (never a
  device assert, which would destroy a CUDA context).
- ``"skip"``: warn and skip the optimizer step. The step is predicated, never
  masked: parameters and optimizer state stay bit-identical to not stepping.
- ``"zero"`` (nonfinite only): warn and replace non-finite gradient values by 0.
- a callable ``fn(report, finding)``: called with the host-side Report.

The default (`DEFAULT`) skips steps with non-finite values and warns on
everything else. Device-side actions (skip flag, zeroing, clipping) live here
too, so that every caller of the monitor acts the same way.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Mapping

import torch

from .checks import CHECKS, Signal, stacked
from .report import Finding, Report

ACTIONS = ("ignore", "warn", "raise", "skip", "zero")
DEFAULT: dict[str, str] = {"nonfinite": "skip", "exploding": "warn", "vanishing": "warn",
                           "headroom": "warn", "dead": "warn"}
Action = str | Callable[[Report, Finding], None]


class HealthWarning(UserWarning):
    """A health check fired under the "warn", "skip" or "zero" policy."""


class HealthCheckError(RuntimeError):
    """A health check fired under the "raise" policy. ``report`` is the full
    Report of the failing check (``report.step`` is the step it happened in)."""

    def __init__(self, message: str, report: Report):
        super().__init__(message)
        self.report = report


def resolve(policy: str | Mapping[str, Action] | None) -> dict[str, Action]:
    """A full check -> action map from None (`DEFAULT`), one action for every
    check, or a partial map (missing checks keep their default)."""
    if policy is None:
        out = dict(DEFAULT)
    elif isinstance(policy, str) or callable(policy):
        out = {c: policy for c in CHECKS}
    elif isinstance(policy, Mapping):
        unknown = set(policy) - set(CHECKS)
        if unknown:
            raise ValueError(f"policy: unknown check(s) {sorted(unknown)}; checks are {list(CHECKS)}")
        out = {**DEFAULT, **policy}
    else:
        raise TypeError(f"policy must be None, an action or a dict of check -> action, "
                        f"got {type(policy).__name__}")
    for check, action in out.items():
        if not callable(action) and action not in ACTIONS:
            raise ValueError(f"policy[{check!r}] = {action!r}; actions are {list(ACTIONS)} "
                             "or a callable(report, finding)")
        if action == "zero" and check != "nonfinite":
            raise ValueError(f"policy[{check!r}] = 'zero': only non-finite values can be zeroed")
    return out


def describe(action: Action) -> str:
    return action if isinstance(action, str) else getattr(action, "__name__", "callable")


# -- host side ---------------------------------------------------------------------
def _library_dirs() -> tuple[str, ...]:
    global _LIBRARY_DIRS
    if not _LIBRARY_DIRS:
        dirs = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
        for name in ("torch", "lightning", "pytorch_lightning", "transformers", "accelerate"):
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.submodule_search_locations:
                dirs += [os.path.abspath(d) + os.sep for d in spec.submodule_search_locations]
        _LIBRARY_DIRS = tuple(dirs)
    return _LIBRARY_DIRS


def user_stacklevel() -> int:
    """The `warnings.warn` stacklevel (from this function's caller) of the first
    frame outside torchhealth and the training libraries around it (torch,
    Lightning, transformers, accelerate): warnings then point at the user's
    training loop, not into a framework."""
    dirs = _library_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(dirs):
        frame, level = frame.f_back, level + 1
    return level


_LIBRARY_DIRS: tuple[str, ...] = ()


def dispatch(report: Report, policy: Mapping[str, Action], *, late: bool = False,
             escalated: int | None = None, warn: bool = True) -> None:
    """Carries out the host-side actions of `report`'s findings: warnings and
    callables first, then one `HealthCheckError` for every "raise" finding (and
    for an escalation: ``escalated`` consecutive skipped steps).
    ``late``: the verdict arrives after that step's optimizer step (sync="never").
    ``warn=False`` leaves out the warnings (ranks other than 0), never a raise.
    A `Finding.local` one (this rank's own activations) warns on its rank and
    never raises: the other ranks' Reports do not hold it."""
    to_raise = []
    for f in report.findings:
        if f.severity == "info":  # a fact (e.g. a gradient zero by construction), not an alarm
            continue
        action = policy.get(f.check, "warn")  # activation checks (torchhealth.watch) warn
        if callable(action):
            action(report, f)
        elif action == "ignore":
            continue
        elif f.local or (action != "raise" and warn):  # a local finding: warned on its rank, never raised
            warnings.warn(f"torchhealth step {report.step}: {f.check}: {f.message}",
                          HealthWarning, stacklevel=user_stacklevel())
        elif action == "raise":
            to_raise.append(f)
    if to_raise or escalated:
        when = ("reported late (sync='never'): that step's optimizer step was already taken"
                if late else "its optimizer step was not taken")
        if to_raise:
            lines = [f"torchhealth: step {report.step} failed {len(to_raise)} check(s) "
                     f"(policy 'raise'; {when}):"]
            lines += [f"  {f.check}: {f.message}" for f in to_raise]
        else:
            lines = [f"torchhealth: the policy skipped {escalated} steps in a row, up to step "
                     f"{report.step} (escalate_after={escalated}): the run is not recovering "
                     f"({when}):"]
            lines += [f"  {f.check}: {f.message}" for f in report.findings]
        lines.append(f"  grad norm {report.grad_norm:.4g}, param norm {report.param_norm:.4g}")
        raise HealthCheckError("\n".join(lines), report)


# -- device side -------------------------------------------------------------------
@dataclass
class Decision:
    """What the policy decided about one check, on the device (0-d tensors).

    ``skip``: skip this optimizer step (a "skip" check fired, or the GradScaler
    found inf); None when nothing can skip. ``scaler_skip``: the GradScaler's
    part of it (None without a scaler). ``consecutive_skips``: checks in a row
    whose step the policy skipped, this one included. ``escalated``: that count
    reached ``escalate_after``, so the host raises."""

    skip: torch.Tensor | None
    scaler_skip: torch.Tensor | None
    consecutive_skips: torch.Tensor
    escalated: torch.Tensor


def decide(signals: list[Signal], policy: Mapping[str, Action], found_inf: torch.Tensor | None,
           consecutive_skips: torch.Tensor, escalate_after: int | None) -> Decision:
    """The device-side verdict of one check: one function of the signals."""
    skipping = [i for i, s in enumerate(signals) if policy[s.check] == "skip"]
    if not skipping:
        policy_skip = None
    elif skipping == list(range(skipping[0], skipping[-1] + 1)):  # one check's signals: a slice
        policy_skip = stacked(signals)[0][skipping[0]:skipping[-1] + 1].any()
    else:  # not an index list: on an accelerator that would be a copy from the host
        policy_skip = torch.stack([signals[i].fired for i in skipping]).any()
    scaler_skip = None if found_inf is None else found_inf.reshape(()) > 0
    parts = [x for x in (policy_skip, scaler_skip) if x is not None]
    skip = (parts[0] if len(parts) == 1 else torch.stack(parts).any()) if parts else None
    if policy_skip is None:
        consecutive = torch.zeros_like(consecutive_skips)
    else:
        consecutive = torch.where(policy_skip, consecutive_skips + 1, 0)
    escalated = (consecutive >= escalate_after) if escalate_after is not None else \
        torch.zeros((), dtype=torch.bool, device=consecutive.device)
    return Decision(skip, scaler_skip, consecutive, escalated)


def act_(grads: list[torch.Tensor], policy: Mapping[str, Action], total_norm: torch.Tensor,
         max_grad_norm: float | None, nonfinite_grads: bool | None) -> None:
    """The in-place actions on gradients: zeroing non-finite values (policy
    "zero"; when `nonfinite_grads` is None, i.e. not known on the host, it runs
    unconditionally, a no-op on finite values) and clipping to `max_grad_norm`
    with the total norm the statistics already hold. Never synchronises."""
    if policy["nonfinite"] == "zero" and nonfinite_grads is not False:
        zero_nonfinite_(grads)
    if max_grad_norm is not None:
        clip_(grads, total_norm, max_grad_norm)


def _by_device_dtype(grads: Iterable[torch.Tensor]) -> dict:
    # Elementwise in-place actions act on a sparse gradient's values (duplicate
    # indices included: scaling each is scaling their sum).
    groups = defaultdict(list)
    for g in grads:
        if g is not None:
            g = g._values() if g.is_sparse else g
            groups[(g.device, g.dtype)].append(g)
    return groups


@torch.no_grad()
def grad_norm_(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The total L2 norm of `grads` as they are now (float64, 0-d, on `device`),
    one `torch._foreach_norm` per device and dtype, without a sync."""
    parts = [torch.stack(torch._foreach_norm(gs)).double().to(device) for gs in
             _by_device_dtype(grads).values()]
    return torch.cat(parts).square().sum().sqrt() if parts else torch.zeros((), dtype=torch.float64,
                                                                                device=device)


@torch.no_grad()
def zero_nonfinite_(grads: Iterable[torch.Tensor]) -> None:
    """Replaces NaN and +-Inf gradient values by 0 in place; finite values are
    untouched (bit for bit), so it is safe to run unconditionally."""
    for g in grads:
        if g is not None:
            (g._values() if g.is_sparse else g).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def clip_(grads: Iterable[torch.Tensor], total_norm: torch.Tensor, max_norm: float,
          eps: float = 1e-6) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` with a norm that is already known (the
    statistics' float64 norm of the finite gradient values): scales every
    gradient by ``min(1, max_norm / (total_norm + eps))`` without a sync.
    Returns the coefficient (0-d, on the norm's device)."""
    coef = torch.clamp(max_norm / (total_norm + eps), max=1.0)
    for (device, _), gs in _by_device_dtype(grads).items():
        torch._foreach_mul_(gs, coef.to(device=device, dtype=torch.float32))
    return coef


@torch.no_grad()
def unscale_(grads: Iterable[torch.Tensor], grad_scale: torch.Tensor) -> None:
    """Divides gradients by a GradScaler's scale in place, exactly as
    ``GradScaler.unscale_`` does (it multiplies by the float32 reciprocal)."""
    inv = grad_scale.double().reciprocal().float()
    for (device, _), gs in _by_device_dtype(grads).items():
        dummy = torch.zeros((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, dummy, inv.to(device))


def accepts_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours ``optimizer.found_inf`` (torch's fused
    Adam, AdamW, SGD and Adagrad): then it skips on the device, no sync."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and \
        getattr(optimizer, "defaults", {}).get("fused", False) is True


def predicated_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor | bool | None,
                    closure: Callable | None = None):
    """Runs ``optimizer.step(closure)`` unless `skip`. A skipped step leaves
    parameters and state bit-identical to not stepping: optimizers that accept
    ``found_inf`` get it and skip on the device without a sync; any other
    optimizer is simply not called, which reads one flag when `skip` is a device
    tensor. Returns ``(step's return value or None, skipped)`` where skipped is
    a bool or, on the sync-free path, a 0-d bool tensor."""
    args = () if closure is None else (closure,)
    if skip is None or skip is False:
        return optimizer.step(*args), False
    if skip is True:
        return None, True
    if accepts_found_inf(optimizer):
        optimizer.found_inf = skip.float()
        try:
            return optimizer.step(*args), skip
        finally:
            del optimizer.found_inf
    if read_flag(skip):
        return None, True
    return optimizer.step(*args), False


def read_flag(flag: torch.Tensor) -> bool:
    """Reads a 0-d device flag on the host: the one synchronisation of a step
    whose skip decision stayed on the device but whose optimizer cannot take
    ``found_inf``."""
    return bool(flag)
