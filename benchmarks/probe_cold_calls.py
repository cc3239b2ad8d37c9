"""What one small call costs right after other work, against the same call
repeated: the machine's price for code and data that have gone cold.

    python benchmarks/probe_cold_calls.py [--rounds 40]

Per round and per amount of other work (a pure-Python loop of N additions,
which touches no tensor and no torch code; for N = 0, the same call made just
before), times the first call that follows it and the one right after, for a
few calls: ``x.sum()`` of 1,000 float32
values, ``torch.empty(1)``, `torchhealth.tensor_stats` of the same 1,000
values, and a pure-Python ``len([1, 2, 3])``. Medians over the rounds.

Why it matters: the checks, the origin tracker's communication hook and
`torchhealth.watch` run small calls between a model's own operations. Their
cost in a training step is the first-call column, not what a loop of the
same call (``timeit``) measures.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's torchhealth
import torchhealth as th  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(1000)
    calls = {
        "len([1, 2, 3])": lambda: len([1, 2, 3]),
        "torch.empty(1)": lambda: torch.empty(1),
        "x.sum()": lambda: x.sum(),
        "tensor_stats([x])": lambda: th.tensor_stats([x], histogram=False),
    }
    work = [0, 10_000, 50_000, 200_000, 1_000_000]  # 0: no other work, the same call just before
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    clock = time.perf_counter
    for _ in range(args.rounds):
        for name, call in calls.items():
            for n in work:
                if n:
                    sum(range(n))
                else:
                    call()  # the baseline: right after the same call
                t0 = clock()
                call()
                t1 = clock()
                call()
                t2 = clock()
                times.setdefault((name, n), []).append((t1 - t0, t2 - t1))
    spent = {}
    for n in work:
        t0 = clock()
        sum(range(n))
        spent[n] = clock() - t0
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f}; medians in microseconds: first call after the other work / "
          "the call right after it")
    print("| call | " + " | ".join(f"after {n:,} additions ({1e3 * spent[n]:.2f} ms)" if n
                                   else "right after the same call" for n in work) + " |")
    print("|---|" + "---:|" * len(work))
    for name in calls:
        cells = []
        for n in work:
            first = statistics.median(a for a, _ in times[(name, n)])
            again = statistics.median(b for _, b in times[(name, n)])
            cells.append(f"{1e6 * first:.1f} / {1e6 * again:.1f}")
        print(f"| `{name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
