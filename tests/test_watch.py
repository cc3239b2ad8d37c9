"""torchhealth.watch (issue 9): where a non-finite value was born, saturation,
dead units, and no finding on a healthy model."""
import dataclasses
import sys
import warnings

import pytest
import torch
from torch import nn

import torchhealth as th
from torchhealth import activations
from helpers import assert_rows_agree


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def _mlp(*middle, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), *middle, nn.Linear(8, 2))


def _x(seed=1, n=6):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


def python_reads(monkeypatch) -> list[list[torch.Tensor]]:
    """The tensors of each read of the passes begun after this call, which use the
    Python `activations.Batch` (tests/test_watch_reads.py holds the extension's
    ``_C.Batch`` to the same reads and rows)."""
    reads = []
    read = activations.read
    monkeypatch.setattr(activations, "NATIVE_BATCH", None)
    monkeypatch.setattr(activations, "read", lambda t, *a: reads.append(t) or read(t, *a))
    return reads


def _run(model, loss_fn=lambda out: out.pow(2).mean(), x=None, steps=1, **kw):
    reports = []
    with th.watch(model, on_report=reports.append, **kw):
        for i in range(steps):
            loss_fn(model(_x(i) if x is None else x)).backward()
    return reports


def _origin(report):
    return report.origin and (report.origin["module"], report.origin["pass"])


def test_a_healthy_model_raises_no_finding():
    model = _mlp(nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid())
    reports = _run(model, steps=3)
    assert [r.step for r in reports] == [0, 1, 2]
    assert not any(r.findings for r in reports) and all(r.origin is None for r in reports)
    names = [(r.name, r.role) for r in reports[0].rows]
    assert ("<input>", "activation") in names and ("1", "activation") in names
    # Backward starts at the model's output, which is its last module's output.
    assert [n for n, role in names if role == "activation_grad"][0] == "6"


@pytest.mark.parametrize("loss_fn", [lambda out: -torch.log(out * 0).mean(),  # log(0)
                                     lambda out: ((out - out) / (out - out)).mean()],  # 0/0
                         ids=["log0", "zero_by_zero"])
def test_a_fault_in_the_loss_is_traced_to_the_loss(loss_fn):
    (r,) = _run(_mlp(nn.ReLU()), loss_fn)
    assert _origin(r) == ("2", "backward")  # the gradient of the model's output (module 2's)
    (f,) = [f for f in r.findings if f.check == "nonfinite"]
    assert "the loss" in f.message


def test_sqrt_of_a_negative_names_the_module():
    model = _mlp(nn.Tanh(), Sqrt())
    (r,) = _run(model)
    assert _origin(r) == ("2", "forward") and r.origin["nan"] > 0


def test_exp_overflow_under_float16_autocast_names_the_module():
    model = _mlp(Exp())
    with torch.no_grad():
        model[0].weight.mul_(40)
    reports = []
    with th.watch(model, on_report=reports.append, backward=False):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(_x())
    assert model[1](torch.full((1,), 12.0, dtype=torch.float16)).isinf().all()  # e^12 > 65504
    assert out.dtype == torch.float16
    (r,) = reports
    assert _origin(r) == ("1", "forward") and r.origin["posinf"] > 0


def test_a_nan_weight_names_its_layer():
    model = _mlp(nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    (r,) = _run(model)
    assert _origin(r) == ("2", "forward")


def test_a_nan_in_one_input_sample_is_traced_to_the_input():
    x = _x()
    x[3, 1] = float("nan")
    (r,) = _run(_mlp(nn.ReLU()), x=x)
    assert _origin(r) == ("<input>", "forward") and r.origin["nan"] == 1


def test_a_saturated_sigmoid_stack_is_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 1))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.mul_(60)
    (r,) = _run(model)
    sat = [f for f in r.findings if f.check == "saturation"]
    assert sat and {n for f in sat for n in f.names} <= {"1", "3"} and "1" in sat[0].names
    assert r.origin is None


def test_dead_relus_are_found():
    model = _mlp(nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    (r,) = _run(model)
    (f,) = [f for f in r.findings if f.check == "dead_units"]
    assert f.names == ["1"] and f.value == 1.0


def test_the_optimizer_report_carries_the_origin_and_raise_carries_it_too():
    model = _mlp(nn.Tanh(), Sqrt())
    opt = th.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                    policy={"nonfinite": "raise"})
    with th.watch(model, monitor=opt):
        model(_x()).pow(2).mean().backward()
        with pytest.raises(th.HealthCheckError) as e:
            opt.step()
    assert _origin(e.value.report) == ("2", "forward")
    assert {r.role for r in e.value.report.rows} >= {"param", "grad", "activation", "activation_grad"}
    assert "origin: 2 (forward pass, step 0)" in str(e.value.report)


