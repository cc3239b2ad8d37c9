"""torchhealth.watch: what each batched read holds (each distinct tensor once, also
across batches; integer outputs none) and that its rows stay exact."""
import weakref

import pytest
import torch
from test_watch import Residual, Wrap, _x, python_reads
from torch import nn

import torchhealth as th
from torchhealth import activations


def _reads(monkeypatch, model, x, read_bytes):
    """(the lists of tensors passed to tensor_stats, the passes) of one watched step."""
    monkeypatch.setattr(activations, "READ_BYTES_CPU", read_bytes)
    with monkeypatch.context() as patched:
        reads = python_reads(patched)
        passes = _step(model, x)
    return reads, passes


def _step(model, x):
    """The passes of one watched step."""
    w = th.watch(model)
    out = model(x)
    if isinstance(out, tuple):  # (loss, logits), as a Hugging Face model returns
        out[0].backward()
    elif out.requires_grad:
        out.pow(2).mean().backward()
    passes = w.take(0)
    w.remove()
    return passes


def test_a_repeat_after_a_full_batch_is_not_read_again_and_rows_match_one_batch(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), Residual(), nn.Linear(8, 8), Wrap(),
                          nn.Linear(8, 2))
    x = _x()
    whole_reads, whole = _reads(monkeypatch, model, x, 1 << 30)
    # A budget of one byte: every batch is full as soon as it holds a tensor, so each
    # distinct tensor is its own read; the ReLU's (in place on its Linear's output),
    # Wrap's (its Sigmoid's) and the model's output (the last Linear's) repeat the
    # tensor just before them, and the Tanh's output gradient is the residual sum's.
    reads, batched = _reads(monkeypatch, model, x, 1)
    assert all(len(r) == 1 for r in reads)
    assert len(reads) == sum(len(r) for r in whole_reads) == 8 + 7
    for a, b in zip(whole, batched):
        assert (a.name, a.modules, a.kinds, a.shapes) == (b.name, b.modules, b.kinds, b.shapes)
        assert torch.equal(a.stats.data, b.stats.data) and torch.equal(a.near, b.near)


class Loss(nn.Module):
    def forward(self, logits):
        return logits.sum() * 0.1


class LossAndLogits(nn.Module):
    """Returns (loss, logits), as a Hugging Face model does: its output repeats its
    head's, after a new tensor (the loss); with ``double``, logits doubled in place
    after the loss, a module's output, was computed."""

    def __init__(self, double=False):
        super().__init__()
        self.body, self.head, self.loss = nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 3), Loss()
        self.double = double

    def forward(self, x):
        logits = self.head(self.body(x))
        loss = self.loss(logits)
        if self.double:
            logits.mul_(2)
        return loss, logits


def test_a_repeat_of_a_tensor_read_in_an_earlier_batch_is_not_read_again(monkeypatch):
    torch.manual_seed(0)
    model, x = LossAndLogits(), _x()
    whole_reads, whole = _reads(monkeypatch, model, x, 1 << 30)
    # One tensor a batch: the loss comes between the head's logits and the model's
    # output's, so they are in different batches; the logits are read once all the same.
    reads, batched = _reads(monkeypatch, model, x, 1)
    assert all(len(r) == 1 for r in reads)
    assert len(reads) == sum(len(r) for r in whole_reads)
    logits = [t for r in reads for t in r if t.shape == (6, 3) and t.requires_grad]
    assert len(logits) == 1
    forward = batched[0]
    assert forward.modules[-4:] == ["head", "loss", "<output>[0]", "<output>[1]"]
    assert torch.equal(forward.stats.data[-1], forward.stats.data[-4])
    for a, b in zip(whole, batched):
        assert (a.name, a.modules, a.kinds, a.shapes) == (b.name, b.modules, b.kinds, b.shapes)
        assert torch.equal(a.stats.data, b.stats.data) and torch.equal(a.near, b.near)


