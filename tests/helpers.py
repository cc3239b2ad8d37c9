"""Comparison against the reference, shared by the CPU and CUDA tests."""
import math

import torch

import torchhealth
from torchhealth import reference
from torchhealth.stats import COLS, SUM, SUMSQ, SUM_RTOL

EXACT = [c for c in range(COLS) if c not in (SUM, SUMSQ)]


def _within_bound(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, what: str):
    for i, (g, w, s) in enumerate(zip(got.tolist(), want.tolist(), scale.tolist())):
        if not math.isfinite(s):  # the bound says nothing once sum(|x|) overflows
            continue
        assert abs(g - w) <= SUM_RTOL * s + 1e-300, f"row {i}: {what} {g} vs reference {w} (scale {s})"


def assert_matches_reference(tensors, **kwargs):
    """tensor_stats(tensors) equals the reference bit for bit on every exact
    column and within the documented bound on sum and sumsq."""
    got = torchhealth.tensor_stats(tensors, **kwargs).data.cpu()
    want = reference.tensor_stats([t.detach().cpu() for t in tensors], **kwargs)
    assert_rows_agree(got, want, tensors)
    return got


def assert_rows_agree(got: torch.Tensor, want: torch.Tensor, tensors, label: str = "") -> None:
    """Statistics rows of `tensors` from two computations (two backends, or two
    calls that split or batch them differently): bit for bit on every exact
    column, within the documented bound on sum and sumsq."""
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape
    exact = EXACT + list(range(COLS, got.shape[1]))
    mismatch = (got[:, exact] != want[:, exact]).nonzero()
    assert mismatch.numel() == 0, (
        f"{label}: first mismatches (row, column among exact columns): {mismatch[:5].tolist()}; "
        f"got {got[mismatch[0, 0], exact].tolist()[:COLS]} want {want[mismatch[0, 0], exact].tolist()[:COLS]}")
    # Scales for the bound: sum(|x|) and sum(x^2) over the finite values, in float64.
    finite = [torch.where(torch.isfinite(t.detach().cpu().double()), t.detach().cpu().double(), 0.0)
              for t in tensors]
    abs_sum = torch.tensor([f.abs().sum().item() for f in finite], dtype=torch.float64)
    sq_sum = torch.tensor([(f * f).sum().item() for f in finite], dtype=torch.float64)
    _within_bound(got[:, SUM].view(torch.float64), want[:, SUM].view(torch.float64), abs_sum, f"{label} sum")
    _within_bound(got[:, SUMSQ].view(torch.float64), want[:, SUMSQ].view(torch.float64), sq_sum, f"{label} sumsq")


def specials(dtype: torch.dtype) -> list[float]:
    """NaN, ±Inf, ±0, the smallest subnormal and normal, the largest finite value
    and their neighbours, for one dtype."""
    fi = torch.finfo(dtype)
    tiny_sub = fi.smallest_normal * fi.eps  # smallest subnormal
    vals = [math.nan, math.inf, -math.inf, 0.0, -0.0, tiny_sub, -tiny_sub, fi.smallest_normal,
            -fi.smallest_normal, fi.smallest_normal - tiny_sub, fi.max, -fi.max, fi.max / 2,
            -fi.max / 2, 1.0, -1.0, 2.0**-149, 2.0**128 if dtype == torch.float64 else 1.5]
    return vals


def planted(dtype: torch.dtype, n: int, offset: int, scale: float, positions, values,
            seed: int) -> torch.Tensor:
    """n random values (N(0, scale^2), rounded to dtype) starting `offset` elements
    into their storage (an unaligned start), with values[k] planted at positions[k]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n + offset, generator=g, dtype=torch.float64) * scale).to(dtype)[offset:]
    for p, v in zip(positions, values):
        if p < n:
            x[p] = v
    return x
