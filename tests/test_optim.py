"""HealthCheckedOptimizer as a drop-in: bit-identical training, the Optimizer
API, schedulers, state dicts, closures and GradScaler."""
import copy
import warnings

import pytest
import torch

import torchhealth as th
from torchhealth import SkipAwareScheduler

O = torch.optim


def _model(seed=0, sparse=False):
    torch.manual_seed(seed)
    if sparse:
        return torch.nn.Sequential(torch.nn.EmbeddingBag(20, 6, mode="sum", sparse=True),
                                   torch.nn.Linear(6, 1))
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(i, sparse=False):
    g = torch.Generator().manual_seed(100 + i)
    if sparse:
        return torch.randint(0, 20, (8, 3), generator=g), torch.randn(8, 1, generator=g)
    return torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)


# name -> (factory(params), needs_closure, sparse model)
OPTIMIZERS = {
    "SGD": lambda p: O.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "SGD-foreach": lambda p: O.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    "SGD-fused": lambda p: O.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "Adam": lambda p: O.Adam(p, lr=0.01),
    "Adam-foreach-amsgrad": lambda p: O.Adam(p, lr=0.01, foreach=True, amsgrad=True),
    "Adam-fused": lambda p: O.Adam(p, lr=0.01, fused=True),
    "AdamW": lambda p: O.AdamW(p, lr=0.01),
    "AdamW-fused": lambda p: O.AdamW(p, lr=0.01, fused=True),
    "Adagrad": lambda p: O.Adagrad(p, lr=0.1),
    "Adagrad-fused": lambda p: O.Adagrad(p, lr=0.1, fused=True),
    "Adadelta": lambda p: O.Adadelta(p, foreach=True),
    "Adafactor": lambda p: O.Adafactor(p, lr=0.01),
    "Adamax": lambda p: O.Adamax(p, lr=0.01),
    "ASGD": lambda p: O.ASGD(p, lr=0.01),
    "NAdam": lambda p: O.NAdam(p, lr=0.01, decoupled_weight_decay=True, weight_decay=0.01),
    "RAdam": lambda p: O.RAdam(p, lr=0.01, foreach=True),
    "RMSprop": lambda p: O.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "Rprop": lambda p: O.Rprop(p, lr=0.01),
    "LBFGS": lambda p: O.LBFGS(p, lr=0.5, max_iter=3, history_size=4),
    "SparseAdam": lambda p: O.SparseAdam(p, lr=0.01),
}
if hasattr(O, "Muon"):
    OPTIMIZERS["Muon"] = lambda p: O.Muon([x for x in p if x.dim() == 2], lr=0.01)


def _train(model, opt, sched, steps, sparse=False, closure_calls=None):
    for i in range(steps):
        x, y = _batch(i, sparse)

        def closure():
            if closure_calls is not None:
                closure_calls.append(i)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        if isinstance(opt, O.LBFGS) or isinstance(getattr(opt, "optimizer", None), O.LBFGS):
            opt.step(closure)
        else:
            closure()
            opt.step()
        sched.step()


def _sched(opt):
    return O.lr_scheduler.SequentialLR(
        opt, [O.lr_scheduler.LinearLR(opt, 0.5, total_iters=2),
              O.lr_scheduler.ExponentialLR(opt, 0.9)], milestones=[2])


def _same(v, w) -> bool:
    if isinstance(v, torch.Tensor):
        return isinstance(w, torch.Tensor) and v.dtype == w.dtype and torch.equal(v, w)
    if isinstance(v, (list, tuple)):
        return len(v) == len(w) and all(_same(x, y) for x, y in zip(v, w))
    return v == w


def _assert_same_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for key, v in a["state"][k].items():
            assert _same(v, b["state"][k][key]), key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bit_identical_to_unwrapped(name):
    sparse = name == "SparseAdam"
    make = OPTIMIZERS[name]
    ref_model, model = _model(sparse=sparse), _model(sparse=sparse)
    # SparseAdam takes only the sparse-gradient embedding table; the dense head
    # is left untrained (identically so in both runs).
    params = (lambda m: [m[0].weight]) if sparse else (lambda m: list(m.parameters()))
    ref_opt = make(params(ref_model))
    opt = th.HealthCheckedOptimizer(make(params(model)), model=model, policy="raise")
    ref_calls, calls = [], []
    _train(ref_model, ref_opt, _sched(ref_opt), 4, sparse, ref_calls)
    _train(model, opt, _sched(opt), 4, sparse, calls)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(ref_opt.state_dict(), opt.optimizer.state_dict())
    assert calls == ref_calls  # a closure is not evaluated more often
    report = opt.last_report
    assert report.step == 3 and not report.findings
    assert {r.role for r in report.rows} == {"param", "grad"}
    if sparse:  # the coalesced gradient's values were read, not a dense copy
        g = model[0].weight.grad.coalesce()
        assert report.rows[1].numel == g._values().numel() < model[0].weight.numel()
        assert report.rows[1].sumsq == pytest.approx((g._values().double() ** 2).sum().item())


