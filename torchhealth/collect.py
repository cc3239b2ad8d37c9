"""The first stage of a check: which tensors to read, and what each one is.

`Collector` knows the parameters (through an optimizer's live ``param_groups``,
a module, or a list), their names and which are embedding tables;
`Collector.collect` returns a `Collected`: the tensors in one block per device,
their `Layout` (names, roles, dtypes, shapes; cached while nothing changes) and
the gradients themselves, for the policy's in-place actions.

Complex parameters, gradients and state are read as their real views
(``torch.view_as_real``: real and imaginary parts side by side, shape ``[..., 2]``
and the matching real dtype), so a NaN in a complex gradient is found like any
other. Sparse gradients are read through their coalesced values.
"""
from __future__ import annotations

import logging
import operator
import sys
from dataclasses import dataclass

import torch

from ._ops import SUPPORTED_DTYPES
from .checks import Layout

log = logging.getLogger("torchhealth")
_EMBEDDINGS = (torch.nn.Embedding, torch.nn.EmbeddingBag)
_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
# Norms that subtract each channel's mean (over the batch or the positions):
# a constant added to one channel before them cancels. LayerNorm and RMSNorm
# do not (LayerNorm removes only the mean over features, one number per token;
# a per-feature bias keeps the rest), nor does GroupNorm with several channels
# per group.
_CHANNEL_NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)
_QUERY_KEY = (("query", "key"), ("q_proj", "k_proj"), ("q", "k"), ("to_q", "to_k"), ("q_lin", "k_lin"))


def _removes_channel_mean(norm: torch.nn.Module, channels: int) -> bool:
    if isinstance(norm, _CHANNEL_NORMS):
        return norm.num_features == channels
    return isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == norm.num_channels == channels


