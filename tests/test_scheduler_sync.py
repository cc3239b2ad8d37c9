"""SkipAwareScheduler under sync="never": no device-to-host read, and the
learning-rate schedule when a skip is known only after the scheduler stepped."""
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchhealth
from torchhealth.hostcopy import HostCopy


class DeviceReads(TorchDispatchMode):
    """Counts what reads a tensor's value on the host: ``_local_scalar_dense``
    (``.item()``, ``bool()``, ``float()``) and copies from another device to the CPU."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if src.device.type != "cpu" and dst.device.type == "cpu":
                self.reads.append(str(func))
        return out


def _setup(lr=1.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    # A fused optimizer takes the skip as found_inf: the step itself reads nothing.
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.Adam(model.parameters(), lr=lr, fused=True),
                                             model=model, sync="never")
    sched = torchhealth.SkipAwareScheduler(torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    return model, opt, sched


def _train(model, opt, sched, steps, nan_at, mode_factory=None):
    lrs, moved = [], []
    for step in range(steps):
        x = torch.randn(8, 4)
        if step == nan_at:
            x[0, 0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        with mode_factory() if mode_factory else warnings.catch_warnings():
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        moved.append(not all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
    return lrs, moved


def test_skip_aware_scheduler_reads_nothing_under_sync_never():
    model, opt, sched = _setup()
    modes = []

    def counting():
        modes.append(DeviceReads())
        return modes[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchhealth.HealthWarning)
        lrs, moved = _train(model, opt, sched, steps=4, nan_at=2, mode_factory=counting)
    assert [m.reads for m in modes] == [[], [], [], []]
    assert moved == [True, True, False, True]
    assert lrs == [0.5, 0.25, 0.25, 0.125]  # on the CPU the check's copy is there at once: exact


def test_skip_known_late_holds_back_the_next_scheduler_step(monkeypatch):
    """A copy that lands one step later (as on a GPU): the scheduler steps for the
    skipped step, then holds back once when the copy says it was skipped."""
    landed = set()
    made = []
    init = HostCopy.__init__

    def record(self, fields):
        init(self, fields)
        made.append(self)
    monkeypatch.setattr(HostCopy, "__init__", record)
    monkeypatch.setattr(HostCopy, "ready", property(lambda self: id(self) in landed))
    model, opt, sched = _setup()
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchhealth.HealthWarning)
        for step in range(6):
            landed.update(id(c) for c in made)  # the copies of earlier steps have landed
            lr, moved = _train(model, opt, sched, steps=1, nan_at=0 if step == 2 else None)
            lrs += lr
            assert moved == [step != 2]
    # Known at once it would be [0.5, 0.25, 0.25, 0.125, 0.0625, 0.03125].
    assert lrs == [0.5, 0.25, 0.125, 0.125, 0.0625, 0.03125]
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("sync", ["step", "never"])
def test_skip_aware_scheduler_is_exact_when_the_verdict_is_on_the_host(sync):
    """sync="step", or an optimizer that reads the flag itself (not fused)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model=model, sync=sync)
    sched = torchhealth.SkipAwareScheduler(torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchhealth.HealthWarning)
        lrs, moved = _train(model, opt, sched, steps=4, nan_at=1)
    assert lrs == [0.5, 0.5, 0.25, 0.125] and moved == [True, False, True, True]
