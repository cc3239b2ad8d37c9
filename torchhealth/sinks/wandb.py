"""Weights & Biases sink (optional extra: ``pip install torchhealth[wandb]``)."""
from __future__ import annotations

from .._optional import require
from ..histogram_view import value_histogram
from ..report import Report
from .base import Sink, scalars

MAX_BINS = 512  # W&B's limit for one histogram


class WandbSink(Sink):
    """Logs each Report to a W&B run at its step: the `scalars` of the Report
    and each tensor's histogram as ``wandb.Histogram(np_histogram=...)`` from
    torchhealth's own bins (neighbouring bins merged if more than 512).

    Give it a run, or keyword arguments for ``wandb.init`` (the sink then
    finishes the run on close). Offline use: ``WANDB_MODE=offline``.
    """

    def __init__(self, run=None, *, histograms: bool = True, **init_kwargs):
        self._wandb = require("wandb", "wandb")
        self._owns = run is None
        self.run = self._wandb.init(**init_kwargs) if run is None else run
        self.histograms = histograms

    def write(self, report: Report) -> None:
        data: dict = dict(scalars(report))
        if self.histograms:
            for r in report.rows:
                edges, counts = value_histogram(r, max_bins=MAX_BINS)
                if counts:
                    data[f"{r.role}_hist/{r.name}"] = self._wandb.Histogram(
                        np_histogram=(counts, edges))
        self.run.log(data, step=report.step)

    def close(self) -> None:
        if self._owns:
            self.run.finish()
