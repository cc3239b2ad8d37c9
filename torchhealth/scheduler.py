"""`SkipAwareScheduler`: an LR scheduler that does not advance for an optimizer
step a `HealthCheckedOptimizer` skipped, without reading the device."""
from __future__ import annotations

from .hostcopy import HostCopy
from .optim import HealthCheckedOptimizer


class SkipAwareScheduler:
    """Wraps an LR scheduler so that ``step()`` does not advance it for an
    optimizer step that a `HealthCheckedOptimizer` skipped. The scheduler may be a
    torch scheduler (its ``optimizer``) or a wrapper holding several optimizers,
    such as accelerate's ``AcceleratedScheduler`` (its ``optimizers``), each of
    which may itself be wrapped (accelerate's ``AcceleratedOptimizer``). Every
    other attribute is the scheduler's.

    It never reads the device. It knows whether the last step was skipped when
    the host already does: the monitor read the verdict during the step
    (sync="step", the default on the CPU), the optimizer read the flag itself
    (under sync="never", an optimizer that cannot take ``found_inf``), or the
    check's non-blocking copy to the host has landed (asked without waiting).
    Under sync="never" with a fused optimizer (Adam, AdamW, SGD, Adagrad with
    ``fused=True``) the verdict of the step just taken is usually still in
    flight: the scheduler then steps, and the first ``step()`` call after that
    copy lands saying the step was skipped is held back. So after a skip the
    learning rate runs one scheduler step ahead until the skip is known (one or
    two steps later: the monitor waits for copies more than two checks old), and
    from then on the schedule is the same as if the skip had been known at once;
    with no skipped step it is the plain scheduler's. Skips learnt late and not
    yet made up are not saved in the scheduler's ``state_dict()``.
    """

    def __init__(self, scheduler):
        optimizers = getattr(scheduler, "optimizers", None) or [getattr(scheduler, "optimizer", None)]
        self._checked = [o for o in (_health_checked(x) for x in optimizers) if o is not None]
        if not self._checked:
            raise TypeError(f"SkipAwareScheduler: {type(scheduler).__name__} steps no "
                            "HealthCheckedOptimizer (looked at its optimizer/optimizers)")
        self.scheduler = scheduler
        self._in_flight: list[list[HostCopy]] = []  # verdicts of steps it advanced for
        self._owed = 0  # scheduler steps to hold back: skips learnt after advancing

    def step(self, *args, **kwargs) -> None:
        self._owed += self._landed_skips()
        verdicts = [o._skip_verdict() for o in self._checked]
        if any(v is True for v in verdicts):
            return
        pending = [v for v in verdicts if isinstance(v, HostCopy)]
        if pending:
            self._in_flight.append(pending)
        if self._owed:
            self._owed -= 1
            return
        self.scheduler.step(*args, **kwargs)

    def _landed_skips(self) -> int:
        """Skips among the steps it advanced for whose verdict has since landed."""
        skips, waiting = 0, []
        for copies in self._in_flight:
            if any(c.ready and c.value("skip") for c in copies):
                skips += 1
            elif not all(c.ready for c in copies):
                waiting.append(copies)
        self._in_flight = waiting
        return skips

    def __getattr__(self, name):
        return getattr(self.__dict__["scheduler"], name)


def _health_checked(optimizer) -> HealthCheckedOptimizer | None:
    """The HealthCheckedOptimizer inside framework wrappers (``.optimizer``)."""
    for _ in range(4):
        if optimizer is None or isinstance(optimizer, HealthCheckedOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None
