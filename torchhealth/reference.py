"""The pure-PyTorch reference of ``tensor_stats``.

Ordinary torch ops, one tensor at a time, with exactly the kernels' semantics
(see ``torchhealth.stats``). It is the oracle of the tests, the fallback when
the compiled extension is missing, and it never synchronises with the device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .stats import BINS, BINS_PER_SIGN, COLS, EXP_MAX, EXP_MIN

_SMALLEST_NORMAL = {
    torch.float16: 2.0**-14,
    torch.bfloat16: 2.0**-126,
    torch.float32: 2.0**-126,
    torch.float64: 2.0**-1022,
}


def default_saturation(dtype: torch.dtype) -> float:
    """Half the dtype's largest finite value: within a factor of 2 of overflow."""
    return torch.finfo(dtype).max / 2


def _row(t: torch.Tensor, histogram: bool, saturation: float | None) -> torch.Tensor:
    x = t.detach().reshape(-1)
    dev = x.device
    threshold = default_saturation(t.dtype) if saturation is None else saturation
    xd = x.to(torch.float64)  # exact for every supported dtype
    fin = torch.isfinite(xd)
    ax = xd.abs()
    counts = torch.stack([
        torch.tensor(x.numel(), device=dev),
        torch.isnan(xd).sum(),
        (xd == math.inf).sum(),
        (xd == -math.inf).sum(),
        (xd == 0).sum(),
        ((ax < _SMALLEST_NORMAL[t.dtype]) & (xd != 0)).sum(),
        (fin & (ax >= threshold)).sum(),
    ])
    d = torch.where(fin, xd, 0.0) + 0.0  # + 0.0 turns -0 into +0
    if x.numel():
        extremes = [torch.where(fin, d, math.inf).amin(), torch.where(fin, d, -math.inf).amax(),
                    d.abs().amax()]
    else:
        extremes = [xd.new_tensor(math.inf), xd.new_tensor(-math.inf), xd.new_tensor(0.0)]
    values = torch.stack(extremes + [d.sum(), (d * d).sum()])
    parts = [counts, values.view(torch.int64)]
    if histogram:
        parts.append(_hist(xd, fin))
    return torch.cat(parts)


def _hist(xd: torch.Tensor, fin: torch.Tensor) -> torch.Tensor:
    _, e = torch.frexp(xd)  # xd = m * 2^e with 0.5 <= |m| < 1, so exponent = e - 1
    exponent = (e.to(torch.int64) - 1).clamp(EXP_MIN - 1, EXP_MAX + 1)
    slot = exponent - (EXP_MIN - 1) + (xd > 0).to(torch.int64) * BINS_PER_SIGN
    slot = torch.where(fin & (xd != 0), slot, BINS)  # one spare bin for the rest
    counts = torch.zeros(BINS + 1, dtype=torch.int64, device=xd.device)
    counts.scatter_add_(0, slot, torch.ones_like(slot))
    return counts[:BINS]


def tensor_stats(tensors: Sequence[torch.Tensor], histogram: bool = True,
                 saturation: float | None = None) -> torch.Tensor:
    """The packed int64 ``[T, COLS (+ BINS)]`` rows the kernels return, computed
    with ordinary torch ops. Inputs are assumed validated."""
    if not tensors:
        return torch.zeros(0, COLS + (BINS if histogram else 0), dtype=torch.int64)
    return torch.stack([_row(t, histogram, saturation) for t in tensors])
