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
until they are read: one `tensor_stats` call at the end of the forward pass
(sigmoid/tanh outputs in a second one, which also counts their values near an
asymptote) and one when backward finishes (an autograd-engine callback); a pass
that holds more than `activations.READ_BYTES` (``READ_BYTES_CPU`` on the CPU)
is read in batches of about that size as it goes. Each distinct tensor is read once. Steps
that are not due cost one comparison per module (and a test of
`torch.compiler.is_compiling()`). See `torchhealth.activations` for what is checked.

With ``monitor=`` (a `HealthMonitor` or `HealthCheckedOptimizer`), the passes
of a step join that monitor's check of the same step (its Report and any
`HealthCheckError` carry ``origin``). Without it, the watch counts forward
passes as steps and delivers its own Reports to ``on_report`` (and
``last_report``).

Under `torch.compile` (``torch.compile(model)`` or ``model.compile()``, watched
before or after compiling), the forward hooks run eagerly
(`torch.compiler.disable`): the compiled graph breaks at every watched module
while the watch is attached, so each module's output exists to be read, and the
rows are those of the eager model. Under compiled autograd the gradient hooks
run eagerly too, and as its engine runs no end-of-backward callback, a backward
pass is closed when it is next needed (the next forward, the monitor's check,
`flush`): the same rows and origin as eager autograd (tested with the ``eager``
backend; the first backward passes compile for several seconds).

With activation checkpointing (`torch.utils.checkpoint` of blocks or of the whole
model, Hugging Face's ``gradient_checkpointing_enable()``), reentrant or not, the
rows are those of the model without it: the forward hooks that recomputation runs
again in backward read nothing (a rerun of the whole model is no new step), and
the gradients flowing into a reentrant segment's recomputed outputs are hooked
there (its first forward recorded no graph).

A copy of a watched model is not watched: ``copy.deepcopy`` (an EMA model) shares
the hooks, which ignore the copy's modules (``watch(copy)`` watches it on its own),
and ``torch.save`` of the model saves it without the watch (the loaded model's
first forward drops what took the hooks' place). A copied or pickled optimizer
wrapper is attached to no watch.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from collections.abc import Callable

import torch

from ._ops import SUPPORTED_DTYPES
from .activations import (
    OTHER,
    PassStats,
    PendingPass,
    activation_findings,
    host_passes,
    kind_of,
    pass_fields,
)
from .checks import Thresholds
from .collect import at_backward_end, uncompiled
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


# The watched models (and their torch.compile wrappers): on the side, not an
# attribute, so that a copy of a model (copy.deepcopy, torch.save) is not taken
# for a watched one.
_WATCHED: weakref.WeakSet = weakref.WeakSet()


class _Hook:
    """A module hook of a watch: ``watch.<method>(*args, module, ...)`` for the
    modules it watches, and nothing for any other. The hooks are part of the
    model's state, so a copy of the model carries them: ``copy.deepcopy`` (an EMA
    model, say) shares this one, which ignores the copy's modules, and a pickled
    model (``torch.save``) holds a `_Detached` hook in its place. Eager under
    `torch.compile` (see `_eager`)."""

    __slots__ = ("watch", "fn", "args")

    def __init__(self, watch: Watch, method: str, *args):
        self.watch, self.fn, self.args = watch, getattr(watch, method), args

    def __call__(self, module, *rest):
        if torch.compiler.is_compiling():
            return _eager(self, module, *rest)
        if module in self.watch._modules:
            return self.fn(*self.args, module, *rest)
        return None

    def __deepcopy__(self, memo) -> _Hook:
        return self

    def __reduce__(self):
        return _Detached, ()


@torch.compiler.disable
def _eager(hook, *args):
    """Runs a watch's hook eagerly where torch.compile would trace it (the
    compiled graph breaks there): traced, it would be asked for the byte size of
    a symbolic shape, its outputs would not exist to be read, and compiled
    autograd cannot trace the engine's queue_callback outside a full graph. The
    hooks call it only when tracing, as the wrapper of `torch.compiler.disable`
    has a cost of its own on every call (benchmarks/RESULTS.md, issue 9)."""
    return hook(*args)


class _Detached:
    """What a watch's hook becomes in a pickled model: on its first call it
    removes itself from the module, which then runs as if never watched."""

    def __call__(self, module, *rest):
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if h is self]:
                del hooks[key]
                for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                              "_forward_hooks_always_called"):
                    getattr(module, extra, {}).pop(key, None)
        return None


def _labelled(name: str, found: list) -> list[tuple[str, torch.Tensor]]:
    """(row name, tensor) for what `_tensors` found in one output: the module's
    name, followed by each tensor's path when there are several."""
    return [(name + path if len(found) > 1 else name, t) for path, t in found]


