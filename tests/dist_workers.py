"""Real gloo process groups for the distributed tests.

`run_scenarios` starts ``world_size`` processes once and runs many scenarios in
them (starting processes costs far more than any scenario); each rank reports,
per scenario, None or the traceback of what failed. A scenario is a function of
``rank`` and ``world_size`` that asserts.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, module, names, out_dir):
    import importlib

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=30))
    scenarios = importlib.import_module(module)
    results = {}
    try:
        for name in names:
            try:
                getattr(scenarios, name)(rank, world_size)
                results[name] = None
            except Exception:  # reported to the parent, which fails that test
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def run_scenarios(world_size: int, module: str, names: list[str]) -> dict[str, str | None]:
    """Run the named scenarios of ``module`` on every rank; per scenario, the
    failures of all ranks joined (None when every rank passed)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world_size, free_port(), module, names, out),
                           nprocs=world_size, join=True, start_method="spawn")
        per_rank = []
        for r in range(world_size):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return {n: "\n".join(f"rank {r}: {res[n]}" for r, res in enumerate(per_rank)
                         if res.get(n, "did not run") is not None) or None for n in names}


# -- comparisons shared by the scenarios -----------------------------------------
def assert_same_stats(got, want, fulls, label: str = "") -> None:
    """Counts, extremes and histograms bit for bit; sums within SUM_RTOL times
    the sum of |x| (and of x**2) over the finite values of ``fulls``."""
    from torchhealth.stats import SUM_RTOL

    assert len(got) == len(want), f"{label}: {len(got)} rows, expected {len(want)}"
    assert torch.equal(got.counts, want.counts), f"{label}: counts {got.counts} != {want.counts}"
    for field in ("min", "max", "absmax"):
        a, b = getattr(got, field), getattr(want, field)
        assert torch.equal(a.view(torch.int64), b.view(torch.int64)), f"{label}: {field} {a} != {b}"
    assert got.has_histogram == want.has_histogram
    if got.has_histogram:
        assert torch.equal(got.hist, want.hist), f"{label}: histograms differ"
    finite = [t.detach().double()[t.detach().isfinite()] for t in fulls]
    for field, mass in (("sum", [f.abs().sum() for f in finite]),
                        ("sumsq", [f.square().sum() for f in finite])):
        diff = (getattr(got, field) - getattr(want, field)).abs()
        bound = SUM_RTOL * torch.stack(mass)
        assert bool((diff <= bound).all()), \
            f"{label}: {field} {getattr(got, field)} != {getattr(want, field)}"
