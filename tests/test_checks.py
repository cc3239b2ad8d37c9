"""The checks as pure functions: hand-made `TensorStats` in, `Signal`s out,
without a model, an optimizer or a host read."""
import dataclasses
import math
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from torchhealth import checks as C, tensor_stats
from torchhealth.report import Report
from torchhealth.stats import TensorStats

# Tensor methods that bring a value to the host (a device sync on CUDA).
HOST_READS = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
              "__complex__", "__array__", "equal", "allclose", "is_nonzero", "nonzero",
              "masked_select", "unique"}


class NoHostReads(TorchFunctionMode):
    """Fails on any tensor operation that reads a value into Python: code run
    inside it provably does not synchronise with the device. With
    ``only_torchhealth``, reads made by other code (an inner optimizer's own)
    are let through."""

    def __init__(self, only_torchhealth: bool = False):
        super().__init__()
        self.only_torchhealth = only_torchhealth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS:
            caller = sys._getframe(1).f_code.co_filename
            if not self.only_torchhealth or "/torchhealth/" in caller:
                raise AssertionError(f"host read: {name} in {caller}")
        return func(*args, **(kwargs or {}))


def stats(*rows) -> TensorStats:
    """TensorStats from dicts of fields (unset: a finite tensor of 10 ones)."""
    counts, values = [], []
    for r in rows:
        numel = r.get("numel", 10)
        counts.append([numel, r.get("nan", 0), r.get("posinf", 0), r.get("neginf", 0),
                       r.get("zero", 0), r.get("subnormal", 0), r.get("saturated", 0)])
        values.append([r.get("min", 1.0), r.get("max", 1.0), r.get("absmax", 1.0),
                       r.get("sum", float(numel)), r.get("sumsq", float(numel))])
    return TensorStats._pack(torch.tensor(counts, dtype=torch.int64),
                             torch.tensor(values, dtype=torch.float64), None)


def rows(*spec, dtype=torch.float32, **kw) -> C.Layout:
    """Layout from (name, role) pairs."""
    return C.Layout(names=[n for n, _ in spec], roles=[r for _, r in spec],
                  dtypes=[dtype] * len(spec), **kw)


PG = rows(("a", "param"), ("a", "grad"), ("b", "param"), ("b", "grad"))
TH = C.Thresholds()


def headroom(s, r, th=TH):
    """The headroom signals of a first check (no earlier peak)."""
    return C.headroom(s, r, th, C.RunningState.zeros(len(r.param_names)))[0]


def fired(signals, check, kind):
    (s,) = [s for s in signals if s.check == check and s.kind == kind]
    return bool(s.fired), s.mask.tolist(), s.value.item()


# -- nonfinite ---------------------------------------------------------------------------
def test_nonfinite_names_the_rows_by_role():
    s = stats({}, {"nan": 2, "posinf": 1}, {"neginf": 1}, {})
    sig = C.nonfinite(s, PG)
    assert fired(sig, "nonfinite", "grad") == (True, [False, True, False, False], 3.0)
    assert fired(sig, "nonfinite", "param") == (True, [False, False, True, False], 1.0)
    assert fired(sig, "nonfinite", "state")[0] is False
    assert not any(x.fired for x in C.nonfinite(stats({}, {}, {}, {}), PG))


def test_nonfinite_gradients_found_by_a_grad_scaler_are_not_a_finding():
    s = stats({}, {"posinf": 1}, {"nan": 1}, {})
    sig = C.nonfinite(s, PG, found_inf=torch.tensor([1.0]))
    assert fired(sig, "nonfinite", "grad")[0] is False
    assert fired(sig, "nonfinite", "param")[0] is True  # parameters are still the model's fault
    assert fired(C.nonfinite(s, PG, found_inf=torch.tensor([0.0])), "nonfinite", "grad")[0]


def test_nonfinite_optimizer_state():
    r = rows(("a", "param"), ("a", "grad"), ("a", "state.exp_avg_sq"))
    sig = C.nonfinite(stats({}, {}, {"posinf": 4}), r)
    assert fired(sig, "nonfinite", "state") == (True, [False, False, True], 4.0)


