"""Cost of the end-of-backward check and of `torchhealth.watch`, against
`torch.autograd.detect_anomaly`, on a Hugging Face GPT-2 (random init from
`GPT2Config`, nothing downloaded), on the CPU.

Arms, interleaved step by step in a rotating order so that the noise of a
shared machine falls on all of them alike (each its own copy of the model):

- plain:        AdamW alone
- step check:   HealthCheckedOptimizer, checks at optimizer-step time (at_backward_end=False)
- backward end: HealthCheckedOptimizer, checks when backward finishes (the default with model=)
- watch:        backward end, plus watch() on every module, every step
- anomaly:      AdamW alone inside torch.autograd.detect_anomaly()

    .venv/bin/python benchmarks/bench_watch.py [--steps 12] [--warmup 2]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
import warnings

import torch

import torchhealth as th


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=2000, n_positions=128, n_embd=256, n_layer=args.layers,
                                     n_head=4)
    ids = torch.randint(0, 2000, (8, 128), generator=torch.Generator().manual_seed(0))

    def make(kind):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if kind in ("plain", "anomaly"):
            return model, inner, None
        opt = th.HealthCheckedOptimizer(inner, model=model, at_backward_end=kind != "step check")
        return model, opt, th.watch(model, monitor=opt) if kind == "watch" else None

    kinds = ["plain", "step check", "backward end", "watch", "anomaly"]
    arms = {k: make(k) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    warnings.simplefilter("ignore")
    for step in range(args.warmup + args.steps):
        order = kinds[step % len(kinds):] + kinds[:step % len(kinds)]
        for k in order:
            model, opt, _ = arms[k]
            ctx = torch.autograd.detect_anomaly() if k == "anomaly" else contextlib.nullcontext()
            t0 = time.perf_counter()
            with ctx:
                opt.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
            if step >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in arms["plain"][0].parameters())
    base = statistics.median(times["plain"])
    print(f"GPT-2 ({args.layers} layers, n_embd 256, {n_params / 1e6:.1f}M parameters), batch 8 x 128 "
          f"tokens, {args.steps} steps after {args.warmup} warm-up, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {cpu_name()}")
    print(f"| arm | median step (ms) | x plain | added vs plain |")
    print(f"|---|---:|---:|---:|")
    for k in kinds:
        m = statistics.median(times[k])
        print(f"| {k} | {1e3 * m:.1f} | {m / base:.3f} | {100 * (m / base - 1):+.1f}% |")
    added = {k: statistics.median(times[k]) - base for k in kinds}
    if added["anomaly"] > 0:
        print(f"\nwatch adds {added['watch'] / added['anomaly']:.3f} of what anomaly mode adds "
              f"(goal: at most 0.1)")


if __name__ == "__main__":
    main()
