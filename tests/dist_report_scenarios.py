"""Scenarios of tests/test_distributed_report.py, run on every rank of a real
gloo group: the wrapper's Reports name the rank that produced a non-finite
gradient, records say how many ranks they cover, checkpoints, parameters with
no gradient on some ranks, and ``check_every > 1``.
"""
from __future__ import annotations

import os
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import torchhealth
from dist_scenarios import _Net

BAD_RANK, BAD_STEP = 1, 2


def _fsdp_net() -> _Net:
    from torch.distributed.fsdp import fully_shard

    net = _Net()
    for m in (net.first, net.second, net):
        fully_shard(m)
    return net


def _ddp_net():
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _Net()
    return DDP(net), net


def _full(tensors):
    return [t.full_tensor() if isinstance(t, DTensor) else t.detach() for t in tensors]


def _train(model, net, rank, world, steps=4, **settings):
    """Trains with a NaN planted in BAD_RANK's batch at BAD_STEP; every rank's
    Reports (all_ranks), and the wrapper."""
    reports = []
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             model=model, **settings)
    opt.monitor.on_report(reports.append, all_ranks=True)
    for step in range(steps):
        net.poison = rank == BAD_RANK and step == BAD_STEP
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    opt.flush()
    return opt, reports


def _assert_names_bad_rank(reports, world, first_names):
    assert [r.step for r in reports] == [0, 1, 2, 3], [r.step for r in reports]
    for r in reports:
        assert r.world_size == world, r.world_size
        ranked = [f for f in r.findings if f.ranks is not None]
        if r.step != BAD_STEP:
            assert not ranked, (r.step, ranked)
            continue
        assert r.skipped
        assert len(ranked) == 1 and ranked[0].check == "nonfinite", r.findings
        assert ranked[0].ranks == [BAD_RANK], ranked[0].ranks
        assert f"produced on rank {BAD_RANK} (local gradients of {first_names})" in ranked[0].message, \
            ranked[0].message


def ddp_report_names_rank(rank, world, sync="auto"):
    """DDP: the NaN of rank 1's batch reaches every rank through the all-reduce;
    every rank's Report names rank 1 and the parameters, with no call by hand.
    The ranks are gathered in one small all-reduce: with the verdict read at
    the step (sync "auto" on the CPU), only on the step that has a non-finite
    gradient to name; with sync="never", at every check."""
    model, net = _ddp_net()
    with torchhealth.distributed.counted_collectives() as calls:
        opt, reports = _train(model, net, rank, world, sync=sync)
    assert opt.monitor.origin_tracker is torchhealth.distributed.track_origin(model)
    _assert_names_bad_rank(reports, world, "module.first.weight, module.first.bias")
    assert len(calls) == (1 if sync == "auto" else 4), calls


def ddp_report_names_rank_never(rank, world):
    ddp_report_names_rank(rank, world, sync="never")


def compiled_ddp_report_names_rank(rank, world):
    """``torch.compile(DDP(net))`` given as ``model=``: the tracker goes on the DDP
    module inside the compiled wrapper, and Reports name the rank and the
    parameters as the DDP module does."""
    model, net = _ddp_net()
    compiled = torch.compile(model, backend="eager")
    opt, reports = _train(compiled, net, rank, world)
    assert opt.monitor.origin_tracker is torchhealth.distributed.track_origin(model)
    _assert_names_bad_rank(reports, world, "module.first.weight, module.first.bias")


