"""Gradients zero by construction, one finding per cause, thresholds that
scale: the checks as pure functions on hand-made statistics, and the module
facts the collector finds."""

import pytest
import torch
from torch import nn

from torchhealth import checks as C
from torchhealth.collect import structural_facts
from torchhealth.report import Finding, Report

from test_checks import NoHostReads, fired, stats

TH = C.Thresholds()


def layer(bias_rms, weight_rms=1e-2, reason="", dtype=torch.float32, numel=100):
    """One module "l" (weight, bias) and a second one "m", with gradients of the given RMS."""
    names = ["l.weight", "l.weight", "l.bias", "l.bias", "m.weight", "m.weight"]
    layout = C.Layout(names=names, roles=["param", "grad"] * 3, dtypes=[dtype] * 6,
                      structural=["", reason, ""], modules=["l", "l", "m"])
    rows = []
    for rms in (weight_rms, bias_rms, 1e-2):
        rows += [{"numel": numel}, {"numel": numel, "sumsq": numel * rms * rms,
                                    "zero": numel if rms == 0 else 0}]
    return stats(*rows), layout


def check(s, layout, state, th=TH):
    signals, state = C.run_checks(s, layout, th, state)
    by = {(x.check, x.kind): x for x in signals}
    return by, state


def test_a_bias_before_a_norm_is_recognised_once_and_never_a_vanishing_or_dead_finding():
    s, layout = layer(1e-10, reason="feeds BatchNorm2d bn")
    state = C.RunningState.zeros(3)
    with NoHostReads():
        by, state = check(s, layout, state)
    info = by[("vanishing", "structural")]
    assert info.severity == "info" and not bool(info.fired)  # no policy acts on a fact
    assert info.mask.tolist() == [False, True, False] and info.value.item() == pytest.approx(1e-8)
    assert not bool(by[("vanishing", "relative")].fired)
    assert state.structural.tolist() == [C.LEARNS, C.STRUCTURAL, C.LEARNS]
    # later checks: not reported again, still excluded, exact zeros included, never dead
    zero, _ = layer(0.0, reason="feeds BatchNorm2d bn")
    for _ in range(5):
        by, state = check(zero, layout, state)
        assert not by[("vanishing", "structural")].mask.any()
        assert not any(bool(by[k].fired) for k in by)
    # a real gradient: checked like any other parameter from then on
    _, state = check(layer(1e-2)[0], layout, state)
    by, state = check(layer(1e-10)[0], layout, state)
    assert state.structural.tolist()[1] == C.LEARNS and bool(by[("vanishing", "relative")].fired)


def test_statistics_alone_recognise_a_rounding_level_gradient_but_not_exact_zeros():
    state = C.RunningState.zeros(3)
    by, state = check(*layer(1e-10), state)  # 1e-8 of its weight's: rounding, float32
    assert by[("vanishing", "structural")].mask.tolist() == [False, True, False]
    for rms in (0.0, 1e-4):  # a cut path; a small but real gradient (1e-2 of its weight's)
        by, new = check(*layer(rms), C.RunningState.zeros(3))
        assert not by[("vanishing", "structural")].mask.any() and new.structural[1] == C.LEARNS
    # bfloat16: its rounding is coarser (sqrt(eps) = 0.088, capped at structural_rms)
    by, _ = check(*layer(5e-5, dtype=torch.bfloat16), C.RunningState.zeros(3))
    assert by[("vanishing", "structural")].mask.tolist() == [False, True, False]
    by, _ = check(*layer(5e-5), C.RunningState.zeros(3))  # float32: 5e-3 is no rounding
    assert not by[("vanishing", "structural")].mask.any()


def test_parameters_of_unknown_modules_are_not_compared():
    s, layout = layer(1e-10)
    layout = C.Layout(names=layout.names, roles=layout.roles, dtypes=layout.dtypes)
    by, _ = check(s, layout, C.RunningState.zeros(3))
    assert not by[("vanishing", "structural")].mask.any() and bool(by[("vanishing", "relative")].fired)


def test_only_from_the_first_check_on():
    state = C.RunningState.zeros(3)
    _, state = check(*layer(1e-2), state)
    by, state = check(*layer(1e-10), state)  # vanishes later: a finding, not a fact
    assert not by[("vanishing", "structural")].mask.any() and bool(by[("vanishing", "relative")].fired)


def test_running_state_round_trips_and_old_checkpoints_load():
    _, state = check(*layer(1e-10), C.RunningState.zeros(3))
    d = state.state_dict()
    assert torch.equal(C.RunningState.from_state_dict(d).structural, state.structural)
    d["peak"] = torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64)
    assert torch.equal(C.RunningState.from_state_dict(d).peak, d["peak"])
    old = {k: v for k, v in d.items() if k not in ("structural", "peak")}
    back = C.RunningState.from_state_dict(old)
    assert back.structural.tolist() == [C.UNDECIDED] * 3 and back.peak.tolist() == [0.0] * 3


