"""Forward hooks on leaf modules for one forward pass: the module calls, in order.

This is the suite's only source of activations, kept small and in one place so
that it can be swapped for the project's ``watch`` hooks.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LeafCall:
    """One call of a leaf module (a module without children) during a forward."""

    name: str
    module: nn.Module
    inputs: tuple[Any, ...]
    output: Any

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The floating-point tensors of the output (a GRU's output and hidden state)."""
        return floating_tensors(self.output)


def floating_tensors(value: Any) -> list[torch.Tensor]:
    """Floating-point tensors in a tensor, or a tuple/list/dict of them (one level)."""
    if isinstance(value, torch.Tensor):
        items = [value]
    elif isinstance(value, (tuple, list)):
        items = list(value)
    elif isinstance(value, dict):
        items = list(value.values())
    else:
        items = []
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


@contextmanager
def leaf_calls(model: nn.Module) -> Iterator[list[LeafCall]]:
    """Record every leaf-module call made inside the ``with`` block; the hooks
    are removed on exit, even on an exception. Outputs are kept with their
    autograd history (``torch.autograd.grad`` can differentiate with respect
    to them)."""
    calls: list[LeafCall] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        calls.append(LeafCall(names[module] or type(module).__name__, module, inputs, output))

    handles = [m.register_forward_hook(hook) for m in names if next(m.children(), None) is None]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
