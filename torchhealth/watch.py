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
that holds more than `READ_BYTES` is read in batches of about that size as it
goes. Each distinct tensor is read once. Steps
that are not due cost one comparison per module. See `torchhealth.activations` for what is checked.

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
from .activations import EPS, OTHER, SIGMOID, TANH, PassStats, activation_findings, bounded_rows, \
    kind_of, near_counts, pass_fields, tiny_counts
from .checks import Thresholds
from .hostcopy import HostCopy
from .report import Report
from .stats import TensorStats


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


# Bytes of held tensors after which the next distinct tensor starts a batched read
# before the pass ends: holding every output gradient of a backward pass until it
# ends would keep memory alive that the autograd engine otherwise frees and reuses
# at once (on a GPU, up to the activations' size again); a read per this many bytes
# bounds that. Large enough that a small model's pass is still one call (and a
# large model's a few per GPU-sized activation), small next to a training step's
# memory. (On the CPU, smaller batches read while the tensors are still in cache
# were measured slower per byte than one large batch, not faster.)
READ_BYTES = 64 << 20


class _Pending:
    """A pass's rows: their tensors awaiting a batched read, and the statistics
    read so far. The hooks only append (they run between the model's own ops,
    with the interpreter's caches cold, so each Python operation there costs many
    times what it does in a loop); the read does the rest for its whole batch.

    Each distinct tensor is read once: a row whose tensor is an earlier one of the
    same batch (a container returning its child's output, a gradient that reaches
    several outputs through a residual sum) repeats that tensor's row, and a full
    batch is read only when a tensor that repeats none of it arrives, so such a
    repeat, which comes right after its original, still finds it. Sigmoid/tanh
    outputs go in a call of their own with the saturation threshold at
    ``1 - EPS`` and a histogram, so that the one read also counts their values
    near an asymptote. Tensors of other dtypes (integers) give no row."""

    def __init__(self, step: int, histogram: bool):
        self.step, self.histogram = step, histogram
        self.items: list = []  # (name, kind, tensor) not read yet
        self.bytes = 0
        self.full = False
        self.names: list[str] = []
        self.kinds: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[torch.dtype] = []
        self.rows: list[int] = []  # per row: its tensor's row in the statistics read
        self.parts: list[tuple[TensorStats, torch.Tensor, torch.Tensor]] = []  # (stats, high, tiny)
        self.read = 0  # rows of statistics read

    def add(self, name: str, kind: str, t: torch.Tensor) -> None:
        if self.full and not any(t is u or _same(t, u) for _, _, u in self.items):
            self.flush()
        self.items.append((name, kind, t))
        self.bytes += t.nbytes
        self.full = self.bytes >= READ_BYTES

    def flush(self) -> None:
        slot: dict = {}
        unique: list[torch.Tensor] = []
        bounded: list[bool] = []
        index = []
        for name, kind, t in self.items:
            if t.dtype not in SUPPORTED_DTYPES:
                continue
            # Every tensor of the batch is still held, so equal keys mean the same elements.
            i = slot.setdefault(_key(t), len(unique))
            if i == len(unique):
                unique.append(t)
                bounded.append(False)
            bounded[i] = bounded[i] or kind in (SIGMOID, TANH)
            index.append(i)
            self.names.append(name)
            self.kinds.append(kind)
            self.shapes.append(tuple(t.shape))
            self.dtypes.append(t.dtype)
        self.items, self.bytes, self.full = [], 0, False
        if not unique:
            return
        plain = [i for i, b in enumerate(bounded) if not b]
        sat = [i for i, b in enumerate(bounded) if b]
        position = [0] * len(unique)
        for p, i in enumerate(plain + sat):
            position[i] = self.read + p
        self.rows += [position[i] for i in index]
        self.read += len(unique)
        if plain:
            stats = tensor_stats([unique[i] for i in plain], histogram=self.histogram)
            zeros = stats.numel.new_zeros(len(plain))
            self.parts.append((stats, zeros, zeros))
        if sat:
            stats = tensor_stats([unique[i] for i in sat], histogram=True, saturation=1 - EPS)
            self.parts.append((bounded_rows(stats, self.histogram), stats.saturated, tiny_counts(stats)))

    def finish(self, name: str) -> PassStats | None:
        """The pass's rows, in order, or None if it held no tensor."""
        self.flush()
        if not self.rows:
            return None
        stats, high, tiny = zip(*self.parts)
        rows = torch.tensor(self.rows, device=stats[0].device)
        stats = stats[0] if len(stats) == 1 else TensorStats.cat(list(stats))
        return PassStats(self.step, name, self.names, self.kinds, self.shapes, self.dtypes, stats[rows],
                         near_counts(self.kinds, torch.cat(high)[rows], torch.cat(tiny)[rows]))


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype, t.shape, t.stride(), t.device


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _key(a) == _key(b)


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
        self._outputs: _Pending | None = None  # the forward pass under way, on a due step
        self._to_hook: list = []  # (grad_fn, output_nr, name, tensor) of its outputs that require grad
        self._grads: _Pending | None = None  # the backward pass under way
        self._passes: dict[int, list[PassStats]] = {}
        model._torchhealth_watch = self

    # -- hooks ------------------------------------------------------------------------
    def _begin(self, module, args, kwargs) -> None:
        if self.monitor is None:
            self._current, self._count = self._count, self._count + 1
            self._deliver(before=self._current)
        step = self._next_step()
        self._outputs = _Pending(step, self._histogram(step)) if self.options.due(step) else None
        if self._outputs is not None:
            self._record("<input>", OTHER, (args, kwargs))
            self._to_hook = []  # the model's inputs: not an output of this pass

    def _output(self, name, kind, module, inputs, output) -> None:
        pending = self._outputs
        if pending is None:
            return
        if isinstance(output, torch.Tensor):  # the common case, in as few operations as it takes
            pending.add(name, kind, output)
            if output.requires_grad:
                self._to_hook.append((output.grad_fn, output.output_nr, name, output))
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
        for path, t in found:
            label = name + path if len(found) > 1 else name
            self._outputs.add(label, kind, t)  # the op records no autograd: nothing to detach
            if t.requires_grad:
                self._to_hook.append((t.grad_fn, t.output_nr, label, t))

    def _end(self, module, inputs, output) -> None:
        if self._outputs is None:
            return
        self._record("<output>", OTHER, output)
        outs, self._outputs = self._outputs, None
        self._add(outs.finish("forward"))
        to_hook, self._to_hook = self._to_hook, []
        if self.backward:
            # Hooked here, in one loop, rather than in each module's hook (where the
            # interpreter's caches are cold): a pre-hook on the node that made the
            # output, as it was when the module returned it, sees the gradient flowing
            # into that output even if a later in-place op replaced the tensor's node.
            for node, index, name, t in to_hook:
                if node is None:  # a leaf: its gradient goes to no node of this pass
                    t.register_hook(functools.partial(self._grad, name))
                else:
                    node.register_prehook(functools.partial(self._grad_output, index, name))

    def _grad_output(self, index, name, grad_outputs) -> None:
        if grad_outputs[index] is not None:
            self._grad(name, grad_outputs[index])

    def _grad(self, name, grad) -> None:
        if self._grads is None:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)
            step = self._next_step()
            self._grads = _Pending(step, self._histogram(step))
        self._grads.add(name, OTHER, grad)

    def _backward_end(self) -> None:
        grads, self._grads = self._grads, None
        if self.options.due(grads.step):
            self._add(grads.finish("backward"))

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
