"""The sanity suite vs the same checks written by hand and run one by one.

For each correct model of the bug zoo (tests/test_bug_zoo.py), times
`check_model` with six checks (finite, connected, params_update, logits,
init_loss, batch_independent) against hand-written equivalents in the style of
torchtest: each check its own forward (and backward), a Python loop over the
parameters with one reduction and one host read per tensor. The overfit check
is left out of both (its optimizer steps cost the same either way); the last
column is the whole `check_model` with every check the model takes, overfit
included, for scale.

    python benchmarks/bench_sanity.py [--min-run-time SECONDS]

Timings are medians of torch.utils.benchmark's blocked_autorange, one thread.
"""
from __future__ import annotations

import argparse
import copy
import math
import pathlib
import sys

import torch
from torch.utils import benchmark

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_bug_zoo import ZOO  # noqa: E402

from torchhealth.testing import check_model  # noqa: E402
from torchhealth.testing.batch import as_batch, primary_output  # noqa: E402

CHECKS = ("finite", "connected", "params_update", "logits", "init_loss", "batch_independent")


def _forward_loss(model, b, loss_fn):
    out = b.forward(model)
    return out, b.loss(loss_fn, out)


def hand_written(model, batch, loss_fn, classes):
    """The six checks one by one, each with its own pass, per-tensor reads."""
    b = as_batch(batch)
    # finite: forward with hooks, backward, then every tensor read on its own
    m = copy.deepcopy(model)
    acts = []
    hooks = [mod.register_forward_hook(lambda _m, _i, o: acts.append(o))
             for mod in m.modules() if next(mod.children(), None) is None]
    out, loss = _forward_loss(m, b, loss_fn)
    loss.backward()
    for h in hooks:
        h.remove()
    tensors = [t for t in acts if isinstance(t, torch.Tensor) and t.is_floating_point()]
    tensors += [p for p in m.parameters()] + [p.grad for p in m.parameters() if p.grad is not None]
    assert all(bool(torch.isfinite(t).all()) for t in tensors)
    # connected: another forward and backward, one read per gradient
    m = copy.deepcopy(model)
    _forward_loss(m, b, loss_fn)[1].backward()
    assert all(p.grad is not None and bool((p.grad != 0).any())
               for p in m.parameters() if p.requires_grad)
    # params_update: forward, backward, step, compare each parameter
    m = copy.deepcopy(model)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in m.parameters()]
    _forward_loss(m, b, loss_fn)[1].backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters()))
    # logits: a forward, rows must not be probabilities or log-probabilities
    m = copy.deepcopy(model)
    with torch.no_grad():
        o = primary_output(b.forward(m)).double()
    assert not bool(((o.sum(1) - 1).abs() < 1e-3).all() and o.min() >= 0)
    assert not bool((o.logsumexp(1).abs() < 1e-3).all())
    # init_loss: a forward
    with torch.no_grad():
        assert abs(_forward_loss(m, b, loss_fn)[1].item() - math.log(classes)) <= 0.5 * math.log(classes)
    # batch independence: eval forward, backward of one sample's output, per-sample reads
    m.eval()
    name, x = b.inputs[0]
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_(True)
        out = primary_output(b.with_inputs([x] + [t for _, t in b.inputs[1:]]).forward(m))
        sources = [x]
    else:
        emb = []
        hook = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Embedding)) \
            .register_forward_hook(lambda _m, _i, o: emb.append(o))
        out = primary_output(b.forward(m))
        hook.remove()
        sources = emb
    i = out.shape[0] // 2
    (g,) = torch.autograd.grad((out[i] * (torch.rand(out[i].shape) + 0.5)).sum(), sources)
    assert all(bool((g[j] != 0).any()) == (j == i) for j in range(out.shape[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-run-time", type=float, default=2.0)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, one thread; checks: {', '.join(CHECKS)}\n")
    print("| model | parameters | suite (ms) | hand-written, one by one (ms) | speed-up "
          "| whole check_model (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (make, batch, loss_fn, kwargs) in ZOO.items():
        torch.manual_seed(0)
        model = make()
        classes = kwargs["classes"]
        report = check_model(model, batch, loss_fn, classes=classes, checks=CHECKS)
        assert report.ok, str(report)
        hand_written(model, batch, loss_fn, classes)  # warm-up and a correctness check
        env = dict(check_model=check_model, hand_written=hand_written, model=model, batch=batch,
                   loss_fn=loss_fn, classes=classes, CHECKS=CHECKS)
        suite = benchmark.Timer("check_model(model, batch, loss_fn, classes=classes, checks=CHECKS)",
                                globals=env).blocked_autorange(min_run_time=args.min_run_time)
        hand = benchmark.Timer("hand_written(model, batch, loss_fn, classes)",
                               globals=env).blocked_autorange(min_run_time=args.min_run_time)
        whole = benchmark.Timer("check_model(model, batch, loss_fn, **kwargs)",
                                globals={**env, "kwargs": kwargs}).blocked_autorange(
                                    min_run_time=args.min_run_time)
        n = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {n:,} | {suite.median * 1e3:.2f} | {hand.median * 1e3:.2f} | "
              f"{hand.median / suite.median:.2f}x | {whole.median * 1e3:.0f} |")


if __name__ == "__main__":
    main()
