"""Seeded randomness that leaves the caller's RNG state as it was."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int, devices=()) -> Iterator[None]:
    """Seed the CPU generator (and those of the given CUDA devices) inside the
    block and restore every one of them after it, leaving the caller's RNG as
    it was. Only those generators: seeding all of them wakes every backend."""
    cuda = sorted({torch.device(d).index or 0 for d in devices if torch.device(d).type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(seed)
        yield
