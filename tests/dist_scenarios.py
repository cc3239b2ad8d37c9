"""Scenarios run on every rank of a real gloo group by tests/test_distributed.py.

Every rank builds the same model and data from fixed seeds (data differs by
rank where a batch would), so the expected values need no extra communication
beyond ``full_tensor()``.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import torchhealth
from torchhealth.distributed import _combine
from torchhealth.distributed._count import Collective
from torchhealth.distributed import (DDPNonfiniteTracker, FSDPNonfiniteTracker, all_reduce_stats,
                                     by_mesh, counted_collectives, global_stats, payload_bytes)
from dist_workers import assert_same_stats

NAN, INF = math.nan, math.inf


def _special(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, shape, generator=g)
    flat = x.view(-1)
    for i, v in enumerate([NAN, INF, -INF, 0.0, -0.0, 1e-40, 6e4, -3e38]):
        if i < flat.numel():
            flat[(7 * i) % flat.numel()] = v
    return x.to(dtype)


def _compare_dtensors(dts, label):
    fulls = [d.full_tensor() for d in dts]
    for hist in (True, False):
        got = torchhealth.tensor_stats(dts, histogram=hist)
        want = torchhealth.tensor_stats(fulls, histogram=hist)
        assert_same_stats(got, want, fulls, f"{label} histogram={hist}")
    got = torchhealth.tensor_stats(dts, saturation=1.0)
    assert_same_stats(got, torchhealth.tensor_stats(fulls, saturation=1.0), fulls, f"{label} saturation")


def dtensor_1d(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    dts = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = _special((5, 7), seed=1, dtype=dtype)
        dts += [distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(x, mesh, [Shard(1)]),
                distribute_tensor(x, mesh, [Replicate()])]
    # fewer rows than ranks (empty shards), an empty tensor, a 0-d tensor
    dts += [distribute_tensor(_special((1, 3), seed=2), mesh, [Shard(0)]),
            distribute_tensor(torch.empty(0, 4), mesh, [Shard(0)]),
            distribute_tensor(torch.tensor(-2.5), mesh, [Replicate()])]
    _compare_dtensors(dts, "1-D mesh")
    assert dts[2].to_local().numel() == 35  # replicated: each rank holds it all ...
    assert int(torchhealth.tensor_stats([dts[2]]).numel[0]) == 35  # ... and it counts once


def dtensor_2d(rank, world):
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard"))
    x = _special((6, 5), seed=3)
    placements = [[Shard(0), Replicate()], [Replicate(), Shard(1)], [Replicate(), Replicate()],
                  [Shard(0), Shard(1)], [Shard(0), Shard(0)], [Replicate(), Shard(0)]]
    dts = [distribute_tensor(x, mesh, p) for p in placements]
    dts.append(distribute_tensor(_special((1, 4), seed=4), mesh, [Replicate(), Shard(0)]))
    _compare_dtensors(dts, "2-D mesh")
    # a 2-D sub-mesh that spans only some ranks: reduced one mesh dimension at a time
    cube = init_device_mesh("cpu", (2, 1, world // 2), mesh_dim_names=("pp", "dp", "tp"))
    sub = cube["dp", "tp"]
    assert sub.ndim == 2 and sub.size() < world
    _compare_dtensors([distribute_tensor(x, sub, p) for p in placements[:4]], "2-D sub-mesh")


def _mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    # Linear(16, 3) and Linear(3, 1) have fewer rows than ranks: uneven and empty shards.
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 1))


def _train_step(model, rank, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + rank))
        model(x).square().sum().backward()
        if step < steps - 1:
            opt.step()
            opt.zero_grad()


def _compare_model(model, label):
    params = [p for p in model.parameters()]
    assert all(isinstance(p, DTensor) for p in params), f"{label}: parameters are not DTensors"
    _compare_dtensors(params, f"{label} parameters")
    _compare_dtensors([p.grad for p in params], f"{label} gradients")


def fsdp2(rank, world):
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    _train_step(model, rank)
    _compare_model(model, "FSDP2")


def hsdp(rank, world):
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert model[0].weight.placements == (Replicate(), Shard(0))
    _train_step(model, rank)
    _compare_model(model, "HSDP")


def fsdp_tp(rank, world):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh["dp"])
    assert len(by_mesh(list(model.parameters()))) == 1
    _train_step(model, rank)
    # the row-wise bias is replicated over "tp" and sharded over "dp": counted once
    assert Replicate() in model[2].bias.placements
    _compare_model(model, "FSDP+TP")


def errors(rank, world):
    mesh = init_device_mesh("cpu", (world,))
    other = init_device_mesh("cpu", (world,), mesh_dim_names=("other",))
    a = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    b = distribute_tensor(torch.ones(4, 2), other, [Shard(0)])
    pending = DTensor.from_local(torch.ones(3), mesh, [Partial()])
    cases = [([a, torch.ones(2)], TypeError, "tensors\\[1\\] is a plain Tensor"),
             ([a, b], ValueError, "tensors\\[1\\] is on .* once per mesh"),
             ([a, pending], ValueError, "tensors\\[1\\] has placement .*pending sum")]
    for tensors, exc, match in cases:
        with pytest.raises(exc, match=match):
            torchhealth.tensor_stats(tensors)
    with pytest.raises(TypeError, match="must be a TensorStats"):
        all_reduce_stats([torch.ones(1)])
    only_zero = dist.new_group([0])
    stats = torchhealth.tensor_stats([torch.ones(3)])
    if rank == 0:  # a group of one: the result is this rank's own
        assert torch.equal(all_reduce_stats(stats, only_zero).data, stats.data)
    else:
        with pytest.raises(ValueError, match=f"this rank \\({rank}\\) is not a member"):
            all_reduce_stats(stats, only_zero)


@contextlib.contextmanager
def _gather_bytes(limit: int):
    """`_combine.GATHER_BYTES` set to ``limit`` while active: which of its two
    ways `all_reduce_stats` and `dtensor_stats` combine rows."""
    saved, _combine.GATHER_BYTES = _combine.GATHER_BYTES, limit
    try:
        yield
    finally:
        _combine.GATHER_BYTES = saved


def _rank_tensors(r):
    return [_special((3 + r, 4), seed=10 + r), torch.randn(r + 1, generator=torch.Generator().manual_seed(r))]


def combine_plain(rank, world):
    """`all_reduce_stats` both ways (one all-gather while it is small, else SUM
    and MAX all-reduces): the statistics of the whole, on every rank."""
    mine = _rank_tensors(rank)
    everyone = [_rank_tensors(r) for r in range(world)]
    fulls = [torch.cat([t[i].flatten() for t in everyone]) for i in range(2)]
    zero = _rank_tensors(0)
    for gather_bytes, kinds in ((_combine.GATHER_BYTES, [("all_gather_into_tensor", None)]),
                                (0, [("all_reduce", dist.ReduceOp.SUM), ("all_reduce", dist.ReduceOp.MAX)])):
        with _gather_bytes(gather_bytes):
            with counted_collectives() as calls:
                got = all_reduce_stats(torchhealth.tensor_stats(mine))
            assert [(c.name, c.op) for c in calls] == kinds, calls
            assert sum(c.bytes for c in calls) == payload_bytes(2, histogram=True) == 2 * 4560, calls
            assert_same_stats(got, torchhealth.tensor_stats(fulls), fulls, "all_reduce_stats")
            got = all_reduce_stats(torchhealth.tensor_stats(mine, histogram=False), async_op=True).wait()
            assert_same_stats(got, torchhealth.tensor_stats(fulls, histogram=False), fulls, "async")
            # replicated rows count once: the result is rank 0's rows
            got = all_reduce_stats(torchhealth.tensor_stats(mine), replicated=True)
            assert_same_stats(got, torchhealth.tensor_stats(zero), zero, "replicated")
            got = all_reduce_stats(torchhealth.tensor_stats(mine), replicated=torch.tensor([True, False]))
            want = [zero[0], fulls[1]]
            assert_same_stats(got, torchhealth.tensor_stats(want), want, "replicated mask")
    # The counter reads the arguments however they were passed.
    with counted_collectives(torchhealth_only=False) as calls:
        dist.all_gather_into_tensor(output_tensor=torch.empty(3 * world), input_tensor=torch.ones(3))
        dist.all_reduce(torch.ones(2), dist.ReduceOp.MAX)
    assert calls == [Collective("all_gather_into_tensor", None, 12),
                     Collective("all_reduce", dist.ReduceOp.MAX, 8)], calls


def dtensor_collectives(rank, world):
    """One all-gather per mesh while ranks x payload fits `GATHER_BYTES`, then
    the two all-reduces; the same numbers either way."""
    mesh = init_device_mesh("cpu", (world,))
    dts = [distribute_tensor(_special((4, 4), seed=s), mesh, [Shard(0) if s % 2 else Replicate()])
           for s in range(6)]
    results = []
    for gather_bytes, kinds in ((world * payload_bytes(6, histogram=False), ["all_gather_into_tensor"]),
                                (world * payload_bytes(6, histogram=False) - 1, ["all_reduce"] * 2)):
        with _gather_bytes(gather_bytes), counted_collectives() as calls:
            results.append(torchhealth.tensor_stats(dts, histogram=False))
        assert [c.name for c in calls] == kinds, calls
        assert sum(c.bytes for c in calls) == payload_bytes(6, histogram=False) == 6 * 96, calls
    fulls = [t.full_tensor() for t in dts]
    for got in results:
        assert_same_stats(got, torchhealth.tensor_stats(fulls, histogram=False), fulls, "dtensor")


class _Net(nn.Module):
    """An MLP that can poison the gradient flowing into its first layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 2)
        self.poison = False

    def forward(self, x):
        h = self.first(x)
        if self.poison and h.requires_grad:
            h.register_hook(lambda g: g * NAN)
        return self.second(torch.relu(h))


