"""`watch`: activation statistics from forward and backward hooks, in batches.

    opt = HealthCheckedOptimizer(torch.optim.AdamW(model.parameters()), model=model)
    with torchhealth.watch(model, monitor=opt):    # or: handle = watch(...); handle.remove()
        for x, y in data:
            ...                                     # the optimizer's Reports now carry
                                                    # activation rows, findings and origin

Forward hooks on every submodule collect its floating-point outputs (tuples,
lists, dicts and dataclasses are walked; integer tensors are ignored; other
objects are skipped, with one warning per module type), and a tensor hook on
each output collects the gradient flowing into it. The tensors are held only
until the pass ends: one `tensor_stats` call at the end of the forward pass
(plus one over sigmoid/tanh outputs, for saturation) and one when backward
finishes (an autograd-engine callback). Steps that are not due cost one
comparison per module. See `torchhealth.activations` for what is checked.

With ``monitor=`` (a `HealthMonitor` or `HealthCheckedOptimizer`), the passes
of a step join that monitor's check of the same step (its Report and any
`HealthCheckError` carry ``origin``). Without it, the watch counts forward
passes as steps and delivers its own Reports to ``on_report`` (and
``last_report``). Hooks of a `torch.compile`d module follow torch.compile's
own hook support; this module has not been tested under it.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch

from ._ops import SUPPORTED_DTYPES, tensor_stats
from .activations import EPS, OTHER, SIGMOID, TANH, PassStats, activation_findings, kind_of, \
    near_asymptote, pass_fields
from .checks import Thresholds
from .hostcopy import HostCopy
from .report import Report


def _tensors(obj, path: str = ""):
    """(path, tensor) for every floating-point tensor in `obj`; None for
    objects that hold none and are not containers."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)] if obj.dtype in SUPPORTED_DTYPES else []
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in (_tensors(v, f"{path}.{k}") or [])]
    if isinstance(obj, (tuple, list)):
        return [x for i, v in enumerate(obj) for x in (_tensors(v, f"{path}[{i}]") or [])]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [x for f in dataclasses.fields(obj)
                for x in (_tensors(getattr(obj, f.name), f"{path}.{f.name}") or [])]
    return [] if obj is None or isinstance(obj, (int, float, bool, str)) else None