class _Masked(nn.Module):
    """A NaN that one rank's forward makes and then masks out: it never reaches
    the loss or any gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.log, self.second = nn.Linear(4, 8), _Log(), nn.Linear(8, 2)
        self.poison = False

    def forward(self, x):
        h = self.first(x)
        bad = self.log(h - 1e3 if self.poison else h.abs() + 1)  # log of a negative: NaN
        return self.second(torch.where(torch.isfinite(bad), bad, torch.zeros_like(bad)))


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


def watched_local_nan_raises_nowhere(rank, world):
    """DDP + watch, policy "raise": a NaN in one rank's activations that never
    reaches a gradient is that rank's own finding (only its Report holds it, with
    ``local`` and its rank); it warns on that rank and raises on none, so no rank
    is left waiting in the next collective while another has stopped."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _Masked()
    model = DDP(net)
    mine = []
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                             policy={"nonfinite": "raise"})
    opt.monitor.on_report(mine.append, all_ranks=True)
    with torchhealth.watch(model, monitor=opt), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            net.poison = rank == BAD_RANK and step == 1
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        opt.flush()
    local = [(r.step, f.check, f.ranks, f.names) for r in mine for f in r.findings if f.local]
    assert local == ([(1, "nonfinite", [BAD_RANK], ["module.log"])] if rank == BAD_RANK else []), local
    said = [str(w.message) for w in caught if "module.log" in str(w.message)]
    assert len(said) == (1 if rank == BAD_RANK else 0) and (not said or f"rank {BAD_RANK}" in said[0]), said
    assert not any(r.skipped for r in mine)


class _Born(_Masked):
    """A NaN that one rank's forward makes in ``log`` and that reaches the loss."""

    def forward(self, x):
        h = self.first(x)
        return self.second(self.log(h - 1e3 if self.poison else h.abs() + 1))


def _watched_origin_on_every_rank(model, net, rank, world, prefix):
    """A NaN born in BAD_RANK's forward pass (``log`` of a negative) at
    BAD_STEP reaches the gradients: every rank's Report names the module where
    it was born on that rank (``origin`` with its ``"rank"``, and the non-finite
    gradient finding), though the other ranks' own activations stayed finite
    (before, only BAD_RANK's Report had an origin). The HTML report shows the rank."""
    from torchhealth.html_report import render

    mine = []
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    opt.monitor.on_report(mine.append, all_ranks=True)
    with torchhealth.watch(model, monitor=opt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(4):
            net.poison = rank == BAD_RANK and step == BAD_STEP
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        opt.flush()
    origins = {r.step: r.origin for r in mine if r.origin is not None}
    assert list(origins) == [BAD_STEP], origins
    o = origins[BAD_STEP]
    assert (o["module"], o["pass"], o["rank"], o["step"]) == (f"{prefix}log", "forward", BAD_RANK, BAD_STEP), o
    assert o["nan"] > 0, o
    grad = [f for f in mine[BAD_STEP].findings if (f.check, f.local) == ("nonfinite", False)]
    assert len(grad) == 1 and grad[0].ranks == [BAD_RANK], grad
    assert f"first non-finite on rank {BAD_RANK}: output of {prefix}log in the forward pass" in grad[0].message
    assert mine[BAD_STEP].skipped and not any(r.skipped for r in mine if r.step != BAD_STEP)
    page = render(mine)
    assert f"<td>{BAD_STEP}</td><td>{prefix}log</td><td>forward</td>" in page
    assert "<th>rank</th>" in page and f"rank {BAD_RANK})" in str(mine[BAD_STEP])
    _same_everywhere(mine, list(net.parameters()))


def ddp_watched_origin_on_every_rank(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _Born()
    _watched_origin_on_every_rank(DDP(net), net, rank, world, "module.")


def fsdp_watched_origin_on_every_rank(rank, world):
    from torch.distributed.fsdp import fully_shard

    net = _Born()
    for m in (net.first, net.second, net):
        fully_shard(m)
    _watched_origin_on_every_rank(net, net, rank, world, "")


def fsdp_report_names_rank(rank, world):
    net = _fsdp_net()
    _, reports = _train(net, net, rank, world)
    _assert_names_bad_rank(reports, world, "first.weight, first.bias")


def raise_names_rank(rank, world):
    """Under "raise", HealthCheckError on every rank names rank 1."""
    net = _fsdp_net()
    try:
        _train(net, net, rank, world, policy={"nonfinite": "raise"})
    except torchhealth.HealthCheckError as e:
        assert e.report.step == BAD_STEP and f"produced on rank {BAD_RANK}" in str(e), str(e)
    else:
        raise AssertionError("no HealthCheckError")


def explicit_tracker_with_hook(rank, world):
    """track_origin(ddp, hook=...) before wrapping: the user's comm hook runs
    after the check, and the wrapper uses that tracker; a hook registered
    without it leaves Reports without ranks, with a warning."""
    import pytest
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model, net = _ddp_net()
    seen = []

    def hook(state, bucket):
        seen.append(bucket.index())
        return allreduce_hook(state, bucket)

    tracker = torchhealth.distributed.track_origin(model, hook=hook, hook_state=None)
    opt, reports = _train(model, net, rank, world)
    assert opt.monitor.origin_tracker is tracker and seen
    _assert_names_bad_rank(reports, world, "module.first.weight, module.first.bias")
    other, _ = _ddp_net()
    other.register_comm_hook(None, allreduce_hook)
    with pytest.warns(UserWarning, match="already has a communication hook"):
        opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(other.parameters()), model=other)
    assert opt.monitor.origin_tracker is None


def log_path(pid: int) -> str:
    """Where `jsonl_world_size` writes its log: named after the test process."""
    return os.path.join(tempfile.gettempdir(), f"torchhealth-dist-{pid}.jsonl")


def jsonl_world_size(rank, world):
    """Rank 0 alone writes the log (the test reads it back and renders it)."""
    from torchhealth.sinks import JsonlSink

    net = _fsdp_net()
    sink = JsonlSink(log_path(os.getppid())) if rank == 0 else None
    _train(net, net, rank, world, on_report=sink)
    if sink is not None:
        sink.close()


class _Branchy(nn.Module):
    """A layer that forward passes use only while ``take`` (its gradient is None
    after the others)."""

    def __init__(self, take: bool):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.branch, self.last = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.take = take

    def forward(self, x):
        h = torch.relu(self.first(x))
        if self.take:
            h = h + self.branch(h)
        return self.last(h)


def _same_everywhere(reports, params):
    """Every rank holds the same verdicts, origins and parameters (a rank's own
    activation findings, `Finding.local`, aside)."""
    mine = [(r.step, r.skipped, r.origin, sorted((f.check, tuple(f.names)) for f in r.findings if not f.local))
            for r in reports]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine, [p.tolist() for p in _full(params)]))
    assert all(e == everyone[0] for e in everyone), everyone


