"""What a saturation threshold inside the data costs `tensor_stats`: sigmoid and
tanh outputs read as `torchhealth.watch` reads them (saturation ``1 - 2^-10``),
one thread, 131,072 values (512 KB of float32, in L2), each CPU kernel this
machine runs, ns per value (fastest of ``--repeat`` calls; rows alternate
within each round, so a load change falls on all of them alike).

    PYTHONPATH=. python benchmarks/bench_saturation.py [--repeat 300]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's torchhealth
import torchhealth as th  # noqa: E402
from torchhealth.activations import EPS  # noqa: E402
from torchhealth.bench import machine  # noqa: E402

N = 1 << 17


def cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, generator=g)
    return {"sigmoid(N(0,1))": torch.sigmoid(z), "sigmoid(3 N(0,1))": torch.sigmoid(3 * z),
            "sigmoid(10 N(0,1))": torch.sigmoid(10 * z), "tanh(3 N(0,1))": torch.tanh(3 * z)}


def kernels() -> list[str]:
    op, runs = torch.ops.torchhealth._cpu_kernel, []
    previous = op("")
    for k in ("avx512", "avx2", "generic"):
        try:
            op(k)
            runs.append(k)
        except RuntimeError:
            pass
    op(previous)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    op = torch.ops.torchhealth._cpu_kernel
    rows = [(name, dtype, hist, kernel) for name in cases() for dtype in (torch.float32, torch.bfloat16)
            for hist in (False, True) for kernel in kernels()]
    data = {(name, dtype): x.to(dtype) for name, x in cases().items() for dtype in (torch.float32, torch.bfloat16)}
    best = {r: float("inf") for r in rows}
    previous = op("")
    for _ in range(args.repeat):
        for r in rows:
            name, dtype, hist, kernel = r
            op(kernel)
            t = time.perf_counter()
            th.tensor_stats([data[name, dtype]], histogram=hist, saturation=1 - EPS)
            best[r] = min(best[r], time.perf_counter() - t)
    op(previous)
    print(f"{machine()}; {N} values, saturation 1 - 2^-10, ns per value (fastest of {args.repeat})\n")
    print("| data | dtype | histogram | kernel | saturated | ns/value |")
    print("|---|---|---|---|---:|---:|")
    for r in rows:
        name, dtype, hist, kernel = r
        x = data[name, dtype]
        frac = (x.float().abs() >= 1 - EPS).float().mean().item()
        print(f"| {name} | {str(dtype)[6:]} | {'with' if hist else 'no'} | {kernel} | {frac:.3f} | "
              f"{best[r] / N * 1e9:.3f} |")


if __name__ == "__main__":
    main()
