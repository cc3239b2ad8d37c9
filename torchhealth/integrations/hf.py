"""Hugging Face transformers integration (optional extra: ``pip install torchhealth[hf]``).

    from torchhealth.integrations.hf import HealthCheckCallback
    trainer = transformers.Trainer(..., callbacks=[HealthCheckCallback(sinks=[JsonlSink("run.jsonl")])])

The statistics and checks run when each backward pass finishes
(`HealthMonitor.check_at_backward_end`), before the Trainer clips the
gradients: clipping multiplies every gradient by a coefficient computed from
the total norm, so one NaN would make every gradient NaN and hide where it was
born; the norms reported are the raw ones. With gradient accumulation the last
micro-batch's backward counts. The verdict is acted on in
``on_pre_optimizer_step``, right before ``optimizer.step()``. Under fp16 AMP
(a GradScaler) gradients are still scaled when backward ends, so the checks
run in ``on_pre_optimizer_step`` instead, on unscaled gradients (unscaling
them first if the Trainer has not, ``max_grad_norm=0``), after clipping; a
step that the GradScaler skips is recorded as such. One `HealthMonitor` names
parameters after the model.

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
from ..options import MonitorOptions, backward_end_by_default
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
    counts optimizer steps; a Report's step is the ``global_step`` the Trainer
    logs for that optimizer step, 1 for the first).

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
        self._state = None  # the Trainer's TrainerState
        self._hooks = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None:
            self._monitor_for(unwrap(optimizer), model, state)
        return control

    def _monitor_for(self, opt, model, state) -> HealthMonitor:
        self._state = state
        if self.monitor is None or self._optimizer is not opt:
            if self._hooks is not None:
                self._hooks.remove()
            self.monitor = HealthMonitor(opt, model=model, options=self.options)
            self.monitor.on_report(self._deliver)
            self._optimizer = opt
            if backward_end_by_default(self.options, model):
                self._hooks = self.monitor.check_at_backward_end(self._next_step)
        return self.monitor

    def _next_step(self) -> int:
        # The Trainer counts an optimizer step once it is done: the step about
        # to be taken is the one it will log as global_step + 1.
        return self._state.global_step + 1

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = unwrap(optimizer)
        self._monitor_for(opt, model, state)
        found_inf = unscale_for_check(getattr(optimizer, "scaler", None), opt)
        try:
            result = self.monitor.check(self._next_step(), found_inf=found_inf)
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
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
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
