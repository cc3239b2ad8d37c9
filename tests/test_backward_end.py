"""Checks at the end of backward (issue 9): the evidence is read before
clipping or any other code can change the gradients."""
import warnings

import pytest
import torch

import torchhealth as th
from torchhealth.stats import SUM_RTOL  # the documented bound of the float64 sums
from test_checks import NoHostReads

O = torch.optim


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _loss(model, i, scale=1.0):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
    return scale * torch.nn.functional.mse_loss(model(x), y)


def _plant_nan(param):
    """A NaN born in one gradient during backward (before it is accumulated)."""
    def hook(grad):
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad
    return param.register_hook(hook)


@pytest.mark.parametrize("at_backward_end", [True, False])
def test_clipping_no_longer_hides_where_a_nan_was_born(at_backward_end):
    model = _model()
    reports = []
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model,
                                    at_backward_end=at_backward_end, on_report=reports.append)
    handle = _plant_nan(model[2].weight)
    _loss(model, 0).backward()
    handle.remove()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one NaN makes every gradient NaN
    assert all(torch.isnan(p.grad).all() for p in model.parameters())
    with pytest.warns(th.HealthWarning, match="nonfinite"):
        opt.step()
    (f,) = [f for f in reports[0].findings if f.check == "nonfinite"]
    if at_backward_end:
        assert f.names == ["2.weight"]  # where it was born, not everything clipping touched
        assert [r.nan for r in reports[0].rows if r.role == "grad"] == [0, 0, 1, 0]
    else:  # the old behaviour, still available: every gradient reads as NaN
        assert f.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert opt.step_was_skipped


def test_the_raw_gradient_norm_is_reported_and_checked_not_the_clipped_one():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model,
                                    thresholds=th.Thresholds(max_norm=100.0))
    _loss(model, 0, scale=1e6).backward()
    raw = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.warns(th.HealthWarning, match="exploding"):
        opt.step()
    report = opt.last_report
    assert report.grad_norm == pytest.approx(raw, rel=SUM_RTOL) and raw > 100
    (said,) = [a for a in report.actions if a.startswith("gradients changed after backward")]
    assert f"-> {1.0:.4g}" in said  # the clipped norm, alongside the raw one


def test_nothing_is_said_when_the_gradients_were_left_alone():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model)
    _loss(model, 0).backward()
    opt.step()
    assert opt.last_report.actions == []


@pytest.mark.parametrize("clip", [False, True])
def test_gradients_are_read_again_only_when_changed_in_place(monkeypatch, clip):
    """The norm the step uses is measured again (a second pass over every
    gradient) only when code between backward and the step changed them in
    place; untouched gradients cost one pass, the statistics'."""
    from torchhealth import monitor
    passes = []
    monkeypatch.setattr(monitor, "grad_norm_", lambda *a: passes.append(1) or torch.ones((), dtype=torch.float64))
    model = _model()
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model)
    for i in range(3):
        opt.zero_grad()
        _loss(model, i).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        assert len(passes) == (i + 1 if clip else 0)
        assert any(a.startswith("gradients changed") for a in opt.last_report.actions) == clip


def test_gradient_accumulation_checks_the_accumulated_gradients_once():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model)
    for step in range(2):
        opt.zero_grad()
        for micro in range(3):
            (_loss(model, 10 * step + micro) / 3).backward()
        accumulated = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
        opt.step()
        assert opt.monitor.micro_batches == 3
        assert opt.last_report.step == step and opt.last_report.grad_norm == pytest.approx(accumulated, rel=SUM_RTOL)
    assert opt.monitor.checks == 2  # one check per optimizer step, not per backward


def test_steps_that_are_not_due_compute_nothing_at_the_end_of_backward(monkeypatch):
    model = _model()
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model, check_every=2)
    calls = []
    prepare = type(opt.monitor)._prepare
    monkeypatch.setattr(type(opt.monitor), "_prepare", lambda self, *a: calls.append(a[0]) or prepare(self, *a))
    for i in range(4):
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()
    assert calls == [0, 2] and opt.monitor.checks == 2


def test_the_backward_end_check_makes_no_host_read_with_sync_never(monkeypatch):
    # As on a GPU: the copies are pretended to be in flight, so nothing is read.
    monkeypatch.setattr(th.CheckResult, "ready", property(lambda self: False))
    model = _model()
    opt = th.HealthCheckedOptimizer(O.Adam(model.parameters(), lr=0.01, fused=True), model=model,
                                    sync="never")
    for i in range(3):
        opt.zero_grad()
        with NoHostReads(only_torchhealth=True):
            _loss(model, i).backward()
            opt.step()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.last_report.step == 2 and not opt.last_report.findings


def test_removing_the_hooks_goes_back_to_checking_at_step_time():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model)
    opt._backward_hooks.remove()
    _loss(model, 0).backward()
    assert opt.monitor._prepared is None
    opt.step()
    assert opt.last_report.step == 0


def test_under_compiled_autograd_the_check_runs_at_step_time():
    """Compiled autograd runs no end-of-backward callback: the wrapper checks at
    step time there, with the same verdict and norm as eager autograd (it
    failed in backward before: the traced hook could not queue its callback)."""
    def run(compiled_autograd: bool):
        torch._dynamo.reset()
        model = _model()
        reports = []
        opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model,
                                        on_report=reports.append, policy="skip")
        for i in range(3):
            handle = _plant_nan(model[2].weight) if i == 1 else None
            loss = _loss(model, i)
            if compiled_autograd:
                with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
                    loss.backward()
            else:
                loss.backward()
            opt.step()
            opt.zero_grad()
            if handle is not None:
                handle.remove()
        return reports, opt.monitor.micro_batches

    (eager, eager_micro), (compiled, compiled_micro) = run(False), run(True)
    assert (eager_micro, compiled_micro) == (1, 0)  # checked at the end of backward, at step time
    assert [r.skipped for r in compiled] == [r.skipped for r in eager] == [False, True, False]
    assert compiled[1].findings[0].names == eager[1].findings[0].names == ["2.weight"]
    for e, c in zip(eager, compiled):
        assert c.grad_norm == pytest.approx(e.grad_norm, rel=1e-5) or (e.grad_norm != e.grad_norm)
