"""Hugging Face transformers integration (optional extra: ``pip install torchhealth[hf]``).

    from torchhealth.integrations.hf import HealthCheckCallback
    trainer = transformers.Trainer(..., callbacks=[HealthCheckCallback(sinks=[JsonlSink("run.jsonl")])])

The checks run in ``on_pre_optimizer_step``: once per optimizer step, after
gradient accumulation and after the Trainer's gradient clipping (so the
gradient norm seen is the clipped one; set ``max_grad_norm=0`` in the
TrainingArguments to see raw norms), right before ``optimizer.step()``. One
`HealthMonitor` names parameters after the model. Under fp16 AMP the gradients
are unscaled first if the Trainer has not done so (``max_grad_norm=0``), and a
step that the GradScaler skips is recorded as such.

Policies: "warn" emits `HealthWarning`; "skip" sets every gradient to None
before the Trainer steps, so parameters and optimizer state stay exactly as
they were (the learning-rate schedule still advances); "raise": with
``stop_on_raise=True`` (default) the failing step is skipped the same way,
``control.should_training_stop`` ends training cleanly after it and the
`HealthCheckError` is kept in ``callback.error`` (and logged to the
"torchhealth" logger); with ``stop_on_raise=False`` the error propagates out
of ``trainer.train()``.

Metrics: Reports go to ``sinks`` (`JsonlSink`, `TensorBoardSink`, `WandbSink`,
any callable); the Trainer's own ``report_to`` loggers are not reachable from a
callback.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable


from .._optional import require
from ..monitor import HealthMonitor
from ..options import MonitorOptions
from ..policy import HealthCheckError
from ..report import Report
from ..sinks.base import Sink
from ._common import skip_by_dropping_gradients, unscale_for_check, unwrap

transformers = require("transformers", "hf")
if not hasattr(transformers.TrainerCallback, "on_pre_optimizer_step"):
    raise ImportError(f"torchhealth: the transformers integration needs transformers >= 4.46 (for the "
                      f"on_pre_optimizer_step event); this is {transformers.__version__}: "
                      "pip install -U 'torchhealth[hf]'")

log = logging.getLogger("torchhealth")


class HealthCheckCallback(transformers.TrainerCallback):
    """Checks gradients, parameters and (opt-in) optimizer state before every
    optimizer step of a `transformers.Trainer`.

    Args (keyword only): ``sinks`` receive every Report (closed at the end of
    training); ``stop_on_raise``: see the module docstring; ``options`` (a
    `MonitorOptions`) and its settings by name, validated here (``check_every``
    counts optimizer steps, ``state.global_step``).

    Attributes: ``monitor``, ``last_report``, ``skipped_steps``, ``error``.
    """

    def __init__(self, *, sinks: Iterable = (), stop_on_raise: bool = True,
                 options: MonitorOptions | None = None, **settings):
        self.options = MonitorOptions.build(options, **settings)
        self.sinks = list(sinks)
        self.stop_on_raise = stop_on_raise
        self.monitor: HealthMonitor | None = None
        self.last_report: Report | None = None
        self.skipped_steps = 0
        self.error: HealthCheckError | None = None
        self._optimizer = None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = unwrap(optimizer)
        if self.monitor is None or self._optimizer is not opt:
            self.monitor = HealthMonitor(opt, model=model, options=self.options)
            self.monitor.on_report(self._deliver)
            self._optimizer = opt
        found_inf = unscale_for_check(getattr(optimizer, "scaler", None), opt)
        try:
            result = self.monitor.check(state.global_step, found_inf=found_inf)
        except HealthCheckError as e:
            if not self.stop_on_raise:
                raise
            self.error = e
            log.error("%s\ntorchhealth: training stops (HealthCheckCallback, stop_on_raise=True)", e)
            skip_by_dropping_gradients(opt, True)
            self.skipped_steps += 1
            control.should_training_stop = True
            return control
        if result is not None and skip_by_dropping_gradients(opt, result.skip):
            self.skipped_steps += 1
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            try:
                self.monitor.flush()
            except HealthCheckError as e:  # a late verdict (sync="never")
                if not self.stop_on_raise:
                    raise
                self.error = e
        for sink in self.sinks:
            if isinstance(sink, Sink):
                sink.close()
        return control

    def _deliver(self, report: Report) -> None:
        self.last_report = report
        for sink in self.sinks:
            sink(report)
