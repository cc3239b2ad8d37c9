"""scripts/check_cross_build.sh fails when any CPU source fails to compile.

The real cross-compilation takes minutes and runs in CI (.ci/run); here the
compiler is replaced by `false` and `true` to check that a failure anywhere
fails the script and names the file."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_cross_build.sh"


def run(compiler: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                               "CXX_CROSS": shutil.which(compiler)})


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_failing_compile_fails_the_script_and_names_the_file():
    r = run("false")
    assert r.returncode == 1
    assert "csrc/cpu/kernel_generic.cpp does not compile for aarch64" in r.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_passes_when_every_compile_passes():
    r = run("true")
    assert r.returncode == 0, r.stderr
    assert "every CPU source compiles" in r.stdout
