"""The pure-PyTorch reference of ``tensor_stats``.

Ordinary torch ops, one tensor at a time, with exactly the kernels' semantics
(see ``torchhealth.stats``). It is the oracle of the tests, the fallback when
the compiled extension is missing, and it never synchronises with the device.

Every value is decoded from its bits: the class of a value (NaN, Inf, zero,
subnormal, saturated, histogram bin), its exact float64 magnitude, min and
max are integer operations, so the results do not depend on the CPU's
flush-to-zero / denormals-are-zero state (``torch.set_flush_denormal``). Only
the float64 sums of float64 subnormals are floating-point arithmetic on
subnormals; under flush-to-zero they may lose less than 2^-1022 per value.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch

from .stats import BINS, BINS_PER_SIGN, COLS, EXP_MAX, EXP_MIN

# dtype: (integer dtype of the same width, bits, mantissa bits, exponent bias,
# whether the largest exponent holds Inf and NaN as in IEEE 754; float8_e4m3fn
# has no Inf and only one NaN mantissa, all ones).
_FORMATS = {
    torch.float8_e4m3fn: (torch.uint8, 8, 3, 7, False),
    torch.float8_e5m2: (torch.uint8, 8, 2, 15, True),
    torch.float16: (torch.int16, 16, 10, 15, True),
    torch.bfloat16: (torch.int16, 16, 7, 127, True),
    torch.float32: (torch.int32, 32, 23, 127, True),
    torch.float64: (torch.int64, 64, 52, 1023, True),
}
_ABS64 = (1 << 63) - 1
_INF = 0x7FF0000000000000  # the bits, and the order key, of +inf


def default_saturation(dtype: torch.dtype) -> float:
    """Half the dtype's largest finite value: within a factor of 2 of overflow
    (224 for float8_e4m3fn, 28672 for float8_e5m2, 32752 for float16)."""
    return torch.finfo(dtype).max / 2


def _float64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _decode(x: torch.Tensor):
    """(nan, posinf, neginf, subnormal, negative, magnitude bits) of a flat tensor,
    where the magnitude bits are those of |x| as an exact float64 (valid where
    finite)."""
    view, nbits, mbits, bias, ieee = _FORMATS[x.dtype]
    b = x.view(view).to(torch.int64)
    if nbits == 64:
        neg, a = b < 0, b & _ABS64
    else:
        b = b & ((1 << nbits) - 1)
        neg, a = (b >> (nbits - 1)) == 1, b & ((1 << (nbits - 1)) - 1)
    field, man = a >> mbits, a & ((1 << mbits) - 1)
    top = (1 << (nbits - 1 - mbits)) - 1  # the largest exponent field
    if ieee:
        special = field == top
        nan, inf = special & (man != 0), special & (man == 0)
    else:
        nan, inf = (field == top) & (man == (1 << mbits) - 1), torch.zeros_like(neg)
    if nbits == 64:
        mag = a
    else:
        # |x| = m * 2^(max(field, 1) - bias - mbits) with the implicit bit in m:
        # both factors and the product are normal float64 values, exact.
        m = man + torch.where(field > 0, 1 << mbits, 0)
        pow2 = ((field.clamp(min=1) - bias - mbits + 1023) << 52).view(torch.float64)
        mag = (m.to(torch.float64) * pow2).view(torch.int64)
    return nan, inf & ~neg, inf & neg, (field == 0) & (man != 0), neg, mag


def _order(bits: torch.Tensor) -> torch.Tensor:
    """float64 bits <-> integers in the same order as the values (an involution)."""
    return torch.where(bits < 0, bits ^ _ABS64, bits)


def _order_int(bits: int) -> int:
    return bits ^ _ABS64 if bits < 0 else bits


def _row(t: torch.Tensor, histogram: bool, saturation: float | None) -> torch.Tensor:
    x = t.detach().reshape(-1)
    dev = x.device
    threshold = default_saturation(t.dtype) if saturation is None else saturation
    nan, posinf, neginf, sub, neg, mag = _decode(x)
    fin = ~(nan | posinf | neginf)
    zero = fin & (mag == 0)
    mag = torch.where(fin, mag, 0)
    counts = torch.stack([
        torch.tensor(x.numel(), device=dev),
        nan.sum(), posinf.sum(), neginf.sum(), zero.sum(), sub.sum(),
        (fin & (mag >= _float64_bits(threshold))).sum(),
    ])
    signed = torch.where(neg & (mag != 0), mag | (-1 << 63), mag)  # -0 -> +0
    if x.numel():
        key = _order(signed)
        extremes = [_order(torch.where(fin, key, _INF).amin()),
                    _order(torch.where(fin, key, _order_int(_float64_bits(-math.inf))).amax()),
                    mag.amax()]
    else:
        extremes = [torch.tensor(_float64_bits(v), device=dev) for v in (math.inf, -math.inf, 0.0)]
    d = signed.view(torch.float64)
    values = torch.stack(extremes + [d.sum().view(torch.int64), (d * d).sum().view(torch.int64)])
    parts = [counts, values]
    if histogram:
        parts.append(_hist(mag, neg, fin & (mag != 0)))
    return torch.cat(parts)


def _hist(mag: torch.Tensor, neg: torch.Tensor, binned: torch.Tensor) -> torch.Tensor:
    # The float64 exponent field of |x| (float64 subnormals land in the underflow slot).
    exponent = ((mag >> 52) - 1023).clamp(EXP_MIN - 1, EXP_MAX + 1)
    slot = exponent - (EXP_MIN - 1) + (~neg).to(torch.int64) * BINS_PER_SIGN
    slot = torch.where(binned, slot, BINS)  # one spare bin for the rest
    counts = torch.zeros(BINS + 1, dtype=torch.int64, device=mag.device)
    counts.scatter_add_(0, slot, torch.ones_like(slot))
    return counts[:BINS]


SUPPORTED_DTYPES = tuple(_FORMATS)


def check_op_inputs(tensors: Sequence[torch.Tensor], saturation: float | None) -> None:
    """The op's own checks, in the words of the C++ op (csrc/validation.h):
    a supported dtype, one device, a positive saturation."""
    for i, t in enumerate(tensors):
        if t.dtype not in _FORMATS:
            raise TypeError(f"tensor_stats: tensors[{i}] has dtype {t.dtype}; torchhealth reads "
                            "float8_e4m3fn, float8_e5m2, float16, bfloat16, float32 and float64")
        if t.device != tensors[0].device:
            raise ValueError(f"tensor_stats: tensors[{i}] is on {t.device} but tensors[0] is on "
                             f"{tensors[0].device}; call tensor_stats once per device")
    if saturation is not None and not saturation > 0:
        raise ValueError(f"tensor_stats: saturation must be a positive magnitude, got {saturation:g}")


def tensor_stats(tensors: Sequence[torch.Tensor], histogram: bool = True,
                 saturation: float | None = None) -> torch.Tensor:
    """The packed int64 ``[T, COLS (+ BINS)]`` rows the kernels return, computed
    with ordinary torch ops, after the op's own checks."""
    check_op_inputs(tensors, saturation)
    if not tensors:
        return torch.zeros(0, COLS + (BINS if histogram else 0), dtype=torch.int64)
    return torch.stack([_row(t, histogram, saturation) for t in tensors])