# -- exploding ---------------------------------------------------------------------------
def _grad_norms(*norms):
    return stats(*[x for n in norms for x in ({}, {"sumsq": n * n})])


def test_exploding_absolute_limits():
    th = C.Thresholds(max_norm=100.0, max_param_norm=80.0)
    state = C.RunningState.zeros(2)
    sig, _ = C.exploding(_grad_norms(60.0, 60.0), PG, th, state)  # total 84.9
    assert fired(sig, "exploding", "total")[0] is False
    assert fired(sig, "exploding", "param")[0] is False
    sig, _ = C.exploding(_grad_norms(90.0, 10.0), PG, th, state)
    assert fired(sig, "exploding", "param") == (True, [False, True, False, False], 90.0)
    ok, _, value = fired(sig, "exploding", "total")
    assert not ok and value == pytest.approx(math.hypot(90, 10))
    sig, _ = C.exploding(_grad_norms(75.0, 75.0), PG, th, state)
    assert fired(sig, "exploding", "total") == (True, [True], pytest.approx(75 * math.sqrt(2)))


def test_spike_against_running_baseline_is_warmup_aware():
    th = C.Thresholds(warmup=5, spike_factor=10.0)
    state = C.RunningState.zeros(2)
    # A spike during warm-up does not fire (there is no baseline yet).
    sig, state = C.exploding(_grad_norms(1.0, 1.0), PG, th, state)
    assert fired(sig, "exploding", "spike")[0] is False
    for n in (1.1, 0.9, 1.0, 1.05):
        sig, state = C.exploding(_grad_norms(n, n), PG, th, state)
        assert fired(sig, "exploding", "spike")[0] is False
    assert state.count.item() == 5
    base = state.mean.clone()
    sig, after = C.exploding(_grad_norms(50.0, 50.0), PG, th, state)
    ok, _, ratio = fired(sig, "exploding", "spike")
    assert ok and ratio == pytest.approx(50.0 / math.exp(base.item()) * math.sqrt(2), rel=1e-9)
    # The spike does not teach the baseline; a normal step after it does not fire.
    assert torch.equal(after.mean, base) and after.count.item() == 5
    sig, after = C.exploding(_grad_norms(3.0, 3.0), PG, th, after)
    assert fired(sig, "exploding", "spike")[0] is False and after.count.item() == 6


def test_spike_baseline_skips_nonfinite_and_scaler_skipped_steps():
    th = C.Thresholds(warmup=1)
    state = C.RunningState.zeros(2)
    _, state = C.exploding(_grad_norms(0.0, 0.0), PG, th, state)  # log(0) = -inf: not learnt
    assert state.count.item() == 0
    _, state = C.exploding(_grad_norms(1.0, 1.0), PG, th, state, found_inf=torch.tensor([1.0]))
    assert state.count.item() == 0
    _, state = C.exploding(_grad_norms(1.0, 1.0), PG, th, state)
    assert state.count.item() == 1 and state.mean.item() == pytest.approx(math.log(math.sqrt(2)))


# -- vanishing ---------------------------------------------------------------------------
def test_vanishing_total_norm():
    th = C.Thresholds(min_norm=1e-6)
    sig = C.vanishing(_grad_norms(1e-7, 1e-7), PG, th)
    assert fired(sig, "vanishing", "total")[0] is True
    assert fired(C.vanishing(_grad_norms(1e-5, 0.0), PG, th), "vanishing", "total")[0] is False
    # non-finite gradients are the nonfinite check's, not a vanishing norm
    s = stats({}, {"nan": 10, "sumsq": 0.0}, {}, {"sumsq": 0.0})
    assert not any(x.fired for x in C.vanishing(s, PG, th))


def test_vanishing_relative_rms():
    sig = C.vanishing(_grad_norms(1.0, 1e-7), PG, TH)
    assert fired(sig, "vanishing", "relative")[:2] == (True, [False, False, False, True])
    assert fired(C.vanishing(_grad_norms(1.0, 1e-5), PG, TH), "vanishing", "relative")[0] is False


