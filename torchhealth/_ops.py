"""`tensor_stats`: the entry point to the kernels, with the backend chosen once
at import (the compiled extension, or the pure-PyTorch reference); and
`native_batch`, the extension's batched reads for `torchhealth.watch`."""
from __future__ import annotations

import numbers
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
        # Rows on the meta device if any input is there (the Meta key outranks
        # the CPU's, so a CPU list with one meta tensor lands here): `_op` then
        # names that tensor.
        like = next((t for t in tensors if t.is_meta), tensors[0])
        return like.new_empty((len(tensors), COLS + (BINS if histogram else 0)), dtype=torch.int64)


def native_checks() -> bool:
    """Whether the extension has the CPU op ``torchhealth::run_checks``
    (`torchhealth.checks.run_checks`)."""
    return _NATIVE_CHECKS


_NATIVE_CHECKS = _BACKEND.name == "extension" and hasattr(torch.ops.torchhealth, "run_checks")


def backend() -> Backend:
    """The active implementation of `tensor_stats` and why it was chosen."""
    return _BACKEND


# Validation is split at the language boundary. Here: the arguments' types and
# non-tensors. What the dispatcher refuses without naming the tensor (sparse and
# quantized layouts) and the meta device outside tracing (the fake kernel would
# answer with meta rows) are named here too, but only once the op has refused
# or answered so: reading three properties of every tensor first cost more
# than the op itself for many small tensors. The op records no autograd, so
# nothing needs detaching. The op itself (C++ in csrc/validation.h, or
# `reference.check_op_inputs` when the extension is not built) checks dtypes,
# devices and the saturation value, in the same words.
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
    if not all(issubclass(c, torch.Tensor) for c in set(map(type, tensors))):
        _name_the_bad_tensor(tensors, torch.compiler.is_compiling())
    return list(tensors), saturation


def _op(tensors: list[torch.Tensor], histogram: bool, saturation: float | None) -> torch.Tensor:
    """The extension's op; a tensor it cannot read is named once it refuses."""
    tracing = torch.compiler.is_compiling()
    try:
        data = torch.ops.torchhealth.tensor_stats.default(tensors, histogram, saturation)
    except NotImplementedError:  # no kernel for this layout: the dispatcher names no tensor
        _name_the_bad_tensor(tensors, tracing)
        raise
    if data.is_meta and not tracing:
        _name_the_bad_tensor(tensors, tracing)
    return data


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
        return TensorStats(_op(tensors, histogram, saturation))
    _name_the_bad_tensor(tensors, torch.compiler.is_compiling())  # the reference would not name it
    return TensorStats(reference.tensor_stats(tensors, histogram, saturation))


def native_batch():
    """``_C.Batch`` (csrc/python_call.cpp), the batched reads of `torchhealth.watch`'s
    hooks, or None with the reference backend (`activations.Batch` does the same
    in Python)."""
    if _BACKEND.name != "extension":
        return None
    from . import _C
    return _C.Batch
