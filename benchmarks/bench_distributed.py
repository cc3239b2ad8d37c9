"""Step time of a small transformer under DDP and FSDP2, with and without
torchhealth, side by side in one run, and what each check sends.

    python benchmarks/bench_distributed.py [--nproc 2] [--steps 30]

Starts ``--nproc`` processes on gloo (CPU; NCCL on GPUs is the same script and
is not run here). Per mode, the plain and the wrapped model train in the same
processes with alternating steps, so both see the same machine load; the table
gives the median step time of each and the all-reduces and bytes torchhealth
issued per check (counted on the real calls). Checks run every step with
histograms off.
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


@contextlib.contextmanager
def counted_all_reduces():
    """The real all-reduce; records the bytes of each call torchhealth makes
    (DDP's own gradient all-reduces go through it too when a hook is set)."""
    sent, real = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("torchhealth"):
            sent.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield sent
    finally:
        dist.all_reduce = real


def build(mode: str, wrapped: bool, origin: bool):
    import torchhealth
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torchhealth.distributed import DDPNonfiniteTracker, FSDPNonfiniteTracker
    from train_fsdp2 import TinyLM, shard

    torch.manual_seed(0)
    model = TinyLM(dim=128, layers=4, seq=64)
    model = shard(model) if mode == "fsdp2" else DDP(model)
    tracker = None
    if origin:
        tracker = FSDPNonfiniteTracker(model) if mode == "fsdp2" else DDPNonfiniteTracker(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if wrapped:
        opt = torchhealth.HealthCheckedOptimizer(opt, model=model)
    return model, opt, tracker


def step(model, opt, tracker, tokens) -> None:
    logits = model(tokens[:, :-1])
    nn.functional.cross_entropy(logits, tokens[:, 1:].flatten()).backward()
    if tracker is not None:
        tracker.gather()
    opt.step()
    opt.zero_grad()


def worker(rank: int, world: int, port: int, steps: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    rows = []
    for mode in ("ddp", "fsdp2"):
        variants = {"plain": build(mode, False, False), "wrapped": build(mode, True, False),
                    "origin": build(mode, False, True), "wrapped+origin": build(mode, True, True)}
        times = {k: [] for k in variants}
        sent = {}
        for i in range(steps + 3):
            g = torch.Generator().manual_seed(i * world + rank)
            tokens = torch.randint(0, 256, (8, 65), generator=g)
            for name, (model, opt, tracker) in variants.items():
                dist.barrier()
                t0 = time.perf_counter()
                with counted_all_reduces() as calls:
                    step(model, opt, tracker, tokens)
                dt = time.perf_counter() - t0
                if i >= 3:  # warm-up steps are not timed
                    times[name].append(dt)
                sent[name] = calls
        n_params = sum(1 for _ in variants["plain"][0].parameters())
        base = statistics.median(times["plain"])
        for name in variants:
            med = statistics.median(times[name])
            rows.append((mode, name, n_params, med * 1e3, 100 * (med / base - 1),
                         len(sent[name]), sum(sent[name])))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.dist_workers import free_port

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(worker, args=(args.nproc, free_port(), args.steps, out),
                       nprocs=args.nproc, join=True, start_method="spawn")
    rows = out.get()
    print(f"{args.nproc} processes, gloo, {args.steps} timed steps, checks every step, no histograms")
    print(f"{'mode':6} {'variant':15} {'params':>6} {'median ms':>10} {'overhead':>9} "
          f"{'all-reduces':>11} {'bytes sent':>10}")
    for mode, name, n, ms, over, calls, sent in rows:
        print(f"{mode:6} {name:15} {n:6d} {ms:10.2f} {over:8.1f}% {calls:11d} {sent:10d}")


if __name__ == "__main__":
    main()