def test_vanishing_zero_fraction_skips_embedding_tables():
    s = stats({}, {"zero": 995, "numel": 1000}, {}, {"zero": 990, "subnormal": 9, "numel": 1000})
    sig = C.vanishing(s, PG, C.Thresholds(max_zero_fraction=0.99))
    ok, mask, value = fired(sig, "vanishing", "zeros")
    assert ok and mask == [False, True, False, True] and value == pytest.approx(0.999)
    r = rows(("a", "param"), ("a", "grad"), ("b", "param"), ("b", "grad"))
    r.sparse = [True, False]
    r._device_cache.clear()
    assert fired(C.vanishing(s, r, TH), "vanishing", "zeros")[1] == [False, False, False, True]


# -- headroom ----------------------------------------------------------------------------
def test_headroom_only_in_low_precision():
    s = stats({"absmax": 40000.0, "saturated": 3}, {"absmax": 100.0})
    r = C.Layout(names=["a", "a"], roles=["param", "grad"], dtypes=[torch.float16, torch.float16])
    ok, mask, use = fired(headroom(s, r, TH), "headroom", "overflow")
    assert ok and mask == [True, False] and use == pytest.approx(40000 / 65504)
    r32 = C.Layout(names=["a", "a"], roles=["param", "grad"], dtypes=[torch.float32] * 2)
    assert not any(x.fired for x in headroom(s, r32, TH))
    assert fired(headroom(s, r, C.Thresholds(headroom=0.75)), "headroom", "overflow")[0] is False


@pytest.mark.parametrize("dtype, near, far", [(torch.float8_e4m3fn, 300.0, 100.0),
                                              (torch.float8_e5m2, 40000.0, 20000.0)])
def test_headroom_of_float8_against_the_formats_own_maximum(dtype, near, far):
    s = stats({"absmax": near}, {"absmax": far})
    r = C.Layout(names=["a", "a"], roles=["param", "grad"], dtypes=[dtype, dtype])
    ok, mask, use = fired(headroom(s, r), "headroom", "overflow")
    assert ok and mask == [True, False] and use == pytest.approx(near / torch.finfo(dtype).max)


def test_headroom_underflow_bfloat16():
    tiny = torch.finfo(torch.bfloat16).tiny
    s = stats({"numel": 100, "zero": 50, "subnormal": 1, "sumsq": tiny ** 2 / 2},
              {"numel": 100, "subnormal": 2, "sumsq": tiny ** 2})
    r = C.Layout(names=["a", "a"], roles=["param", "grad"], dtypes=[torch.bfloat16] * 2)
    ok, mask, frac = fired(headroom(s, r, C.Thresholds(max_subnormal_fraction=0.015)),
                           "headroom", "underflow")
    assert ok and mask == [True, True] and frac == pytest.approx(0.02)
    # the same subnormals in a tensor whose norm dwarfs their lost precision: nothing lost
    s = stats({"numel": 100, "subnormal": 30, "sumsq": 1e-6}, {"numel": 100, "subnormal": 30})
    r16 = C.Layout(names=["a", "a"], roles=["param", "grad"], dtypes=[torch.float16] * 2)
    assert fired(headroom(s, r16, TH), "headroom", "underflow")[:2] == (False, [False, False])


