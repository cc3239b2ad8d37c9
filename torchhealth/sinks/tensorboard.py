"""TensorBoard sink (optional extra: ``pip install torchhealth[tensorboard]``)."""
from __future__ import annotations

import os

from .._optional import require
from ..histogram_view import value_histogram
from ..report import Report
from .base import Sink, findings_text, logged, scalars

# TensorBoard makes a section of each tag's first path component: the per-tensor
# metrics go under these two instead of one section per metric and role.
TENSORS, HISTOGRAMS = "health_tensors", "health_histograms"


class TensorBoardSink(Sink):
    """Writes each Report to TensorBoard at its step: the totals of `scalars`
    under ``health/``; with `per_tensor`, each tensor's metrics grouped in one
    section as ``health_tensors/<role>_norm/<name>`` (and ``_absmax``,
    ``_nonfinite``); with `histograms`, each tensor's histogram from
    torchhealth's own log2 bins (through ``add_histogram_raw``, nothing
    recomputed) as ``health_histograms/<role>/<name>``, written only for rows
    measured with a histogram; the findings as text under ``health/findings``;
    and the user's own scalars (`HealthMonitor.log`) as ``user/<name>``.

    Give it a log directory, or a ``SummaryWriter`` to share (then closing the
    sink flushes the writer but leaves it open).
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer=None,
                 histograms: bool = True, per_tensor: bool = True):
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardSink: give exactly one of log_dir and writer")
        if writer is None:
            tb = require("torch.utils.tensorboard", "tensorboard")
            writer = tb.SummaryWriter(log_dir=os.fspath(log_dir))
        self.writer = writer
        self._owns = log_dir is not None
        self.histograms = histograms
        self.per_tensor = per_tensor

    def write(self, report: Report) -> None:
        w, step = self.writer, report.step
        for tag, value in scalars(report, per_tensor=self.per_tensor).items():
            tag = tag if tag.startswith("health/") else f"{TENSORS}/{tag}"
            w.add_scalar(tag, value, step, walltime=report.time)
        for tag, value in logged(report).items():
            w.add_scalar(tag, value, step, walltime=report.time)
        if self.histograms:
            write_histograms(w, report)
        if report.findings:
            w.add_text("health/findings", findings_text(report), step, walltime=report.time)

    def close(self) -> None:
        self.writer.flush()
        if self._owns:
            self.writer.close()


def write_histograms(writer, report: Report, step: int | None = None) -> None:
    """The measured histograms of `report`'s rows through a SummaryWriter (or
    anything with its ``add_histogram_raw``), at `step` (default: the
    report's); rows without a histogram are skipped."""
    step = report.step if step is None else step
    for r in report.rows:
        edges, counts = value_histogram(r)
        if counts:
            writer.add_histogram_raw(f"{HISTOGRAMS}/{r.role}/{r.name}", min=r.min, max=r.max,
                                     num=sum(counts), sum=r.sum, sum_squares=r.sumsq,
                                     bucket_limits=edges[1:], bucket_counts=counts,
                                     global_step=step, walltime=report.time)
