"""Overhead of HealthCheckedOptimizer at check_every=1, on the CPU.

Trains, side by side in one process, a small transformer (~3.7M parameters)
and an MLP (~1.9M parameters), each in three identical copies:

- plain:       AdamW alone
- manual:      AdamW plus the checks people write by hand today (per-gradient
               isfinite().all() and a total-norm computation, read on the host)
- torchhealth: HealthCheckedOptimizer(AdamW), default policy and thresholds,
               check_every=1, sync="auto" (= "step" on the CPU: every step's
               verdict is read before the optimizer step)

The arms are interleaved step by step, in an order that rotates every step,
so that the noise of a shared machine falls on all of them alike; the overhead
is the ratio of median step times (forward + backward + checks + step).

    .venv/bin/python benchmarks/bench_optimizer.py [--steps 15] [--warmup 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch
from torch import nn

import torchhealth as th


class TinyLM(nn.Module):
    def __init__(self, vocab=2000, d=256, layers=4, heads=4, ff=1024, seq=128):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.body(h, mask=self.mask, is_causal=True))


def transformer(batch: int, seq: int = 128):
    vocab = 2000
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(4)]

    def loss(model, i):
        t = data[i % len(data)]
        logits = model(t[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, vocab), t[:, 1:].reshape(-1))

    return (lambda: TinyLM(vocab=vocab, seq=seq)), loss, f"batch {batch} x {seq} tokens"


def mlp(batch: int):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(4)]

    def make():
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))

    def loss(model, i):
        x, y = data[i % len(data)]
        return nn.functional.cross_entropy(model(x), y)

    return make, loss, f"batch {batch}"


def manual_checks(model) -> None:
    """What people write by hand: a finiteness test per gradient and the total
    norm, both read on the host (one sync each)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise FloatingPointError("non-finite gradient")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if float(norm) > 1e4:
        raise FloatingPointError("exploding gradient")


def bench(name, make, loss_fn, steps, warmup):
    arms = {}
    for arm in ("plain", "manual", "torchhealth"):
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if arm == "torchhealth":
            opt = th.HealthCheckedOptimizer(opt, model=model, check_every=1)
            check_times = _time_calls(opt.monitor, "check")
        arms[arm] = (model, opt, [])
    order = list(arms)
    for i in range(warmup + steps):
        for arm in order[i % 3:] + order[: i % 3]:  # rotate who goes first
            model, opt, times = arms[arm]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss_fn(model, i).backward()
            if arm == "manual":
                manual_checks(model)
            opt.step()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
    # Same training in every arm: the wrapper is bit-identical when nothing fires.
    ref = list(arms["plain"][0].parameters())
    identical = all(torch.equal(p, q) for p, q in zip(ref, arms["torchhealth"][0].parameters()))
    report = arms["torchhealth"][1].last_report
    times = {a: t for a, (_, _, t) in arms.items()}
    med = {a: statistics.median(t) for a, t in times.items()}
    nparams = sum(p.numel() for p in ref)
    # Adjacent steps of two arms share the machine's state of the moment: the
    # median of their ratios cancels slow drifts better than a ratio of medians.
    paired = {a: statistics.median(x / y for x, y in zip(times[a], times["plain"]))
              for a in ("manual", "torchhealth")}
    return {"name": name, "params": nparams, "median": med, "identical": identical,
            "paired": paired, "check": statistics.median(check_times[warmup:]),
            "findings": [f.check for f in report.findings],
            "min": {a: min(t) for a, t in times.items()},
            "spread": {a: (min(t), max(t)) for a, t in times.items()}}


def _time_calls(obj, name: str) -> list[float]:
    """Records the duration of every call of ``obj.<name>``."""
    fn, out = getattr(obj, name), []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            out.append(time.perf_counter() - t0)

    setattr(obj, name, timed)
    return out


def _pct(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="measured steps per arm and model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: steadier on a shared machine)")
    ap.add_argument("--lm-batch", type=int, default=8)
    ap.add_argument("--mlp-batch", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("error", th.HealthWarning)  # a finding would spoil the comparison
    rows = []
    for name, (make, loss_fn, shape) in (("transformer", transformer(args.lm_batch)),
                                         ("MLP", mlp(args.mlp_batch))):
        r = bench(name, make, loss_fn, args.steps, args.warmup)
        r["shape"] = shape
        rows.append(r)
    print(f"torch {torch.__version__}, torchhealth backend: {th.backend().name}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {args.steps} measured steps (+{args.warmup} warm-up) per arm, "
          f"arms interleaved")
    print()
    print("Step times are medians (ms). Overheads: paired = median over steps of the ratio to the "
          "plain step run next to it; min = ratio of the fastest steps; check = time inside "
          "the monitor's check() per step over the plain step.")
    print()
    print("| model | params | data | plain | manual checks | torchhealth | check() | "
          "torchhealth overhead: paired / min / check | manual: paired | bit-identical |")
    print("|---|---:|---|---:|---:|---:|---:|---|---:|---|")
    for r in rows:
        m, p, lo = r["median"], r["paired"], r["min"]
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['shape']} | {1e3 * m['plain']:.1f} | "
              f"{1e3 * m['manual']:.1f} | {1e3 * m['torchhealth']:.1f} | {1e3 * r['check']:.2f} | "
              f"{_pct(p['torchhealth'])} / {_pct(lo['torchhealth'] / lo['plain'])} / "
              f"{_pct(1 + r['check'] / m['plain'])} | {_pct(p['manual'])} | "
              f"{'yes' if r['identical'] else 'NO'} |")
    print()
    for r in rows:
        s = r["spread"]
        print(f"{r['name']}: min/max ms per arm: " + ", ".join(
            f"{a} {1e3 * lo:.1f}/{1e3 * hi:.1f}" for a, (lo, hi) in s.items()))
    t = rows[0]
    direct = t["check"] / t["median"]["plain"]
    print(f"\ntransformer: check() costs {100 * direct:.2f}% of a plain step, paired end-to-end "
          f"overhead {_pct(t['paired']['torchhealth'])} (target <= +3%: "
          f"{'met' if direct <= 0.03 and t['paired']['torchhealth'] <= 1.03 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