class Watch:
    """The handle `watch` returns: ``remove()`` (or leave the ``with`` block)
    detaches every hook; ``last_report`` and ``flush()`` for a watch without a
    monitor."""

    def __init__(self, model: torch.nn.Module, *, monitor=None, check_every: int = 1,
                 backward: bool = True, thresholds: Thresholds | None = None,
                 on_report: Callable[[Report], None] | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}")
        # torch.compile(m) wraps m: its modules are named and hooked as m's.
        inner = uncompiled(model)
        self._roots = (model,) if inner is model else (model, inner)
        if any(m in _WATCHED for m in self._roots):
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
        self._last: tuple | None = None  # (step, passes, host copy) of the newest delivered step
        self._last_report: Report | None = None
        names = {m: n for n, m in self._roots[-1].named_modules()}
        self._modules = set(names) | set(self._roots)  # what the hooks act for (see _Hook)
        # The gradient hooks are eager too (`_eager`). (Under compiled autograd the
        # engine runs no queued callback either: a backward pass is then closed when
        # next needed, see _close_backward.)
        self._hooks = [model.register_forward_pre_hook(_Hook(self, "_begin"), with_kwargs=True)]
        self._hooks += [m.register_forward_hook(_Hook(self, "_output", names[m], kind_of(m)))
                        for m in self._roots[-1].modules() if m not in self._roots]
        self._hooks.append(model.register_forward_hook(_Hook(self, "_end")))
        self._skipped_types: set[type] = set()
        self._outputs: PendingPass | None = None  # the forward pass under way, on a due step
        # (grad_fn, output_nr, name, leaf) of its outputs that require grad; leaf is the
        # tensor only when it has no grad_fn: holding every output until the forward pass
        # ends would keep alive the ones autograd does not save (a dropout's input, a
        # residual branch), which the allocator would otherwise reuse at once.
        self._to_hook: list = []
        self._grads: PendingPass | None = None  # the backward pass under way
        self._recomputing = False  # the whole model's forward, rerun inside a due step's backward
        self._output_hooked = False  # whether the last forward's own output had a graph to hook
        self._passes: dict[int, list[PassStats]] = {}
        for m in self._roots:
            _WATCHED.add(m)

    # -- hooks ------------------------------------------------------------------------
    def _begin(self, module, args, kwargs) -> None:
        if torch._C._current_graph_task_id() != -1:
            # Inside a backward: activation checkpointing of the whole model
            # recomputing it, within the step and the pass under way.
            self._recomputing = self.backward and self.options.due(self._next_step())
            return
        self._close_backward()
        if self.monitor is None:
            self._current, self._count = self._count, self._count + 1
            self._deliver(before=self._current)
        step = self._next_step()
        self._outputs = PendingPass(step, self._histogram(step)) if self.options.due(step) else None
        if self._outputs is not None:
            self._record("<input>", OTHER, (args, kwargs))
            self._to_hook = []  # the model's inputs: not an output of this pass

    def _output(self, name, kind, module, inputs, output) -> None:
        pending = self._outputs
        if pending is None:
            if self._grads is not None or self._recomputing:  # a forward inside a due step's backward
                self._hook_recomputed(name, output)
            return
        if isinstance(output, torch.Tensor):  # the common case, in as few operations as it takes
            pending.add(name, kind, output)
            if output.requires_grad:
                node = output.grad_fn
                self._to_hook.append((node, output.output_nr, name, output if node is None else None))
        else:
            self._record(name, kind, output, module=module)

    def _record(self, name, kind, obj, module=None) -> None:
        found = _tensors(obj)
        if found is None:
            if module is not None and type(module) not in self._skipped_types:
                self._skipped_types.add(type(module))
                warnings.warn(f"torchhealth.watch: {type(module).__name__} returns a "
                              f"{type(obj).__name__}, which holds no tensors it can read; skipped")
            return
        for label, t in _labelled(name, found):
            self._outputs.add(label, kind, t)  # the op records no autograd: nothing to detach
            if t.requires_grad:
                node = t.grad_fn
                self._to_hook.append((node, t.output_nr, label, t if node is None else None))

    def _hook_recomputed(self, name, obj) -> None:
        """Reentrant activation checkpointing recomputes a segment in backward
        (its first forward recorded no graph) to run a backward of its own
        through it: the gradients flowing into the recomputed outputs join the
        backward pass under way. (Non-reentrant checkpointing backpropagates
        through the first forward's graph, already hooked; the nodes hooked here
        then never run.)"""
        for label, t in _labelled(name, _tensors(obj) or []):
            if t.grad_fn is not None:
                t.grad_fn.register_prehook(functools.partial(self._grad_output, t.output_nr, label))

    def _end(self, module, inputs, output) -> None:
        if self._recomputing:
            self._recomputing = False
            if not self._output_hooked:  # reentrant: the first forward recorded no graph
                self._hook_recomputed("<output>", output)
        if self._outputs is None:
            return
        self._record("<output>", OTHER, output)
        self._output_hooked = any(name.startswith("<output>") for _, _, name, _ in self._to_hook)
        outs, self._outputs = self._outputs, None
        self._add(outs.finish("forward"))
        to_hook, self._to_hook = self._to_hook, []
        if self.backward:
            # Hooked here, in one loop, rather than in each module's hook (where the
            # interpreter's caches are cold): a pre-hook on the node that made the
            # output, as it was when the module returned it, sees the gradient flowing
            # into that output even if a later in-place op replaced the tensor's node.
            for node, index, name, leaf in to_hook:
                if node is None:  # a leaf: its gradient goes to no node of this pass
                    leaf.register_hook(functools.partial(self._grad, name))
                else:
                    node.register_prehook(functools.partial(self._grad_output, index, name))

    def _grad_output(self, index, name, grad_outputs) -> None:
        if torch.compiler.is_compiling():
            return _eager(self._grad_output, index, name, grad_outputs)
        if grad_outputs[index] is not None:
            self._take_grad(name, grad_outputs[index])

    def _grad(self, name, grad) -> None:  # a leaf's tensor hook: one gradient, not a tuple
        self._grad_output(0, name, (grad,))

    def _take_grad(self, name, grad) -> None:
        if self._grads is None:
            at_backward_end(self._backward_end)  # none under compiled autograd: see _close_backward
            step = self._next_step()
            self._grads = PendingPass(step, self._histogram(step))
        self._grads.add(name, OTHER, grad)

    def _backward_end(self) -> None:
        grads, self._grads = self._grads, None
        if self.options.due(grads.step):
            self._add(grads.finish("backward"))

    def _close_backward(self) -> None:
        """Ends a backward pass that no engine callback ended (compiled
        autograd): at the next forward, or when its step's passes are wanted,
        once no backward runs (a forward inside one is a recomputation, by
        activation checkpointing, within the pass)."""
        if self._grads is not None and torch._C._current_graph_task_id() == -1:
            self._backward_end()

    def _histogram(self, step: int) -> bool:
        return self.options.histogram_due(step // self.options.check_every)

    def _add(self, p: PassStats | None) -> None:
        if p is None:
            return
        passes = self._passes.setdefault(p.step, [])
        passes[:] = [q for q in passes if q.name != p.name] + [p]  # a step's last pass of each kind

    # -- results ------------------------------------------------------------------------
    def take(self, step: int) -> list[PassStats]:
        """The passes of `step` (forward first), handed over once; older ones are dropped."""
        self._close_backward()
        for old in [s for s in self._passes if s < step]:
            del self._passes[old]
        return sorted(self._passes.pop(step, []), key=lambda p: p.name != "forward")

    def _deliver(self, before: int | None = None) -> None:
        self._close_backward()
        for step in sorted(s for s in self._passes if before is None or s < before):
            passes = self.take(step)
            self._last, self._last_report = (step, passes, HostCopy(pass_fields(passes))), None
            for cb in list(self._on_report):
                cb(self.last_report)

    @property
    def last_report(self) -> Report | None:
        """The Report of the newest delivered step (without a monitor), built
        when first read: a step nobody reads costs no Report."""
        if self._last_report is None and self._last is not None:
            step, passes, copy = self._last
            th = self.options.thresholds
            rows, findings, origin = activation_findings(host_passes(passes, copy),
                                                         th.max_saturated_fraction, th.max_dead_fraction)
            self._last_report = Report(step=step, rows=rows, findings=findings, origin=origin)
        return self._last_report

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
        for m in self._roots:
            _WATCHED.discard(m)

    def __reduce__(self):
        # What refers to a watch (the monitor of a copied or pickled optimizer
        # wrapper) is, copied, attached to none: the watch belongs to its model.
        return _no_watch, ()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _no_watch() -> None:
    return None


def watch(model: torch.nn.Module, *, monitor=None, check_every: int = 1, backward: bool = True,
          thresholds: Thresholds | None = None,
          on_report: Callable[[Report], None] | None = None) -> Watch:
    """Watches the outputs (and output gradients) of every module of `model`;
    see the module docstring. ``check_every`` and ``thresholds`` apply without
    a monitor (with one, its own settings do)."""
    return Watch(model, monitor=monitor, check_every=check_every, backward=backward,
                 thresholds=thresholds, on_report=on_report)
