#!/usr/bin/env bash
# Compiles the extension's CPU sources for aarch64 with -Werror (compile only:
# nothing is linked or run), so that the non-x86 path (the generic kernel, the
# float-environment guard, dispatch without x86 kernels) cannot rot on an x86
# CI machine. Installs the distribution's cross g++ if it is missing. The torch
# headers are those of the development venv: they are the same for every
# architecture apart from a few #ifdef'd vector headers, which the
# extension's CPU sources do not include.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-/work/main/.venv/bin/python}
CXX_CROSS=${CXX_CROSS:-aarch64-linux-gnu-g++}

if ! command -v "$CXX_CROSS" >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null
fi

mapfile -t INCLUDES < <("$PY" -c '
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()["include"]]:
    print("-I" + p)')

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
status=0
for src in csrc/*.cpp csrc/cpu/*.cpp; do
  # The flags of setup.py, plus -Werror, with torch's headers as system headers
  # (their own warnings are not ours to fix).
  if ! "$CXX_CROSS" -std=c++20 -O3 -fopenmp -fPIC -Wall -Wextra -Wno-unused-parameter -Werror \
      -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -Icsrc \
      "${INCLUDES[@]/#-I/-isystem}" -c "$src" -o "$OUT/$(basename "$src").o"; then
    echo "check_cross_build: $src does not compile for aarch64" >&2
    status=1
  fi
done
if [ "$status" = 0 ]; then
  echo "check_cross_build: every CPU source compiles for aarch64 with -Werror ($("$CXX_CROSS" -dumpversion))"
fi
exit "$status"
