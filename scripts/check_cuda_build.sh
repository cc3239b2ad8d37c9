#!/usr/bin/env bash
# CUDA build check for machines without a GPU: builds torchhealth with its CUDA
# kernels against torch==2.14.1 (a CUDA 13.0 build) in a second virtual
# environment, imports it, and checks that every op that reads tensors has a
# CUDA kernel. Fails on any compiler warning in our own sources (csrc/).
#
#   bash scripts/check_cuda_build.sh
#
# Prints ptxas's registers and spills for each of our kernels and
# architecture, and fails on any spill.
#
# Environment: PYTHON (python3), MAX_JOBS (2), TORCH_CUDA_ARCH_LIST
# ("8.0;9.0+PTX"), KEEP_BUILD=1 keeps the temporary build folder and its log,
# NVCC_APPEND_FLAGS (added to ours; e.g. -DTORCHHEALTH_CUDA_MIN_BLOCKS_PER_SM=N,
# csrc/cuda/launch.h).
# The build happens in a temporary copy of the tree, so the work tree's own
# build/ and in-place torchhealth/_C*.so are never touched.
# It never runs a kernel: that needs a GPU (tests/test_cuda.py).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$REPO/.venv-cuda  # git-ignored (.venv-*/)
PY=${PYTHON:-python3}
T0=$(date +%s)
say() { printf '[check_cuda_build %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { echo "check_cuda_build: FAILED: $*" >&2; exit 1; }

# --- the toolkit: CUDA_HOME is the folder of the nvcc that really runs ---------
# The nvcc on PATH may be a wrapper script in another folder (here
# /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), and torch would
# then guess CUDA_HOME=/usr/local, which has no CUDA headers. nvcc's dry run
# reports the folder of the real binary as _HERE_, whatever wrapper or symlink
# led to it; failing that, follow symlinks, then look for an exec line in a
# wrapper script, then fall back to /usr/local/cuda-13.0.
find_cuda_home() {
  local nvcc here="" target
  nvcc=$(command -v nvcc || true)
  [[ -n "$nvcc" ]] || { echo /usr/local/cuda-13.0; return; }
  here=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)
  if [[ -z "$here" || ! -x "$here/nvcc" ]]; then
    target=$(readlink -f "$nvcc")
    if [[ -f "$target" ]] && head -c 2 "$target" | grep -q '#!'; then
      # A script: take the first absolute path ending in /bin/nvcc it mentions.
      target=$(grep -o '/[^ "]*/bin/nvcc' "$target" | head -n1 || true)
    fi
    here=${target:+$(dirname "$target")}
  fi
  if [[ -n "$here" && -f "$here/../include/cuda_runtime.h" ]]; then
    (cd "$here/.." && pwd -P)
  else
    echo /usr/local/cuda-13.0
  fi
}
CUDA_HOME=$(find_cuda_home)
[[ -f "$CUDA_HOME/include/cuda_runtime.h" && -x "$CUDA_HOME/bin/nvcc" ]] ||
  die "no CUDA toolkit: $CUDA_HOME has no bin/nvcc and include/cuda_runtime.h"
say "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n1))"

# --- the environment ------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIPLOG=$(mktemp)
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    torch==2.14.1 numpy setuptools wheel ninja >"$PIPLOG" 2>&1; then
  cat "$PIPLOG" >&2
  die "could not install torch==2.14.1 into $VENV"
fi
rm -f "$PIPLOG"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CPATH_DIR=$SITE/nvidia/cu13/include  # cusparse.h, cublas_v2.h, ... for torch's headers
[[ -d "$CPATH_DIR" ]] || die "$CPATH_DIR is missing (torch==2.14.1 should bring it)"
say "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"

# --- a private copy of the tree, so its build/ never meets the CPU build's ----
WORK=$(mktemp -d "${TMPDIR:-/tmp}/torchhealth-cuda-build.XXXXXX")
if [[ "${KEEP_BUILD:-0}" != 1 ]]; then
  trap 'rm -rf "$WORK"' EXIT
else
  say "keeping $WORK"
fi
SRC=$WORK/src
mkdir -p "$SRC"
# The work tree as it is (uncommitted work included), without environments,
# build products and caches.
tar -C "$REPO" -cf - \
  --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./dist \
  --exclude='*.egg-info' --exclude='*.so' --exclude=__pycache__ \
  --exclude=.hypothesis --exclude=.pytest_cache --exclude=./runs . | tar -C "$SRC" -xf -
LOG=$WORK/build.log

# --- the build --------------------------------------------------------------------
ARCHS=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
say "building in $SRC (MAX_JOBS=${MAX_JOBS:-2}, TORCH_CUDA_ARCH_LIST=$ARCHS)"
if ! (cd "$SRC" && env TORCHHEALTH_CUDA=1 CUDA_HOME="$CUDA_HOME" CPATH="$CPATH_DIR${CPATH:+:$CPATH}" \
      TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-2}" PATH="$CUDA_HOME/bin:$PATH" \
      NVCC_APPEND_FLAGS="-Xptxas=-v${NVCC_APPEND_FLAGS:+ $NVCC_APPEND_FLAGS}" \
      "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps \
      --disable-pip-version-check . >"$LOG" 2>&1); then
  tail -n 80 "$LOG" >&2
  die "the build failed (end of its log above)"
