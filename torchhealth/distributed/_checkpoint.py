"""Distributed checkpoints (`torch.distributed.checkpoint`) of a model and a
`HealthCheckedOptimizer`: the model, the inner optimizer's state and the
monitor's running state (gradient-norm baseline, dead counters, skip counts)
in one dict for ``dcp.save`` / ``dcp.load``::

    state = checkpoint_state(model, opt)
    dcp.save(state, checkpoint_id=path)
    ...                                      # a new process, the same model and wrapper
    state = checkpoint_state(model, opt)     # the template dcp.load fills in place
    dcp.load(state, checkpoint_id=path)
    load_checkpoint_state(model, opt, state)

The model and optimizer parts are `torch.distributed.checkpoint.state_dict`'s
(sharded, keyed by parameter name, so they reshard). The inner optimizer, not
the wrapper, goes to ``get_state_dict``: it initialises an empty optimizer
state with a step on zero gradients, which must not count as a health check.
The running state is the same on every rank, so it is saved once and loaded
on every rank.
"""
from __future__ import annotations

import torch

_KEY = "torchhealth"


def checkpoint_state(model: torch.nn.Module, opt) -> dict:
    """``{"model", "optim", "torchhealth"}`` of ``model`` and the wrapper
    ``opt``, for ``dcp.save``, or as the template that ``dcp.load`` fills."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt.optimizer)
    ours = opt.state_dict()[_KEY]
    if ours["monitor"]["running"] is None:
        # No check ran yet: zeros of the right shapes, so dcp.load has tensors to fill.
        from ..check_types import RunningState

        params = opt.monitor.collector.collect().layout.param_names
        device = next((p.device for g in opt.param_groups for p in g["params"]), torch.device("cpu"))
        ours["monitor"]["running"] = RunningState.zeros(len(params), device).state_dict()
    return {"model": model_sd, "optim": optim_sd, _KEY: ours}


def load_checkpoint_state(model: torch.nn.Module, opt, state: dict) -> None:
    """Loads what `checkpoint_state` gave (after ``dcp.load``) into ``model``
    and the wrapper ``opt``, on every rank."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    missing = [k for k in ("model", "optim", _KEY) if k not in state]
    if missing:
        raise ValueError(f"load_checkpoint_state: state has no {', '.join(map(repr, missing))}; "
                         "pass the dict checkpoint_state returned, filled by dcp.load")
    set_state_dict(model, opt.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    # The wrapper loads its counters and the monitor's state with the inner
    # optimizer's state dict, which set_state_dict has just loaded.
    opt.load_state_dict({**opt.optimizer.state_dict(), _KEY: state[_KEY]})