class Watch:
    """The handle `watch` returns: ``remove()`` (or leave the ``with`` block)
    detaches every hook; ``last_report`` and ``flush()`` for a watch without a
    monitor."""

    def __init__(self, model: torch.nn.Module, *, monitor=None, check_every: int = 1,
                 backward: bool = True, thresholds: Thresholds | None = None,
                 on_report: Callable[[Report], None] | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}")
        if getattr(model, "_torchhealth_watch", None) is not None:
            raise ValueError(f"watch: this {type(model).__name__} is already watched; "
                             "remove() the first watch before watching it again")
        self.monitor = getattr(monitor, "monitor", monitor)  # a wrapper's monitor, or the monitor
        if self.monitor is not None:
            self.options = self.monitor.options
            self._next_step = monitor._next_step if hasattr(monitor, "_next_step") else \
                lambda: self.monitor.checks * self.options.check_every
            self.monitor.attach_activations(self)
        else:
            from .options import MonitorOptions
            self.options = MonitorOptions(check_every=check_every, thresholds=thresholds or Thresholds())
            self._count = 0  # forward passes so far: a watch without a monitor counts them as steps
            self._current = 0
            self._next_step = lambda: self._current
        self.model, self.backward = model, backward
        self._on_report = [on_report] if on_report else []
        self.last_report: Report | None = None
        names = {m: n for n, m in model.named_modules()}
        self._hooks = [model.register_forward_pre_hook(self._begin, with_kwargs=True)]
        self._hooks += [m.register_forward_hook(functools.partial(self._output, names[m], kind_of(m)))
                        for m in model.modules() if m is not model]
        self._hooks.append(model.register_forward_hook(self._end))
        self._skipped_types: set[type] = set()
        self._step = None  # the step being watched, or None
        self._outputs: list = []  # (name, kind, tensor) of the forward pass under way
        self._grads: list = []  # (name, gradient) of the backward pass under way
        self._queued = False
        self._passes: dict[int, list[PassStats]] = {}
        model._torchhealth_watch = self

    # -- hooks ------------------------------------------------------------------------
    def _begin(self, module, args, kwargs) -> None:
        if self.monitor is None:
            self._current, self._count = self._count, self._count + 1
            self._deliver(before=self._current)
        step = self._next_step()
        self._step = step if self.options.due(step) else None
        self._outputs = []
        if self._step is not None:
            self._record("<input>", OTHER, (args, kwargs), grad=False)

    def _output(self, name, kind, module, inputs, output) -> None:
        if self._step is not None:
            self._record(name, kind, output, grad=self.backward, module=module)

    def _record(self, name, kind, obj, grad: bool, module=None) -> None:
        found = _tensors(obj)
        if found is None:
            if module is not None and type(module) not in self._skipped_types:
                self._skipped_types.add(type(module))
                warnings.warn(f"torchhealth.watch: {type(module).__name__} returns a "
                              f"{type(obj).__name__}, which holds no tensors it can read; skipped")
            return
        seen = {id(t) for _, _, t in self._outputs}
        for path, t in found:
            if id(t) in seen:  # a container returning its child's output
                continue
            label = name + path if len(found) > 1 else name
            self._outputs.append((label, kind, t.detach()))
            if grad and t.requires_grad:
                t.register_hook(functools.partial(self._grad, label))

    def _end(self, module, inputs, output) -> None:
        if self._step is None:
            return
        self._record("<output>", OTHER, output, grad=self.backward)
        outs, self._outputs = self._outputs, []
        if not outs:
            return
        names, kinds, tensors = zip(*outs)
        stats = tensor_stats(list(tensors), histogram=self._histogram(self._step))
        near = torch.zeros(len(tensors), dtype=torch.int64, device=stats.device)
        bounded = [i for i, k in enumerate(kinds) if k in (SIGMOID, TANH)]
        if bounded:
            sat = tensor_stats([tensors[i] for i in bounded], histogram=True, saturation=1 - EPS)
            near[bounded] = near_asymptote(sat, [kinds[i] for i in bounded])
        self._add(PassStats(self._step, "forward", list(names), list(kinds),
                            [tuple(t.shape) for t in tensors], [t.dtype for t in tensors], stats, near))

    def _grad(self, name, grad) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)
        self._grads.append((name, grad.detach()))

    def _backward_end(self) -> None:
        self._queued = False
        grads, self._grads = self._grads, []
        step = self._next_step()
        if not grads or not self.options.due(step):
            return
        names, tensors = zip(*grads)
        stats = tensor_stats(list(tensors), histogram=self._histogram(step))
        near = torch.zeros(len(tensors), dtype=torch.int64, device=stats.device)
        self._add(PassStats(step, "backward", list(names), [OTHER] * len(names),
                            [tuple(t.shape) for t in tensors], [t.dtype for t in tensors], stats, near))

    def _histogram(self, step: int) -> bool:
        return self.options.histogram_due(step // self.options.check_every)

    def _add(self, p: PassStats) -> None:
        passes = self._passes.setdefault(p.step, [])
        passes[:] = [q for q in passes if q.name != p.name] + [p]  # a step's last pass of each kind

    # -- results ------------------------------------------------------------------------
    def take(self, step: int) -> list[PassStats]:
        """The passes of `step` (forward first), handed over once; older ones are dropped."""
        for old in [s for s in self._passes if s < step]:
            del self._passes[old]
        return sorted(self._passes.pop(step, []), key=lambda p: p.name != "forward")

    def _deliver(self, before: int | None = None) -> None:
        for step in sorted(s for s in self._passes if before is None or s < before):
            passes = self.take(step)
            copy = HostCopy(pass_fields(passes))
            th = self.options.thresholds
            rows, findings, origin = activation_findings(
                [(p, copy.tensor(f"act{i}"), copy.tensor(f"near{i}")) for i, p in enumerate(passes)],
                th.max_saturated_fraction, th.max_dead_fraction)
            self.last_report = Report(step=step, rows=rows, findings=findings, origin=origin)
            for cb in list(self._on_report):
                cb(self.last_report)

    def flush(self) -> None:
        """Delivers the Reports of every watched step now (without a monitor)."""
        if self.monitor is None:
            self._deliver()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.monitor is not None:
            self.monitor.attach_activations(None)
        self.flush()
        self.model._torchhealth_watch = None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def watch(model: torch.nn.Module, *, monitor=None, check_every: int = 1, backward: bool = True,
          thresholds: Thresholds | None = None,
          on_report: Callable[[Report], None] | None = None) -> Watch:
    """Watches the outputs (and output gradients) of every module of `model`;
    see the module docstring. ``check_every`` and ``thresholds`` apply without
    a monitor (with one, its own settings do)."""
    return Watch(model, monitor=monitor, check_every=check_every, backward=backward,
                 thresholds=thresholds, on_report=on_report)