def _origin_steps(model, net, tracker, rank, world, bad_rank, bad_step=2,
                  names=("first.weight", "first.bias")):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(4):
        net.poison = rank == bad_rank and step == bad_step
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
        model(x).sum().backward()
        origin = tracker.gather()
        want = torch.zeros(world, dtype=torch.bool)
        if step == bad_step:
            want[bad_rank] = True
            assert origin.describe() == {"ranks": [bad_rank],
                                         "parameters": list(names)}, origin.describe()
            grads = [p.grad for p in model.parameters()]
            grads = [g.full_tensor() if isinstance(g, DTensor) else g for g in grads]
            assert not bool(torch.isfinite(grads[0]).all()), "the NaN should have spread to every rank"
            opt.zero_grad()
            continue
        assert torch.equal(origin.ranks, want), (step, origin.ranks)
        opt.step()
        opt.zero_grad()


def ddp_origin(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _Net()
    model = DDP(net, bucket_cap_mb=1e-5)  # small buckets: one parameter each
    tracker = DDPNonfiniteTracker(model)
    _origin_steps(model, net, tracker, rank, world, bad_rank=world - 1,
                  names=("module.first.weight", "module.first.bias"))


def fsdp_origin(rank, world, mesh=None):
    from torch.distributed.fsdp import fully_shard

    net = _Net()
    for m in (net.first, net.second, net):
        fully_shard(m, mesh=mesh)
    tracker = FSDPNonfiniteTracker(net)
    assert tracker.slot_names == (("first.weight", "first.bias"), ("second.weight", "second.bias"))
    _origin_steps(net, net, tracker, rank, world, bad_rank=1)


def fsdp_skip_everywhere(rank, world):
    """HealthCheckedOptimizer over FSDP2: a NaN from one rank's batch makes every
    rank skip that step (the wrapper reads global statistics), and only that one."""
    from torch.distributed.fsdp import fully_shard

    net = _Net()
    fully_shard(net.first)
    fully_shard(net.second)
    fully_shard(net)
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    for step in range(4):
        net.poison = rank == world - 1 and step == 2
        before = [p.full_tensor().clone() for p in net.parameters()]
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
        net(x).sum().backward()
        opt.step()
        opt.zero_grad()
        after = [p.full_tensor() for p in net.parameters()]
        assert opt.step_was_skipped == (step == 2), (step, opt.step_was_skipped)
        assert all(torch.equal(a, b) for a, b in zip(after, before)) == (step == 2), step


def rank0_reports_and_raise_together(rank, world):
    """Under FSDP2, Reports reach sinks on rank 0 only (every rank holds the same
    one), and a "raise" finding raises on every rank at the same step."""
    from torch.distributed.fsdp import fully_shard

    net = _Net()
    fully_shard(net.first)
    fully_shard(net.second)
    fully_shard(net)
    got, everywhere = [], []
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), model=net,
                                             policy={"nonfinite": "raise"}, on_report=got.append)
    opt.monitor.on_report(everywhere.append, all_ranks=True)
    raised = None
    for step in range(3):
        net.poison = rank == 0 and step == 1
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step * world + rank))
        net(x).sum().backward()
        try:
            opt.step()
        except torchhealth.HealthCheckError as e:
            raised = e.report.step
            break
        opt.zero_grad()
    assert raised == 1, (rank, raised)
    assert [r.step for r in got] == ([0, 1] if rank == 0 else []), (rank, got)
    assert [r.step for r in everywhere] == [0, 1]
    assert everywhere[1].grad_norm != everywhere[1].grad_norm or everywhere[1].nonfinite("grad") > 0


