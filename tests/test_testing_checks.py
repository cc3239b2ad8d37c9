"""check_model and the assert_* functions beyond the bug zoo: bad input, the
user's model left untouched, one tensor_stats call per group, each check's
verdicts, and the report."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchhealth
from torchhealth import testing as T
from torchhealth.testing.activations import leaf_calls

from test_bug_zoo import one_thread  # noqa: F401  (autouse fixture)

CE = nn.CrossEntropyLoss()


def mlp(out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, out))


BATCH = T.data.blobs(64).batch(32)


@pytest.mark.parametrize("batch,error,phrase", [
    ([[1.0, 2.0]], TypeError, "batch[0] is a list, not a tensor"),
    ({"x": 1.0}, TypeError, "batch['x'] is a float, not a tensor"),
    ("abc", TypeError, "batch must be a tensor, a tuple/list of tensors"),
    ((torch.ones(4, 2), torch.ones(3, 2), torch.ones(4)), ValueError, "same batch dimension 0"),
])
def test_bad_batch_is_a_clear_error(batch, error, phrase):
    with pytest.raises(error, match=None) as info:
        T.check_model(mlp(), batch, CE)
    assert phrase in str(info.value)


def test_loss_that_is_not_a_scalar_is_a_clear_error():
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor; it returned "
                                         r"shape \[32\]"):
        T.check_model(mlp(), BATCH, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor; it returned a float"):
        T.check_model(mlp(), BATCH, lambda out, y: 1.0)


def test_model_without_trainable_parameters_is_a_clear_error():
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="Sequential has no trainable parameters"):
        T.check_model(frozen, BATCH, CE)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        T.check_model(nn.ReLU(), BATCH, CE)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        T.check_model(lambda x: x, BATCH, CE, frozen=["fc"])


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown check name\(s\) \['conected'\]"):
        T.check_model(mlp(), BATCH, CE, checks=["conected"])
    with pytest.raises(ValueError, match="frozen: the model has no parameter or module named 'fc9'"):
        T.check_model(mlp(), BATCH, CE, frozen=["fc9"])


def test_the_users_model_optimizer_and_rng_are_untouched():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    model.eval()
    rng = torch.get_rng_state()
    report = T.check_model(model, BATCH, CE, optimizer=opt, classes=3)
    assert report.ok, str(report)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and not opt.state and torch.equal(rng, torch.get_rng_state())
    assert all(not m._forward_hooks for m in model.modules())


def test_one_tensor_stats_call_per_group(monkeypatch):
    calls = []
    real = torchhealth.tensor_stats
    monkeypatch.setattr(torchhealth, "tensor_stats", lambda ts, **kw: calls.append(len(ts)) or real(ts, **kw))
    T.check_model(mlp(), BATCH, CE, checks=["finite", "connected", "params_update",
                                            "batch_independent"])
    # activations (3 leaf modules + output), parameters, gradients, changes, one row per
    # (input, sample) for batch independence
    assert calls == [4, 4, 4, 4, 32]


def test_an_optimizer_that_leaves_a_layer_out_freezes_it():
    model = mlp()
    opt = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    assert T.check_model(model, BATCH, CE, optimizer=opt, frozen=[model[0]],
                         checks=["frozen", "params_update"]).ok
    report = T.check_model(model, BATCH, CE, frozen=["0"], checks=["frozen"])  # default Adam
    assert report["frozen"].failed and report["frozen"].names == ("0.weight", "0.bias")


def test_optimizer_factory():
    report = T.assert_params_update(mlp(), BATCH, CE,
                                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert report["params_update"].passed and len(report) == 1


def test_output_range():
    sig = nn.Sequential(mlp(1), nn.Sigmoid())
    x, y = BATCH
    bce = nn.BCELoss()
    assert T.assert_output_range(sig, (x, y[:, None].float().clamp(max=1)), bce,
                                 output_range=(0, 1))["output_range"].passed
    with pytest.raises(AssertionError, match=r"outside the expected \[0, 1\] \(a missing sigmoid"):
        T.assert_output_range(mlp(1), (x, y[:, None].float()), nn.MSELoss(), output_range=(0, 1))
    assert T.check_model(mlp(), BATCH, CE, checks=["output_range"])["output_range"].status \
        is T.Status.NOT_APPLICABLE


class Sqrt(nn.Module):
    def forward(self, x):
        return x.sqrt()


def test_finite_names_the_first_module_that_makes_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), Sqrt(), nn.Linear(8, 3))
    with pytest.raises(AssertionError, match="the first in forward order is the activation of 1"):
        T.assert_finite(model, BATCH, CE)
    assert T.assert_finite(mlp(), BATCH, CE)["finite"].passed


def test_nll_loss_without_log_softmax():
    report = T.check_model(mlp(), BATCH, nn.NLLLoss(), checks=["logits"])
    assert report["logits"].failed and "a missing log_softmax" in report["logits"].message
    logsm = nn.Sequential(mlp(), nn.LogSoftmax(1))
    assert T.check_model(logsm, BATCH, nn.NLLLoss(), checks=["logits"])["logits"].passed
    # a loss the suite cannot classify is not applicable unless output_kind= says what it expects
    loss = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    assert T.check_model(mlp(), BATCH, loss, checks=["logits"])["logits"].status \
        is T.Status.NOT_APPLICABLE
    assert T.check_model(nn.Sequential(mlp(), nn.Softmax(1)), BATCH, loss, checks=["logits"],
                         output_kind="logits")["logits"].failed


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 8), nn.Linear(3, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, z):
        return self.head(F.relu(self.bn(self.a(x) + self.b(z))))


def test_several_inputs_dicts_and_batch_norm_no_false_alarm():
    torch.manual_seed(0)
    x, y = BATCH
    z = torch.randn(32, 3)
    model = TwoInputs()
    report = T.check_model(model, (x, z, y), CE, classes=3)
    assert report.ok and report["batch_independent"].passed, str(report)

    class Kw(TwoInputs):
        def forward(self, x, z):
            return super().forward(x, z)

    torch.manual_seed(0)
    assert T.assert_batch_independent(Kw(), {"x": x, "z": z, "labels": y}, CE).ok


def test_batch_of_one_sample_is_not_applicable_for_batch_independence():
    x, y = BATCH
    r = T.check_model(mlp(), (x[:1], y[:1]), CE, checks=["batch_independent"])
    assert r["batch_independent"].status is T.Status.NOT_APPLICABLE
    assert "single sample" in r["batch_independent"].message


def test_init_loss_tolerance_and_expected_value():
    x, y = BATCH
    big = mlp()
    with torch.no_grad():
        big[2].weight.mul_(50)
    with pytest.raises(AssertionError, match="initial outputs too large"):
        T.assert_init_loss(big, BATCH, CE, classes=3)
    T.assert_init_loss(mlp(1), (x, torch.zeros(32, 1)), nn.MSELoss(), expected_init_loss=0.2,
                       init_loss_rtol=5.0)


def test_overfit_fails_for_a_model_that_cannot_fit():
    torch.manual_seed(0)
    x = torch.randn(32, 2)
    y = torch.randint(0, 3, (32,))  # random labels on a linear model: not fittable
    with pytest.raises(AssertionError, match="the model cannot fit one batch"):
        T.assert_overfits_batch(nn.Linear(2, 3), (x, y), CE, overfit_steps=30)
    assert T.check_model(mlp(), BATCH, CE, checks=["overfits"], overfit_steps=0)["overfits"] \
        .status is T.Status.NOT_APPLICABLE


def test_model_that_raises_is_reported_not_swallowed_silently():
    def broken(out, y):
        raise KeyError("no such head")

    report = T.check_model(mlp(), BATCH, broken)
    assert report["forward"].failed and "loss_fn raised KeyError" in report["forward"].message
    assert report["connected"].status is T.Status.NOT_APPLICABLE


def test_leaf_calls_removes_its_hooks_even_on_error():
    model = mlp()
    with pytest.raises(RuntimeError):
        with leaf_calls(model) as calls:
            model(torch.ones(2, 2))
            raise RuntimeError("stop")
    assert [c.name for c in calls] == ["0", "1", "2"]
    assert all(not m._forward_hooks for m in model.modules())


def test_report_text_dict_and_lookup():
    report = T.check_model(mlp(), BATCH, CE, classes=3, overfit_steps=0)
    text = str(report)
    assert text.startswith("SanityReport of Sequential: 0 failed,")
    assert "[passed] connected" in text and "[not applicable] overfits: overfit_steps=0" in text
    json.dumps(report.to_dict())
    assert "connected" in report and "nope" not in report
    with pytest.raises(KeyError, match="no check named 'nope'"):
        report["nope"]
    assert report.raise_if_failed() is report


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(x).detach()


def test_a_fully_detached_output_is_reported_not_a_crash():
    report = T.check_model(Detached(), BATCH, CE, classes=3)
    assert report["connected"].failed and report["connected"].names == ("fc.weight", "fc.bias")
    assert report["batch_independent"].status is T.Status.NOT_APPLICABLE
    assert report["overfits"].failed and report["params_update"].failed