def test_a_steps_activation_findings_are_made_once_for_the_origin_and_the_report(monkeypatch):
    """Under torch.distributed the monitor reads a step's activation origin (to
    gather it) and then builds its Report: the rows and findings are made from
    the host copy once, and both see the same origin."""
    from torchhealth import result
    calls = []
    real = result.activation_findings
    monkeypatch.setattr(result, "activation_findings", lambda *a: calls.append(1) or real(*a))
    model = _mlp(nn.Tanh(), Sqrt())
    opt = th.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                    policy={"nonfinite": "ignore"})
    with th.watch(model, monitor=opt):
        model(_x()).pow(2).mean().backward()
        checked = opt.monitor.check()
    origin = checked.local_origin()
    assert (origin["module"], origin["pass"]) == ("2", "forward")
    assert checked.report().origin == origin
    assert len(calls) == 1


def test_watch_follows_the_monitors_cadence_and_costs_nothing_between_checks(monkeypatch):
    model = _mlp(nn.ReLU())
    opt = th.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model=model, check_every=2)
    calls = python_reads(monkeypatch)
    reports = []
    opt.monitor.on_report(reports.append)
    with th.watch(model, monitor=opt):
        for i in range(4):
            opt.zero_grad()
            model(_x(i)).pow(2).mean().backward()
            opt.step()
    assert [r.step for r in reports] == [0, 2]
    assert len(calls) == 4  # one forward and one backward call on each due step, none otherwise
    assert all(any(row.role == "activation" for row in r.rows) for r in reports)


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    extra: dict


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return Out(h, {"pair": (h * 2, torch.arange(3)), "note": "text"})


class Opaque(nn.Module):
    def forward(self, x):
        return object()


def test_structured_outputs_are_walked_and_other_objects_skipped_once():
    model = nn.Sequential()
    model.add_module("s", Structured())
    model.add_module("o", Opaque())
    reports = []
    with pytest.warns(UserWarning, match="Opaque returns a object") as caught:
        with th.watch(model, on_report=reports.append, backward=False):
            model(_x())
            model(_x())
    assert len([w for w in caught if "Opaque" in str(w.message)]) == 1
    names = {r.name for r in reports[0].rows}
    assert {"s.hidden", "s.extra.pair[0]"} <= names and not any("[1]" in n for n in names)


def test_watching_twice_is_an_error_and_remove_detaches_everything():
    model = _mlp(nn.ReLU())
    w = th.watch(model)
    with pytest.raises(ValueError, match="already watched"):
        th.watch(model)
    w.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    th.watch(model).remove()
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        th.watch([model])


def _act_rows(report):
    return [(r.name, r.role, r.numel, r.sum, r.absmax) for r in report.rows if r.role.startswith("activation")]


def test_a_copy_of_a_watched_model_is_not_watched():
    """The EMA pattern: ``ema = copy.deepcopy(model)`` of a watched model, run
    (under no_grad) between the model's backward and the optimizer step. The
    copy's forward is not taken for the model's (before: the copy shared the
    watch's hooks, its forward replaced the model's rows of that step, and
    ``watch(ema)`` said the copy was already watched); the copy can be watched
    on its own, and a copy of the wrapper is attached to no watch."""
    import copy
    import pickle

    def step(model, opt, ema=None):
        model(_x(0)).pow(2).mean().backward()
        if ema is not None:
            with torch.no_grad():
                ema(_x(5, n=3))
        opt.step()
        opt.zero_grad()
        return opt.monitor.last_report

    plain = _mlp(nn.ReLU())
    plain_opt = th.HealthCheckedOptimizer(torch.optim.SGD(plain.parameters(), lr=0.1), model=plain)
    model = _mlp(nn.ReLU())
    opt = th.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with th.watch(plain, monitor=plain_opt), th.watch(model, monitor=opt):
        want = _act_rows(step(plain, plain_opt))
        assert [n for n, role, *_ in want if role == "activation"] == ["<input>", "0", "1", "2", "<output>"]
        assert {n for n, role, *_ in want if role == "activation_grad"} >= {"0", "1", "2"}
        ema = copy.deepcopy(model)
        assert _act_rows(step(model, opt, ema)) == want
        ema_reports = []
        with th.watch(ema, on_report=ema_reports.append):
            with torch.no_grad():
                ema(_x(5, n=3))
        assert [r.numel for r in ema_reports[0].rows][:1] == [12]  # the copy's own input, 3 x 4
        for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
            assert copied.monitor._activations is None
        assert opt.monitor._activations is not None