def test_a_float16_parameter_on_course_to_overflow_is_caught_before_it_gets_near():
    r = C.Layout(names=["w", "w"], roles=["param", "grad"], dtypes=[torch.float16] * 2)
    state, courses = C.RunningState.zeros(1), []
    for absmax in (0.5, 4000.0, 8000.0, 12000.0):  # +4000 per check: 65504 in ~14 more
        (sigs, state) = C.headroom(stats({"absmax": absmax}, {"absmax": 1.0}), r, TH, state)
        courses.append(fired(sigs, "headroom", "course"))
        assert not fired(sigs, "headroom", "overflow")[0]
    assert [c[0] for c in courses] == [False, True, True, True]
    assert courses[1][1] == [True, False] and courses[1][2] == pytest.approx((65504 - 4000) / 3999.5, rel=1e-3)
    assert state.peak.item() == pytest.approx(12000 / 65504)
    # slow growth (or large values that stay put, or float32) is no course to overflow
    for grow, dtype in ((10.0, torch.float16), (0.0, torch.float16), (4000.0, torch.float32)):
        rr = C.Layout(names=["w", "w"], roles=["param", "grad"], dtypes=[dtype] * 2)
        st = C.RunningState.zeros(1)
        for k in range(4):
            sigs, st = C.headroom(stats({"absmax": 2000.0 + grow * k}, {}), rr, TH, st)
            assert not fired(sigs, "headroom", "course")[0], (grow, dtype, k)
    # the horizon is a threshold: 0 disables it
    st = C.RunningState.zeros(1)
    for absmax in (0.5, 4000.0, 8000.0):
        sigs, st = C.headroom(stats({"absmax": absmax}, {}), r, C.Thresholds(overflow_horizon=0), st)
        assert not fired(sigs, "headroom", "course")[0]


# -- dead --------------------------------------------------------------------------------
def _dead_layout():
    # "b" has no gradient row at all (grad None); "c" is frozen; "a" is alive.
    return C.Layout(names=["a", "a", "b", "c"], roles=["param", "grad", "param", "param"],
                    dtypes=[torch.float32] * 4, param_index=[0, 0, 1, 2], param_names=["a", "b", "c"],
                    trainable=[True, True, False])


def test_dead_after_k_consecutive_checks_of_none_or_zero_grads():
    th, r = C.Thresholds(dead_after=3), _dead_layout()
    # "a" and "b" have had gradients before (the structural check said so).
    state = dataclasses.replace(C.RunningState.zeros(3),
                                structural=torch.tensor([C.LEARNS, C.LEARNS, C.UNDECIDED]))
    for k in range(1, 4):
        (sig, info), state = C.dead(stats({}, {}, {}, {}), r, th, state)
        assert state.dead.tolist() == [0, k, 0] and bool(sig.fired) == (k >= 3)
        assert not info.mask.any() and info.severity == "info"
    assert sig.mask.tolist() == [False, True, False] and sig.axis == "params"
    # An all-zero gradient counts too; a nonzero one resets the counter.
    zero = stats({}, {"zero": 10, "sumsq": 0.0}, {}, {})
    for _ in range(3):
        (sig, _), state = C.dead(zero, r, th, state)
    assert state.dead.tolist() == [3, 6, 0] and sig.mask.tolist() == [True, True, False]
    (sig, _), state = C.dead(stats({}, {}, {}, {}), r, th, state)
    assert state.dead.tolist() == [0, 7, 0]


def test_a_parameter_never_reached_is_info_once_and_not_dead():
    th, r = C.Thresholds(dead_after=3), _dead_layout()
    state = C.RunningState.zeros(3)
    infos = []
    for k in range(1, 7):
        (sig, info), state = C.dead(stats({}, {}, {}, {}), r, th, state)
        assert not bool(sig.fired), k
        infos.append(info.mask.tolist())
    assert infos[2] == [False, True, False] and sum(map(any, infos)) == 1  # once, at check 3
    assert state.structural[1] == C.UNREACHED and state.dead[1] == 0
    f = C.finding(info, False, [False, True, False], 3.0, [], ["a", "b", "c"])
    assert f.severity == "info" and f.names == ["b"] and "does not reach it" in f.message
    # Nobody has a gradient (no backward at all): that is not a configuration, it is dead.
    lone = C.Layout(names=["b"], roles=["param"], dtypes=[torch.float32], param_index=[0],
                    param_names=["b"], trainable=[True])
    state = C.RunningState.zeros(1)
    for _ in range(3):
        (sig, info), state = C.dead(stats({}), lone, th, state)
    assert bool(sig.fired) and not info.mask.any()