def test_a_tensor_changed_in_place_after_its_read_is_read_again(monkeypatch):
    torch.manual_seed(0)
    model, x = LossAndLogits(double=True), _x()
    reads, (forward, _) = _reads(monkeypatch, model, x, 1)
    with torch.no_grad():
        doubled = model(x)[1]
    head, output = forward.modules.index("head"), forward.modules.index("<output>[1]")
    # The head's row: the logits as it returned them; the output's: as the model did.
    assert forward.stats.max[head].item() == (doubled / 2).max().item()
    assert forward.stats.max[output].item() == doubled.max().item()
    assert forward.stats.sum[output].item() == pytest.approx(2 * forward.stats.sum[head].item())


class ArgMax(nn.Module):
    def forward(self, x):
        return x.argmax(-1)


@pytest.mark.parametrize("read_bytes", [1, 1 << 30])
def test_an_integer_output_gives_no_row(monkeypatch, read_bytes):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), ArgMax())
    reads, (forward,) = _reads(monkeypatch, model, _x(), read_bytes)
    assert forward.modules == ["<input>", "0", "1"]
    assert forward.dtypes == [torch.float32] * 3
    assert all(t.is_floating_point() for r in reads for t in r)


def test_a_step_that_is_not_due_holds_nothing_and_hooks_no_gradient():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    reports, grads = [], []
    with th.watch(model, check_every=2, on_report=reports.append) as w:
        grad = w._take_grad  # where every gradient hook delivers
        w._take_grad = lambda name, g: grads.append(name) or grad(name, g)
        for i in range(2):
            model(_x(i)).pow(2).mean().backward()
            assert w._outputs is None and w._grads is None and not w._to_hook
            # Step 0 only: the three modules' output gradients and the model's output's (the last one's).
            assert sorted(grads) == ["0", "1", "2", "<output>"]
    assert [r.step for r in reports] == [0]
    assert [(r.name, r.role) for r in reports[0].rows if r.role == "activation_grad"][:2] == \
        [("2", "activation_grad"), ("<output>", "activation_grad")]


def test_an_output_modified_in_place_later_keeps_its_own_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
    x = _x()
    seen = {}

    def capture(name):  # a hook on each output as the module returns it
        def hook(module, inputs, out):
            out.register_hook(lambda g: seen.__setitem__(name, g))
        return hook

    model[0].register_forward_hook(capture("0"))
    model[1].register_forward_hook(capture("1"))
    (r,) = _run_one(model, x)
    rows = {row.name: row for row in r.rows if row.role == "activation_grad"}
    for name in ("0", "1"):  # the Linear's gradient is the ReLU's masked by it: not the same tensor
        want = th.tensor_stats([seen[name]], histogram=False)
        assert rows[name].zero == int(want.zero[0]) and rows[name].sum == float(want.sum[0])
    assert rows["0"].zero > rows["1"].zero


def _run_one(model, x):
    reports = []
    with th.watch(model, on_report=reports.append):
        model(x).pow(2).mean().backward()
    return reports


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_output_gradients_of_a_leaf_a_custom_function_and_a_multi_output_op_are_the_tensors_own():
    torch.manual_seed(0)
    model = nn.Sequential(Lambda(lambda x: x), nn.Linear(4, 8), Lambda(Square.apply),
                          Lambda(lambda x: x.chunk(2, dim=-1)), Lambda(lambda xs: xs[0] * 3 + xs[1]),
                          nn.Linear(4, 2))
    seen = {}

    def capture(name):
        def hook(module, inputs, out):
            for i, t in enumerate(out if isinstance(out, tuple) else (out,)):
                label = f"{name}[{i}]" if isinstance(out, tuple) else name
                t.register_hook(lambda g, label=label: seen.__setitem__(label, g))
        return hook

    for name, m in list(model.named_children()):
        m.register_forward_hook(capture(name))
    x = torch.randn(3, 4, requires_grad=True)  # module 0 returns this leaf itself
    (r,) = _run_one(model, x)
    rows = {row.name: row for row in r.rows if row.role == "activation_grad"}
    assert set(rows) == set(seen) | {"<output>"}
    for name, g in seen.items():
        want = th.tensor_stats([g], histogram=False)
        assert (rows[name].numel, rows[name].sum) == (int(want.numel[0]), float(want.sum[0])), name


