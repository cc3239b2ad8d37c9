"""Step time of a small transformer under DDP and FSDP2, with and without
torchhealth, side by side in one run, and what each check sends.

    python benchmarks/bench_distributed.py [--nproc 2] [--steps 30] [--dim 128] [--layers 4] [--check-every 1]

Starts ``--nproc`` processes on gloo (CPU; NCCL on GPUs is the same script and
is not run here). Per mode, two identical plain models and the wrapped one
(``model=`` given, so Reports name the rank of a non-finite gradient: the
origin tracker is installed, its flags gathered on a step with a non-finite
gradient) train in the same processes, one step each in turn, in an order that
rotates every step, so all see the same machine load. The table gives each
arm's median step time, its overhead against the first plain arm as the median
of the step-by-step ratios with their interquartile range, and the collectives
and bytes torchhealth issued per check (counted on the real calls); "in
check()": the mean time spent in the monitor's check per step, as a share of
the plain step; "in hooks": the same for the origin tracker's reads inside
communication (the rest of torchhealth's work in a step). The second plain arm
is the noise floor: its "overhead" is what identical work measures on this
machine.
Checks run every step (``--check-every``: every Nth) with histograms off.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def build(mode: str, wrapped: bool, dim: int, layers: int, check_every: int = 1):
    import torchhealth
    from torch.nn.parallel import DistributedDataParallel as DDP
    from train_fsdp2 import TinyLM, shard

    torch.manual_seed(0)
    model = TinyLM(dim=dim, layers=layers, seq=64)
    model = shard(model) if mode == "fsdp2" else DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if wrapped:
        opt = torchhealth.HealthCheckedOptimizer(opt, model=model, histogram=False, check_every=check_every)
        assert opt.monitor.origin_tracker is not None
    return model, opt


def step(model, opt, tokens) -> None:
    logits = model(tokens[:, :-1])
    nn.functional.cross_entropy(logits, tokens[:, 1:].flatten()).backward()
    opt.step()
    opt.zero_grad()


def time_checks(monitor, spent: list) -> None:
    """Records the wall time of each `HealthMonitor.check` call (statistics,
    their collectives, the origin gather, checks, policy and Report): the part
    of the overhead that machine noise cannot hide in a small difference."""
    real = monitor.check

    def check(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    monitor.check = check


@contextlib.contextmanager
def time_hooks(spent: list, now: list):
    """Within it, adds the wall time of each origin-tracker check inside
    communication (the DDP comm hook's or FSDP2 reduce-scatter's read of the
    local gradients) to ``spent[now[0]]``: the wrapped arm's cost outside `check()`."""
    from torchhealth.distributed import _origin

    real = _origin._record

    def record(*args):
        t0 = time.perf_counter()
        try:
            return real(*args)
        finally:
            spent[now[0]] += time.perf_counter() - t0

    _origin._record = record
    try:
        yield
    finally:
        _origin._record = real


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def worker(rank: int, world: int, port: int, steps: int, dim: int, layers: int, check_every: int,
           out) -> None:
    from torchhealth.distributed import counted_collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    rows = []
    for mode in ("ddp", "fsdp2"):
        variants = {"plain": build(mode, False, dim, layers), "plain again": build(mode, False, dim, layers),
                    "wrapped": build(mode, True, dim, layers, check_every)}
        names = list(variants)
        times = {k: [] for k in variants}
        checks: list[float] = []
        time_checks(variants["wrapped"][1].monitor, checks)
        hooks, now = [0.0] * (steps + 3), [0]
        sent = {}
        with time_hooks(hooks, now):
            for i in range(steps + 3):
                now[0] = i
                g = torch.Generator().manual_seed(i * world + rank)
                tokens = torch.randint(0, 256, (8, 65), generator=g)
                for name in names[i % 3:] + names[:i % 3]:  # rotating order
                    model, opt = variants[name]
                    dist.barrier()
                    t0 = time.perf_counter()
                    with counted_collectives() as calls:
                        step(model, opt, tokens)
                    dt = time.perf_counter() - t0
                    if i >= 3:  # warm-up steps are not timed
                        times[name].append(dt)
                    if calls or name not in sent:  # what a checked step sends
                        sent[name] = calls
        n_params = sum(1 for _ in variants["plain"][0].parameters())
        # Per step (checked or not): the mean, so that every Nth step's check counts.
        in_check = 100 * statistics.fmean(checks[3:]) / statistics.median(times["plain"])
        in_hooks = 100 * statistics.fmean(hooks[3:]) / statistics.median(times["plain"])
        for name in variants:
            ratios = [t / b for t, b in zip(times[name], times["plain"])]
            lo, mid, hi = (100 * (r - 1) for r in quartiles(ratios))
            rows.append((mode, name, n_params, statistics.median(times[name]) * 1e3, mid, lo, hi,
                         len(sent[name]), sum(c.bytes for c in sent[name]), in_check if name == "wrapped" else 0.0,
                         in_hooks if name == "wrapped" else 0.0))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dim", type=int, default=128, help="the transformer's width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--check-every", type=int, default=1, help="the wrapper's check_every")
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.dist_workers import free_port

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(worker, args=(args.nproc, free_port(), args.steps, args.dim, args.layers, args.check_every, out),
                       nprocs=args.nproc, join=True, start_method="spawn")
    rows = out.get()
    print(f"{args.nproc} processes, gloo, {args.steps} timed steps, TinyLM(dim={args.dim}, "
          f"layers={args.layers}), checks every {args.check_every} step(s), no histograms")
    print(f"{'mode':6} {'variant':12} {'params':>6} {'median ms':>10} {'overhead':>9} "
          f"{'IQR':>15} {'collectives':>11} {'bytes sent':>10} {'in check()':>10} {'in hooks':>8}")
    for mode, name, n, ms, over, lo, hi, calls, sent, in_check, in_hooks in rows:
        iqr = f"[{lo:+.1f}, {hi:+.1f}]%"
        print(f"{mode:6} {name:12} {n:6d} {ms:10.2f} {over:+8.1f}% {iqr:>15} {calls:11d} {sent:10d} "
              f"{in_check:9.1f}% {in_hooks:7.1f}%")


if __name__ == "__main__":
    main()