def test_a_watched_model_saves_and_loads_without_its_watch():
    """``torch.save(model)`` of a watched model (before: PicklingError): the
    loaded model computes the same, is not watched (its first forward removes
    what took the watch's hooks' place), and the watch goes on."""
    import io

    model = _mlp(nn.ReLU())
    reports = []
    with th.watch(model, on_report=reports.append) as w:
        model(_x(0)).sum().backward()
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(_x(1)), model(_x(1)))
        assert not any(m._forward_hooks or m._forward_pre_hooks or m._forward_pre_hooks_with_kwargs
                       for m in loaded.modules())
        th.watch(loaded).remove()
        w.flush()
    assert [r.step for r in reports] == [0, 1]  # the model's two forward passes, not the loaded one's


def test_the_origin_survives_the_log(tmp_path):
    from torchhealth.sinks import JsonlSink, read_jsonl
    model = _mlp(nn.Tanh(), Sqrt())
    path = tmp_path / "run.jsonl"
    with JsonlSink(path) as sink:
        for r in _run(model, steps=2):
            sink(r)
    back = read_jsonl(path)
    assert [_origin(r) for r in back] == [("2", "forward")] * 2
    assert back[0].origin["nan"] > 0 and back[0].to_dict() == back[0].to_dict()


def test_the_html_report_shows_the_origin():
    from torchhealth.html_report import render
    model = _mlp(nn.Tanh(), Sqrt())
    page = render(_run(model, steps=2))
    assert "Where it broke" in page and "<td>2</td><td>forward</td>" in page.replace("\n", "")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(8, 8), nn.Tanh()

    def forward(self, x):  # the gradient of the sum reaches both of its terms as one tensor
        return x + self.act(self.lin(x))


class Wrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sigmoid()

    def forward(self, x):  # returns its child's output
        return self.inner(x)


@pytest.mark.parametrize("histogram", [True, False])
def test_each_distinct_tensor_is_read_once_and_every_row_is_exact(monkeypatch, histogram):
    from torchhealth.activations import EPS
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), Residual(), nn.Linear(8, 8), Wrap(),
                          nn.Linear(8, 2))
    with torch.no_grad():
        model[3].weight.mul_(30)  # some sigmoid outputs near 0 and 1
    seen, names = {}, {m: n for n, m in model.named_modules()}

    def capture(module, inputs, output):  # no copy: the watch reads the values as they are at the pass's end
        seen[("forward", names[module])] = output.detach()
        output.register_hook(lambda g: seen.__setitem__(("backward", names[module]), g))

    for m in list(model.modules())[1:]:
        m.register_forward_hook(capture)
    reads = python_reads(monkeypatch)
    w = th.watch(model, thresholds=th.Thresholds(), check_every=1)
    w.options = dataclasses.replace(w.options, histogram=histogram)
    x = _x()
    model(x).pow(2).mean().backward()
    passes = w.take(0)
    w.remove()
    # Forward: the ReLU's output is its Linear's, Wrap's is its Sigmoid's, <output> is the last
    # Linear's (6 tensors, then the Tanh's and the Sigmoid's); backward: the residual sum's
    # gradient is also the Tanh's output gradient, <output>'s the last Linear's.
    assert [len(r) for r in reads] == [6, 2, 7]
    for p in passes:
        for i, (name, kind) in enumerate(zip(p.modules, p.kinds)):
            t = x if name == "<input>" else seen[(p.name, "5" if name == "<output>" else name)]
            want = th.tensor_stats([t], histogram=histogram).data  # the op alone on this tensor
            assert_rows_agree(p.stats.data[i:i + 1], want, [t], f"{p.name} {name}")
            near = 0
            if kind == "sigmoid":
                near = int(((t >= 1 - EPS) | (t.abs() < EPS)).sum())
            elif kind == "tanh":
                near = int((t.abs() >= 1 - EPS).sum())
            assert int(p.near[i]) == near, (p.name, name)
    assert [len(p.modules) for p in passes] == [11, 10]
    assert int(passes[0].near[passes[0].modules.index("4.inner")]) > 0


