"""The CPU chunk kernels against the definition, built by each compiler and for aarch64.

tests/kernel_check.cpp is built from the extension's own kernel sources with no
torch library and run; it checks the portable kernel and, on x86-64, every x86
kernel this CPU runs. Two builds that tests/test_cpu_kernels.py (through the
extension, built by GCC) does not see: Clang's (the kernels use GCC vector
extensions and each compiler's own target pragma), and the distribution's
aarch64 cross g++'s, statically linked and run under qemu-user: the NEON build
of the portable kernel, which every non-x86 machine gets. .ci/run installs
Clang, the cross g++ and qemu-user; without them these tests skip.
"""
import os
import platform
import re
import shutil
import subprocess

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = os.path.join(ROOT, "csrc", "cpu")
PORTABLE = [os.path.join(ROOT, "tests", "kernel_check.cpp"), os.path.join(CPU, "kernel_generic.cpp"),
            os.path.join(CPU, "float8_tables.cpp")]
X86 = [os.path.join(CPU, "kernel_avx2.cpp"), os.path.join(CPU, "kernel_avx512.cpp")]
FLAGS = ["-O3", "-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
         *[f"-isystem{p}" for p in include_paths()], f"-I{os.path.join(ROOT, 'csrc')}", f"-I{CPU}"]
EM_AARCH64 = 183


def build_and_run(cxx: str, exe, sources: list[str], extra: list[str], runner: list[str]) -> dict:
    """Builds and runs the check; its checks per kernel."""
    build = subprocess.run([cxx, *FLAGS, *extra, *sources, "-o", str(exe)], capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:]
    done = r"kernel (\w+) against the definition: (\d+) checks, 0 failures"
    kernels = {m.group(1): int(m.group(2)) for m in re.finditer(done, run.stdout)}
    assert kernels and all(n == 9610 for n in kernels.values()), run.stdout
    return kernels


def host_kernels() -> list[str]:
    """The kernels the check must have run on this CPU."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["generic"]
    import torchhealth.bench
    return [k for k in torchhealth.bench.runnable_kernels() if k != "scalar"]


def test_every_kernel_matches_the_definition_when_built_by_clang(tmp_path):
    cxx = shutil.which("clang++")
    if not cxx:
        pytest.skip("clang++ is not installed (Debian: clang); .ci/run installs it")
    x86 = platform.machine() in ("x86_64", "AMD64")
    kernels = build_and_run(cxx, tmp_path / "kernel_check", PORTABLE + (X86 if x86 else []), [], [])
    assert sorted(kernels) == sorted(host_kernels())


def test_the_portable_kernel_matches_the_definition_on_aarch64(tmp_path):
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if not (cxx and qemu):
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu, "
                    "qemu-user); .ci/run installs them")
    exe = tmp_path / "kernel_check_aarch64"
    assert build_and_run(cxx, exe, PORTABLE, ["-static"], [qemu]) == {"generic": 9610}
    assert exe.read_bytes()[18:20] == EM_AARCH64.to_bytes(2, "little")  # ELF e_machine


def test_the_neon_build_uses_fmin_fmax_in_pass_1_and_no_compare_in_pass_2s_one_hot():
    """The aarch64 forms of the portable kernel's primitives reach the hot loops: pass 1's
    min and max are fmin/fmax (the compare-and-select of `a < b ? a : b` costs two to
    three instructions), pass 2's one-hot bit is umin and ushl (the portable form adds a
    compare and two ands per register). A static count of the cross build
    (benchmarks/kernel_loops.py), not a time."""
    if not shutil.which("aarch64-linux-gnu-g++") or not shutil.which("aarch64-linux-gnu-objdump"):
        pytest.skip("the aarch64 cross g++ is not installed (Debian: g++-aarch64-linux-gnu)")
    import importlib.util
    spec = importlib.util.spec_from_file_location("kernel_loops", os.path.join(ROOT, "benchmarks", "kernel_loops.py"))
    kernel_loops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_loops)
    found = list(kernel_loops.loops(kernel_loops.disassemble("aarch64", PORTABLE[1])))
    pass1 = [ops for name, kind, _, _, ops in found if kind == "pass 1" and "chunk<FromFloat>" in name]
    pass2 = [(size, ops) for name, kind, size, _, ops in found if kind == "pass 2"]
    assert pass1 and pass2, found
    for ops in pass1:
        assert ops["fmin"] == 8 and ops["fmax"] == 8 and ops["fcmgt"] == 0 and ops["bsl"] == 0, ops
    size, ops = min(pass2, key=lambda p: p[0])  # the unmasked variant
    assert ops["cmhs"] == 0 and ops["umin"] == 32, ops  # 16 for the window slot, 16 clamps
