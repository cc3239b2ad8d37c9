"""torchhealth.watch: what each batched read holds (each distinct tensor once, also
across batches; integer outputs none) and that its rows stay exact."""
import weakref

import pytest
import torch
from test_watch import Residual, Wrap, _x
from torch import nn

import torchhealth as th
from torchhealth import activations


def _reads(monkeypatch, model, x, read_bytes):
    """(the lists of tensors passed to tensor_stats, the passes) of one watched step."""
    monkeypatch.setattr(activations, "READ_BYTES_CPU", read_bytes)
    reads = []
    stats = activations.tensor_stats_in_hooks
    monkeypatch.setattr(activations, "tensor_stats_in_hooks", lambda t, *a: reads.append(t) or stats(t, *a))
    w = th.watch(model)
    out = model(x)
    if isinstance(out, tuple):  # (loss, logits), as a Hugging Face model returns
        out[0].backward()
    elif out.requires_grad:
        out.pow(2).mean().backward()
    passes = w.take(0)
    w.remove()
    monkeypatch.setattr(activations, "tensor_stats_in_hooks", stats)
    return reads, passes


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