# -- all together, on the device ---------------------------------------------------------------
def test_run_checks_never_reads_the_device_and_does_not_mutate_its_inputs():
    s = stats({}, {"nan": 1}, {"absmax": 1e5}, {"zero": 10, "sumsq": 0.0})
    before = s.data.clone()
    state = C.RunningState.zeros(2)
    with NoHostReads():
        signals, new = C.run_checks(s, PG, TH, state, found_inf=torch.zeros(1))
    assert torch.equal(s.data, before) and state.count.item() == 0 and state.dead.tolist() == [0, 0]
    assert [x.check for x in signals] == ["nonfinite"] * 3 + ["exploding"] * 3 + \
        ["vanishing"] * 4 + ["headroom"] * 3 + ["dead"] * 2
    assert [x.severity for x in signals].count("info") == 2
    # the NaN gradient, and the all-zero gradient of "b" (vanishing: zeros)
    assert [bool(x.fired) for x in signals] == [True] + [False] * 7 + [True] + [False] * 6
    assert new.dead.tolist() == [0, 1]
    # "b"'s exact zeros have no structural reason: not recognised; a NaN says nothing about "a"
    assert new.structural.tolist() == [C.UNDECIDED, C.LEARNS]
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        bool(signals[0].fired)  # the guard itself works


def test_finding_names_parameters_and_statistics():
    s = stats({}, {"nan": 2, "posinf": 1, "numel": 8}, {}, {})
    r = rows(("net.0.weight", "param"), ("net.0.weight", "grad"), ("net.2.bias", "param"),
             ("net.2.bias", "grad"), shapes=[(2, 4)] * 2 + [(10,)] * 2)
    (sig, *_) = C.nonfinite(s, r)
    report = Report.from_stats(7, s, r.names, r.roles, r.shapes, r.dtypes)
    f = C.finding(sig, True, sig.mask.tolist(), sig.value.item(), report.rows, r.param_names)
    assert f.check == "nonfinite" and f.severity == "error" and f.names == ["net.0.weight"]
    assert "2 NaN, 1 +Inf of 8" in f.message and f.value == 3.0
    assert C.finding(sig, False, sig.mask.tolist(), 0.0, report.rows, r.param_names) is None


@pytest.mark.parametrize("bad", [dict(max_norm=0), dict(spike_decay=1.0), dict(warmup=0),
                                 dict(dead_after=0), dict(headroom=-1)])
def test_thresholds_are_validated(bad):
    with pytest.raises(ValueError, match="Thresholds"):
        C.Thresholds(**bad)


# -- the CPU op against the reference -------------------------------------------------------
def _random_case(g: torch.Generator, k: int):
    """A layout of random parameters (some without a gradient, frozen, sparse,
    with a structural reason, sharing a module, low precision, with optimizer
    state) and a function giving the statistics of one step: values drawn on
    scales from vanishing to overflowing, with NaN, Inf, zeros and subnormals."""
    def pick(n):
        return int(torch.randint(n, (), generator=g))

    params = [dict(dtype=[torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn][pick(4)],
                   numel=[0, 1, 5, 40][pick(4)], grad=pick(5) > 0, trainable=pick(6) > 0, sparse=pick(5) == 0,
                   structural="bias cancels" if pick(4) == 0 else "", module=f"m{pick(3)}" if pick(3) else None,
                   state=k % 3 == 0 and pick(2) == 0)
              for _ in range(1 + pick(6))]
    names, roles, dtypes, index = [], [], [], []
    for j, p in enumerate(params):
        for role in ["param"] + ["grad"] * p["grad"] + ["state.exp_avg"] * p["state"]:
            names.append(f"p{j}")
            roles.append(role)
            dtypes.append(p["dtype"])
            index.append(j)
    layout = C.Layout(names=names, roles=roles, dtypes=dtypes, param_index=index,
                      param_names=[f"p{j}" for j in range(len(params))],
                      trainable=[p["trainable"] for p in params], sparse=[p["sparse"] for p in params],
                      structural=[p["structural"] for p in params], modules=[p["module"] for p in params])

    def step():
        tensors = []
        for role, j in zip(roles, index):
            p = params[j]
            scale = [0.0, 1e-30, 1e-12, 1e-4, 1.0, 3e2, 2e4, 6e4, 1e30][pick(9)]
            x = torch.randn(p["numel"], generator=g) * scale
            x[torch.rand(p["numel"], generator=g) < 0.2] = 0.0
            if p["numel"] and pick(6) == 0:
                x[pick(p["numel"])] = [math.nan, math.inf, -math.inf][pick(3)]
            tensors.append(x.to(p["dtype"]))
        return tensor_stats(tensors, histogram=False)
    return layout, step


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


