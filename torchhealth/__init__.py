"""torchhealth: fused, sync-free health statistics for PyTorch models."""
from ._ops import Backend, backend, tensor_stats
from .stats import BINS, BINS_PER_SIGN, EXP_MAX, EXP_MIN, HistogramBins, TensorStats, histogram_bins

__all__ = [
    "BINS", "BINS_PER_SIGN", "EXP_MAX", "EXP_MIN", "Backend", "HistogramBins", "TensorStats",
    "backend", "histogram_bins", "tensor_stats",
]
__version__ = "0.1.0"
