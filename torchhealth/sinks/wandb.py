"""Weights & Biases sink (optional extra: ``pip install torchhealth[wandb]``)."""
from __future__ import annotations

from .._optional import require
from ..histogram_view import value_histogram
from ..report import Report
from .base import Sink, findings_text, logged, scalars

MAX_BINS = 512  # W&B's limit for one histogram


class WandbSink(Sink):
    """Logs each Report to a W&B run at its step: the `scalars` of the Report
    (the per-tensor ones only with `per_tensor`), the user's own scalars
    (`HealthMonitor.log`) as ``user/<name>``, the findings' text under
    ``health/findings_text`` on the steps that have any, and with `histograms`
    each tensor's histogram as ``wandb.Histogram(np_histogram=...)`` from
    torchhealth's own bins (neighbouring bins merged if more than 512), for the
    rows measured with a histogram.

    With ``alerts=True``, each error finding also raises a ``wandb.alert``
    titled by its check (W&B then holds back repeats of one title for
    `alert_wait` seconds).

    Give it a run, or keyword arguments for ``wandb.init`` (the sink then
    finishes the run on close). Offline use: ``WANDB_MODE=offline``.
    """

    def __init__(self, run=None, *, histograms: bool = True, per_tensor: bool = True,
                 alerts: bool = False, alert_wait: float = 60.0, **init_kwargs):
        self._wandb = require("wandb", "wandb")
        self._owns = run is None
        self.run = self._wandb.init(**init_kwargs) if run is None else run
        self.histograms = histograms
        self.per_tensor = per_tensor
        self.alerts = alerts
        self.alert_wait = alert_wait

    def write(self, report: Report) -> None:
        data: dict = {**scalars(report, per_tensor=self.per_tensor), **logged(report)}
        if report.findings:
            data["health/findings_text"] = findings_text(report)
        if self.histograms:
            for r in report.rows:
                edges, counts = value_histogram(r, max_bins=MAX_BINS)
                if counts:
                    data[f"{r.role}_hist/{r.name}"] = self._wandb.Histogram(
                        np_histogram=(counts, edges))
        self.run.log(data, step=report.step)
        if self.alerts:
            for f in report.findings:
                if f.severity == "error":
                    self.run.alert(title=f"torchhealth: {f.check}",
                                   text=f"step {report.step}: {f.message}",
                                   level=self._wandb.AlertLevel.ERROR,
                                   wait_duration=self.alert_wait)

    def close(self) -> None:
        if self._owns:
            self.run.finish()
