"""The CUDA kernel's per-thread accumulator (csrc/cuda/thread_acc.h) on the CPU.

The header is host and device code, so the arithmetic the GPU runs (float
partial sums flushed into float64, extremes and counts in float) is checked
here, on machines without a GPU, against update() in csrc/stats.h:
tests/thread_acc_check.cpp is compiled with the host C++ compiler and run.
"""
import os
import re
import shutil
import subprocess

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_thread_accumulator_matches_update_within_the_sum_bound(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler (CXX, c++ or g++) to build the check")
    exe = tmp_path / "thread_acc_check"
    flags = ["-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror"]
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}"]
    build = subprocess.run([cxx, *flags, *incs, os.path.join(ROOT, "tests", "thread_acc_check.cpp"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:]
    worst = re.search(r"sum ([0-9.e+-]+), sumsq ([0-9.e+-]+)", run.stdout)
    assert worst and 0 < float(worst.group(1)) <= 1e-6 and 0 < float(worst.group(2)) <= 1e-6, run.stdout
