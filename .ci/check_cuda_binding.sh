#!/usr/bin/env bash
# Syntax-checks the torch bindings of the CUDA ops (csrc/**/*_cuda.cpp) on a machine whose torch has no CUDA.
# The CPU wheel ships the c10 CUDA headers but not the one CMake generates (cuda_cmake_macros.h); a stub with
# its single definition stands in. Needs the CUDA runtime headers (found next to nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# nvcc reports the include directory it uses itself (nvcc may be a wrapper script outside the toolkit).
cuda_include=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)
[ -f "$cuda_include/cuda_runtime_api.h" ] || { echo "cannot find the CUDA runtime headers (got '$cuda_include')" >&2; exit 1; }
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
includes=$("$PY" -c "from torch.utils import cpp_extension as c; print(' '.join('-isystem ' + p for p in c.include_paths()))")
python_include=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
status=0
for src in $(find csrc -name '*_cuda.cpp' | sort); do
  if g++ -std=c++20 -fsyntax-only -Wall -Wextra -DAF2_EXT_WITH_CUDA -I"$stub" $includes -isystem "$python_include" \
      -isystem "$cuda_include" -Icsrc "$src"; then
    echo "ok: $src"
  else
    echo "FAILED: $src" >&2
    status=1
  fi
done
exit $status