def test_third_party_optimizer_subclass():
    class SignSGD(O.Optimizer):
        def __init__(self, params, lr=0.01):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.add_(p.grad.sign(), alpha=-g["lr"])

    ref, model = _model(), _model()
    ref_opt, opt = SignSGD(ref.parameters()), th.HealthCheckedOptimizer(SignSGD(model.parameters()))
    _train(ref, ref_opt, _sched(ref_opt), 3)
    _train(model, opt, _sched(opt), 3)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), model.parameters()))


def test_shares_param_groups_state_and_defaults():
    model = _model()
    inner = O.Adam(model.parameters(), lr=0.1)
    opt = th.HealthCheckedOptimizer(inner)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults and isinstance(opt, O.Optimizer)
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5
    sched = O.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    _train(model, opt, sched, 2)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.005)
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra], "lr": 1.0})
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["params"][0] is extra
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError):
        th.HealthCheckedOptimizer(model)


def test_hooks_run_on_wrapper_and_inner():
    model = _model()
    inner = O.SGD(model.parameters(), lr=0.1)
    opt = th.HealthCheckedOptimizer(inner)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", type(o).__name__)))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", type(o).__name__)))
    inner.register_step_post_hook(lambda o, a, k: seen.append(("inner", type(o).__name__)))
    _train(model, opt, O.lr_scheduler.StepLR(opt, 1), 1)
    assert seen == [("pre", "HealthCheckedOptimizer"), ("inner", "SGD"),
                    ("post", "HealthCheckedOptimizer")]


def test_state_dict_round_trips_both_ways():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.Adam(model.parameters(), lr=0.01))
    _train(model, opt, _sched(opt), 3)
    sd = opt.state_dict()
    assert sd["torchhealth"]["steps"] == 3
    # wrapper -> plain optimizer
    plain = O.Adam(model.parameters(), lr=0.01)
    plain.load_state_dict(copy.deepcopy(sd))
    _assert_same_state(plain.state_dict(), opt.optimizer.state_dict())
    # plain -> wrapper, and wrapper -> wrapper with counters
    fresh = th.HealthCheckedOptimizer(O.Adam(model.parameters(), lr=0.01))
    fresh.load_state_dict(plain.state_dict())
    _assert_same_state(fresh.optimizer.state_dict(), plain.state_dict())
    assert fresh.steps == 0
    fresh.load_state_dict(sd)
    assert fresh.steps == 3 and fresh.monitor.checks == 3
    assert fresh.state_dict()["torchhealth"]["monitor"]["checks"] == 3
    # the loaded state is live: training continues identically
    _train(model, fresh, O.lr_scheduler.StepLR(fresh, 1), 1)
    assert fresh.steps == 4 and fresh.last_report.step == 3


def test_named_param_groups_and_default_names():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.AdamW(model.named_parameters(), lr=0.01))
    _train(model, opt, O.lr_scheduler.StepLR(opt, 1), 1)
    assert {r.name for r in opt.last_report.rows} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.01))
    _train(model, opt, O.lr_scheduler.StepLR(opt, 1), 1)
    assert opt.last_report.rows[0].name == "group0.param0"
    assert opt.last_report.rows[-1].name == "group0.param3"


def test_check_every_and_report_callback():
    model = _model()
    reports = []
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.01), check_every=3,
                                    on_report=reports.append)
    _train(model, opt, O.lr_scheduler.StepLR(opt, 1), 7)
    assert [r.step for r in reports] == [0, 3, 6]
    d = reports[-1].to_dict()
    assert th.Report.from_dict(d).to_dict() == d


def _nan_step(model, opt, i=99):
    x, y = _batch(i)
    x[0, 0] = float("nan")
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", th.HealthWarning)
        opt.step()


@pytest.mark.parametrize("name", ["Adam", "Adam-fused", "SGD-fused", "Adagrad-fused", "RMSprop"])
@pytest.mark.parametrize("sync", ["never", "step"])
def test_skipped_step_is_bit_identical_to_not_stepping(name, sync):
    model = _model()
    opt = th.HealthCheckedOptimizer(OPTIMIZERS[name](list(model.parameters())), sync=sync)
    sched = SkipAwareScheduler(O.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    _train(model, opt, sched, 2)
    params = copy.deepcopy(list(model.parameters()))
    state = copy.deepcopy(opt.optimizer.state_dict())
    lr = opt.param_groups[0]["lr"]
    _nan_step(model, opt)
    sched.step()
    assert opt.step_was_skipped and opt.skipped_steps == 1
    if sync == "never" and "fused" in name:  # decided on the device, no host read
        assert isinstance(opt._last_skip, torch.Tensor)
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    _assert_same_state(state, opt.optimizer.state_dict())
    assert opt.param_groups[0]["lr"] == lr  # the scheduler did not advance
    with warnings.catch_warnings(record=True) as caught:  # sync="never": delivered now
        warnings.simplefilter("always", th.HealthWarning)
        report = opt.last_report
    assert report.skipped and report.step == 2 and "skip: nonfinite" in report.actions
    assert len(caught) == (1 if sync == "never" else 0)


def test_sync_never_delivers_one_step_late_and_raises_naming_the_step():
    model = _model()
    reports = []
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.01), model=model, sync="never",
                                    policy={"nonfinite": "raise"}, on_report=reports.append)
    _train(model, opt, O.lr_scheduler.StepLR(opt, 1), 2)
    assert [r.step for r in reports] == [0]
    _nan_step(model, opt)  # step 2: not raised yet
    with pytest.raises(th.HealthCheckError, match="step 2") as e:
        _train(model, opt, O.lr_scheduler.StepLR(opt, 1), 1)
    assert e.value.report.step == 2 and "0.weight" in str(e.value)
    assert "already taken" in str(e.value) and opt.steps == 4  # step 3 raised before stepping


