"""`Collector.collect`'s quick path (the rows of the last collect, reused when
nothing about the tensors changed) against the full path of a fresh collector."""
import torch
from torch import nn

from torchhealth.collect import Collector


def _same(got, want) -> None:
    assert len(got.tensors) == len(want.tensors)
    # The same tensors (a sparse gradient's values: coalesced anew by each collect).
    assert all(a is b or (a.dtype == b.dtype and torch.equal(a, b)) for a, b in zip(got.tensors, want.tensors))
    assert all(a is b for a, b in zip(got.grads, want.grads)) and len(got.grads) == len(want.grads)
    for field in ("names", "roles", "dtypes", "shapes", "param_index", "param_names", "trainable",
                  "sparse", "structural", "modules"):
        assert getattr(got.layout, field) == getattr(want.layout, field), field
    assert got.devices == want.devices


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _backward(model) -> None:
    model(torch.tensor([1, 2, 3])).sum().backward()


def test_every_collect_equals_a_fresh_full_collect_while_the_tensors_change():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    collector = Collector(opt, model)
    lin, extra = model[1], nn.Parameter(torch.randn(3))

    def fresh():
        return Collector(opt, model).collect()

    changes = [
        lambda: None,  # no gradients yet
        lambda: _backward(model),
        lambda: None,  # unchanged: the quick path
        lambda: opt.zero_grad(),  # gradients gone
        lambda: _backward(model),
        lambda: lin.weight.requires_grad_(False),
        lambda: lin.weight.requires_grad_(True),
        lambda: setattr(lin.bias, "grad", None),  # one gradient gone
        lambda: setattr(lin.weight, "data", lin.weight.data.double()),  # a dtype, same parameter
        lambda: setattr(lin.weight, "grad", torch.zeros_like(lin.weight)),
        lambda: setattr(lin.bias, "data", torch.zeros(2, 2)),  # a shape, same parameter
        lambda: opt.add_param_group({"params": [extra]}),
        lambda: setattr(extra, "grad", torch.ones(3)),
        lambda: setattr(model[0].weight, "grad", torch.sparse_coo_tensor([[1, 1]], torch.ones(2, 4), (10, 4))),
        lambda: None,  # a sparse gradient: the full path every time
        lambda: setattr(model[0].weight, "grad", torch.ones(10, 4)),
        lambda: None,
    ]
    for i, change in enumerate(changes):
        change()
        got = collector.collect()
        _same(got, fresh())
        assert not got.changed_params or i == 11, i


def test_an_unchanged_collect_takes_the_quick_path_and_reuses_the_layout(monkeypatch):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    collector = Collector(opt, model)
    _backward(model)
    first = collector.collect()
    full = []
    real = Collector._collect_all
    monkeypatch.setattr(Collector, "_collect_all", lambda self, *a: full.append(1) or real(self, *a))
    again = collector.collect()
    assert not full and again.layout is first.layout
    _same(again, first)
    opt.zero_grad()
    _backward(model)  # new gradient tensors, same facts: still quick
    quick = collector.collect()
    assert not full
    _same(quick, real(Collector(opt, model), [p for p in model.parameters()],
                      [p.grad for p in model.parameters()]))
    # With optimizer state read, always the full path.
    stateful = Collector(torch.optim.Adam(model.parameters()), model, optimizer_state=True)
    stateful.collect()
    stateful.collect()
    assert len(full) == 2
