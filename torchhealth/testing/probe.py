"""The suite's passes over a deepcopy of the model, each run at most once.

`Probe` owns the copy (and a copy of the optimizer): the user's model, its
gradients, its optimizer state and the global RNG are never touched. Every
group of tensors (activations, parameters, gradients, parameter changes) is
read with one `torchhealth.tensor_stats` call and one host copy.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

import torchhealth

from .activations import LeafCall, floating_tensors, leaf_calls
from .batch import Batch, primary_output

OptimizerArg = torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam with lr=1e-2: moves every parameter with a nonzero gradient and
    overfits a small batch of a small model in tens of steps."""
    return torch.optim.Adam(params, lr=1e-2)


@dataclass(frozen=True)
class Rows:
    """Host copy of the statistics of named tensors (one `tensor_stats` call)."""

    names: list[str]
    numel: list[int]
    nonfinite: list[int]
    zero: list[int]
    min: list[float]
    max: list[float]

    @staticmethod
    def of(names: list[str], tensors: list[torch.Tensor]) -> Rows:
        if not tensors:
            return Rows([], [], [], [], [], [])
        s = torchhealth.tensor_stats([t.detach() for t in tensors], histogram=False).cpu()
        return Rows(list(names), s.numel.tolist(), s.nonfinite.tolist(), s.zero.tolist(),
                    s.min.tolist(), s.max.tolist())

    def where(self, predicate: Callable[[int], bool]) -> list[str]:
        return [n for i, n in enumerate(self.names) if predicate(i)]

    def nonfinite_names(self) -> list[str]:
        return self.where(lambda i: self.nonfinite[i] > 0)

    def all_zero_names(self) -> list[str]:
        return self.where(lambda i: self.zero[i] == self.numel[i])


@dataclass(frozen=True)
class TrainPass:
    """The suite's one train-mode forward and backward."""

    output: torch.Tensor  # primary output, detached
    loss: float
    calls: list[LeafCall]
    activations: Rows  # "module name" rows, then "output"
    params: Rows
    grads: Rows  # trainable parameters that got a gradient
    no_grad: list[str]  # trainable parameters whose gradient is None


@dataclass(frozen=True)
class Dependence:
    """Which inputs (by batch index) the output of sample ``sample`` depends on."""

    sample: int
    depends: list[bool]
    sources: list[str]  # what was differentiated: inputs, or embedding-like module outputs


def resolve_names(model: nn.Module, items: Iterable[Any], what: str) -> set[str]:
    """Parameter names for ``items``: parameter names, module names (prefixes),
    modules or parameters of ``model``."""
    named = list(model.named_parameters())
    out: set[str] = set()
    for item in items:
        if isinstance(item, str):
            hits = {n for n, _ in named if n == item or n.startswith(item + ".")}
            if not hits:
                raise ValueError(f"{what}: the model has no parameter or module named {item!r}")
        elif isinstance(item, nn.Module):
            hits = {n for n, p in named if any(p is q for q in item.parameters())}
        elif isinstance(item, torch.Tensor):
            hits = {n for n, p in named if p is item}
        else:
            raise TypeError(f"{what}: expected parameter or module names, modules or parameters, "
                            f"got {type(item).__name__}")
        if not hits:
            raise ValueError(f"{what}: {type(item).__name__} is not a parameter of the model")
        out |= hits
    return out


