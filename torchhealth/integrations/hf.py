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
``control.should_training_stop`` ends training cleanly after it (logs written,
sinks closed, every callback's ``on_train_end`` run) and then
``trainer.train()`` raises the `HealthCheckError` (also kept in
``callback.error``), so a script fails with a non-zero exit code; with
``stop_on_raise=False`` the error propagates out of ``trainer.train()`` at once,
from inside the step.

Metrics: Reports go to ``sinks`` (`JsonlSink`, `TensorBoardSink`, `WandbSink`,
any callable), and the ``health/`` totals of the newest Report go into the
Trainer's own logs at each of its logging steps, so every ``report_to``
integration records them beside the loss (TensorBoard as ``train/health/...``,
at the Trainer's ``global_step``).

Checkpoints: the running state (gradient-norm baseline, dead counters) is
saved in each checkpoint's ``trainer_state.json`` (the callback is an
``ExportableState``) and restored by ``trainer.train(resume_from_checkpoint=...)``.
The callback restores it itself: leave ``restore_callback_states_from_checkpoint``
at its default (False), since with True the Trainer replaces the callback with a
new one built from JSON arguments, which cannot hold sinks or a callable policy.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import torch

from .._optional import require
from ..monitor import HealthMonitor
from ..options import MonitorOptions, backward_end_by_default
from ..policy import HealthCheckError
from ..report import Report
from ..sinks.base import Sink, scalars
from ._common import log_learning_rates, skip_by_dropping_gradients, unscale_for_check, unwrap

transformers = require("transformers", "hf")
if not hasattr(transformers.TrainerCallback, "on_pre_optimizer_step"):
    raise ImportError(f"torchhealth: the transformers integration needs transformers >= 4.46 (for the "
                      f"on_pre_optimizer_step event); this is {transformers.__version__}: "
                      "pip install -U 'torchhealth[hf]'")

log = logging.getLogger("torchhealth")


class HealthCheckCallback(transformers.TrainerCallback, transformers.trainer_callback.ExportableState):
    """Checks gradients, parameters and (opt-in) optimizer state before every
    optimizer step of a `transformers.Trainer`.

    Args (keyword only): ``sinks`` receive every Report (closed at the end of
    training); ``stop_on_raise``: see the module docstring; ``log``: put the
    ``health/`` totals (`torchhealth.sinks.base.scalars`) into the Trainer's logs;
    ``per_tensor``: with them, three metrics per parameter; ``options`` (a
    `MonitorOptions`) and its settings by name, validated here (``check_every``
    counts optimizer steps; a Report's step is the ``global_step`` the Trainer
    logs for that optimizer step, 1 for the first).

    Attributes: ``monitor``, ``last_report``, ``skipped_steps``, ``error``.
    """

    def __init__(self, *, sinks: Iterable = (), stop_on_raise: bool = True, log: bool = True,
                 per_tensor: bool = False, options: MonitorOptions | None = None, **settings):
        self.options = MonitorOptions.build(options, **settings)
        self.sinks = list(sinks)
        self.stop_on_raise = stop_on_raise
        self.log, self.per_tensor = log, per_tensor
        self.monitor: HealthMonitor | None = None
        self.last_report: Report | None = None
        self.skipped_steps = 0
        self.error: HealthCheckError | None = None
        self._optimizer = None
        self._state = None  # the Trainer's TrainerState
        self._hooks = None
        self._handler = None  # the Trainer's CallbackHandler
        self._logs_first = False  # a _HealthLogs before the report_to integrations adds to logs
        self._logged_step = 0  # the step of the newest Report put into the Trainer's logs
        self._checkpoint: dict | None = None  # the state of a checkpoint, for the next monitor

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._state is state:  # called again: see _log_before_reporters
            return control
        self._state = state
        self._logged_step = 0  # a new run counts steps from its start
        self._handler = _calling_handler(sys._getframe(1))
        if self.log and self._handler is not None:
            self._logs_first = _log_before_reporters(self._handler, self)
        if state.global_step > 0:  # resumed from a checkpoint
            self._restore(self._saved_in(state))
        if optimizer is not None:
            self._monitor_for(unwrap(optimizer), model, state)
        return control

    # -- checkpoints (transformers.trainer_callback.ExportableState) ---------------------------
    def state(self) -> dict:
        """What a checkpoint's ``trainer_state.json`` keeps: JSON only."""
        monitor = self.monitor.state_dict() if self.monitor is not None else self._checkpoint_monitor()
        return {"args": {"stop_on_raise": self.stop_on_raise, "log": self.log, "per_tensor": self.per_tensor},
                "attributes": {"_checkpoint": {"monitor": _to_json(monitor),
                                               "skipped_steps": self.skipped_steps}}}

    def _saved_in(self, state) -> dict | None:
        """This callback's entry in a checkpoint's state: the Trainer keeps a
        list for several callbacks of one class, in the order it holds them."""
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, list):
            same = [cb for cb in (self._handler.callbacks if self._handler else [self])
                    if type(cb) is type(self)]
            saved = saved[same.index(self)] if self in same and same.index(self) < len(saved) else None
        return (saved or {}).get("attributes", {}).get("_checkpoint")

    def _checkpoint_monitor(self):
        return _from_json(self._checkpoint["monitor"]) if self._checkpoint else None

    def _restore(self, checkpoint: dict | None) -> None:
        if checkpoint is None:
            return
        self._checkpoint = checkpoint
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        if self.monitor is not None:
            self._load_checkpoint(self.monitor)

    def _load_checkpoint(self, monitor: HealthMonitor) -> None:
        saved, self._checkpoint = self._checkpoint_monitor(), None
        if saved is not None:
            monitor.load_state_dict(saved)

    # -- the step --------------------------------------------------------------------------------
    def _monitor_for(self, opt, model, state) -> HealthMonitor:
        self._state = state
        if self.monitor is None or self._optimizer is not opt:
            if self._hooks is not None:
                self._hooks.remove()
            self.monitor = HealthMonitor(opt, model=model, options=self.options)
            self._load_checkpoint(self.monitor)
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
        log_learning_rates(self.monitor, opt)
        try:
            result = self.monitor.check(self._next_step(), found_inf=found_inf)
        except HealthCheckError as e:
            self._stop(e, control)
            skip_by_dropping_gradients(opt, True)
            self.skipped_steps += 1
            return control
        if result is not None and skip_by_dropping_gradients(opt, result.skip):
            self.skipped_steps += 1
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer's loggers (report_to) are callbacks that read this same
        # dict, and they are registered before user callbacks, so they would
        # see it before this method runs: a small callback placed before them
        # (_HealthLogs) calls _add_to_logs instead.
        if not self._logs_first:
            self._add_to_logs(logs, control)
        return control

    def _add_to_logs(self, logs, control) -> None:
        if not self.log or logs is None or self.monitor is None:
            return
        try:  # delivers pending results (the Trainer reads its loss on the host here too)
            report = self.monitor.last_report
        except HealthCheckError as e:  # a late verdict (sync="never")
            self._stop(e, control)
            report = self.monitor.last_report
        if report is not None and report.step > self._logged_step:
            self._logged_step = report.step
            logs.update(scalars(report, per_tensor=self.per_tensor))

    def on_train_end(self, args, state, control, **kwargs):
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self.monitor is not None:
            try:
                self.monitor.flush()
            except HealthCheckError as e:  # a late verdict (sync="never")
                self._stop(e, control)
        for sink in self.sinks:
            if isinstance(sink, Sink):
                sink.close()
        if self.error is not None and self.stop_on_raise:
            # Raising ends the Trainer's loop over callbacks: the ones after
            # this one end first (loggers close their files), then train() fails.
            callbacks = self._handler.callbacks if self._handler is not None else []
            for cb in callbacks[callbacks.index(self) + 1:] if self in callbacks else []:
                cb.on_train_end(args, state, control, **kwargs)
            raise self.error
        return control

    def _stop(self, error: HealthCheckError, control) -> None:
        """Ends training cleanly after this step; train() raises `error` at the end."""
        if not self.stop_on_raise:
            raise error
        self.error = error
        log.error("%s\ntorchhealth: training stops (HealthCheckCallback, stop_on_raise=True)", error)
        control.should_training_stop = True

    def _deliver(self, report: Report) -> None:
        self.last_report = report
        for sink in self.sinks:
            sink(report)


