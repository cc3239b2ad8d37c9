"""HealthMonitor: host reads by construction, policies, and use without a wrapper."""
import math
import warnings

import pytest
import torch

import torchhealth as th
from torchhealth import policy as P
from torchhealth.hostcopy import HostCopy
from torchhealth.monitor import CheckResult
from test_checks import NoHostReads

O = torch.optim


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _backward(model, i, nan=False):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
    if nan:
        x[2, 1] = float("nan")
    torch.nn.functional.mse_loss(model(x), y).backward()


def _step(model, opt, i, nan=False):
    opt.zero_grad()
    _backward(model, i, nan)
    opt.step()


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_sync_never_with_fused_skip_makes_no_host_read(monkeypatch, name):
    """By construction: with sync="never" and an optimizer that takes found_inf,
    a step (check, policy, skip or step) reads nothing from the device, even
    when the step must be skipped. The copies are pretended to be in flight."""
    model = _model()
    inner = getattr(O, name)(model.parameters(), lr=0.01, fused=True)
    opt = th.HealthCheckedOptimizer(inner, model=model, sync="never", max_grad_norm=1.0)
    monkeypatch.setattr(CheckResult, "ready", property(lambda self: False))
    before = [p.detach().clone() for p in model.parameters()]
    for i, nan in enumerate([False, True]):
        opt.zero_grad()
        _backward(model, i, nan)
        with NoHostReads():
            opt.step()
    assert isinstance(opt._last_skip, torch.Tensor)  # decided on the device
    monkeypatch.undo()
    assert opt.step_was_skipped and opt.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # step 0 stepped
    with pytest.warns(th.HealthWarning, match="step 1: nonfinite"):
        report = opt.last_report
    assert report.step == 1 and report.skipped


@pytest.mark.parametrize("inner", [lambda p: O.Adam(p, lr=0.01), lambda p: O.SGD(p, lr=0.1)])
@pytest.mark.parametrize("sync", ["step", "never"])
def test_at_most_one_transfer_per_step(monkeypatch, inner, sync):
    """By construction: outside `HostCopy.read` (one copy of one packed buffer
    to the host), `HostCopy.value` (Python conversions of that copy) and
    `CheckResult.report` (which only uses what the copy holds), torchhealth
    reads nothing from the device; the copy is read at most once per step: for
    this step with sync="step", for an earlier step's landed copy with sync="never"."""
    transfers = []
    read, value, report, flag = HostCopy.read, HostCopy.value, CheckResult.report, P.read_flag
    init = CheckResult.__init__

    def counted_read(self):
        if not self._landed:
            transfers.append(("verdict", self.step))
        with torch._C.DisableTorchFunction():
            return read(self)

    def host_value(self, name):
        with torch._C.DisableTorchFunction():
            return value(self, name)

    def counted_flag(t):
        transfers.append(("skip flag", opt.steps - 1))
        with torch._C.DisableTorchFunction():
            return flag(t)

    def tagged_init(self, step, *args, **kwargs):
        init(self, step, *args, **kwargs)
        self.copy.step = step  # names the step in `transfers`

    def host_report(self):
        with torch._C.DisableTorchFunction():
            return report(self)

    monkeypatch.setattr(HostCopy, "read", counted_read)
    monkeypatch.setattr(HostCopy, "value", host_value)
    monkeypatch.setattr(CheckResult, "report", host_report)
    monkeypatch.setattr(CheckResult, "__init__", tagged_init)
    monkeypatch.setattr(P, "read_flag", counted_flag)
    model = _model()
    opt = th.HealthCheckedOptimizer(inner(model.parameters()), model=model, sync=sync,
                                    on_report=lambda r: None)  # a Report every step
    per_step = []
    for i in range(4):
        opt.zero_grad()
        _backward(model, i, nan=i == 2)
        before = len(transfers)
        with warnings.catch_warnings(), NoHostReads(only_torchhealth=True):
            warnings.simplefilter("ignore", th.HealthWarning)
            opt.step()
        per_step.append(transfers[before:])
    if sync == "step":  # this step's verdict, once; the skip decision is then a host bool
        assert per_step == [[("verdict", i)] for i in range(4)]
    else:  # the previous step's landed copy (no wait), and one flag for a non-fused optimizer
        assert per_step == [[("skip flag", 0)]] + [[("verdict", i - 1), ("skip flag", i)]
                                                   for i in range(1, 4)]
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("sync", ["step", "never"])
def test_zero_policy_replaces_nonfinite_gradients_and_says_so_only_when_it_did(sync):
    model = _model()
    reports = []
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model, sync=sync,
                                    policy={"nonfinite": "zero"}, on_report=reports.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", th.HealthWarning)
        for i in range(3):
            _step(model, opt, i, nan=i == 1)
        opt.flush()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not opt.step_was_skipped and opt.skipped_steps == 0
    assert [("zeroed non-finite gradient values" in r.actions) for r in reports] == [False, True, False]
    assert reports[1].nonfinite("grad") > 0  # the statistics describe the gradients before zeroing
    assert len([w for w in caught if "nonfinite" in str(w.message)]) == 1


