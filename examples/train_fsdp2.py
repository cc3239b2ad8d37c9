"""Train a small transformer with FSDP2 and torchhealth, on one or several nodes.

Single node, 2 processes (CPU/gloo here; NCCL on GPUs):

    torchrun --standalone --nproc_per_node 2 examples/train_fsdp2.py

Two nodes (run on each node, with NODE_RANK 0 and 1 and the address of node 0):

    torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK \\
        --rdzv_backend c10d --rdzv_endpoint $MASTER_HOST:29500 --rdzv_id my_run \\
        examples/train_fsdp2.py

Every rank runs the same checks on the same combined statistics, so every rank
reaches the same verdict and skips the same steps. ``--nan-at STEP`` plants a
NaN in the last rank's batch at that step, to see a skipped step and the
origin of the NaN: the wrapper, given the FSDP2 model, checks each module's
local gradients inside its reduce-scatter, so the Report names the rank.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import torchhealth


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 2, seq: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch * seq, vocab]``: flat, because a Linear over a 3-D
        input returns a view, which FSDP2 warns about for a root module's output."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).flatten(0, 1))


def shard(model: TinyLM) -> TinyLM:
    """FSDP2: one communication group per transformer block, and the root."""
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def batch(step: int, rank: int, args) -> torch.Tensor:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    return torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--nan-at", type=int, default=-1, help="plant a NaN in the last rank's batch")
    args = p.parse_args()

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every rank
    model = shard(TinyLM(vocab=args.vocab, seq=args.seq).to(device))
    reports = []  # Reports reach callbacks on rank 0 only
    opt = torchhealth.HealthCheckedOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr),
                                             model=model, on_report=reports.append)
    for step in range(args.steps):
        tokens = batch(step, rank, args).to(device)
        logits = model(tokens[:, :-1])
        if step == args.nan_at and rank == world - 1:
            logits = logits * math.nan  # a bad batch on one rank
        loss = nn.functional.cross_entropy(logits, tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0:
            culprits = sorted({r for f in reports[-1].findings for r in f.ranks or ()})
            print(f"step {step:3d}  loss {loss.item():.4f}  skipped {opt.step_was_skipped}"
                  + (f"  non-finite gradients from ranks {culprits}" if culprits else ""))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