def _assert_native_is_reference(layout, th, steps, k, seen):
    """Checks every step's statistics with the CPU op and with the reference,
    each from its own running state, and asserts identical signals and states;
    adds the kinds that fired (or recorded, for info signals) to ``seen``."""
    native = reference = C.RunningState.zeros(len(layout.param_names))
    for i, s in enumerate(steps):
        found_inf = [None, torch.zeros(1), torch.ones(1), torch.ones((), dtype=torch.float64)][(k + i) % 4]
        got, native = C.run_checks(s, layout, th, native, found_inf)
        want, reference = C.reference_checks(TensorStats(s.data), layout, th, reference, found_inf)
        assert [(x.check, x.kind, x.axis, x.threshold) for x in got] == \
            [(x.check, x.kind, x.axis, x.threshold) for x in want]
        for a, b in zip(got, want):
            where = (k, i, a.check, a.kind)
            assert _same(a.fired, b.fired) and _same(a.mask, b.mask), where
            assert _same(a.value, b.value.double()), (where, a.value, b.value)
            if bool(a.fired) or (a.severity == "info" and a.mask.any()):
                seen.add((a.check, a.kind))
        for name in ("count", "mean", "var", "dead", "structural", "peak"):
            a, b = getattr(native, name), getattr(reference, name)
            assert _same(a, b.reshape(a.shape).to(a.dtype)), (k, i, name, a, b)


NATIVE = pytest.mark.skipif(not C._ops.native_checks(), reason="the extension is not built")


@NATIVE
def test_the_native_checks_are_the_reference():
    """`run_checks` on the CPU (the op of csrc/cpu/checks_cpu.cpp) gives every
    signal (fired, mask, value) and the running state of the PyTorch
    reference, bit for bit, over random layouts, statistics, thresholds and
    GradScaler flags, for several steps in a row (so spikes, dead counters,
    structural status and float16 peaks evolve)."""
    g = torch.Generator().manual_seed(0)
    seen = set()
    for k in range(60):
        layout, step = _random_case(g, k)
        th = C.Thresholds(warmup=1 + k % 3, dead_after=1 + k % 3, spike_factor=1.5, spike_zscore=0.5,
                          max_norm=[1e4, 10.0][k % 2], min_norm=[1e-8, 1e-3][k % 2],
                          headroom=[0.5, 0.01][k % 2], max_subnormal_fraction=[0.01, 0.0][k % 2],
                          max_param_norm=[1e4, 1.0][k % 2], overflow_horizon=[20.0, 1e6][k % 2])
        _assert_native_is_reference(layout, th, [step() for _ in range(6)], k, seen)
    # Every kind of signal fired (or recorded, for info) at least once.
    assert seen == {(c, k) for c, k, _ in C._SIGNALS}, sorted(seen)


