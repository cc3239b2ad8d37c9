"""The portable CPU kernel (csrc/cpu/kernel_generic.cpp) against the definition,
on this CPU and on aarch64.

tests/generic_kernel_check.cpp is built from the extension's own sources with no
torch library and run: with the host compiler (the SSE2 build on x86-64), and with
the distribution's aarch64 cross g++, statically linked and run under qemu-user
(the NEON build: the kernel every non-x86 machine gets, which no test can reach
through torch here). .ci/run installs both tools; without them that test skips.
"""
import os
import re
import shutil
import subprocess

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(ROOT, "tests", "generic_kernel_check.cpp"),
           os.path.join(ROOT, "csrc", "cpu", "kernel_generic.cpp"),
           os.path.join(ROOT, "csrc", "cpu", "float8_tables.cpp")]
FLAGS = ["-O2", "-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
         *[f"-isystem{p}" for p in include_paths()],
         f"-I{os.path.join(ROOT, 'csrc')}", f"-I{os.path.join(ROOT, 'csrc', 'cpu')}"]


def build_and_run(cxx: str, exe, extra: list[str], runner: list[str]) -> str:
    build = subprocess.run([cxx, *FLAGS, *extra, *SOURCES, "-o", str(exe)], capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    done = re.search(r"(\d+) checks, 0 failures", run.stdout)
    assert done and int(done.group(1)) > 9000, run.stdout
    return run.stdout


def test_the_generic_kernel_matches_the_definition_on_this_cpu(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler (CXX, c++ or g++) to build the check")
    build_and_run(cxx, tmp_path / "generic_kernel_check", [], [])


def test_the_generic_kernel_matches_the_definition_on_aarch64(tmp_path):
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not (cxx and qemu):
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu, "
                    "qemu-user); .ci/run installs them")
    exe = tmp_path / "generic_kernel_check_aarch64"
    build_and_run(cxx, exe, ["-static"], [qemu])
    assert exe.read_bytes()[18:20] == (183).to_bytes(2, "little")  # ELF e_machine: EM_AARCH64
