"""`MonitorOptions`: every setting of a health monitor, in one validated object.

`HealthMonitor`, `HealthCheckedOptimizer` and the Lightning and Hugging Face
callbacks all take these settings, either as keyword arguments (``check_every=2``)
or as ``options=MonitorOptions(...)``; `MonitorOptions.build` is the one place
that turns either into a validated object, so a bad setting fails when the
wrapper or callback is made, never at the first step.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .policy import resolve as resolve_policy
from ._args import number, positive_int
from .checks import Thresholds

SYNC_MODES = ("auto", "never", "step")


@dataclass(frozen=True)
class MonitorOptions:
    """How a monitor checks.

    - ``check_every``: check on steps where ``step % check_every == 0``.
    - ``thresholds``: a `Thresholds` (defaults documented in `torchhealth.checks`).
    - ``policy``: an action for every check, or a dict check -> action (missing
      checks keep `policy.DEFAULT`); see `torchhealth.policy`.
    - ``sync``: "auto", "never" or "step" (see `torchhealth.monitor`).
    - ``optimizer_state``: also read optimizer state tensors shaped like their
      parameter (e.g. Adam's ``exp_avg_sq``): True, or a collection of state keys.
    - ``histogram``: also compute log2 histograms (for sinks and reports; the
      checks do not need them): True on every check, False never, or N on every
      Nth check (default 10: the report's heatmaps fill in at a tenth of the cost).
    - ``max_grad_norm``: clip gradients to this total norm, reusing the statistics.
    - ``at_backward_end``: run the checks when backward finishes, before other
      code (gradient clipping) changes the gradients; the step then uses that
      verdict. None (default): when the parameters' module is known (``model=``)
      and the process is not one of several (under DDP the engine's callbacks
      may run before the gradients are all-reduced; there checks run at step time).
    - ``escalate_after``: after this many consecutive checks that skipped the step
      (policy "skip"), raise `HealthCheckError` instead: a run whose weights went
      NaN would otherwise skip every step forever. None never escalates.
    """

    check_every: int = 1
    thresholds: Thresholds = field(default_factory=Thresholds)
    policy: Mapping = field(default_factory=lambda: resolve_policy(None))
    sync: str = "auto"
    optimizer_state: bool | frozenset = False
    histogram: bool | int = 10
    max_grad_norm: float | None = None
    escalate_after: int | None = 100
    at_backward_end: bool | None = None

    def __post_init__(self):
        own = "MonitorOptions"
        set_ = object.__setattr__
        set_(self, "check_every", positive_int(f"{own}.check_every", self.check_every))
        if self.thresholds is None:
            set_(self, "thresholds", Thresholds())
        elif not isinstance(self.thresholds, Thresholds):
            raise TypeError(f"{own}.thresholds must be a torchhealth.Thresholds, got "
                            f"{type(self.thresholds).__name__} (use Thresholds(**your_dict))")
        set_(self, "policy", resolve_policy(self.policy))
        if self.sync not in SYNC_MODES:
            raise ValueError(f"{own}.sync must be one of {SYNC_MODES}, got {self.sync!r}")
        st = self.optimizer_state
        if not isinstance(st, bool):
            if isinstance(st, str) or not isinstance(st, Iterable):
                raise TypeError(f"{own}.optimizer_state must be a bool or a collection of state "
                                f"keys, got {st!r}")
            set_(self, "optimizer_state", frozenset(st))
        if not isinstance(self.histogram, bool):
            try:
                set_(self, "histogram", positive_int(f"{own}.histogram", self.histogram))
            except (TypeError, ValueError):
                raise TypeError(f"{own}.histogram must be a bool or a positive int (every Nth check), "
                                f"got {self.histogram!r}") from None
        if self.max_grad_norm is not None:
            set_(self, "max_grad_norm", number(f"{own}.max_grad_norm", self.max_grad_norm))
        if self.at_backward_end is not None and not isinstance(self.at_backward_end, bool):
            raise TypeError(f"{own}.at_backward_end must be a bool or None, got {self.at_backward_end!r}")
        if self.escalate_after is not None:
            set_(self, "escalate_after", positive_int(f"{own}.escalate_after", self.escalate_after))

    @classmethod
    def build(cls, options: MonitorOptions | None = None, **settings) -> MonitorOptions:
        """`options` with `settings` (field names) replaced; the defaults when
        both are empty. Unknown names are a TypeError that lists the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown torchhealth setting(s) {unknown}; settings are {sorted(names)}")
        if options is None:
            return cls(**settings)
        if not isinstance(options, cls):
            raise TypeError(f"options must be a MonitorOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **settings) if settings else options

    def due(self, step: int) -> bool:
        return step % self.check_every == 0

    def histogram_due(self, checks: int) -> bool:
        """Whether the check after `checks` earlier ones computes histograms."""
        h = self.histogram
        return h if isinstance(h, bool) else checks % h == 0


def backward_end_by_default(options: MonitorOptions, model) -> bool:
    """Whether checks run at the end of backward: `MonitorOptions.at_backward_end`,
    or with None, when a model is known and torch.distributed runs one process."""
    if options.at_backward_end is not None:
        return options.at_backward_end
    import torch.distributed as dist
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return model is not None and not several
