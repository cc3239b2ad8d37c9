"""TensorBoard sink (optional extra: ``pip install torchhealth[tensorboard]``)."""
from __future__ import annotations

import os

from .._optional import require
from ..histogram_view import value_histogram
from ..report import Report
from .base import Sink, scalars


class TensorBoardSink(Sink):
    """Writes each Report to TensorBoard at its step: the `scalars` of the
    Report, each tensor's histogram from torchhealth's own log2 bins (through
    ``add_histogram_raw``, nothing recomputed) under ``<role>_hist/<name>``,
    and the findings as text under ``health/findings``.

    Give it a log directory, or a ``SummaryWriter`` to share (then closing the
    sink flushes the writer but leaves it open).
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer=None,
                 histograms: bool = True):
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardSink: give exactly one of log_dir and writer")
        if writer is None:
            tb = require("torch.utils.tensorboard", "tensorboard")
            writer = tb.SummaryWriter(log_dir=os.fspath(log_dir))
        self.writer = writer
        self._owns = log_dir is not None
        self.histograms = histograms

    def write(self, report: Report) -> None:
        w, step = self.writer, report.step
        for tag, value in scalars(report).items():
            w.add_scalar(tag, value, step, walltime=report.time)
        if self.histograms:
            for r in report.rows:
                edges, counts = value_histogram(r)
                if counts:
                    w.add_histogram_raw(f"{r.role}_hist/{r.name}", min=r.min, max=r.max,
                                        num=sum(counts), sum=r.sum, sum_squares=r.sumsq,
                                        bucket_limits=edges[1:], bucket_counts=counts,
                                        global_step=step, walltime=report.time)
        if report.findings:
            w.add_text("health/findings", "\n\n".join(
                f"**{f.severity}** {f.check}: {f.message}" for f in report.findings), step,
                walltime=report.time)

    def close(self) -> None:
        self.writer.flush()
        if self._owns:
            self.writer.close()