def _pg(*norms, nan=()):
    rows = []
    for i, n in enumerate(norms):
        rows += [{}, {"sumsq": n * n, "nan": 1 if i in nan else 0}]
    names = [x for i in range(len(norms)) for x in (f"p{i}", f"p{i}")]
    return stats(*rows), C.Layout(names=names, roles=["param", "grad"] * len(norms),
                                  dtypes=[torch.float32] * len(rows))


def test_an_exploding_norm_is_not_also_a_vanishing_one():
    s, layout = _pg(1e5, 1e-3)  # 1e-8 of the largest: small only next to the explosion
    by, _ = check(s, layout, C.RunningState.zeros(2))
    assert bool(by[("exploding", "total")].fired) and not bool(by[("vanishing", "relative")].fired)
    by, _ = check(*_pg(1.0, 1e-8), C.RunningState.zeros(2))
    assert bool(by[("vanishing", "relative")].fired)  # without the explosion it is one


def test_non_finite_gradients_give_no_exploding_finding_and_teach_no_baseline():
    s, layout = _pg(1e5, 1e5, nan=(0,))
    by, state = check(s, layout, C.RunningState.zeros(2))
    assert bool(by[("nonfinite", "grad")].fired)
    assert not bool(by[("exploding", "total")].fired)
    assert by[("exploding", "param")].mask.tolist() == [False, False, False, True]  # other values
    assert state.count.item() == 0


def test_an_overflowed_float16_tensor_is_the_nonfinite_checks_not_a_headroom_warning():
    s = stats({"absmax": 60000.0, "posinf": 1}, {"absmax": 60000.0})
    layout = C.Layout(names=["a", "b"], roles=["grad", "grad"], dtypes=[torch.float16] * 2)
    assert fired(C.headroom(s, layout, TH, C.RunningState.zeros(2))[0], "headroom", "overflow")[:2] == (True, [False, True])


def test_relative_limit_scales_with_the_number_of_gradient_tensors():
    assert C.relative_rms_limit(_pg(*[1.0] * 10)[1], TH) == TH.min_relative_rms
    assert C.relative_rms_limit(_pg(*[1.0] * 400)[1], TH) == pytest.approx(TH.min_relative_rms / 2)
    th = C.Thresholds(relative_rms_tensors=400)
    assert C.relative_rms_limit(_pg(*[1.0] * 400)[1], th) == TH.min_relative_rms


def test_info_finding_says_why_and_the_primary_field_round_trips():
    s, layout = layer(1e-10, reason="feeds BatchNorm2d bn, ... redundant")
    by, _ = check(s, layout, C.RunningState.zeros(3))
    sig = by[("vanishing", "structural")]
    report = Report.from_stats(0, s, layout.names, layout.roles, layout.shapes, layout.dtypes)
    f = C.finding(sig, False, sig.mask.tolist(), sig.value.item(), report.rows, layout.param_names,
                  notes=layout.structural)
    assert f.severity == "info" and f.names == ["l.bias"] and "BatchNorm2d" in f.message
    assert C.finding(by[("vanishing", "relative")], False, [False] * 6, 0.0, report.rows,
                     layout.param_names) is None
    p = Finding("exploding", "error", "x", primary=True)
    assert Finding.from_dict(p.to_dict()) == p and Finding.from_dict(f.to_dict()) == f
    assert "primary" not in f.to_dict()  # logs written before the field read the same


@pytest.mark.parametrize("layers, redundant", [
    ((nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), True),
    ((nn.Linear(4, 8), nn.BatchNorm1d(8)), True),
    ((nn.Conv1d(3, 8, 3), nn.InstanceNorm1d(8)), True),
    ((nn.Conv2d(3, 8, 3), nn.GroupNorm(8, 8)), True),
    ((nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)), False),  # removes one mean per 4 channels
    ((nn.Linear(4, 8), nn.LayerNorm(8)), False),  # removes one mean per token, not per feature
    ((nn.Linear(4, 8), nn.BatchNorm1d(6)), False),  # not its input (channel count)
    ((nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8)), False),  # a constant does not pass a ReLU
])
def test_structural_facts_bias_before_norm(layers, redundant):
    model = nn.Sequential(*layers)
    facts = structural_facts(model)
    assert (id(model[0].bias) in facts) == redundant and len(facts) == redundant


def test_structural_facts_attention_key_bias_and_fused_projections():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    model = nn.ModuleDict({"a": Attn(), "mha": nn.MultiheadAttention(8, 2)})
    facts = structural_facts(model)
    assert list(facts) == [id(model["a"].k_proj.bias)] and "softmax" in facts[id(model["a"].k_proj.bias)]
