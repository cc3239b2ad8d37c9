"""Healthy standard models trained with the default settings raise no alarm
(issue 15): gradients that are zero by construction are facts, reported once
as info, and one cause gives one finding."""
import warnings

import pytest
import torch
from torch import nn

import torchhealth as th
from torchhealth import demo


def _train(model, batch, loss_fn, steps, lr=1e-3, **options):
    """Trains with Adam under HealthCheckedOptimizer; returns the Reports and the
    HealthWarnings that are not about an info finding."""
    reports = []
    opt = th.HealthCheckedOptimizer(torch.optim.Adam(model.parameters(), lr=lr), model=model,
                                    on_report=reports.append, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", th.HealthWarning)
        for i in range(steps):
            x, y = batch(i)
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        opt.flush()
    info = {f.message for r in reports for f in r.findings if f.severity == "info"}
    alarms = [str(w.message) for w in caught if issubclass(w.category, th.HealthWarning)
              and not any(m in str(w.message) for m in info)]
    return reports, alarms


def _images(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)


def _info(reports):
    return [(r.step, f) for r in reports for f in r.findings if f.severity == "info"]


def test_conv_bias_before_batch_norm_is_a_fact_not_a_vanishing_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1, bias=True), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    reports, alarms = _train(model, _images, lambda m, x, y: nn.functional.cross_entropy(m(x), y), 40)
    assert len(reports) == 40 and alarms == []
    assert all(r.ok for r in reports)
    (step, f), = _info(reports)  # once, at the first check
    assert step == 0 and f.check == "vanishing" and set(f.names) == {"0.bias", "3.bias"}
    assert "BatchNorm2d" in f.message and "redundant" in f.message


def _bert():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32)
    return transformers.BertForMaskedLM(cfg)


def test_bert_attention_key_bias_gets_one_info_finding_and_no_warning():
    model = _bert()
    tokens = lambda i: (torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(i)), None)
    reports, alarms = _train(model, tokens, lambda m, x, y: m(input_ids=x, labels=x).loss, 40)
    assert alarms == [] and all(r.ok for r in reports)
    (step, f), = _info(reports)
    keys = [f"bert.encoder.layer.{i}.attention.self.key.bias" for i in range(2)]
    assert step == 0 and sorted(f.names) == keys
    assert "softmax" in f.message and "redundant" in f.message and not f.primary


def test_adam_lr_1000_explodes_without_vanishing_on_the_same_step():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", th.HealthWarning)
        s = demo.setup("lr")
        reports = demo.train(s)
    exploding = [r for r in reports if any(f.check == "exploding" for f in r.findings)]
    assert exploding
    for r in exploding:
        assert not any(f.check == "vanishing" for f in r.findings), r
        assert [f.check for f in r.findings if f.primary] == ["exploding"]
    for r in reports:  # non-finite values: one finding, not exploding or vanishing too
        if any(f.check == "nonfinite" and "gradient" in f.message for f in r.findings):
            assert {f.check for f in r.findings} == {"nonfinite"}
            assert sum(f.primary for f in r.findings) == 1 and r.findings[0].primary


def test_an_info_finding_is_never_acted_on_by_the_policy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 10 * 10, 10))
    reports, alarms = _train(model, _images, lambda m, x, y: nn.functional.cross_entropy(m(x), y), 3,
                             policy="raise")  # with a callback, so every report is dispatched
    assert [f.severity for r in reports for f in r.findings] == ["info"]
