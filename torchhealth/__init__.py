"""torchhealth: fused, sync-free health statistics for PyTorch models."""
from ._ops import Backend, backend, tensor_stats
from .stats import BINS, BINS_PER_SIGN, EXP_MAX, EXP_MIN, HistogramBins, TensorStats, histogram_bins
from .report import Finding, Report, Row
from .checks import Thresholds
from .policy import HealthCheckError, HealthWarning
from .options import MonitorOptions
from .monitor import CheckResult, HealthMonitor
from .optim import HealthCheckedOptimizer
from .scheduler import SkipAwareScheduler
from .watch import Watch, watch

__all__ = [
    "BINS", "BINS_PER_SIGN", "EXP_MAX", "EXP_MIN", "Backend", "HistogramBins", "TensorStats",
    "backend", "histogram_bins", "tensor_stats",
    "CheckResult", "Finding", "HealthCheckError", "HealthCheckedOptimizer", "HealthMonitor",
    "HealthWarning", "MonitorOptions", "Report", "Row", "SkipAwareScheduler", "Thresholds",
    "Watch", "watch",
]
__version__ = "0.1.0"
