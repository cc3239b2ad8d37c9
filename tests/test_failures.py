"""The failures people actually hit, on synthetic data (CPU): each is caught by
the named check within a few steps, and the healthy twin of the same model,
trained with every check set to "raise", raises nothing.

The scenarios are the demo's (`torchhealth.demo.setup`), so the demo shows what
these tests check."""
import math
import warnings

import pytest
import torch

import torchhealth as th
from torchhealth import HealthCheckedOptimizer, demo


def _faulty(name, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", th.HealthWarning)
        s = demo.setup(name)
        reports = demo.train(s, **options)
    first: dict[str, int] = {}
    for r in reports:
        for f in r.findings:
            if f.severity != "info":
                first.setdefault(f.check, r.step)
    return s, reports, first, caught


@pytest.mark.parametrize("name", list(demo.SCENARIOS))
def test_healthy_twin_raises_nothing(name):
    s = demo.setup(name, healthy=True)
    reports = demo.train(s, policy="raise")  # any finding would raise HealthCheckError
    assert len(reports) == s.steps and all(r.ok and not r.findings for r in reports)
    assert all(torch.isfinite(p).all() for p in s.model.parameters())


@pytest.mark.parametrize("name", list(demo.SCENARIOS))
def test_each_scenario_is_caught_by_its_checks_in_order_within_a_few_steps(name):
    s, reports, first, _ = _faulty(name)
    start = s.inject_step or 0
    steps = [first[c] for c in s.expect]  # KeyError: an expected check never fired
    assert steps == sorted(steps)
    if name != "fp16":  # a slow drift: its test asks for a warning well before overflow instead
        assert steps[0] - start <= 2
    assert min(first.values()) >= start  # nothing fired before the fault


def test_adam_lr_1000_explodes_then_goes_nonfinite():
    s, reports, first, caught = _faulty("lr")
    assert first["exploding"] <= 2 and first["exploding"] < first["nonfinite"] <= 4
    r = reports[first["exploding"]]
    (total,) = [f for f in r.findings if f.check == "exploding" and "total" in f.message]
    assert total.value > total.threshold == th.Thresholds().max_norm
    assert any("exploding" in str(w.message) for w in caught)  # default policy: warn
    # the default policy skips the non-finite steps from then on
    assert all(x.skipped for x in reports[first["nonfinite"]:])


def test_deep_sigmoid_stack_vanishes():
    s, reports, first, _ = _faulty("vanishing")
    assert first == {"vanishing": 0}
    (f,) = reports[0].findings
    # the layers nearest the input are named, the last one is not
    assert "net.0.weight" in f.names and "net.24.weight" not in f.names


def test_one_nan_in_one_batch_is_caught_at_that_step_naming_the_parameters():
    s, reports, first, _ = _faulty("nan")
    assert first == {"nonfinite": s.inject_step}
    r = reports[s.inject_step]
    (f,) = r.findings
    assert f.check == "nonfinite" and f.severity == "error"
    assert set(f.names) == {n for n, _ in s.model.named_parameters()}
    assert r.skipped and r.nonfinite("grad") > 0 and r.nonfinite("param") == 0
    # skipped, so training went on from clean parameters
    assert all(torch.isfinite(p).all() for p in s.model.parameters())
    assert sum(x.skipped for x in reports) == 1


def test_nan_with_raise_policy_raises_before_stepping():
    s = demo.setup("nan")
    before = {}

    def remember(report):
        before.update({n: p.detach().clone() for n, p in s.model.named_parameters()})

    with pytest.raises(th.HealthCheckError, match=r"(?s)step 12 .*non-finite gradients") as e:
        demo.train(s, policy={"nonfinite": "raise"}, on_report=remember)
    assert e.value.report.step == 12 and "net.0.weight" in str(e.value)
    assert all(torch.equal(before[n], p) for n, p in s.model.named_parameters())


def test_float16_headroom_warns_before_overflow():
    s, reports, first, _ = _faulty("fp16")
    # first the course (growing ~4000 per step toward 65504), soon after the drift starts
    assert first["headroom"] <= 2 and first["headroom"] < first["nonfinite"] - 5
    (f,) = reports[first["headroom"]].findings
    assert f.names == ["bias"] and "growing toward overflow" in f.message and 0 < f.value <= 20
    # then, one bit from the maximum, the nearness itself
    r = [x for x in reports if any("of overflow" in g.message for g in x.findings)][0]
    (f,) = [g for g in r.findings if "of overflow" in g.message]
    assert f.names == ["bias"] and 0.5 <= f.value < 1.0 and r.step < first["nonfinite"] - 3
    assert all(x.nonfinite() == 0 for x in reports[:first["nonfinite"]])
    bias = [row for row in r.rows if row.name == "bias" and row.role == "param"][0]
    assert 32752 <= bias.absmax < 65504 and bias.saturated == 1
    assert math.isinf(reports[first["nonfinite"]].rows[-2].max)  # then it did overflow


def test_a_layer_cut_off_mid_run_is_dead_after_k_checks():
    s, reports, first, _ = _faulty("dead", thresholds=th.Thresholds(dead_after=4))
    assert s.inject_step == 3 and first == {"dead": 3 + 3}
    (f,) = reports[6].findings
    assert f.severity == "warning" and f.names == ["aux.weight", "aux.bias"]
    assert {r.name for r in reports[6].rows if r.role == "grad"}.isdisjoint(f.names)
    assert all(not r.findings for r in reports[:6])


def test_a_branch_the_loss_never_reaches_is_one_info_finding_not_a_warning():
    torch.manual_seed(0)
    model = demo._MLP([16, 64, 1], aux=True, detach_aux_from=0)  # `aux` never reaches the loss
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    reports = []
    opt = HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model=model,
                                 on_report=reports.append, policy="raise")
    for _ in range(12):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    found = [(r.step, f) for r in reports for f in r.findings]
    ((step, f),) = found
    assert step == th.Thresholds().dead_after - 1 and f.severity == "info" and f.check == "dead"
    assert f.names == ["aux.weight", "aux.bias"] and "does not reach it" in f.message
    assert all(r.ok for r in reports)


