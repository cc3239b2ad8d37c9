"""`CheckResult`: one check on its way to the host, and `build_report`, the one
function that turns its host copy into a `Report`."""
from __future__ import annotations

import dataclasses

import torch

from . import user_scalars
from .activations import PassStats, activation_findings, any_finding, host_passes, pass_fields
from .checks import Layout, Signal, any_fired, finding, stacked
from .policy import Decision, describe
from .hostcopy import HostCopy
from .options import MonitorOptions
from .distributed import NonfiniteOrigin
from .report import Finding, Report, rows_from_stats
from .stats import TensorStats

SCALER_SKIP = "GradScaler skipped the step (inf/NaN from loss scaling; not a model fault)"
ZEROED = "zeroed non-finite gradient values"


class CheckResult:
    """One check, still on the device, with its host copy under way.

    ``skip`` says whether this step must be skipped (a "skip" finding, or the
    GradScaler's ``found_inf``): a bool when the verdict was read right away
    (``late`` is False), else a 0-d bool device tensor; None when nothing can
    skip. `fired`, `skipped`, `escalated` and `report()` read the host copy
    (waiting for it if it has not landed: see ``ready``).
    """

    def __init__(self, step: int, stats: TensorStats, layout: Layout, signals: list[Signal],
                 decision: Decision, grad_norm: torch.Tensor, options: MonitorOptions, *,
                 late: bool, activations: list[PassStats] = (), applied_norm: torch.Tensor | None = None,
                 scalars: dict[str, float | torch.Tensor] | None = None,
                 origin: NonfiniteOrigin | None = None, world_size: int = 1):
        self.step, self.layout, self.signals, self.options = step, layout, signals, options
        self.origin, self.world_size = origin, world_size
        self.late = late  # whether the verdict reaches the host after the optimizer step
        self.scalars = dict(scalars or {})  # the user's, from `HealthMonitor.log`
        none = layout.masks(grad_norm.device)["false"]  # a constant, never written
        fired, value, mask = stacked(signals)
        self.copy = HostCopy({
            "stats": stats.data,
            "fired": fired,
            "value": value,
            "mask": mask,
            "grad_norm": grad_norm,
            "skip": decision.skip if decision.skip is not None else none,
            "scaler_skip": decision.scaler_skip if decision.scaler_skip is not None else none,
            "escalated": decision.escalated,
            "consecutive_skips": decision.consecutive_skips,
            **pass_fields(list(activations)),
            **({"applied_norm": applied_norm} if applied_norm is not None else {}),
            **user_scalars.fields(self.scalars, grad_norm.device),
            **({"origin_ranks": origin.ranks, "origin_slots": origin.slot_ranks > 0}
               if origin is not None else {}),
        })
        self.activations = list(activations)
        self._device_skip = decision.skip
        self._report: Report | None = None
        self._activation_view: tuple | None = None

    @property
    def ready(self) -> bool:
        return self.copy.ready

    @property
    def skip(self) -> bool | torch.Tensor | None:
        if self._device_skip is None:
            return None
        return self._device_skip if self.late else self.copy.value("skip")

    @property
    def fired(self) -> bool:
        """Whether any check whose policy is not "ignore" fired, or the run escalated."""
        flags = self.copy.value("fired")
        return self.escalated or any(f and self.options.policy[s.check] != "ignore"
                                     for s, f in zip(self.signals, flags)) or \
            (bool(self.activations) and any_finding(host_passes(self.activations, self.copy),
                                                    self.options.thresholds.max_saturated_fraction,
                                                    self.options.thresholds.max_dead_fraction))

    @property
    def skipped(self) -> bool:
        """Whether this step is skipped, by the policy or by a GradScaler."""
        return bool(self.copy.value("skip"))

    @property
    def escalated(self) -> bool:
        """Whether this check made `MonitorOptions.escalate_after` consecutive skips."""
        return bool(self.copy.value("escalated"))

    @property
    def nonfinite_grads(self) -> bool:
        """Whether the nonfinite check fired on a gradient."""
        return any_fired(self.signals, self.copy.value("fired"), "nonfinite", "grad")

    def activation_view(self) -> tuple[list, list[Finding], dict | None]:
        """This step's activation rows, findings and origin (`torchhealth.watch`),
        from the host copy; made once (the origin gather and the Report both read it)."""
        if self._activation_view is None:
            th = self.options.thresholds
            self._activation_view = activation_findings(host_passes(self.activations, self.copy),
                                                        th.max_saturated_fraction, th.max_dead_fraction)
        return self._activation_view

    def local_origin(self) -> dict | None:
        """This rank's activation origin (`torchhealth.watch`), from the host copy."""
        return self.activation_view()[2] if self.activations else None

    def report(self) -> Report:
        """The host-side Report of this check (built once)."""
        if self._report is None:
            self._report = build_report(self.step, self.layout, self.signals, self.copy, self.options,
                                        self.activation_view(), self.scalars, self.origin, self.world_size)
        return self._report