class _HealthLogs(transformers.TrainerCallback):
    """Puts a `HealthCheckCallback`'s scalars into the Trainer's logs; sits
    before the ``report_to`` integrations so that they record them."""

    def __init__(self, owner: HealthCheckCallback):
        self.owner = owner

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.owner._add_to_logs(logs, control)
        return control


def _calling_handler(frame):
    """The Trainer's CallbackHandler running the current event: callbacks are
    given no reference to it, and it holds the order in which they run. Looked
    for a few frames up, since a subclass may call this event through super()."""
    for _ in range(4):
        if frame is None:
            return None
        caller = frame.f_locals.get("self")
        if isinstance(caller, transformers.trainer_callback.CallbackHandler):
            return caller
        frame = frame.f_back
    log.warning("torchhealth: HealthCheckCallback found no CallbackHandler calling it; its metrics go "
                "only to the report_to integrations listed after it")
    return None


def _log_before_reporters(handler, owner: HealthCheckCallback) -> bool:
    """Places a `_HealthLogs` for `owner` before the first ``report_to``
    integration (transformers keeps them all in ``transformers.integrations``).
    Returns whether there is one. The handler is iterating its list for
    on_train_begin: inserting before `owner` shifts `owner` one place on, so it
    is called once more, which `HealthCheckCallback.on_train_begin` ignores;
    nothing else moves past the iteration point."""
    callbacks = handler.callbacks
    if any(isinstance(cb, _HealthLogs) and cb.owner is owner for cb in callbacks):
        return True
    at = next((i for i, cb in enumerate(callbacks)
               if type(cb).__module__.startswith("transformers.integrations")), None)
    if at is None or at > callbacks.index(owner):
        return False
    callbacks.insert(at, _HealthLogs(owner))
    return True


def _to_json(value):
    """A state dict with tensors as JSON (trainer_state.json): floats round-trip
    exactly through Python's json (NaN and inf included)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "data": value.cpu().tolist()}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"tensor", "data"}:
        return torch.tensor(value["data"], dtype=getattr(torch, value["tensor"]))
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value