def ddp_unused_branch(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _Branchy(rank == 0)  # a branch only rank 0 takes
    model = DDP(net, find_unused_parameters=True)
    reports = []
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    opt.monitor.on_report(reports.append, all_ranks=True)
    for step in range(4):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    assert len(reports) == 4
    _same_everywhere(reports, list(model.parameters()))


def _named_at_step_3(reports, net):
    """Checks on steps 0, 3 and 6 (check_every=3), BAD_RANK named at step 3
    alone, the same verdicts and parameters on every rank."""
    assert [r.step for r in reports] == [0, 3, 6], [r.step for r in reports]
    named = {r.step: [f.ranks for f in r.findings if f.ranks] for r in reports}
    assert named == {0: [], 3: [[BAD_RANK]], 6: []}, named
    _same_everywhere(reports, list(net.parameters()))


def _check_every(model, net, rank, world):
    """check_every=3: checks on steps 0, 3, 6 on every rank, no hang. The local
    gradients are read inside communication only on a checked step (a NaN of
    BAD_RANK's at unchecked step 2 sets no flag, nor names any rank at step 3),
    and a NaN of BAD_RANK's at checked step 3 is named."""
    reports = []
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                                             check_every=3)
    opt.monitor.on_report(reports.append, all_ranks=True)
    tracker = opt.monitor.origin_tracker
    for step in range(7):
        net.poison = rank == BAD_RANK and step in (BAD_STEP, 3)
        assert tracker.armed == (step % 3 == 0), step
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
        model(x).sum().backward()
        flags = tracker.local_flags()
        assert bool(flags.any()) == (net.poison and step == 3), (step, flags)
        if step == BAD_STEP:  # a step every rank drops: no gradient reaches the optimizer
            opt.zero_grad()
        opt.step()
        assert not bool(flags.any()), (step, flags)  # forgotten once checked
        opt.zero_grad()
    opt.flush()
    _named_at_step_3(reports, net)


def fsdp_check_every(rank, world):
    net = _fsdp_net()
    _check_every(net, net, rank, world)


def ddp_check_every(rank, world):
    _check_every(*_ddp_net(), rank, world)


