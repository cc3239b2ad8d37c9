"""The user's own numbers of a step (loss, learning rate, ...), logged with
`HealthMonitor.log` and carried by that step's `Report` as ``Report.scalars``.

A tensor stays a tensor (a detached float64 copy, on its device) until the
check's one host copy (`torchhealth.hostcopy.HostCopy`) brings it back with
the statistics: logging a loss costs no synchronisation of its own, and on a
step that is not checked it is never read at all.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch

PREFIX = "scalar:"  # of their fields in the host copy, beside the statistics'


def checked(key: str, value) -> float | torch.Tensor:
    """`value` as a float, or as a detached 0-d float64 tensor snapshot of it;
    a TypeError/ValueError naming `key` for anything that is not one real
    number. Non-finite values are kept (a NaN loss is worth seeing)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"log: scalar names must be non-empty strings, got {key!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"log: {key} is a tensor of shape {tuple(value.shape)}; log takes one "
                             "number per name (a Python number or a tensor with one element)")
        if value.is_complex():
            raise TypeError(f"log: {key} is a complex tensor; log takes real numbers")
        # A copy: the caller may update the tensor in place before the check reads it.
        return value.detach().reshape(()).to(torch.float64, copy=True)
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"log: {key} = {value!r} is too large for a float") from None
    raise TypeError(f"log: {key} is a {type(value).__name__} ({value!r:.40}); log takes a real "
                    "number or a tensor with one element")


def fields(scalars: Mapping[str, float | torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors among `scalars` as host-copy fields on `device`."""
    out = {}
    for key, v in scalars.items():
        if isinstance(v, torch.Tensor):
            # Device to device (or host to device) without waiting; to the host
            # it must wait, or the copy could be read before it lands.
            out[PREFIX + key] = v.to(device, non_blocking=device.type != "cpu")
    return out


def values(scalars: Mapping[str, float | torch.Tensor], copy) -> dict[str, float]:
    """`scalars` as floats, the tensors read from `copy` (a landed `HostCopy`)."""
    return {k: float(copy.value(PREFIX + k)) if isinstance(v, torch.Tensor) else v
            for k, v in scalars.items()}