class Probe:
    """Runs the suite's passes on ``deepcopy(model)``, each once, on demand."""

    def __init__(self, model: nn.Module, batch: Batch, loss_fn: Callable,
                 optimizer: OptimizerArg = None, seed: int = 0):
        self.batch, self.loss_fn, self.seed = batch, loss_fn, seed
        if isinstance(optimizer, torch.optim.Optimizer):
            # One deepcopy keeps the optimizer's parameters pointing at the copy's.
            self.model, self.optimizer = copy.deepcopy((model, optimizer))
        else:
            self.model = copy.deepcopy(model)
            make = optimizer or default_optimizer
            self.optimizer = make([p for p in self.model.parameters() if p.requires_grad])
        for p in self.model.parameters():
            p.grad = None
        self.named = list(self.model.named_parameters())

    @cached_property
    def train_pass(self) -> TrainPass:
        self.model.train()
        with leaf_calls(self.model) as calls:
            output = self.batch.forward(self.model)
        loss = self.batch.loss(self.loss_fn, output)
        out = primary_output(output)
        acts = [(c.name if len(c.tensors) == 1 else f"{c.name}[{k}]", t)
                for c in calls for k, t in enumerate(c.tensors)] + [("output", out)]
        activations = Rows.of([n for n, _ in acts], [t for _, t in acts])
        params = Rows.of([n for n, _ in self.named], [p for _, p in self.named])
        if loss.requires_grad:  # else no parameter reaches the loss: `connected` names them all
            loss.backward()
        with_grad = [(n, p.grad) for n, p in self.named if p.requires_grad and p.grad is not None]
        return TrainPass(out.detach(), loss.item(), list(calls), activations, params,
                         Rows.of([n for n, _ in with_grad], [g for _, g in with_grad]),
                         [n for n, p in self.named if p.requires_grad and p.grad is None])

    @cached_property
    def changes(self) -> Rows:
        """Change of every parameter over one optimizer step with the train pass's gradients."""
        self.train_pass  # noqa: B018  (the step uses its gradients)
        before = [p.detach().clone() for _, p in self.named]
        self.optimizer.step()
        return Rows.of([n for n, _ in self.named],
                       [p.detach() - b for (_, p), b in zip(self.named, before)])

    @cached_property
    def dependence(self) -> Dependence | str:
        """Gradient of one sample's output (randomly weighted, so that outputs
        summing to a constant do not cancel) with respect to every sample's
        input, in eval mode; a string says why it cannot be computed."""
        batch, n = self.batch, self.batch.size
        if n < 2:
            return "the batch has a single sample"
        self.model.eval()
        floats = [(name, t.detach().clone().requires_grad_(True)) for name, t in batch.inputs
                  if t.is_floating_point()]
        with torch.enable_grad(), leaf_calls(self.model) as calls:
            fed = batch.with_inputs([dict(floats).get(name, t) for name, t in batch.inputs])
            out = primary_output(fed.forward(self.model))
        sources = floats or [(f"output of {c.name}", c.tensors[0]) for c in calls
                             if c.tensors and c.tensors[0].requires_grad
                             and not floating_tensors(list(c.inputs))]
        if not sources:
            return ("no input is floating point and no module maps integer inputs to "
                    "activations (an embedding), so there is nothing to differentiate")
        if not out.requires_grad:
            return "the output does not depend on the inputs through autograd"
        if out.dim() == 0 or out.shape[0] != n:
            return f"the output's shape {list(out.shape)} has no batch dimension 0 of size {n}"
        i = n // 2
        gen = torch.Generator().manual_seed(self.seed)
        weights = torch.rand(out[i].shape, generator=gen).to(out.device, out.dtype) + 0.5
        grads = torch.autograd.grad((out[i] * weights).sum(), [t for _, t in sources],
                                    allow_unused=True)
        rows = Rows.of([], [g[j] for g in grads if g is not None for j in range(n)])
        used = [g for g in grads if g is not None]
        depends = [any(rows.zero[k * n + j] < rows.numel[k * n + j] for k in range(len(used)))
                   for j in range(n)]
        return Dependence(i, depends, [s for s, _ in sources])

    def overfit(self, steps: int, target: float) -> list[float]:
        """Train-mode losses of up to ``steps`` optimizer steps on the batch,
        stopping once the loss is at or below ``target``."""
        self.changes  # noqa: B018  (the first step is the parameter-update step)
        self.model.train()
        losses: list[float] = []
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.batch.loss(self.loss_fn, self.batch.forward(self.model))
            losses.append(loss.item())
            # without a graph there is nothing to train: the check reports the flat loss
            if losses[-1] <= target or not loss.requires_grad:
                break
            loss.backward()
            self.optimizer.step()
        return losses

    def eval_loss(self) -> float:
        self.model.eval()
        with torch.no_grad():
            return float(self.batch.loss(self.loss_fn, self.batch.forward(self.model)))
