"""Benchmark of torchhealth.tensor_stats on the CPU; see torchhealth/bench.py.

    python benchmarks/bench_stats.py [--quick] [--repeat N] [--progress]
"""
import sys

from torchhealth.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