class Shift(nn.Module):
    """x + 1: autograd saves neither its input nor its output."""

    def forward(self, x):
        return x + 1


class Probe(nn.Module):
    """Records whether the tensor behind `ref` was still alive when it ran."""

    def __init__(self):
        super().__init__()
        self.ref, self.alive = None, None

    def forward(self, x):
        self.alive = self.ref() is not None
        return x * 3


def test_an_output_already_read_is_not_kept_alive_until_the_pass_ends(monkeypatch):
    # The first Shift's output is saved by nothing: once watch has read it (a one-byte
    # budget reads each tensor as the next arrives), only the model held it, and the
    # allocator can reuse its memory for the rest of the pass.
    monkeypatch.setattr(activations, "READ_BYTES_CPU", 1)
    probe = Probe()
    model = nn.Sequential(nn.Linear(4, 8), Shift(), Shift(), Shift(), probe)
    model[1].register_forward_hook(lambda m, i, out: setattr(probe, "ref", weakref.ref(out)))
    with th.watch(model) as w:
        model(_x()).sum().backward()
        forward, backward = w.take(0)
    assert probe.alive is False
    assert forward.modules == ["<input>", "0", "1", "2", "3", "4", "<output>"]
    # Its gradient is still hooked and read (through its node, not the tensor).
    assert backward.modules == ["4", "<output>", "3", "2", "1", "0"]


# The extension's batch (_C.Batch, csrc/python_call.cpp) against its Python
# reference (activations.Batch): the same reads and the same rows.
NATIVE = pytest.mark.skipif(activations.NATIVE_BATCH is None, reason="needs the compiled extension")
BATCHES = [pytest.param(activations.Batch, id="python"),
           pytest.param(activations.NATIVE_BATCH, id="native", marks=NATIVE)]


def _made_by(monkeypatch, cls, model, x, read_bytes):
    """(the passes, each batch's reads) of one watched step with batches of `cls`."""
    made = []
    with monkeypatch.context() as patched:
        patched.setattr(activations, "READ_BYTES_CPU", read_bytes)
        patched.setattr(activations, "NATIVE_BATCH", lambda *a: made.append(cls(*a)) or made[-1])
        passes = _step(model, x)
    return passes, [list(b.calls) for b in made]


def _scenarios():
    torch.manual_seed(0)
    yield nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), Residual(), nn.Linear(8, 8), Wrap(),
                        nn.Linear(8, 2))
    yield LossAndLogits()
    yield LossAndLogits(double=True)
    yield nn.Sequential(nn.Linear(4, 8), nn.Tanh(), ArgMax())
    yield nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), Shift(), nn.Tanh(), Shift(), nn.Sigmoid())


@NATIVE
@pytest.mark.parametrize("read_bytes", [1, 100, 1 << 30])
def test_the_extensions_batch_makes_the_reads_and_rows_of_the_python_one(monkeypatch, read_bytes):
    for model in _scenarios():
        python, python_calls = _made_by(monkeypatch, activations.Batch, model, _x(), read_bytes)
        native, native_calls = _made_by(monkeypatch, activations.NATIVE_BATCH, model, _x(), read_bytes)
        assert native_calls == python_calls and len(native) == len(python) > 0
        for a, b in zip(python, native):
            assert (a.step, a.name, a.modules, a.kinds, a.shapes, a.dtypes) == \
                (b.step, b.name, b.modules, b.kinds, b.shapes, b.dtypes)
            assert torch.equal(a.stats.data, b.stats.data) and torch.equal(a.near, b.near), (model, a.name)