def test_a_pass_larger_than_the_read_budget_is_read_in_batches_with_the_same_rows(monkeypatch):
    model = _mlp(nn.Tanh(), nn.Linear(8, 8), nn.ReLU())

    def passes(read_bytes):
        monkeypatch.setattr(activations, "READ_BYTES_CPU", read_bytes)
        with monkeypatch.context() as patched:
            calls = python_reads(patched)
            w = th.watch(model)
            model(_x()).pow(2).mean().backward()
            out = w.take(0)
            w.remove()
        return out, calls

    whole, calls = passes(1 << 30)
    assert len(calls) == 3  # forward, forward's tanh output, backward
    batched, calls = passes(6 * 8 * 4)  # a read every 48 floats: one per output of this model or two
    assert len(calls) > 6
    for a, b in zip(whole, batched):
        assert (a.name, a.modules, a.kinds, a.shapes) == (b.name, b.modules, b.kinds, b.shapes)
        assert torch.equal(a.stats.data, b.stats.data) and torch.equal(a.near, b.near)


def test_activation_histograms_reach_the_report_and_the_log(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from torchhealth import report_plots
    from torchhealth.html_report import render
    from torchhealth.sinks import JsonlSink, read_jsonl
    model = _mlp(nn.Tanh())
    x = _x()
    reports = _run(model, x=x, steps=2)  # histograms every 10th check, from the first
    rows = {(r.name, r.role): r for r in reports[0].rows}
    out = rows[("1", "activation")]  # the Tanh's output
    want = th.tensor_stats([torch.tanh(model[0](x)).detach()])
    counts = want.hist[0].tolist()
    assert out.hist == {b: n for b, n in enumerate(counts) if n}
    assert sum(out.hist.values()) == out.numel - out.zero
    assert all(r.hist for r in reports[0].rows if r.role.startswith("activation"))
    path = tmp_path / "run.jsonl"
    with JsonlSink(path) as sink:
        sink(reports[0])
    back = read_jsonl(path)[0]
    assert [r.hist for r in back.rows] == [r.hist for r in reports[0].rows]
    drawn, heatmap = [], report_plots.heatmap
    monkeypatch.setattr(report_plots, "heatmap",
                        lambda mpl, ax, rows, title: drawn.append((title, len(rows))) or heatmap(mpl, ax, rows, title))
    render([back], heatmaps=["1"])  # the Tanh module: its output and output gradient over steps
    assert drawn == [("1: output gradient", 1), ("1: output", 1)]
    assert not any(r.hist for r in reports[1].rows)  # off the cadence: none


@pytest.mark.parametrize("middle", [
    (nn.ReLU(),), (nn.Tanh(),), (nn.Sigmoid(),), (Sqrt(),), (nn.Softmax(dim=1),)],
    ids=["relu", "tanh", "sigmoid", "sqrt", "softmax"])
@pytest.mark.parametrize("fault", ["none", "saturate", "kill", "nan"])
def test_the_fast_verdict_on_activations_agrees_with_their_findings(middle, fault):
    """`any_finding` (whole columns, what a monitor asks on every step) says
    exactly when `activation_findings` (a Row per activation) finds something."""
    model = _mlp(*middle)
    with torch.no_grad():
        if fault == "saturate":
            model[0].weight.mul_(80)
        elif fault == "kill":
            model[0].bias.fill_(-100.0)
        elif fault == "nan":
            model[0].weight[0, 0] = float("nan")
    with th.watch(model) as w:
        x = _x() - (3.0 if isinstance(middle[0], Sqrt) else 0.0)  # sqrt of negatives: NaN
        model(x).pow(2).mean().backward()
        passes = w.take(0)  # step 0's forward and backward passes, before any Report
    limits = th.Thresholds().max_saturated_fraction, th.Thresholds().max_dead_fraction
    host = [(p, p.stats.data, p.near) for p in passes]
    found = activations.activation_findings(host, *limits)[1]
    assert len(passes) == 2 and activations.any_finding(host, *limits) == bool(found)
    real = {"nan": True, "kill": isinstance(middle[0], nn.ReLU),
            "saturate": isinstance(middle[0], (nn.Tanh, nn.Sigmoid))}.get(fault, False)
    if real or isinstance(middle[0], Sqrt):
        assert found  # the faults are real: the agreement is not all "nothing"


def test_an_activation_finding_alone_makes_the_monitor_warn(recwarn):
    """With no sink and no parameter finding, the monitor still sees an activation
    finding (dead ReLUs) and warns; a healthy step warns nothing."""
    for dead in (False, True):
        model = _mlp(nn.ReLU())
        if dead:
            with torch.no_grad():
                model[0].bias.fill_(-100.0)
        opt = th.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model=model)
        recwarn.clear()
        with th.watch(model, monitor=opt):
            model(_x()).pow(2).mean().backward()
            opt.step()
        said = [str(w.message) for w in recwarn if "dead_units" in str(w.message)]
        assert bool(said) == dead, said


