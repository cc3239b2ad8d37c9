"""`tensor_stats`: the one entry point to the kernels, with the backend chosen
once at import (the compiled extension, or the pure-PyTorch reference)."""
from __future__ import annotations

import numbers
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import reference
from .reference import SUPPORTED_DTYPES  # noqa: F401  (the dtypes collect and watch pass on)
from .stats import BINS, COLS, TensorStats



@dataclass(frozen=True)
class Backend:
    """Which implementation `tensor_stats` uses, and why."""

    name: str  # "extension" or "reference"
    reason: str
    cuda: bool  # whether CUDA kernels are compiled in

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def _load() -> Backend:
    try:
        from . import _C  # noqa: F401  (loading it registers the ops)
    except ImportError as e:
        reason = (f"the compiled extension torchhealth._C could not be imported: {e}. "
                  "Using the pure-PyTorch reference, which is correct but slower; build the "
                  "extension with `pip install --no-build-isolation -e .`")
        warnings.warn(f"torchhealth: {reason}", RuntimeWarning, stacklevel=3)
        return Backend("reference", reason, cuda=False)
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("torchhealth::tensor_stats", "CUDA")
    return Backend("extension", f"torchhealth._C from {_C.__file__}", cuda=cuda)


_BACKEND = _load()

if _BACKEND.name == "extension":
    @torch.library.register_fake("torchhealth::tensor_stats")
    def _tensor_stats_fake(tensors, histogram=True, saturation=None):
        return tensors[0].new_empty((len(tensors), COLS + (BINS if histogram else 0)),
                                    dtype=torch.int64)


def backend() -> Backend:
    """The active implementation of `tensor_stats` and why it was chosen."""
    return _BACKEND


# Validation is split at the language boundary. Here: what Python must check
# because it never reaches a kernel (the argument types, non-tensors, sparse
# and quantized layouts, which the dispatcher would refuse without naming the
# tensor, and the meta device outside tracing). The op itself (C++ in
# csrc/validation.h, or `reference.check_op_inputs` when the extension is not
# built) checks dtypes, devices and the saturation value, in the same words.
def _validate(tensors, histogram, saturation) -> tuple[list[torch.Tensor], float | None]:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"tensor_stats: tensors must be a list or tuple of tensors, got "
                        f"{type(tensors).__name__} (wrap an iterator in list(...))")
    if not isinstance(histogram, bool):
        raise TypeError(f"tensor_stats: histogram must be a bool, got {type(histogram).__name__}")
    if saturation is not None:
        if isinstance(saturation, bool) or not isinstance(saturation, numbers.Real):
            raise TypeError(f"tensor_stats: saturation must be a number, got "
                            f"{type(saturation).__name__} {saturation!r}")
        try:
            saturation = float(saturation)
        except OverflowError:
            raise ValueError(f"tensor_stats: saturation = {saturation!r} is too large for a float") from None
    tracing = torch.compiler.is_compiling()
    # The common case in one sweep (a model's worth of tensors costs ~1 us each
    # in the loop below, as much as the op itself for many small tensors); the
    # loop runs only to name the tensor that fails. The op records no
    # autograd, so nothing needs detaching.
    if not _all_reach_the_op(tensors, tracing):
        _name_the_bad_tensor(tensors, tracing)
    return list(tensors), saturation


# Each property is read by map() in C, one at a time: a Python loop, or a
# tuple per tensor (which wakes the garbage collector every few hundred
# tensors), costs several times more per tensor.
_LAYOUT = operator.attrgetter("layout")
_QUANTIZED = operator.attrgetter("is_quantized")
_META = operator.attrgetter("is_meta")


def _all_reach_the_op(tensors, tracing: bool) -> bool:
    if not all(issubclass(c, torch.Tensor) for c in set(map(type, tensors))):
        return False
    if tracing:  # dynamo traces a Python loop, not operator.attrgetter
        return all(t.layout == torch.strided and not t.is_quantized for t in tensors)
    if not all(lay == torch.strided for lay in set(map(_LAYOUT, tensors))):
        return False
    return not any(map(_QUANTIZED, tensors)) and not any(map(_META, tensors))


def _name_the_bad_tensor(tensors, tracing: bool) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor_stats: tensors[{i}] is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided:
            raise ValueError(f"tensor_stats: tensors[{i}] has layout {t.layout}; torchhealth reads "
                             "strided (dense) tensors; call .to_dense() first")
        if t.is_quantized:
            raise TypeError(f"tensor_stats: tensors[{i}] is quantized ({t.dtype}); dequantize it first")
        if t.device.type == "meta" and not tracing:
            raise ValueError(f"tensor_stats: tensors[{i}] is on the meta device and holds no data")


def tensor_stats(tensors: Sequence[torch.Tensor], *, histogram: bool = True,
                 saturation: float | None = None) -> TensorStats:
    """Health statistics of every tensor in one pass: one `TensorStats` row each.

    Args:
        tensors: a list or tuple of float16/bfloat16/float32/float64 tensors on one
            device, any shapes (0-d and empty included), contiguous or not (a
            tensor that is neither contiguous nor a permutation of a contiguous
            one is copied first). Autograd is not recorded.
        histogram: also compute the exact log2-magnitude histogram.
        saturation: absolute magnitude at or above which a finite value counts as
            saturated; default: half of each tensor's dtype maximum.

    Results stay on the tensors' device; the call does not synchronise. A tensor
    that another thread (or stream) writes during the call gives undefined
    statistics; each row is still self-consistent (every element classified once).
    Raises TypeError/ValueError naming the index of an unusable tensor.

    DTensors (all on one mesh) give the rows of the global tensors, the same on
    every rank; every rank of the mesh must call it: see `torchhealth.distributed`.
    """
    from . import distributed  # cheap after the first call; it imports no DTensor code
    if distributed.holds_dtensor(tensors):
        return distributed.dtensor_stats(tensors, histogram=histogram, saturation=saturation)
    tensors, saturation = _validate(tensors, histogram, saturation)
    if _BACKEND.name == "extension" and tensors:
        return TensorStats(torch.ops.torchhealth.tensor_stats(tensors, histogram, saturation))
    return TensorStats(reference.tensor_stats(tensors, histogram, saturation))