def test_relu_with_large_negative_bias_is_dead_and_vanishing():
    s, reports, first, _ = _faulty("relu")
    assert first["vanishing"] == 0 and first["dead"] == th.Thresholds().dead_after - 1
    dead = [f for f in reports[first["dead"]].findings if f.check == "dead"][0]
    assert {"net.0.weight", "net.0.bias", "net.2.weight"} <= set(dead.names)
    assert "net.4.bias" not in dead.names  # the output bias still learns


# -- the demo itself ---------------------------------------------------------------------
def test_demo_run_logs_every_report_and_reports_progress(tmp_path, monkeypatch):
    from torchhealth.sinks import read_jsonl

    monkeypatch.setattr(demo, "_has_matplotlib", lambda: False)  # the HTML is tested below

    seen, progress = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error", th.HealthWarning)  # run() keeps them in the Reports
        for _ in range(2):  # a second run replaces the log, it does not append to it
            seen.clear(), progress.clear()
            reports = demo.run("nan", steps=8, log_dir=tmp_path, on_report=seen.append,
                               progress=lambda i, n: progress.append((i, n)))
    assert [r.step for r in reports] == list(range(8)) and seen == reports
    assert progress == [(i, 8) for i in range(1, 9)]
    assert [r.to_dict() for r in read_jsonl(tmp_path / "run.jsonl")] == [r.to_dict() for r in reports]
    assert [r.step for r in reports if r.findings] == [4] and reports[4].skipped
    assert all(r.rows[0].hist for r in reports)  # histograms on, for the HTML report
    assert not (tmp_path / "report.html").exists()


def test_demo_main_tells_the_story(tmp_path, capsys):
    assert demo.main(["--scenario", "nan", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in ("injected  : at step 12 one value of one input batch is NaN",
                 "first finding at step 12", "The report of step 12", "net.0.weight",
                 "What was done: skip: nonfinite", str(tmp_path / "run.jsonl")):
        assert text in out, text
    if demo._has_matplotlib():
        assert f"Report: {tmp_path / 'report.html'}" in out
        assert "<td>nonfinite</td>" in (tmp_path / "report.html").read_text()
    else:
        assert "Report: not written (needs matplotlib" in out
    with pytest.raises(SystemExit):
        demo.main(["--scenario", "nope"])