fi
say "built"
# nvcc already turns every warning in our .cu files into an error
# (--Werror=all-warnings, -Xcompiler=-Werror); this also catches warnings the
# host compiler reports in the CUDA build's other files (csrc/cuda/*.cpp and
# the shared csrc/*.h, csrc/*.cpp) and any ptxas/nvlink warning. Warnings in
# torch's or the toolkit's headers are not ours; those of the CPU kernels
# (csrc/cpu/) are the CPU build's to fail on, and are only counted here.
WARN_RE="(^|/)csrc/[^ :]*(:[0-9]+(:[0-9]+)?: warning|\([0-9]+\): warning)"
if grep -E "$WARN_RE" "$LOG" | grep -v "/csrc/cpu/" >&2; then
  die "compiler warnings in the CUDA build's own files (above)"
fi
CPU_WARNINGS=$(grep -E "$WARN_RE" "$LOG" | grep -c "/csrc/cpu/" || true)
if [[ "$CPU_WARNINGS" != 0 ]]; then
  say "note: $CPU_WARNINGS warning(s) located in csrc/cpu/ (the CPU kernels' files; not counted here)"
fi
if grep -E "ptxas (warning|error)|nvlink warning" "$LOG" >&2; then
  die "ptxas/nvlink warnings (above)"
fi
grep -q "tensor_stats_kernel.cu" "$LOG" || die "nvcc never compiled csrc/cuda/tensor_stats_kernel.cu"

# --- ptxas's resource report (-Xptxas=-v): registers and spills per kernel --------
# ptxas prints, per kernel and architecture: "Compiling entry function 'NAME'
# for 'sm_XX'", then "N bytes stack frame, N bytes spill stores, N bytes spill
# loads", then "Used N registers, ...".
RESOURCES=$(awk '
  /Compiling entry function/ {
    k = ""; if (match($0, /stats_(main|finish)(ILb[01]E)?/)) k = substr($0, RSTART, RLENGTH)
    sub(/ILb1E/, "<histogram>", k); sub(/ILb0E/, "<no histogram>", k)
    arch = ""; if (match($0, /sm_[0-9]+/)) arch = substr($0, RSTART, RLENGTH)
    spill = ""; next
  }
  /bytes stack frame/ { spill = $0; sub(/^[ \t]+/, "", spill) }
  /Used [0-9]+ registers/ && k != "" {
    match($0, /Used [0-9]+ registers/)
    printf "  %-6s %-26s %s; %s\n", arch, k, substr($0, RSTART, RLENGTH), spill; k = ""
  }' "$LOG")
[[ -n "$RESOURCES" ]] || die "no ptxas resource report (-Xptxas=-v) for our kernels in the build log"
say "ptxas resource usage:"
echo "$RESOURCES"
if grep -E "[1-9][0-9]* bytes spill (stores|loads)" <<<"$RESOURCES" >&2; then
  die "ptxas spills registers in the kernels above: lower TORCHHEALTH_CUDA_MIN_BLOCKS_PER_SM (csrc/cuda/launch.h) or the registers they need"
fi

# --- import it from outside the tree and check the registrations ----------------
say "checking the installed extension (no GPU needed: nothing is run on one)"
(cd "$WORK" && "$VENV/bin/python" - <<'EOF'
import torch
import torchhealth

b = torchhealth.backend()
assert b.name == "extension", f"torchhealth fell back to the reference: {b.reason}"
assert b.cuda, "torchhealth._C was built without a CUDA kernel for tensor_stats"
# Ops that read no tensor (test and control hooks such as _work_plan and
# _cpu_kernel) have a catch-all kernel and no CUDA one of their own.
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("torchhealth::"))
HOST_ONLY = {op for op in ops
             if not any("Tensor" in str(a.type) for a in torch._C._get_schema(op, "").arguments)}
# The checks' op is the CPU's alone: on other devices torchhealth.checks.run_checks
# runs the PyTorch checks (csrc/cpu/checks_cpu.cpp says why).
CPU_ONLY = {"torchhealth::run_checks"}
assert "torchhealth::tensor_stats" in ops and "torchhealth::tensor_stats" not in HOST_ONLY, ops
missing = [op for op in ops if op not in HOST_ONLY | CPU_ONLY
           and not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
for op in sorted(CPU_ONLY):
    assert op in ops and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op} has no CPU kernel"
for op in sorted(HOST_ONLY):
    assert torch._C._dispatch_has_kernel(op), f"{op} has no kernel"
segments, merges = torch.ops.torchhealth._work_plan([3, 0, 100_000], [4, 2, 8], 8)
assert segments.shape[1] == 6 and merges.shape[1] == 3
print(f"torchhealth {torchhealth.__version__} from {torchhealth.__file__}")
print(f"torch {torch.__version__}, backend: {b}")
print("CUDA kernels registered for:", ", ".join(op for op in ops if op not in HOST_ONLY))
print("GPU visible:", torch.cuda.is_available(), "(not needed; no kernel is run here)")
EOF
) || die "the installed extension failed the import/registration check"
say "OK: CUDA build check passed in $(( $(date +%s) - T0 )) s"