def build_report(step: int, layout: Layout, signals: list[Signal], copy: HostCopy,
                 options: MonitorOptions, activation_view: tuple = ([], [], None),
                 scalars: dict[str, float | torch.Tensor] | None = None,
                 rank_origin: NonfiniteOrigin | None = None, world_size: int = 1) -> Report:
    """The Report of one check from its host copy: rows, findings (the first
    warning or error, in `CHECKS` order, marked primary: a non-finite value
    comes before the norms it breaks, an exploding norm before what looks
    small next to it), the labels of the actions the policy took, the
    activations' rows, findings and origin (``activation_view``, from
    `activation_findings`), and the user's `scalars`.
    ``world_size``: the ranks the statistics cover; ``rank_origin`` (its flags
    in the copy): which ranks' local gradients were non-finite, named on the
    non-finite gradient finding."""
    rows = rows_from_stats(TensorStats(copy.tensor("stats")), layout.names, layout.roles,
                           layout.shapes, layout.dtypes)
    flags, values, masks = copy.value("fired"), copy.value("value"), copy.value("mask")
    where = None  # which ranks produced a non-finite gradient, and where it was born there
    if rank_origin is not None and any_fired(signals, flags, "nonfinite", "grad"):
        # Gathered with the check (sync="never"): its flags are in the copy;
        # else after the host read (sync="step"), and read now.
        where = (rank_origin.describe_flags(copy.value("origin_ranks"), copy.value("origin_slots"))
                 if "origin_ranks" in copy.fields else rank_origin.describe())
        where["module"] = rank_origin.first_module(where["ranks"])
    findings, actions = [], []
    at = 0
    for s, hit, value in zip(signals, flags, values):
        mask, at = masks[at:at + s.size], at + s.size
        f = finding(s, hit, mask, value, rows, layout.param_names, notes=layout.structural)
        if f is None:
            continue
        if where is not None and (s.check, s.kind) == ("nonfinite", "grad"):
            f = _with_ranks(f, where)
        if f.severity != "info" and not any(x.primary for x in findings):
            f = dataclasses.replace(f, primary=True)
        findings.append(f)
        if not hit:  # an info finding: no check fired, no action
            continue
        action = options.policy[s.check]
        label = f"{describe(action)}: {s.check}"
        if action != "ignore" and label not in actions:
            actions.append(label)
    if copy.value("scaler_skip"):
        actions.append(SCALER_SKIP)
    # With sync="never" zeroing runs on every check (a no-op on finite values);
    # it is an action only where there was something to zero.
    if options.policy["nonfinite"] == "zero" and any_fired(signals, flags, "nonfinite", "grad"):
        actions.append(ZEROED)
    grad_norm = copy.value("grad_norm")
    if options.max_grad_norm is not None and grad_norm > options.max_grad_norm:
        actions.append(f"clipped gradients: norm {grad_norm:.4g} -> {options.max_grad_norm:.4g}")
    # The raw norm is over finite values: compared only when every gradient was finite.
    if "applied_norm" in copy.fields and not any_fired(signals, flags, "nonfinite", "grad"):
        applied = copy.value("applied_norm")
        if not abs(applied - grad_norm) <= 1e-6 * max(abs(grad_norm), 1e-30):
            actions.append(f"gradients changed after backward (e.g. clipped): norm {grad_norm:.4g} "
                           f"-> {applied:.4g}; the statistics describe them as backward left them")
    if copy.value("escalated"):
        actions.append(f"raise: {copy.value('consecutive_skips')} consecutive skipped steps "
                       f"(escalate_after={options.escalate_after})")
    act_rows, act_findings, origin = activation_view
    if where is not None and where["module"] is not None:  # gathered from the rank that made it
        origin = where["module"]
    if world_size > 1 and act_findings:  # this rank's own activations: see `Finding.local`
        rank = torch.distributed.get_rank()
        act_findings = [dataclasses.replace(f, message=f"{f.message} (rank {rank}'s activations)",
                                            ranks=[rank], local=True) for f in act_findings]
    return Report(step=step, rows=rows + act_rows, findings=act_findings + findings, actions=actions,
                  skipped=bool(copy.value("skip")), origin=origin,
                  scalars=user_scalars.values(scalars or {}, copy), world_size=world_size)


def _with_ranks(f: Finding, where: dict) -> Finding:
    """The non-finite gradient finding, naming the ranks whose own gradients
    were non-finite before communication spread them to every rank."""
    if where["ranks"]:
        names = ", ".join(where["parameters"])
        said = f"; produced on rank{'s' * (len(where['ranks']) > 1)} " \
               f"{', '.join(map(str, where['ranks']))} (local gradients of {names})"
    else:
        said = "; every rank's local gradients were finite before communication"
    o = where["module"]
    if o is not None:
        said += (f"; first non-finite on rank {o['rank']}: "
                 f"{'output' if o['pass'] == 'forward' else 'output gradient'} of {o['module']} "
                 f"in the {o['pass']} pass")
    return dataclasses.replace(f, message=f.message + said, ranks=where["ranks"])
