"""Builds torchhealth._C.

Environment switches:
  TORCHHEALTH_CUDA=auto|0|1  build the CUDA kernels. auto: when nvcc is found and
                             torch was built with CUDA (no GPU needs to be visible).
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0+PTX").
  DEBUG=1                    -O0 -g instead of -O3.
  MAX_JOBS                   parallel compile jobs (read by torch's ninja build).
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def want_cuda() -> bool:
    mode = os.environ.get("TORCHHEALTH_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"TORCHHEALTH_CUDA must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return False
    # Whether a GPU is visible does not matter: only the compiler and torch's
    # CUDA build do. CUDA_HOME must be the toolkit itself (with its headers);
    # torch guesses it from the folder of the first nvcc on PATH, which is
    # wrong when that nvcc is a wrapper script, so say so instead of failing
    # later in the compiler.
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME)")
    else:
        if not (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))):
            missing.append(f"no nvcc on PATH or in {CUDA_HOME}/bin")
        if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
            missing.append(f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h "
                           "(point CUDA_HOME at the toolkit, not at a wrapper's folder)")
    if mode == "1" and missing:
        raise SystemExit("TORCHHEALTH_CUDA=1 but " + "; ".join(missing))
    if missing and torch.version.cuda is not None:
        # A CUDA build of torch but no usable toolkit: say why the CUDA kernels
        # are left out rather than leave a CPU-only build unexplained.
        print("torchhealth: building without CUDA kernels: " + "; ".join(missing), flush=True)
    return not missing


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    # setuptools wants source paths relative to the project root.
    sources = (sorted(glob.glob("csrc/*.cpp", root_dir=ROOT))
               + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT)))
    kwargs = dict(
        name="torchhealth._C",
        sources=sources,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if want_cuda():
        # The host side (csrc/cuda/*.cpp) is built by the C++ compiler with
        # the flags above; nvcc builds only the kernels (csrc/cuda/*.cu), which
        # include no ATen header, so -Werror there covers our code, not torch's.
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cpp", root_dir=ROOT))
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
        kwargs["extra_compile_args"]["nvcc"] = opt + [
            "--expt-relaxed-constexpr",
            "-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter",
            "--Werror=all-warnings",  # nvcc's own and ptxas warnings
            "-Xcompiler=-Werror",  # the host compiler's, on our .cu files
        ]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # The default architectures, as nvcc flags: torch adds its own only
            # when no -gencode/-arch flag is given (torch 2.13-2.14.1).
            kwargs["extra_compile_args"]["nvcc"] += [
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"]
        return CUDAExtension(**kwargs)
    return CppExtension(**kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
