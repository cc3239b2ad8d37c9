"""The wrapper under hostile use (issue 11): copies, complex parameters,
bad settings, and runs that never recover."""
import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch

import torchhealth as th
from torchhealth.options import MonitorOptions

O = torch.optim


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _step(model, opt, i, nan=False):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
    if nan:
        x[0, 0] = float("nan")
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_the_wrapper_copies_and_pickles_like_a_plain_optimizer(clone):
    model = _model()
    opt = th.HealthCheckedOptimizer(O.Adam(model.parameters(), lr=0.01), model=model, check_every=2)
    for i in range(3):
        _step(model, opt, i)
    twin = clone(opt)
    assert isinstance(twin, th.HealthCheckedOptimizer) and twin.steps == 3
    assert twin.monitor.options == opt.monitor.options and twin.monitor.checks == opt.monitor.checks
    assert twin.state_dict()["torchhealth"]["monitor"]["checks"] == 2
    # The copy holds its own tensors: its state is equal, not shared.
    a, b = opt.state_dict()["state"][0]["exp_avg"], twin.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_a_nan_in_a_complex_gradient_is_found_and_the_step_skipped():
    torch.manual_seed(0)
    z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    w = torch.nn.Parameter(torch.randn(3))
    reports = []
    opt = th.HealthCheckedOptimizer(O.Adam([z, w], lr=0.1), on_report=reports.append)
    before = z.detach().clone()
    loss = (z.abs() ** 2).sum() + (w ** 2).sum()
    loss.backward()
    z.grad[1] = complex(float("nan"), 0.0)
    with pytest.warns(th.HealthWarning, match="nonfinite"):
        opt.step()
    assert opt.step_was_skipped and torch.equal(z.detach(), before)
    (f,) = [f for f in reports[0].findings if f.check == "nonfinite"]
    assert f.names == ["group0.param0"]
    grad_row = [r for r in reports[0].rows if r.role == "grad" and r.name == "group0.param0"][0]
    assert grad_row.nan == 1 and grad_row.shape == (4, 2)  # read as its real view


def test_an_optimizer_of_complex_parameters_only_checks_and_steps():
    z = torch.nn.Parameter(torch.ones(3, dtype=torch.complex128))
    opt = th.HealthCheckedOptimizer(O.SGD([z], lr=0.5))
    (z.abs() ** 2).sum().backward()
    opt.step()
    assert not opt.step_was_skipped and torch.allclose(z.detach().real, torch.zeros(3, dtype=torch.float64))
    assert {r.dtype for r in opt.last_report.rows} == {"float64"}


@pytest.mark.parametrize("settings, error, match", [
    (dict(thresholds=th.Thresholds), TypeError, "thresholds must be a torchhealth.Thresholds"),
    (dict(thresholds={"max_norm": 1.0}), TypeError, r"Thresholds\(\*\*your_dict\)"),
    (dict(check_every=True), TypeError, "check_every must be a positive int"),
    (dict(check_every=2.0), TypeError, "check_every must be a positive int"),
    (dict(check_every=0), ValueError, "check_every must be a positive int"),
    (dict(max_grad_norm="1"), TypeError, "max_grad_norm must be a number, got str"),
    (dict(max_grad_norm=math.nan), ValueError, "max_grad_norm must be in"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm must be in"),
    (dict(max_grad_norm=10 ** 400), ValueError, "too large for a float"),
    (dict(escalate_after=0), ValueError, "escalate_after"),
    (dict(histogram="yes"), TypeError, "histogram must be a bool or a positive int"),
    (dict(histogram=0), TypeError, "histogram must be a bool or a positive int"),
    (dict(optimizer_state="exp_avg"), TypeError, "optimizer_state must be a bool or a collection"),
    (dict(sync="sometimes"), ValueError, "sync must be one of"),
    (dict(check_evry=2), TypeError, r"unknown torchhealth setting\(s\) \['check_evry'\]"),
])
def test_bad_settings_fail_at_construction_with_a_clear_error(settings, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model, **settings)
    with pytest.raises(error, match=match):
        MonitorOptions.build(**settings)


@pytest.mark.parametrize("field, value, error", [
    ("min_norm", math.nan, ValueError), ("max_norm", -1.0, ValueError), ("warmup", 2.5, TypeError),
    ("dead_after", 0, ValueError), ("max_zero_fraction", 1.5, ValueError),
    ("headroom", "0.5", TypeError), ("spike_decay", 1.0, ValueError),
])
def test_bad_thresholds_are_refused_by_name(field, value, error):
    with pytest.raises(error, match=f"Thresholds.{field}"):
        th.Thresholds(**{field: value})


def test_numpy_scalars_of_every_width_are_numbers():
    for x in (np.float32(2), np.float64(2), np.int64(2), np.float16(2)):
        assert MonitorOptions(max_grad_norm=x).max_grad_norm == 2.0
        assert th.Thresholds(max_norm=x).max_norm == 2.0
        s = th.tensor_stats([torch.tensor([1.0, 3.0])], saturation=x)
        assert s.saturated.tolist() == [1]
    with pytest.raises(ValueError, match="saturation = .* too large"):
        th.tensor_stats([torch.ones(2)], saturation=10 ** 400)


@pytest.mark.parametrize("sync", ["step", "never"])
def test_a_run_that_never_recovers_escalates_to_an_error(sync):
    model = _model()
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model, sync=sync,
                                    escalate_after=3)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # the weights went NaN: every step will skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", th.HealthWarning)
        for i in range(2):
            _step(model, opt, i)
        with pytest.raises(th.HealthCheckError, match="skipped 3 steps in a row") as e:
            _step(model, opt, 2)
            opt.flush()  # sync="never": the verdict of step 2 arrives here
    assert e.value.report.step == 2
    assert "raise: 3 consecutive skipped steps (escalate_after=3)" in e.value.report.actions
    # sync="step" raises before step 2's optimizer step (which is then neither taken nor
    # counted); sync="never" learns of it after step 2 was already skipped on the device.
    assert opt.skipped_steps == (2 if sync == "step" else 3)


def test_the_consecutive_skip_count_restarts_after_a_good_step_and_survives_a_checkpoint():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.01), model=model, escalate_after=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", th.HealthWarning)
        for i, nan in enumerate([True, False, True]):  # never two in a row
            _step(model, opt, i, nan)
        sd = opt.state_dict()
        assert int(sd["torchhealth"]["monitor"]["running"]["skips"]) == 1
        twin_model = _model()
        twin = th.HealthCheckedOptimizer(O.SGD(twin_model.parameters(), lr=0.01), model=twin_model,
                                         escalate_after=2)
        twin.load_state_dict(sd)
        with pytest.raises(th.HealthCheckError, match="skipped 2 steps in a row"):
            _step(twin_model, twin, 3, nan=True)
