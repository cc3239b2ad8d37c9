"""What a batch is, how it is fed to a model and a loss, and the errors for bad input.

A batch is one of:

- a tensor ``x``: ``model(x)``, then ``loss_fn(output)``;
- a tuple or list ``(x1, ..., xk, y)`` with k >= 1: ``model(x1, ..., xk)``, then
  ``loss_fn(output, y)``; a one-element tuple is inputs only;
- a dict of tensors: ``model(**inputs)`` with every key but ``target_key``, then
  ``loss_fn(output, batch[target_key])`` (``loss_fn(output)`` without that key).

Dimension 0 of every input is the batch dimension.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .activations import floating_tensors


@dataclass(frozen=True)
class Batch:
    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]
    target: torch.Tensor | None

    @property
    def inputs(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of every model input: ``inputs[i]`` or the dict key."""
        return [(f"inputs[{i}]", t) for i, t in enumerate(self.args)] + list(self.kwargs.items())

    @property
    def size(self) -> int:
        return self.inputs[0][1].shape[0]

    def with_inputs(self, tensors: list[torch.Tensor]) -> Batch:
        """The same batch with its inputs replaced, in the order of `inputs`."""
        k = len(self.args)
        return replace(self, args=tuple(tensors[:k]), kwargs=dict(zip(self.kwargs, tensors[k:])))

    def forward(self, model: nn.Module) -> Any:
        return _user_call("the model", model, *self.args, **self.kwargs)

    def loss(self, loss_fn: Callable, output: Any) -> torch.Tensor:
        """``loss_fn`` applied to the output (and the target), checked to be a scalar."""
        args = (output,) if self.target is None else (output, self.target)
        loss = _user_call("loss_fn", loss_fn, *args)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a scalar tensor; it returned a "
                            f"{type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor; it returned shape "
                             f"{list(loss.shape)} (a loss with reduction='none'? reduce it "
                             "with .mean())")
        if not loss.is_floating_point():
            raise TypeError(f"loss_fn must return a floating-point scalar; it returned {loss.dtype}")
        return loss.reshape(())


class UserCodeError(RuntimeError):
    """The model or the loss function raised; the original is the ``__cause__``."""


def _user_call(what: str, fn: Callable, *args, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise UserCodeError(f"{what} raised {type(e).__name__}: {e}") from e


def _tensor(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"batch: {where} is a {type(value).__name__}, not a tensor; a batch is a "
                        "tensor, a tuple/list of tensors (inputs..., target) or a dict of tensors")
    return value


def as_batch(batch: Any, *, target_key: str = "labels") -> Batch:
    """Split ``batch`` into model inputs and target; raise a clear error for anything else."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, torch.Tensor):
        out = Batch((batch,), {}, None)
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("batch: an empty tuple/list has no inputs")
        items = tuple(_tensor(v, f"batch[{i}]") for i, v in enumerate(batch))
        out = Batch(items, {}, None) if len(items) == 1 else Batch(items[:-1], {}, items[-1])
    elif isinstance(batch, Mapping):
        items = {str(k): _tensor(v, f"batch[{k!r}]") for k, v in batch.items()}
        target = items.pop(target_key, None)
        if not items:
            raise ValueError(f"batch: the dict has no inputs besides the target {target_key!r}")
        out = Batch((), items, target)
    else:
        raise TypeError(f"batch must be a tensor, a tuple/list of tensors (inputs..., target) or "
                        f"a dict of tensors; got {type(batch).__name__}")
    sizes = {name: (t.shape[0] if t.dim() else None) for name, t in out.inputs}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"batch: every input needs the same batch dimension 0; got sizes {sizes}")
    return out


def primary_output(output: Any) -> torch.Tensor:
    """The tensor the output checks read: the output itself, the first floating
    tensor of a tuple, or ``output["logits"]`` of a dict (else its first tensor)."""
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    found = floating_tensors(output)
    if not found:
        raise TypeError(f"model output is a {type(output).__name__} without a floating-point "
                        "tensor; the checks read a tensor, a tuple of tensors or a dict with 'logits'")
    return found[0]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters with requires_grad; a clear error when there are none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters "
                         f"({len(named)} parameter(s), none with requires_grad=True): "
                         "there is nothing for the sanity checks to train")
    return trainable
