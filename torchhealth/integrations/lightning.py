"""PyTorch Lightning integration (optional extra: ``pip install torchhealth[lightning]``).

    from torchhealth.integrations.lightning import HealthCheckCallback
    trainer = lightning.Trainer(callbacks=[HealthCheckCallback(sinks=[JsonlSink("run.jsonl")])])

The statistics and checks run when each backward pass finishes
(`HealthMonitor.check_at_backward_end`), before Lightning clips gradients
(``gradient_clip_val``), which would spread one NaN to every gradient; the
verdict is acted on in ``on_before_optimizer_step``, once per optimizer step
(after gradient accumulation: the last micro-batch's backward counts), through
one `HealthMonitor` per optimizer, which names parameters after the
LightningModule. Under a GradScaler the checks run in
``on_before_optimizer_step`` on unscaled gradients instead.

Mixed precision with a GradScaler ("16-mixed"): Lightning unscales the
gradients before this hook, except for optimizers that unscale inside their
own ``step()`` (fused Adam/AdamW/SGD, ``_step_supports_amp_scaling``). For
those the callback calls ``scaler.unscale_(optimizer)`` itself, which the
scaler then honours (the fused step receives no scale, only ``found_inf``).
Either way the statistics describe true gradients, and a step that the scaler
skips for overflow (``found_inf``) is recorded as such, not as a non-finite
finding.

Policies: "warn" emits `HealthWarning`; "raise" raises `HealthCheckError` out of
the hook, which ends ``trainer.fit`` with that exception; "skip" sets every
gradient to None before Lightning calls ``optimizer.step()``, so parameters and
optimizer state stay exactly as they were (the step counter still advances);
"zero" and ``max_grad_norm`` act on the gradients in place.

Schedulers: under automatic optimization, each step-interval scheduler from
``configure_optimizers`` (the user's own, unchanged) does not advance after an
optimizer step the callback skipped (policy "skip", or a scaler overflow seen
by a check): while training, Lightning's config holds it through
`HeldBackScheduler`, and holds it again itself after ``fit``. Epoch-interval
and ReduceLROnPlateau schedulers are left alone (a skipped step is one of an
epoch's many; a plateau scheduler steps on a validation metric, not per step).

Histograms: with a logger whose ``experiment`` writes TensorBoard histograms
(`TensorBoardLogger`), each Report's log2 histograms, when measured (the
``histogram`` cadence), go through that same writer, beside the scalars.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import torch

from .._optional import require
from ..monitor import HealthMonitor
from ..options import MonitorOptions, backward_end_by_default
from ..report import Report
from ..sinks.base import Sink, scalars
from ..sinks.tensorboard import write_histograms
from ._common import log_learning_rates, skip_by_dropping_gradients, unscale_for_check, unwrap

pl = require("lightning.pytorch", "lightning")


class HealthCheckCallback(pl.Callback):
    """Checks gradients, parameters and (opt-in) optimizer state before every
    optimizer step and logs the totals through the trainer's loggers.

    Args (keyword only): ``options`` (a `MonitorOptions`) and its settings by
    name, validated here (``check_every`` counts each optimizer's own steps, so
    with several optimizers, e.g. a GAN's, each is checked on its own cadence).
    ``sinks``: Sinks (or callables) that receive every Report, e.g. a
    `JsonlSink`; closed at the end of fit. ``log``: send `scalars` of each
    Report to ``trainer.loggers`` on the trainer's ``log_every_n_steps``
    cadence (with several optimizers, keys start with ``optimizer{i}/``);
    ``per_tensor``: include per-parameter norms, absmax and non-finite counts
    (three metrics per tensor), not only the ``health/`` totals.
    ``histograms``: write the measured histograms through each logger that
    can (``experiment.add_histogram_raw``, as TensorBoardLogger's); None (the
    default): when ``log`` is on and a logger can.

    The running state (baselines, counters) is saved in Lightning checkpoints
    (`state_dict`) and restored on resume.

    Attributes: ``monitors`` (optimizer -> `HealthMonitor`), ``last_report``,
    ``skipped_steps``.
    """

    def __init__(self, *, sinks: Iterable = (), log: bool = True, per_tensor: bool = False,
                 histograms: bool | None = None, options: MonitorOptions | None = None, **settings):
        super().__init__()
        if histograms is not None and not isinstance(histograms, bool):
            raise TypeError(f"HealthCheckCallback: histograms must be True, False or None, got {histograms!r}")
        self.options = MonitorOptions.build(options, **settings)
        self.sinks = list(sinks)
        self.log, self.per_tensor, self.histograms = log, per_tensor, histograms
        self.monitors: dict[torch.optim.Optimizer, HealthMonitor] = {}
        self.last_report: Report | None = None
        self.skipped_steps = 0
        self._trainer = None
        self._hooks: list = []
        self._steps: dict[torch.optim.Optimizer, int] = {}  # each optimizer's own steps
        self._index: dict[int, int] = {}  # id(monitor) -> the optimizer's index in the trainer
        self._saved: dict | None = None  # from load_state_dict, applied as monitors are made
        self._skips: dict[torch.optim.Optimizer, int] = {}  # each optimizer's skipped steps
        self._held_configs: list = []  # Lightning's scheduler configs holding a HeldBackScheduler
        self._tb_writers: list = []

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        for optimizer in trainer.optimizers:
            self._monitor_for(unwrap(optimizer), pl_module)
        if pl_module.automatic_optimization:
            for config in trainer.lr_scheduler_configs:
                if config.interval == "step" and not config.reduce_on_plateau:
                    config.scheduler = HeldBackScheduler(config.scheduler, self._skips)
                    self._held_configs.append(config)
        self._tb_writers = self._histogram_writers(trainer)

    def _monitor_for(self, opt, pl_module) -> HealthMonitor:
        monitor = self.monitors.get(opt)
        if monitor is None:
            monitor = self.monitors[opt] = HealthMonitor(opt, model=pl_module, options=self.options)
            index = self._optimizer_index(opt)
            self._index[id(monitor)] = index
            monitor.on_report(functools.partial(self._deliver, index))
            self._steps[opt] = 0
            saved = (self._saved or {}).get(index)
            if saved is not None:
                monitor.load_state_dict(saved["monitor"])
                self._steps[opt] = saved["steps"]
            if backward_end_by_default(self.options, pl_module):
                self._hooks.append(monitor.check_at_backward_end(functools.partial(self._steps.get, opt)))
        return monitor

    def _optimizer_index(self, opt) -> int:
        optimizers = [unwrap(o) for o in (self._trainer.optimizers if self._trainer else [])]
        return next((i for i, o in enumerate(optimizers) if o is opt), len(self.monitors) - 1)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._trainer = trainer
        opt = unwrap(optimizer)
        monitor = self._monitor_for(opt, pl_module)
        found_inf = unscale_for_check(getattr(trainer.precision_plugin, "scaler", None), opt)
        step = self._steps[opt]
        self._steps[opt] = step + 1
        log_learning_rates(monitor, opt)
        result = monitor.check(step, found_inf=found_inf)
        if result is not None and skip_by_dropping_gradients(opt, result.skip):
            self.skipped_steps += 1  # policy or scaler
            self._skips[opt] = self._skips.get(opt, 0) + 1

    def state_dict(self) -> dict:
        saved = dict(self._saved or {})
        for opt, monitor in self.monitors.items():
            saved[self._index[id(monitor)]] = {"monitor": monitor.state_dict(), "steps": self._steps[opt]}
        return {"optimizers": saved}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved = dict(state_dict.get("optimizers", {}))
        for opt, monitor in self.monitors.items():  # already made: restore now
            saved = self._saved.get(self._index[id(monitor)])
            if saved is not None:
                monitor.load_state_dict(saved["monitor"])
                self._steps[opt] = saved["steps"]

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._finish(flush=False)

    # -- internals ----------------------------------------------------------------------------
    def _histogram_writers(self, trainer) -> list:
        """The trainer's loggers' writers that take histograms (the scalars
        already go through `log_metrics`, so only histograms are written there)."""
        if self.histograms is False or (self.histograms is None and not self.log):
            return []
        experiments = [getattr(logger, "experiment", None) for logger in trainer.loggers]
        writers = [e for e in experiments if callable(getattr(e, "add_histogram_raw", None))]
        if not writers and self.histograms:
            warnings.warn("HealthCheckCallback: histograms=True, but no logger of the trainer writes "
                          "histograms (an `experiment` with `add_histogram_raw`, as TensorBoardLogger's); "
                          "they go only to the callback's sinks", UserWarning, stacklevel=2)
        return writers

    def _deliver(self, index: int, report: Report) -> None:
        self.last_report = report
        for sink in self.sinks:
            sink(report)
        trainer = self._trainer
        if self.log and trainer is not None and report.step % max(trainer.log_every_n_steps, 1) == 0:
            prefix = f"optimizer{index}/" if len(trainer.optimizers) > 1 else ""
            metrics = {prefix + k: v for k, v in scalars(report, per_tensor=self.per_tensor).items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if self._tb_writers and trainer is not None:
            for writer in self._tb_writers:
                write_histograms(writer, report, step=trainer.global_step)  # the scalars' step

    def _finish(self, flush: bool = True) -> None:
        for hooks in self._hooks:
            hooks.remove()
        self._hooks = []
        for config in self._held_configs:
            config.scheduler = config.scheduler.scheduler
        self._held_configs = []
        if flush:
            for monitor in self.monitors.values():
                monitor.flush()
        for sink in self.sinks:
            if isinstance(sink, Sink):
                sink.close()
        self._tb_writers = []  # the loggers': Lightning flushes and closes them


class HeldBackScheduler:
    """The user's `scheduler` as Lightning steps it while the callback trains:
    its ``step()`` is held back once for each optimizer step the callback
    skipped (`skips`: optimizer -> its skipped steps so far, shared by every
    scheduler of that optimizer), so the schedule resumes where it stopped.
    Everything else (``state_dict``, ``optimizer``, ``get_last_lr``, ...) is
    the scheduler's own, so checkpoints are unchanged. With a ``frequency``
    above 1 the hold falls on the next scheduler step Lightning takes."""

    def __init__(self, scheduler, skips: dict):
        self.scheduler, self._skips = scheduler, skips
        self._optimizer = unwrap(scheduler.optimizer)
        self._held_back = skips.get(self._optimizer, 0)  # skips before it was wrapped are not its own

    def step(self, *args, **kwargs):
        if self._skips.get(self._optimizer, 0) > self._held_back:
            self._held_back += 1
            return None
        return self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name):
        if name == "scheduler":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.scheduler, name)