def test_max_grad_norm_clips_like_clip_grad_norm():
    ref, model = _model(), _model()
    ref_opt = O.SGD(ref.parameters(), lr=0.1)
    opt = th.HealthCheckedOptimizer(O.SGD(model.parameters(), lr=0.1), max_grad_norm=0.05)
    for i in range(3):
        x, y = _batch(i)
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        opt.step()
        assert opt.last_report.grad_norm == pytest.approx(norm.item(), rel=1e-6)
        assert any(a.startswith("clipped gradients") for a in opt.last_report.actions)
        for p, q in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_optimizer_state_is_opt_in():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.Adam(model.parameters(), lr=0.01), optimizer_state=True,
                                    policy={"nonfinite": "raise"})
    _train(model, opt, O.lr_scheduler.StepLR(opt, 1), 2)
    roles = {r.role for r in opt.last_report.rows}
    assert roles == {"param", "grad", "state.exp_avg", "state.exp_avg_sq"}
    opt.state[model[0].weight]["exp_avg_sq"][0, 0] = float("inf")
    with pytest.raises(th.HealthCheckError, match="non-finite optimizer state"):
        _train(model, opt, O.lr_scheduler.StepLR(opt, 1), 1)


# -- GradScaler ----------------------------------------------------------------------
def _scaled_run(make, wrap, steps, inf_at=None, unscale=False):
    model = _model()
    opt = make(list(model.parameters()))
    if wrap:
        opt = th.HealthCheckedOptimizer(opt, policy={"nonfinite": "raise"})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(steps):
        x, y = _batch(i)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if i == inf_at:
            model[0].weight.grad[0, 0] = float("inf")
        if unscale:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    return model, opt, scaler


@pytest.mark.parametrize("name", ["Adam", "Adam-fused", "SGD-fused"])
@pytest.mark.parametrize("unscale", [False, True])
def test_grad_scaler_bit_identical_and_skips_recorded_once(name, unscale):
    ref, _, ref_scaler = _scaled_run(OPTIMIZERS[name], False, 4, inf_at=2, unscale=unscale)
    model, opt, scaler = _scaled_run(OPTIMIZERS[name], True, 4, inf_at=2, unscale=unscale)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), model.parameters()))
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0**9
    assert opt.steps == 4 and opt.skipped_steps == 1  # recorded once, no raise
    assert not hasattr(opt.optimizer, "found_inf") and not hasattr(opt, "found_inf")


def test_grad_scaler_skip_is_reported_as_the_scalers_and_stats_are_unscaled():
    reports = []
    model = _model()
    opt = th.HealthCheckedOptimizer(O.Adam(model.parameters(), lr=0.01), on_report=reports.append)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = _batch(0)
    for i in range(2):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if i == 1:
            model[0].weight.grad[0, 0] = float("inf")
            model[0].weight.grad[0, 1] = float("nan")
        scaler.step(opt)
        scaler.update()
    first, second = reports
    plain = _model()
    torch.nn.functional.mse_loss(plain(x), y).backward()
    want = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in plain.parameters())).item()
    assert first.grad_norm == pytest.approx(want, rel=1e-5)  # unscaled
    assert second.skipped and not second.findings
    assert any("GradScaler skipped" in a for a in second.actions)
    assert opt.step_was_skipped and opt.skipped_steps == 1


def test_found_inf_reaches_a_fused_inner_optimizer_on_the_device():
    model = _model()
    inner = O.AdamW(model.parameters(), lr=0.01, fused=True)
    seen = []
    inner.register_step_pre_hook(
        lambda o, a, k: seen.append((getattr(o, "found_inf", None), hasattr(o, "grad_scale"))))
    opt = th.HealthCheckedOptimizer(inner, sync="never")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i in range(2):
        x, y = _batch(i)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if i == 1:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert [(f.item(), has_scale) for f, has_scale in seen] == [(0.0, False), (1.0, False)]
    assert opt.skipped_steps == 1 and not hasattr(inner, "found_inf")


def test_state_dict_hooks_registered_on_the_wrapper_run_in_order():
    model = _model()
    opt = th.HealthCheckedOptimizer(O.Adam(model.parameters(), lr=0.01), model=model)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append(("pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(("load", sd.get("extra"))))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("loaded", o is opt)))
    sd = opt.state_dict()
    assert sd["extra"] == 1 and "torchhealth" in sd
    opt.load_state_dict(sd)
    assert seen == [("pre", True), ("load", 1), ("loaded", True)]
