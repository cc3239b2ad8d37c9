"""The float64 sums of every CPU kernel stay within the documented bound
(|sum - exact| <= SUM_RTOL * sum|x|, likewise sumsq; torchhealth/stats.py) on
data chosen to maximise float32 rounding in the vector kernels' per-lane
float32 partial sums (csrc/cpu/simd_kernel.h, add_sums), and near the limits
that send a block to the careful pass (2^-63, squares overflowing float).
Every other column stays bit for bit equal to the reference."""
import math

import numpy as np
import pytest
import torch

from torchhealth import stats as S

from helpers import assert_matches_reference
from test_cpu_kernels import KERNELS, use_kernel

FLUSH = 8  # csrc/cpu/simd_kernel.h kFlush: registers per float32 partial
LANES = [4, 8, 16]  # float32 lanes of the generic, avx2 and avx512 kernels


def _groups(lanes: int, flush: int, square: bool, seed: int, n_groups: int = 120) -> np.ndarray:
    """Groups of `flush` registers of `lanes` float32 values aimed at a float32
    partial over `flush` registers per lane: one large value per lane, then
    flush - 1 values whose term (the value, or its square when `square`) sits
    exactly at half an ulp of the partial, with ties to even keeping the
    partial where it was, so that every rounding loses its whole half ulp and
    all in the same direction. Large values have random signs, scales over
    2^-40 .. 2^40, and mantissa 1.5 (sum: even, increments +2^(e-24)) or 1.25
    (square 1.5625: even, increments of square 2^(2e-24)). Every group errs by
    the same fraction of its sum|term|, so the whole tensor does too."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_groups, flush, lanes), dtype=np.float64)
    for g in range(n_groups):
        e = int(rng.integers(-40, 41))
        sign = float(rng.choice([-1.0, 1.0]))
        if square:
            out[g, 0] = sign * 1.25 * 2.0**e
            out[g, 1:] = rng.choice([-1.0, 1.0], size=(flush - 1, lanes)) * 2.0 ** (e - 12)
        else:
            out[g, 0] = sign * 1.5 * 2.0**e
            out[g, 1:] = 2.0 ** (e - 24)
    return out.reshape(-1).astype(np.float32)


def _simulated_error(x: np.ndarray, lanes: int, flush: int, square: bool) -> tuple[float, float]:
    """|sum - exact| and sum|term| of per-lane float32 partials over `flush`
    registers, flushed into float64: a model of the vector kernels' fast pass."""
    t = x.astype(np.float64) ** 2 if square else x.astype(np.float64)
    regs = (t.astype(np.float32) if square else x).reshape(-1, flush, lanes)
    part = np.zeros((regs.shape[0], lanes), dtype=np.float32)
    for j in range(flush):
        part = part + regs[:, j]  # float32 adds, rounded each time
    return abs(float(part.astype(np.float64).sum()) - math.fsum(t.tolist())), math.fsum(np.abs(t).tolist())


def _cases(lanes: int) -> dict[str, np.ndarray]:
    # Aimed at the kernels' flush length, and at a 4x longer one (which would
    # break the bound, test_the_data_is_adversarial).
    cases = {f"{what} x{k}": _groups(lanes, k * FLUSH, what == "squares", seed=lanes + k)
             for what in ("sums", "squares") for k in (1, 4)}
    n = 8 * FLUSH * lanes
    rng = np.random.default_rng(lanes)
    # A block of values near the float32 limits of the fast pass: squares of
    # values near 2^63 overflow float32 partials (the careful pass, in
    # float64, takes the block); 2^-63 is the smallest magnitude the fast pass
    # takes, just below it the careful pass does.
    cases["edge"] = rng.choice(np.array([2.0**63, -(2.0**63) * (1 - 2.0**-24), 1.5 * 2.0**62, 2.0**-63,
                                         -(2.0**-63), 2.0**-63 * (1 - 2.0**-24), 1.0, -3.0],
                                        dtype=np.float32), size=n)
    # Tiny values only: the fast pass, with squares near 2^-126.
    cases["tiny"] = (rng.choice([-1.0, 1.0], size=n) * 2.0**-63 * rng.uniform(1, 2, size=n)).astype(np.float32)
    # Random signs and magnitudes over 2^-60 .. 2^60 (the fast pass throughout).
    cases["wild"] = (rng.choice([-1.0, 1.0], size=8 * n) * 2.0 ** rng.uniform(-60, 60, size=8 * n)).astype(np.float32)
    cases["all"] = np.concatenate(list(cases.values()))
    return cases


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("square", [False, True], ids=["sum", "sumsq"])
def test_the_data_is_adversarial(lanes, square):
    """In a model of the kernels' float32 partials, the data aimed at FLUSH
    registers stays within the bound but errs by over a quarter of it, and the
    data aimed at 4 * FLUSH registers breaks it: a kernel flushing 4x later
    would fail test_sums_within_the_documented_bound."""
    err, scale = _simulated_error(_groups(lanes, FLUSH, square, seed=1), lanes, FLUSH, square)
    assert 0.25 * S.SUM_RTOL * scale < err <= S.SUM_RTOL * scale
    err, scale = _simulated_error(_groups(lanes, 4 * FLUSH, square, seed=1), lanes, 4 * FLUSH, square)
    assert err > S.SUM_RTOL * scale


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_sums_within_the_documented_bound(kernel, lanes, dtype):
    with use_kernel(kernel):
        cases = _cases(lanes)
        tensors = [torch.from_numpy(v).to(dtype) for v in cases.values()]
        for hist in (False, True):
            got = assert_matches_reference(tensors, histogram=hist)
            for row, x in enumerate(tensors):
                d = x.double()
                for col, terms in ((S.SUM, d), (S.SUMSQ, d * d)):  # squares of float32 are exact in float64
                    exact = math.fsum(terms.tolist())
                    bound = S.SUM_RTOL * math.fsum(terms.abs().tolist())
                    value = got[row, col].view(torch.float64).item()
                    assert abs(value - exact) <= bound, (list(cases)[row], col, value, exact, bound)