def hsdp_origin(rank, world):
    fsdp_origin(rank, world, init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard")))


def mixed_meshes(rank, world):
    """FSDP + TP with a layer left out of the TP plan: its parameters live on the
    1-D "dp" mesh, the others on the 2-D mesh; plain tensors in between."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(use_local_output=False)})
    fully_shard(model, mesh=mesh["dp"])
    params = list(model.parameters())
    assert len(by_mesh(params)) == 2
    with pytest.raises(ValueError, match="once per mesh"):
        torchhealth.tensor_stats(params)
    piece = _rank_tensors(rank)[0]
    tensors = [params[2], params[0], piece, params[1], params[3]]
    full_piece = torch.cat([_rank_tensors(r)[0].flatten() for r in range(world)])
    fulls = [params[2].full_tensor(), params[0].full_tensor(), full_piece,
             params[1].full_tensor(), params[3].full_tensor()]
    got = global_stats(tensors, plain="sharded")
    assert_same_stats(got, torchhealth.tensor_stats(fulls), fulls, "mixed, sharded plain")
    same = _special((3, 3), seed=5)
    got = global_stats([same, params[0]], plain="replicated", histogram=False)
    fulls = [same, fulls[1]]
    assert_same_stats(got, torchhealth.tensor_stats(fulls, histogram=False), fulls, "replicated plain")
