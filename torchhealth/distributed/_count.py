"""`counted_collectives`: what torchhealth sends, counted on the real calls."""
from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import NamedTuple

import torch.distributed as dist

_COUNTED = ("all_reduce", "all_gather_into_tensor")


class Collective(NamedTuple):
    name: str  # "all_reduce" or "all_gather_into_tensor"
    op: object  # the all-reduce's ReduceOp (None: the default, SUM; or an all-gather)
    bytes: int  # sent by this rank


@contextlib.contextmanager
def counted_collectives(torchhealth_only: bool = True) -> Iterator[list[Collective]]:
    """Records each all-reduce and all-gather issued while it is active, as
    a `Collective` in the list it yields; with ``torchhealth_only``, only the
    calls made from torchhealth's own code (not DDP's or FSDP's). The calls
    themselves are the real ones. For tests and benchmarks of a communication
    budget (not thread-safe: it replaces the functions in
    ``torch.distributed`` while active)."""
    calls: list[Collective] = []
    real = {name: getattr(dist, name) for name in _COUNTED}

    def counting(name):
        signature = inspect.signature(real[name])

        def call(*args, **kwargs):
            if not torchhealth_only or \
                    sys._getframe(1).f_globals.get("__name__", "").startswith("torchhealth"):
                given = signature.bind(*args, **kwargs).arguments  # by position or keyword
                sent = given["input_tensor" if name == "all_gather_into_tensor" else "tensor"]
                calls.append(Collective(name, given.get("op"), sent.numel() * sent.element_size()))
            return real[name](*args, **kwargs)
        return call

    for name in _COUNTED:
        setattr(dist, name, counting(name))
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