def _batch(cls, read=activations.read, histogram=True, budget=1 << 30):
    return cls(histogram, budget, budget, activations.BOUNDED, 1 - activations.EPS, read)


@pytest.mark.parametrize("cls", BATCHES)
@pytest.mark.parametrize("histogram", [False, True])
def test_a_batch_gives_the_rows_of_tensor_stats(cls, histogram):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 48, generator=g) * 300
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e-41])
    plain = [x, x.t(), x[:, ::3], x.to(torch.bfloat16), x.half(), x.double()[1:], nn.Parameter(x[::2]),
             torch.zeros(0), torch.tensor(2.5), (x / 300).to(torch.float8_e4m3fn)]
    bounded = [torch.tanh(x), torch.sigmoid(x).half()]
    b = _batch(cls, histogram=histogram)
    for i, t in enumerate(plain + bounded):
        b.add(f"m{i}", "tanh" if i >= len(plain) else "other", t)
    b.flush()
    names, kinds, shapes, dtypes, rows, parts = b.result()
    assert names == [f"m{i}" for i in range(len(plain) + len(bounded))] and rows == list(range(len(names)))
    assert shapes == [tuple(t.shape) for t in plain + bounded] and dtypes == [t.dtype for t in plain + bounded]
    assert [bounded_part for _, bounded_part in parts] == [False, True] and list(b.calls) == [10, 2]
    assert torch.equal(parts[0][0], th.tensor_stats(plain, histogram=histogram).data)
    assert torch.equal(parts[1][0], th.tensor_stats(bounded, saturation=1 - activations.EPS).data)


@NATIVE
def test_the_extensions_batch_reads_plain_tensors_through_neither_python_nor_torch_ops(monkeypatch):
    import types

    def refuse(*args, **kwargs):
        raise AssertionError("a read of plain tensors went through Python")

    tensors = [torch.ones(3), torch.randn(9), nn.Parameter(torch.randn(4, 4))]
    want = th.tensor_stats(tensors, histogram=False).data
    monkeypatch.setattr(torch.ops.torchhealth, "tensor_stats", types.SimpleNamespace(default=refuse))
    b = _batch(activations.NATIVE_BATCH, read=refuse, histogram=False)
    for t in tensors:
        b.add("m", "other", t)
    b.flush()
    assert torch.equal(b.result()[-1][0][0], want)


@pytest.mark.parametrize("cls", BATCHES)
def test_a_batch_holding_a_tensor_subclass_reads_it_through_tensor_stats(cls):
    # A DTensor is such a subclass: tensor_stats gives the rows of the global tensors.
    class Tagged(torch.Tensor):
        pass

    reads = []
    x = torch.randn(100)
    b = _batch(cls, read=lambda t, *a: reads.append(t) or activations.read(t, *a))
    b.add("a", "other", torch.ones(3))
    b.add("b", "other", x.as_subclass(Tagged))
    b.flush()
    assert [type(t) for t in reads[0]] == [torch.Tensor, Tagged]
    assert torch.equal(b.result()[-1][0][0], th.tensor_stats([torch.ones(3), x]).data)


@pytest.mark.parametrize("cls", BATCHES)
@pytest.mark.parametrize("bad, exc, words", [
    (torch.randn(2, 2).to_sparse(), ValueError, ["tensors[1]", "sparse", "layout"]),
    (torch.empty(3, device="meta"), ValueError, ["tensors[1]", "meta"]),
])
def test_a_batch_names_a_tensor_it_cannot_read(cls, bad, exc, words):
    b = _batch(cls)
    b.add("a", "other", torch.ones(2))
    b.add("b", "other", bad)
    with pytest.raises(exc) as e:
        b.flush()
    for w in words:
        assert w in str(e.value), (w, str(e.value))