def test_callable_policy_gets_report_and_finding():
    model = _model()
    calls = []
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model,
                                    policy={"nonfinite": lambda r, f: calls.append((r.step, f.check, f.names))})
    for i in range(2):
        _step(model, opt, i, nan=i == 1)
    assert calls == [(1, "nonfinite", ["0.weight", "0.bias", "2.weight", "2.bias"])]
    assert not opt.step_was_skipped  # a callable does not skip


def test_monitor_without_a_wrapper_on_a_module():
    model = _model()
    mon = th.HealthMonitor(model, thresholds=th.Thresholds(max_norm=1e-3), policy="ignore")
    _backward(model, 0)
    result = mon.check(0)
    assert result is not None and not result.skipped and not result.fired  # ignored
    report = mon.last_report
    assert [f.check for f in report.findings] == ["exploding"]
    assert report.actions == [] and {r.name for r in report.rows} == {"0.weight", "0.bias",
                                                                       "2.weight", "2.bias"}
    assert report.grad_norm == pytest.approx(
        torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item())


def test_policy_and_settings_are_validated():
    model = _model()
    with pytest.raises(ValueError, match="unknown check"):
        th.HealthMonitor(model, policy={"exploded": "warn"})
    with pytest.raises(ValueError, match="only non-finite"):
        th.HealthMonitor(model, policy={"dead": "zero"})
    with pytest.raises(ValueError, match="sync"):
        th.HealthMonitor(model, sync="sometimes")
    with pytest.raises(ValueError, match="check_every"):
        th.HealthMonitor(model, check_every=0)


def test_embedding_tables_are_exempt_from_the_zero_fraction_check():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(1000, 8), torch.nn.Linear(8, 1))
    model(torch.tensor([3, 7])).sum().backward()  # 2 of 1000 rows get a gradient
    assert (model[0].weight.grad == 0).double().mean() > 0.99
    with_names = th.HealthMonitor(model, policy="ignore")
    with_names.check(0)
    assert not with_names.last_report.findings
    # Without the model, the monitor cannot know it is an embedding table.
    anonymous = th.HealthMonitor(list(model.parameters()), policy="ignore")
    anonymous.check(0)
    (f,) = anonymous.last_report.findings
    assert f.check == "vanishing" and f.names == ["group0.param0"]


def test_a_step_with_nonfinite_gradients_logs_a_nan_or_inf_norm():
    """Issue 12: the norm of the finite values hid the fault on dashboards."""
    from torchhealth.sinks.base import scalars
    model = _model()
    mon = th.HealthMonitor(model, policy="ignore")
    _backward(model, 0, nan=True)
    mon.check(0)
    r = mon.last_report
    assert math.isnan(r.grad_norm) and math.isfinite(r.finite_grad_norm) and r.finite_grad_norm >= 0
    model.zero_grad()
    _backward(model, 1)
    model[2].bias.grad[0] = float("inf")
    mon.check(1)
    r = mon.last_report
    assert r.grad_norm == math.inf and math.isfinite(r.finite_grad_norm)
    m = scalars(r, per_tensor=False)
    assert m["health/grad_norm"] == math.inf and m["health/finite_grad_norm"] == r.finite_grad_norm


def test_warnings_point_at_the_training_loop_not_into_a_library():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), model=model)
    _backward(model, 0, nan=True)
    with pytest.warns(th.HealthWarning) as caught:
        opt.step()  # the warning's line
    import linecache
    assert caught[0].filename == __file__
    assert "opt.step()  # the warning's line" in linecache.getline(__file__, caught[0].lineno)


def test_histograms_by_default_on_every_tenth_check():
    model = _model()
    reports = []
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.01), model=model, on_report=reports.append)
    for i in range(21):
        _step(model, opt, i)
    assert [r.step for r in reports if r.rows[0].hist is not None] == [0, 10, 20]


def test_checkpoint_templates_and_results_are_usable_outside_the_check():
    """The check runs in inference mode; what leaves it as a tensor still works
    as a normal one: `state_dict` tensors are filled in place by checkpoint
    loaders (dcp.load), and the zero policy edits the gradients in place."""
    model = _model()
    opt = th.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                    policy={"nonfinite": "zero"})
    for i in range(3):
        with pytest.warns(th.HealthWarning) if i == 1 else warnings.catch_warnings():
            _step(model, opt, i, nan=i == 1)
    running = opt.monitor.state_dict()["running"]
    for name, t in running.items():
        assert not t.is_inference(), name
        before = t.clone()
        t.copy_(t + 1 if t.dtype != torch.bool else ~t)  # what dcp.load does to a template
        assert not torch.equal(t, before), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The live state did not move with the template.
    assert not any(torch.equal(running[k], v) for k, v in opt.monitor.state_dict()["running"].items()
                   if v.numel())
