"""`HealthMonitor.log` / `HealthCheckedOptimizer.log`: the user's scalars in the
Report of their step, carried by the check's one host copy."""
import math
import warnings

import pytest
import torch

import torchhealth as th
from torchhealth.hostcopy import HostCopy
from torchhealth.monitor import CheckResult
from test_checks import NoHostReads


def _setup(**settings):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    reports = []
    opt = th.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                    on_report=reports.append, **settings)
    return model, opt, reports


def _loss(model, i, nan=False):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
    if nan:
        x[0, 0] = float("nan")
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("sync", ["step", "never"])
def test_scalars_reach_the_report_of_their_step(sync):
    model, opt, reports = _setup(sync=sync, check_every=2)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", th.HealthWarning)
        for i in range(6):
            opt.zero_grad()
            loss = _loss(model, i, nan=i == 4)
            loss.backward()
            losses.append(loss.item())
            opt.log(loss=loss, lr=0.1 / (i + 1), step_parity=i % 2)
            if i == 2:
                opt.log(extra=7)  # logged once: in its step's Report only
            opt.step()
        opt.flush()
    assert [r.step for r in reports] == [0, 2, 4]  # steps 1, 3, 5 are not checked: their numbers go nowhere
    for r in reports:
        assert r.scalars["loss"] == losses[r.step] or (math.isnan(losses[r.step]) and math.isnan(r.scalars["loss"]))
        assert r.scalars["lr"] == 0.1 / (r.step + 1) and r.scalars["step_parity"] == 0.0
    assert list(reports[0].scalars) == ["loss", "lr", "step_parity"]  # in the order logged
    assert reports[1].scalars["extra"] == 7.0 and "extra" not in reports[2].scalars
    assert math.isnan(reports[2].scalars["loss"]) and reports[2].skipped  # a NaN loss is kept, not dropped
    assert "logged: loss nan" in str(reports[2])


def test_a_tensor_is_read_as_it_was_when_logged():
    model, opt, reports = _setup()
    _loss(model, 0).backward()
    running = torch.tensor(1.0)
    opt.log(running=running, half=torch.tensor([0.5], dtype=torch.float16), count=torch.tensor(3))
    running.add_(100.0)  # after log: not what the Report holds
    opt.step()
    assert reports[0].scalars == {"running": 1.0, "half": 0.5, "count": 3.0}


@pytest.mark.parametrize("value, error, words", [
    ("0.5", TypeError, "loss is a str"),
    (None, TypeError, "loss is a NoneType"),
    (1 + 2j, TypeError, "loss is a complex"),
    (torch.zeros(3), ValueError, "loss is a tensor of shape (3,)"),
    (torch.zeros(()), None, None),
    (torch.ones(1, dtype=torch.complex64), TypeError, "loss is a complex tensor"),
    (10 ** 400, ValueError, "loss = 1000"),
])
def test_bad_scalars_are_refused_naming_them(value, error, words):
    model, opt, reports = _setup()
    if error is None:
        opt.log(loss=value)
        return
    with pytest.raises(error) as e:
        opt.log(lr=0.1, loss=value)
    assert words in str(e.value)
    _loss(model, 0).backward()
    opt.step()
    assert reports[0].scalars == {}  # a refused call logs nothing, not even its good names


@pytest.mark.parametrize("check_every", [1, 2])
def test_logged_tensors_ride_the_one_host_copy(monkeypatch, check_every):
    """With sync="step" on the CPU, logging the loss tensor adds no host read
    of its own: `log` and `step` read nothing outside `HostCopy.read`, which
    runs once per checked step and not at all on the other steps."""
    reads = []
    read, value, report = HostCopy.read, HostCopy.value, CheckResult.report

    def counted_read(self):
        if not self._landed:
            reads.append(self.fields)
        with torch._C.DisableTorchFunction():
            return read(self)

    def host(fn):
        def run(*args):
            with torch._C.DisableTorchFunction():
                return fn(*args)
        return run

    monkeypatch.setattr(HostCopy, "read", counted_read)
    monkeypatch.setattr(HostCopy, "value", host(value))
    monkeypatch.setattr(CheckResult, "report", host(report))
    model, opt, reports = _setup(sync="step", check_every=check_every)
    per_step = []
    for i in range(4):
        opt.zero_grad()
        loss = _loss(model, i)
        loss.backward()
        before = len(reads)
        with NoHostReads(only_torchhealth=True):
            opt.log(loss=loss, lr=0.1)
            opt.step()
        per_step.append(len(reads) - before)
    assert per_step == [1 if i % check_every == 0 else 0 for i in range(4)]
    assert all("scalar:loss" in fields for fields in reads)  # the loss came with the statistics
    assert [r.step for r in reports] == list(range(0, 4, check_every))
    assert all(set(r.scalars) == {"loss", "lr"} for r in reports)


def test_monitor_log_without_the_wrapper():
    model, _, _ = _setup()
    monitor = th.HealthMonitor(model)
    got = []
    monitor.on_report(got.append)
    _loss(model, 0).backward()
    monitor.log(loss=float("inf"))
    monitor.check(0)
    assert got[0].scalars == {"loss": math.inf}
    assert th.report.Report.from_dict(got[0].to_dict()).scalars == {"loss": math.inf}
