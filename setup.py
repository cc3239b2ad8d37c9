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
    available = torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if mode == "1" and not available:
        raise SystemExit("TORCHHEALTH_CUDA=1 but nvcc or a CUDA build of torch is missing "
                         f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    return mode == "1" or (mode == "auto" and available)


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    # setuptools wants source paths relative to the project root.
    sources = ["csrc/torchhealth.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    kwargs = dict(
        name="torchhealth._C",
        sources=sources,
        include_dirs=[CSRC],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
        kwargs["extra_compile_args"]["nvcc"] = opt + ["--expt-relaxed-constexpr",
                                                      "-Xcompiler=-Wall", "-Werror=all-warnings"]
        kwargs["define_macros"] = [("TORCHHEALTH_WITH_CUDA", "1")]
        return CUDAExtension(**kwargs)
    return CppExtension(**kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