@NATIVE
def test_the_native_checks_are_the_reference_on_their_thresholds():
    """The same on statistics drawn from powers of two against thresholds that
    are powers of two, so that values often land exactly on a limit: every
    comparison goes the reference's way (strict or not) at the boundary."""
    g = torch.Generator().manual_seed(1)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    seen = set()
    for k in range(60):
        layout, _ = _random_case(g, k)
        th = C.Thresholds(warmup=1, dead_after=2, max_norm=4.0, max_param_norm=2.0, min_norm=0.5,
                          spike_factor=2.0, spike_zscore=1.0, min_relative_rms=0.5,
                          max_zero_fraction=0.5, headroom=0.5, overflow_horizon=2.0,
                          max_subnormal_fraction=0.25, structural_rms=0.5)
        steps = []
        for _ in range(6):
            counts, values = [], []
            for dtype in layout.dtypes:
                numel = pick([0, 1, 2, 4, 8])
                nan = pick([0, 0, 0, 1]) if numel else 0
                zero = pick([0, numel // 2, numel - nan])
                sub = pick([0, (numel - nan - zero) // 4, (numel - nan - zero) // 2])
                counts.append([numel, nan, 0, 0, zero, sub, 0])
                top = torch.finfo(dtype).max
                absmax = pick([0.0, top / 2, top / 4, top / 64, top / 128, 1.0])
                values.append([-absmax, absmax, absmax, 0.0, pick([0.0, 2.0 ** -40, 0.25, 1.0, 4.0, 16.0])])
            steps.append(TensorStats._pack(torch.tensor(counts, dtype=torch.int64),
                                           torch.tensor(values, dtype=torch.float64), None))
        _assert_native_is_reference(layout, th, steps, k, seen)
    assert len(seen) >= 12, sorted(seen)


@NATIVE
def test_the_native_op_refuses_constants_and_state_of_another_layout():
    """A running state or layout constants that do not match the rows raise a
    clear error instead of reading out of bounds."""
    m = PG.masks(torch.device("cpu"))
    s = stats({}, {}, {}, {})
    state = C.RunningState.zeros(3)  # PG has 2 parameters
    args = [s.data, m["row_ints"], m["row_floats"], m["param_ints"], [1.0] * 15, [1, 1, PG.num_modules],
            state.count, state.mean, state.var, state.dead, state.structural, state.peak,
            torch.zeros((), dtype=torch.float64), None]
    with pytest.raises(RuntimeError, match="running state disagree"):
        torch.ops.torchhealth.run_checks(*args)
    args[3] = torch.tensor([[0, 1], [9, 1]])  # parameter 1's gradient row is past the end
    args[9:12] = [torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                  torch.zeros(2, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="parameter 1 names no row"):
        torch.ops.torchhealth.run_checks(*args)


def test_run_checks_traces_under_torch_compile():
    """Under `torch.compile` the checks are the PyTorch reference (which traces
    whole; the CPU op has no tracing rule), with the same verdict as eager."""
    x = [torch.tensor([1.0, math.nan, 0.0]), torch.zeros(3)]
    layout = rows(("a", "param"), ("a", "grad"))

    def verdict(a, b):
        s = tensor_stats([a, b], histogram=False)
        signals, new = C.run_checks(s, layout, TH, C.RunningState.zeros(1))
        return torch.stack([q.fired for q in signals]), new.dead

    compiled = torch.compile(verdict, backend="eager", fullgraph=True)
    for got, want in zip(compiled(*x), verdict(*x)):
        assert torch.equal(got, want)
    assert verdict(*x)[0].tolist()[:2] == [False, True]  # a NaN parameter


@pytest.mark.parametrize("native", [True, False])
def test_the_policy_skips_on_any_check_it_is_told_to(native):
    """`decide` over the signals of either implementation: with "skip" for
    checks whose signals are not next to each other (nonfinite and dead), a
    step is skipped when either fires, and only then."""
    from torchhealth.policy import decide, resolve
    if native and not C._ops.native_checks():
        pytest.skip("the extension is not built")
    layout = rows(("a", "param"), ("a", "grad"), ("b", "param"), ("b", "grad"))
    policy = resolve({"nonfinite": "skip", "dead": "skip"})
    run = C.run_checks if native else C.reference_checks
    state = C.RunningState.zeros(2)
    skipped = []
    for nan, dead in ((0, 0), (1, 0), (0, 10), (0, 10), (0, 10)):
        s = stats({}, {"nan": nan}, {}, {"zero": dead, "sumsq": 0.0 if dead else 10.0})
        signals, state = run(s, layout, TH, state)
        d = decide(signals, policy, None, state.skips, None)
        state = dataclasses.replace(state, skips=d.consecutive_skips)
        skipped.append(bool(d.skip))
    assert skipped == [False, True, False, False, True]  # "b" is dead from its third all-zero check
