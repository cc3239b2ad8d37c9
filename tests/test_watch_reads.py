"""torchhealth.watch: what each batched read holds (each distinct tensor once, also
across batches; integer outputs none) and that its rows stay exact."""
import pytest
import torch
from torch import nn

import torchhealth as th
from test_watch import Residual, Wrap, _x


def _reads(monkeypatch, model, x, read_bytes):
    """(the lists of tensors passed to tensor_stats, the passes) of one watched step."""
    monkeypatch.setitem(th.watch.__globals__, "READ_BYTES", read_bytes)
    reads = []
    stats = th.watch.__globals__["tensor_stats"]
    monkeypatch.setitem(th.watch.__globals__, "tensor_stats", lambda t, **k: reads.append(t) or stats(t, **k))
    w = th.watch(model)
    out = model(x)
    if out.requires_grad:
        out.pow(2).mean().backward()
    passes = w.take(0)
    w.remove()
    monkeypatch.setitem(th.watch.__globals__, "tensor_stats", stats)
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


def test_hooks_on_a_step_that_is_not_due_read_nothing_and_register_no_gradient_hook(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    hooks = []
    register = torch.Tensor.register_hook
    monkeypatch.setattr(torch.Tensor, "register_hook", lambda t, h: hooks.append(h) or register(t, h))
    reports = []
    with th.watch(model, check_every=2, on_report=reports.append) as w:
        for i in range(2):
            model(_x(i)).pow(2).mean().backward()
            # On step 0 only: the three modules' outputs and the model's output (the last one's).
            assert len(hooks) == 4 and w._outputs is None and w._grads is None
    assert [r.step for r in reports] == [0]