def test_a_watch_without_callbacks_builds_a_report_only_when_it_is_read(monkeypatch):
    """Without a monitor or ``on_report``, a step's Report is built when
    ``last_report`` is read, once, and it is the newest step's."""
    import importlib
    watch_module = importlib.import_module("torchhealth.watch")  # the module, not the function
    built = []
    real = watch_module.activation_findings
    monkeypatch.setattr(watch_module, "activation_findings", lambda *a: built.append(1) or real(*a))
    model = _mlp(nn.Sigmoid())
    with th.watch(model) as w:
        for i in range(3):
            model(_x(seed=i)).pow(2).mean().backward()
        model(_x(seed=3))  # delivers step 2
        assert built == []
        report = w.last_report
        assert report.step == 2 and w.last_report is report and built == [1]
        assert {r.name for r in report.rows} >= {"0", "1", "2"}


@pytest.mark.parametrize("how", ["torch.compile(m)", "m.compile()", "watch(torch.compile(m))"])
def test_a_compiled_model_gives_the_rows_and_origin_of_the_eager_one(how):
    """Under torch.compile the hooks run eagerly (graph breaks): same rows, same
    counts, same origin as the eager model. (Traced, the first hook failed on the
    byte size of a symbolic shape.)"""
    def steps(compiled: bool):
        torch._dynamo.reset()
        torch.manual_seed(5)  # the middle Linear is made before _mlp seeds
        model = _mlp(nn.Sigmoid(), nn.Linear(8, 8), nn.ReLU())
        run = model
        if compiled and how == "m.compile()":
            model.compile(backend="aot_eager", dynamic=True)
        elif compiled:
            run = torch.compile(model, backend="aot_eager", dynamic=True)
        reports = []
        with th.watch(run if how.startswith("watch") else model, on_report=reports.append):
            for i in range(3):
                if i == 2:
                    with torch.no_grad():
                        model[0].weight[1, 2] = float("nan")
                run(_x(i, n=4 + i)).pow(2).mean().backward()  # a new batch size each step
        return reports

    eager, compiled = steps(False), steps(True)
    assert [r.step for r in compiled] == [0, 1, 2]
    for e, c in zip(eager, compiled):
        assert [(r.name, r.role, r.numel, r.nan, r.zero) for r in c.rows] == \
            [(r.name, r.role, r.numel, r.nan, r.zero) for r in e.rows]
        for re_, rc in zip(e.rows, c.rows):
            assert rc.l2norm == pytest.approx(re_.l2norm, rel=1e-5, abs=1e-12), rc.name
    assert _origin(compiled[2]) == _origin(eager[2]) == ("0", "forward")
    assert not compiled[1].findings


def test_hooks_go_through_the_disabled_wrapper_only_when_traced(monkeypatch):
    """Eager hooks call their method directly; under torch.compile (and only
    there) every hook runs through `watch._eager`, torch.compiler.disable's wrapper."""
    watch_module = sys.modules[th.watch.__module__]
    calls = []
    eager = watch_module._eager
    monkeypatch.setattr(watch_module, "_eager", lambda hook, *a: calls.append(hook) or eager(hook, *a))
    model = _mlp(nn.ReLU())
    with th.watch(model) as w:
        model(_x()).pow(2).mean().backward()
        assert calls == [] and w._grads is None
        torch._dynamo.reset()
        torch.compile(model, backend="eager")(_x()).pow(2).mean().backward()
    torch._dynamo.reset()
    assert len(calls) >= 3  # the pre-hook, each module's hook, the model's end hook


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.Tanh()

    def forward(self, x):
        return x + self.act(self.fc(x))


class _Checkpointed(nn.Module):
    """Three residual blocks, each run through `torch.utils.checkpoint` unless
    ``reentrant`` is None."""

    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.blocks = nn.Linear(4, 8), nn.ModuleList(_Residual() for _ in range(3))
        self.head, self.reentrant = nn.Linear(8, 1), reentrant

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x) if self.reentrant is None else \
                torch.utils.checkpoint.checkpoint(b, x, use_reentrant=self.reentrant)
        return self.head(x)


