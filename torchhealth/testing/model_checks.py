"""The model checks: each reads a `Probe` and the suite's options and returns a
`CheckResult`. They hold no state; the probe runs each pass at most once."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .activations import leaf_calls
from .probe import Probe
from .report import CheckResult, failed, not_applicable, passed

# Layers whose composition, without a nonlinearity between them, is one linear map.
LINEAR_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Leaf modules that keep a tensor linear in its input (Dropout scales by a fixed mask).
LINEAR_PASS_THROUGH = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
                       nn.Dropout2d, nn.Dropout3d)
# Modules that behave differently in train and eval mode.
MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class Options:
    frozen: set[str] = field(default_factory=set)
    output_range: tuple[float, float] | None = None
    classes: int | None = None
    expected_init_loss: float | None = None
    init_loss_rtol: float = 0.5
    output_kind: str | None = None  # "logits", "probabilities", "log_probabilities"
    evaluate: Callable[[nn.Module, Any], Any] | None = None
    raw_batch: Any = None
    overfit_steps: int = 200
    overfit_ratio: float = 0.1


def _modules(names: list[str]) -> list[str]:
    return sorted({n.rpartition(".")[0] or n for n in names})


def finite(p: Probe, o: Options) -> CheckResult:
    t = p.train_pass
    bad = ([f"activation of {n}" for n in t.activations.nonfinite_names()]
           + [f"parameter {n}" for n in t.params.nonfinite_names()]
           + [f"gradient of {n}" for n in t.grads.nonfinite_names()]
           + (["loss"] if not math.isfinite(t.loss) else []))
    if bad:
        return failed("finite", f"NaN or Inf in {len(bad)} tensor(s); the first in forward "
                      f"order is the {bad[0]}", bad, loss=t.loss)
    return passed("finite", f"no NaN or Inf in the loss, {len(t.activations.names)} activations, "
                  f"{len(t.params.names)} parameters and {len(t.grads.names)} gradients")


def connected(p: Probe, o: Options) -> CheckResult:
    t = p.train_pass
    dead = t.no_grad + t.grads.all_zero_names()
    if dead:
        return failed("connected", f"{len(dead)} trainable parameter(s) of module(s) "
                      f"{', '.join(_modules(dead))} get no gradient from the loss: a layer whose "
                      "output is never used, or a path cut by detach(), no_grad or an integer op",
                      dead, no_gradient=t.no_grad)
    return passed("connected", f"all {len(t.grads.names)} trainable parameters get a "
                  "nonzero gradient from the loss")


def params_update(p: Probe, o: Options) -> CheckResult:
    changes, t = p.changes, p.train_pass
    grad_state = {n: "no gradient" for n in t.no_grad}
    grad_state.update({n: "an all-zero gradient" for n in t.grads.all_zero_names()})
    not_trainable = [n for n, q in p.named if not q.requires_grad and n not in o.frozen]
    stuck = [n for n in changes.all_zero_names() if n not in o.frozen and n not in not_trainable]
    if not_trainable or stuck:
        parts = []
        if not_trainable:
            parts.append(f"{', '.join(_modules(not_trainable))} has requires_grad=False but is "
                         "not listed in frozen= (a layer frozen by accident?)")
        moved_not = ("a gradient, but the optimizer did not move it: missing from its param "
                     "groups, or lr=0?")
        parts += [f"{n} did not change in one optimizer step ({grad_state.get(n, moved_not)})"
                  for n in stuck]
        return failed("params_update", "; ".join(parts), not_trainable + stuck)
    return passed("params_update", f"all {len(changes.names) - len(o.frozen)} parameters not "
                  "listed in frozen= change in one optimizer step (on a copy of the model)")


def frozen(p: Probe, o: Options) -> CheckResult:
    if not o.frozen:
        return not_applicable("frozen", "no parameter is listed in frozen=")
    changes = p.changes
    moved = [n for i, n in enumerate(changes.names)
             if n in o.frozen and changes.zero[i] < changes.numel[i]]
    if moved:
        return failed("frozen", f"{len(moved)} parameter(s) listed in frozen= changed in one "
                      "optimizer step (requires_grad still True and in the optimizer?)", moved)
    return passed("frozen", f"the {len(o.frozen)} parameters listed in frozen= stay unchanged "
                  "over one optimizer step")


def output_range(p: Probe, o: Options) -> CheckResult:
    if o.output_range is None:
        return not_applicable("output_range", "output_range= not given")
    lo, hi = o.output_range
    a = p.train_pass.activations
    got = (a.min[-1], a.max[-1])  # the last row is the model's output
    if got[0] < lo or got[1] > hi:
        return failed("output_range", f"the output spans [{got[0]:.4g}, {got[1]:.4g}], outside "
                      f"the expected [{lo:g}, {hi:g}] (a missing sigmoid/softmax/tanh?)",
                      ["output"], min=got[0], max=got[1])
    return passed("output_range", f"the output spans [{got[0]:.4g}, {got[1]:.4g}] "
                  f"within [{lo:g}, {hi:g}]")


def _output_kind(o: Options, loss_fn) -> str | None:
    if o.output_kind:
        return o.output_kind
    if isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy:
        return "logits"
    if isinstance(loss_fn, nn.NLLLoss) or loss_fn is F.nll_loss:
        return "log_probabilities"
    return None


def logits(p: Probe, o: Options) -> CheckResult:
    kind = _output_kind(o, p.loss_fn)
    out = p.train_pass.output.double()
    if kind is None or out.dim() < 2:
        return not_applicable("logits", "the loss is neither CrossEntropyLoss nor NLLLoss and "
                              "output_kind= is not given" if kind is None else
                              "the output has no class dimension 1")
    tol = 1e-3
    probs = bool(out.min() >= -tol and out.max() <= 1 + tol and ((out.sum(1) - 1).abs() < tol).all())
    logp = bool(out.max() <= tol and (out.logsumexp(1).abs() < tol).all())
    if kind == "logits" and probs:
        why = ("the model's outputs are probabilities (in [0, 1], rows summing to 1) but the "
               "loss expects logits and applies softmax itself: softmax is applied twice")
    elif kind == "logits" and logp:
        why = ("the model's outputs are log-probabilities (rows log-sum-exp to 0): log-softmax "
               "fed to CrossEntropyLoss, which applies log-softmax again; return logits or use NLLLoss")
    elif kind == "log_probabilities" and not logp:
        why = ("the loss expects log-probabilities (NLLLoss) but the model's rows do not "
               "log-sum-exp to 0: a missing log_softmax")
    elif kind == "probabilities" and not probs:
        why = "the loss expects probabilities but the model's rows are not in [0, 1] summing to 1"
    else:
        return passed("logits", f"the outputs are {kind.replace('_', '-')}, as the loss expects")
    return failed("logits", why, ["output"])


def init_loss(p: Probe, o: Options) -> CheckResult:
    expected = o.expected_init_loss
    if expected is None and o.classes:
        expected = math.log(o.classes)
    if expected is None:
        return not_applicable("init_loss", "neither classes= nor expected_init_loss= given")
    got, tol = p.train_pass.loss, o.init_loss_rtol * abs(expected)
    what = f"log({o.classes}) = {expected:.4g}" if o.expected_init_loss is None else f"{expected:.4g}"
    if abs(got - expected) <= tol:
        return passed("init_loss", f"the loss at initialisation is {got:.4g}, about {what}")
    hint = ("a loss with a flipped sign?" if got < 0 < expected else
            "initial outputs too large (the last layer's init scale?) or a wrong loss" if got > expected
            else "labels leaking into the inputs, or a loss that is not averaged?")
    return failed("init_loss", f"the loss at initialisation is {got:.4g}, expected about {what} "
                  f"(tolerance {tol:.3g}): {hint}", ["loss"], loss=got, expected=expected)


def nonlinearity(p: Probe, o: Options) -> CheckResult:
    origin: dict[int, str] = {}  # id of an activation -> the linear layer it is linear in
    pairs = []
    for c in p.train_pass.calls:
        x = c.inputs[0] if c.inputs and isinstance(c.inputs[0], torch.Tensor) else None
        src = origin.get(id(x)) if x is not None else None
        if isinstance(c.module, LINEAR_LAYERS):
            if src:
                pairs.append(f"{src} -> {c.name}")
            origin[id(c.output)] = c.name
        elif isinstance(c.module, LINEAR_PASS_THROUGH) and src:
            origin[id(c.output)] = src
    if pairs:
        return failed("nonlinearity", f"linear layers feed each other with no activation between "
                      f"them ({'; '.join(pairs)}): together they are one linear map (a missing "
                      "activation? skip this check for an intended low-rank factorisation)", pairs)
    return passed("nonlinearity", "no linear or convolution layer feeds another directly")


def batch_independent(p: Probe, o: Options) -> CheckResult:
    d = p.dependence
    if isinstance(d, str):
        return not_applicable("batch_independent", d)
    others = [j for j, dep in enumerate(d.depends) if dep and j != d.sample]
    note = "(checked in eval mode, so batch norm's batch statistics are no false alarm)"
    if others:
        return failed("batch_independent", f"the output of sample {d.sample} depends on the "
                      f"inputs of {len(others)} other sample(s) {others[:8]}: a view/reshape or "
                      f"transpose that mixes the batch dimension, or a reduction over dim 0 {note}",
                      d.sources, sample=d.sample, other_samples=others)
    if not d.depends[d.sample]:
        return failed("batch_independent", f"the output of sample {d.sample} does not depend on "
                      f"its own input {note}", d.sources, sample=d.sample)
    return passed("batch_independent", f"the output of sample {d.sample} depends on its own "
                  f"input only {note}")


def eval_mode(p: Probe, o: Options) -> CheckResult:
    if o.evaluate is None:
        return not_applicable("eval_mode", "evaluate= (the validation function) not given")
    p.model.train()  # the state a training loop leaves the model in
    outs = []
    for _ in range(2):
        with leaf_calls(p.model) as calls, torch.no_grad():
            outs.append(o.evaluate(p.model, o.raw_batch))
    train_mode = sorted({c.name for c in calls if c.module.training
                         and isinstance(c.module, MODE_DEPENDENT)})
    if train_mode:
        return failed("eval_mode", f"evaluate ran {', '.join(train_mode)} in training mode "
                      "(dropout or batch norm on during validation): model.eval() forgotten",
                      train_mode)
    a, b = (x.detach() if isinstance(x, torch.Tensor) else x for x in outs)
    if isinstance(a, torch.Tensor) and not torch.equal(a, b):
        return failed("eval_mode", "evaluate returned different outputs for the same batch: "
                      "randomness left on in validation (model.eval() forgotten, or "
                      "F.dropout(training=True)?)", ["evaluate"])
    return passed("eval_mode", "evaluate runs every dropout and batch norm in eval mode and "
                  "is deterministic")


def overfits(p: Probe, o: Options) -> CheckResult:
    if o.overfit_steps <= 0:
        return not_applicable("overfits", "overfit_steps=0")
    start = p.train_pass.loss
    if not start > 0:
        return failed("overfits", f"the loss starts at {start:.4g}, not above 0: a loss with a "
                      "flipped sign? (skip this check for a loss that can be negative)",
                      ["loss"], start=start)
    target = o.overfit_ratio * start
    losses = p.overfit(o.overfit_steps, target)
    best = min(losses)
    final = best if best <= target else p.eval_loss()
    if best <= target:
        return passed("overfits", f"the loss fell from {start:.4g} to {best:.4g} after "
                      f"{len(losses)} optimizer steps on one batch (on a copy of the model)")
    if final <= target:
        return passed("overfits", f"the loss fell from {start:.4g} to {final:.4g} in eval mode "
                      f"after {len(losses) + 1} optimizer steps on one batch (on a copy of the "
                      "model)")
    return failed("overfits", f"the loss went from {start:.4g} to {best:.4g} at best (eval mode "
                  f"{final:.4g}) in {len(losses) + 1} optimizer steps, not below {o.overfit_ratio:g}x its "
                  "start: the model cannot fit one batch (a missing activation, softmax applied "
                  "twice, labels that do not match the inputs, too small a learning rate?)",
                  ["loss"], start=start, best=best, eval_final=final)


MODEL_CHECKS: dict[str, Callable[[Probe, Options], CheckResult]] = {
    f.__name__: f for f in (finite, connected, params_update, frozen, output_range, logits,
                            init_loss, nonlinearity, batch_independent, eval_mode, overfits)}