def _due_steps_only(model, net, rank, world):
    """A monitor told of its due steps only (check_every=3, ``check(step)``
    called on steps 0, 3 and 6 alone): the tracker, disarmed after step 0's
    check for step 1, reads again from step 2 on, so a NaN of BAD_RANK's at
    checked step 3 is named (before, it stayed disarmed until step 3's own
    check, and no Report named a rank)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = torchhealth.HealthMonitor(opt, model=model, check_every=3)
    reports = []
    monitor.on_report(reports.append, all_ranks=True)
    for step in range(7):
        net.poison = rank == BAD_RANK and step == 3
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
        model(x).sum().backward()
        if step % 3 != 0 or not monitor.check(step).skip:
            opt.step()
        opt.zero_grad()
    monitor.flush()
    _named_at_step_3(reports, net)


def fsdp_due_steps_only(rank, world):
    net = _fsdp_net()
    _due_steps_only(net, net, rank, world)


def ddp_due_steps_only(rank, world):
    _due_steps_only(*_ddp_net(), rank, world)


def fsdp_unused_branch(rank, world):
    """FSDP2 (one group for the whole model) with a branch every rank skips on
    odd steps (FSDP2 itself needs every rank to use the same parameters: a
    branch one rank alone skips fails in its reduce-scatter, torchhealth or
    not): the gradient set changes from step to step, every rank checks the
    same tensors, reaches the same verdict and holds the same parameters."""
    from torch.distributed.fsdp import fully_shard

    net = _Branchy(True)
    fully_shard(net)
    reports = []
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    opt.monitor.on_report(reports.append, all_ranks=True)
    for step in range(4):
        net.take = step % 2 == 0
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
        net(x).sum().backward()
        assert (net.branch.weight.grad is None) == (step % 2 == 1)
        opt.step()
        opt.zero_grad()
    assert len(reports) == 4
    _same_everywhere(reports, list(net.parameters()))


def _adam_fsdp():
    net = _fsdp_net()
    return net, torchhealth.HealthCheckedOptimizer(torch.optim.AdamW(net.parameters(), lr=0.01),
                                                   model=net)


def _steps(net, opt, steps, rank, world):
    for step in steps:
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
        net(x).sum().backward()
        opt.step()
        opt.zero_grad()


def _host(tree):
    """A state dict with every tensor as a full host tensor, for comparisons."""
    if isinstance(tree, dict):
        return {k: _host(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_host(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return (tree.full_tensor() if isinstance(tree, DTensor) else tree).detach().cpu().tolist()
    return tree


def dcp_round_trip(rank, world):
    """dcp.save of an FSDP2 model and the wrapped AdamW after 3 steps, dcp.load
    into fresh ones: the running baselines and the inner optimizer state are
    restored identically on every rank, and 3 more steps match 6 uninterrupted."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torchhealth.distributed import checkpoint_state, load_checkpoint_state

    path = [tempfile.mkdtemp(prefix="torchhealth-dcp-") if rank == 0 else None]
    dist.broadcast_object_list(path)
    whole, whole_opt = _adam_fsdp()
    _steps(whole, whole_opt, range(6), rank, world)
    first, first_opt = _adam_fsdp()
    _steps(first, first_opt, range(3), rank, world)
    dcp.save(checkpoint_state(first, first_opt), checkpoint_id=path[0])
    saved = _host(first_opt.state_dict())
    resumed, resumed_opt = _adam_fsdp()
    state = checkpoint_state(resumed, resumed_opt)
    dcp.load(state, checkpoint_id=path[0])
    load_checkpoint_state(resumed, resumed_opt, state)
    restored = _host(resumed_opt.state_dict())
    assert restored == saved, (restored["torchhealth"], saved["torchhealth"])
    assert restored["torchhealth"]["monitor"]["running"]["count"] == 3
    everyone = [None] * world
    dist.all_gather_object(everyone, restored)
    assert all(e == restored for e in everyone)
    _steps(resumed, resumed_opt, range(3, 6), rank, world)
    assert _host(list(resumed.parameters())) == _host(list(whole.parameters()))
    assert _host(resumed_opt.state_dict()) == _host(whole_opt.state_dict())
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path[0])