@pytest.mark.parametrize("whole", [False, True], ids=["blocks", "whole model"])
@pytest.mark.parametrize("born", ["forward", "backward"])
def test_activation_checkpointing_gives_the_rows_and_origin_of_plain_training(born, whole):
    """Recomputation in backward runs the modules' forward hooks again: they are
    not counted twice, and the gradients flowing into the checkpointed modules'
    outputs are seen (reentrant checkpointing: through the graph of the
    recomputation, the first forward having recorded none), so a NaN born in a
    forward or a backward pass inside a checkpointed block is placed where it is
    placed without checkpointing. The whole model checkpointed reruns its
    forward inside backward: that is no new step nor pass (it crashed, or
    counted a step, before)."""
    def steps(reentrant):
        net = _Checkpointed(None if whole else reentrant)
        reports = []
        with th.watch(net, on_report=reports.append):
            for i in range(2):
                hook = None
                if i == 1 and born == "forward":
                    with torch.no_grad():
                        net.blocks[1].fc.weight[0, 0] = float("nan")
                elif i == 1:
                    hook = net.blocks[1].act.register_full_backward_pre_hook(
                        lambda m, grad_out: (grad_out[0] * float("nan"),))
                x = _x(i, n=4).requires_grad_(whole and reentrant is True)
                out = net(x) if not whole or reentrant is None else \
                    torch.utils.checkpoint.checkpoint(net, x, use_reentrant=reentrant)
                out.sum().backward()
                if hook is not None:
                    hook.remove()
        return reports

    plain = steps(None)
    origin = ("blocks.1.fc" if born == "forward" else "blocks.1.act", born)
    assert _origin(plain[1]) == origin
    for reentrant in (False, True):
        checkpointed = steps(reentrant)
        for p, c in zip(plain, checkpointed):
            assert [(r.name, r.role, r.numel, r.nan) for r in c.rows] == \
                [(r.name, r.role, r.numel, r.nan) for r in p.rows], reentrant
        assert _origin(checkpointed[1]) == origin, reentrant
        assert not checkpointed[0].findings


def test_compiled_autograd_gives_the_rows_and_origin_of_eager_autograd():
    """Under compiled autograd the gradient hooks run eagerly and the engine runs
    no end-of-backward callback: the backward pass is closed when next needed
    (the next forward, the monitor's check, flush). Same rows, counts and origin
    as eager autograd, with and without a monitor. (It failed in the first
    backward before: the traced hook could not queue its callback.)"""
    def steps(compiled_autograd: bool, with_monitor: bool):
        torch._dynamo.reset()
        torch.manual_seed(5)
        model = _mlp(nn.Sigmoid(), nn.Linear(8, 8), nn.ReLU())
        reports = []
        opt = th.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model=model,
                                        on_report=reports.append) if with_monitor else None
        with th.watch(model, monitor=opt, on_report=None if opt else reports.append):
            for i in range(3):
                if i == 2:
                    with torch.no_grad():
                        model[2].weight[1, 2] = float("nan")
                loss = model(_x(i)).pow(2).mean()
                if compiled_autograd:
                    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
                        loss.backward()
                else:
                    loss.backward()
                if opt is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        opt.step()
                    opt.zero_grad()
        return reports

    for with_monitor in (False, True):
        eager, compiled = steps(False, with_monitor), steps(True, with_monitor)
        assert [r.step for r in compiled] == [r.step for r in eager] == [0, 1, 2]
        for e, c in zip(eager, compiled):
            rows = [(r.name, r.role, r.numel, r.nan, r.zero) for r in c.rows]
            assert rows == [(r.name, r.role, r.numel, r.nan, r.zero) for r in e.rows]
            assert any(role == "activation_grad" for _, role, *_ in rows)
        assert _origin(compiled[2]) == _origin(eager[2]) == ("2", "forward")


def test_the_optimizer_of_a_compiled_model_names_its_parameters_as_the_model_does():
    torch._dynamo.reset()
    model = _mlp(nn.ReLU())
    compiled = torch.compile(model, backend="aot_eager")
    opt = th.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=compiled,
                                    policy="skip")
    with th.watch(compiled, monitor=opt):
        for i in range(2):
            if i == 1:
                with torch.no_grad():
                    model[2].weight[0, 0] = float("nan")
            compiled(_x(i)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    report = opt.last_report
    assert {r.name for r in report.rows if r.role == "param"} == {n for n, _ in model.named_parameters()}
    assert report.origin["module"] == "2" and opt.skipped_steps == 1
    assert any("2.weight" in f.names for f in report.findings if f.check == "nonfinite")