def structural_facts(model: torch.nn.Module) -> dict[int, str]:
    """``id(parameter) -> why its gradient is zero by construction``, from the
    modules alone (the checks confirm it from the statistics):

    - the bias of a Linear or Conv layer that the next module (in registration
      order, with a matching channel count) normalises per channel: BatchNorm,
      InstanceNorm, or GroupNorm with one channel per group;
    - the bias of an attention key projection (a ``key``/``k_proj``/``k``/...
      Linear beside a ``query``/``q_proj``/``q``/... one, as in BERT, ViT and
      most Hugging Face encoders): it adds ``q . b`` to every score of a query,
      a constant that softmax removes.

    A fused input projection (``nn.MultiheadAttention.in_proj_bias``, GPT-2's
    ``c_attn.bias``) holds its key bias as one third of a larger tensor: that
    third gets no gradient, but the query and value thirds do, so the tensor's
    statistics are healthy and nothing is recorded for it."""
    facts: dict[int, str] = {}
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    for (name, layer), (norm_name, norm) in zip(leaves, leaves[1:]):
        bias = getattr(layer, "bias", None)
        channels = getattr(layer, "out_features", getattr(layer, "out_channels", None))
        if isinstance(layer, _LAYERS) and isinstance(bias, torch.nn.Parameter) \
                and _removes_channel_mean(norm, channels):
            facts[id(bias)] = (f"feeds {type(norm).__name__} `{norm_name}`, which subtracts "
                               "each channel's mean: the bias cancels, so it is redundant; "
                               "bias=False gives the same model")
    for name, module in model.named_modules():
        for q, k in _QUERY_KEY:
            key = getattr(module, k, None)
            bias = getattr(key, "bias", None)
            if isinstance(getattr(module, q, None), torch.nn.Linear) and isinstance(key, torch.nn.Linear) \
                    and isinstance(bias, torch.nn.Parameter):
                facts[id(bias)] = ("attention key bias: it adds the same number to every score of a "
                                   "query, which softmax removes, so it is redundant")
    return facts


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module a `torch.compile` wrapper wraps (whose names the user knows), or `model`."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def in_compiled_autograd() -> bool:
    """Whether a gradient hook runs inside compiled autograd's graph, where the
    autograd engine runs no callback queued with ``queue_callback``."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(ca.in_compiled_autograd_region)


def at_backward_end(callback) -> bool:
    """Queues `callback` to run when the backward pass under way ends (the
    engine's ``queue_callback``, as DDP and FSDP do). False, queuing nothing,
    where no engine callback would run: under compiled autograd, or outside a
    backward pass."""
    if in_compiled_autograd() or torch._C._current_graph_task_id() == -1:
        return False
    torch.autograd.Variable._execution_engine.queue_callback(callback)
    return True


_REAL_DTYPES = frozenset(SUPPORTED_DTYPES)
_LAYOUTS = (torch.strided, torch.sparse_coo)


def _real(t: torch.Tensor) -> torch.Tensor:
    # The dtype first: a real tensor is not asked whether it is complex.
    return torch.view_as_real(t.detach()) if t.dtype not in _REAL_DTYPES and t.is_complex() else t


def _readable(t: torch.Tensor) -> bool:
    return (t.dtype in _REAL_DTYPES or t.is_complex()) and t.layout in _LAYOUTS


# What `Collector.collect`'s quick path compares, per parameter and gradient.
_PARAM_FACTS = operator.attrgetter("dtype", "shape", "device", "requires_grad", "layout")
_GRAD_FACTS = operator.attrgetter("dtype", "shape", "layout")


def _interleaved(params: list, grads: list) -> list:
    """Each parameter followed by its gradient, if it has one."""
    return [t for pair in zip(params, grads) for t in pair if t is not None]


@dataclass
class Collected:
    """What one check reads: ``tensors[i]`` is described by row ``i`` of
    ``layout``; ``grads`` are the gradients to act on in place (real views of
    complex ones, sparse ones as they are)."""

    tensors: list[torch.Tensor]
    layout: Layout
    grads: list[torch.Tensor]
    changed_params: bool  # the set of parameters differs from the previous collect
    devices: list[torch.device]  # of the tensors, in row order (one block of rows each)


class Collector:
    """Finds the tensors of `source` (an optimizer, a module, or an iterable of
    parameters, ``(name, parameter)`` pairs or param groups) and names them
    after `model` (unwrapped from any `torch.compile` wrapper by the monitor),
    after named param groups (``"param_names"``), or ``group{i}.param{j}``.
    ``optimizer_state``: False, True, or a set of state keys to read too
    (tensors shaped like their parameter)."""

    def __init__(self, source, model: torch.nn.Module | None = None,
                 optimizer_state: bool | frozenset = False):
        self.optimizer = source if isinstance(source, torch.optim.Optimizer) else None
        self._groups: list[dict] = []
        if self.optimizer is None:
            items = (list(source.named_parameters()) if isinstance(source, torch.nn.Module)
                     else list(source))
            if items and isinstance(items[0], dict):
                self._groups = items
            elif items and isinstance(items[0], tuple):
                self._groups = [{"params": [p for _, p in items], "param_names": [n for n, _ in items]}]
            else:
                self._groups = [{"params": items}]
        self._names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        # Embedding tables get mostly-zero gradients by design.
        self._sparse_ids = ({id(m.weight) for m in model.modules() if isinstance(m, _EMBEDDINGS)}
                            if model is not None else set())
        self._structural = structural_facts(model) if model is not None else {}
        self._modules = ({id(p): name for name, m in model.named_modules() for p in m.parameters(recurse=False)}
                         if model is not None else {})
        self.optimizer_state = optimizer_state
        self._key = None
        self._layout: Layout | None = None
        self._params_key = None
        self._quick = None  # the last collect's `_facts`, when the quick path may reuse it
        self._devices: list[torch.device] = []

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups if self.optimizer is not None else self._groups

    def _state_tensors(self, p) -> list[tuple[str, torch.Tensor]]:
        if not self.optimizer_state or self.optimizer is None:
            return []
        st = self.optimizer.state.get(p)
        if not st:
            return []
        keys = None if self.optimizer_state is True else self.optimizer_state
        return [(k, _real(v)) for k, v in st.items()
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.layout == torch.strided
                and _readable(v) and (keys is None or k in keys)]

    def _facts(self, params: list, grads: list) -> tuple:
        return (list(map(id, params)), list(map(_PARAM_FACTS, params)),
                [None if g is None else _GRAD_FACTS(g) for g in grads])

    def collect(self) -> Collected:
        # Runs every check. The quick path: when every tensor is a plain dense
        # real tensor on one device and no optimizer state is read, and no
        # parameter, gradient, dtype, shape, device or requires_grad changed
        # since the last collect, the rows are each parameter followed by its
        # gradient, as last time (a third of the full path's Python).
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params]
        facts = self._facts(params, grads) if self._quick is not None else None
        if facts is not None and facts == self._quick:
            return Collected(_interleaved(params, grads), self._layout, [g for g in grads if g is not None],
                             False, self._devices)
        return self._collect_all(params, grads)

    def _collect_all(self, flat: list, flat_grads: list) -> Collected:
        # Per tensor only what can change between steps (the gradient, its
        # dtype and shape); names and the rest of the Layout are rebuilt only
        # when the key below changes.
        entries = []  # (tensor, parameter index, role)
        params = []  # (parameter, group index, index in the group)
        grads = []
        for gi, group in enumerate(self.param_groups):
            for pj, p in enumerate(group["params"]):
                if not _readable(p):
                    continue
                j = len(params)
                params.append((p, gi, pj))
                entries.append((_real(p), j, "param"))  # tensor_stats records no autograd
                g = p.grad
                if g is not None:
                    g = _real(g)
                    grads.append(g)
                    if g.is_sparse:  # duplicate indices add up: read the true gradient
                        g = (g if g.is_coalesced() else g.coalesce())._values()
                    entries.append((g, j, "grad"))
                if self.optimizer_state:
                    entries += [(v, j, f"state.{k}") for k, v in self._state_tensors(p)]
        devices = list(dict.fromkeys(t.device for t, _, _ in entries))
        if len(devices) > 1:  # stable: one block of rows per device
            entries.sort(key=lambda e: devices.index(e[0].device))
        key = [(j, role, t.dtype, t.shape) for t, j, role in entries]
        key += [(id(p), p.requires_grad) for p, _, _ in params]
        key.append(tuple(devices))
        if key != self._key:
            self._layout = self._build_layout(entries, params)
            self._key = key
        params_key = [id(p) for p, _, _ in params]
        changed = self._params_key is not None and params_key != self._params_key
        if changed:
            log.info("torchhealth: the parameter set changed; dead-parameter counters restart")
        self._params_key = params_key
        tensors = [t for t, _, _ in entries]
        quick = _interleaved(flat, flat_grads)  # what the quick path would return
        plain = (not self.optimizer_state and len(devices) <= 1 and len(tensors) == len(quick)
                 and all(map(operator.is_, tensors, quick)))
        self._quick = self._facts(flat, flat_grads) if plain else None
        self._devices = devices
        return Collected(tensors, self._layout, grads, changed, devices)

    def _build_layout(self, entries: list, params: list) -> Layout:
        names = []
        for p, gi, pj in params:
            gnames = self.param_groups[gi].get("param_names")
            names.append(self._names.get(id(p)) or (gnames[pj] if gnames else f"group{gi}.param{pj}"))
        return Layout(
            names=[names[j] for _, j, _ in entries], roles=[r for _, _, r in entries],
            dtypes=[t.dtype for t, _, _ in entries], shapes=[tuple(t.shape) for t, _, _ in entries],
            param_index=[j for _, j, _ in entries], param_names=names,
            trainable=[p.requires_grad for p, _, _ in params],
            sparse=[id(p) in self._sparse_ids or (p.grad is not None and p.grad.is_sparse)
                    for p, _, _ in params],
            structural=[self._structural.get(id(p), "") for p, _, _ in params],
            modules=[self._modules.get(id(p)) for p, _, _ in params])
