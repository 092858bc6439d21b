#!/usr/bin/env bash
# On a machine with network access: download the wheels scripts/gpu_check.sh installs, offline, on a GPU
# machine that lacks them (einops, numpy, tqdm, expecttest), for CPython 3.12 on manylinux x86_64.
#
#   bash scripts/prepare_gpu_wheelhouse.sh [DIR]      (default DIR: wheelhouse/ at the repository root)
#
# Carry DIR to the GPU machine (gpu_check.sh reads wheelhouse/ at the repository root, or AF2_EXT_WHEELHOUSE).
# Environment: PYTHON (the pip to download with, default python3), AF2_EXT_WHEEL_PYTHON (target CPython
# version, default 3.12).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$root/wheelhouse}
target_python=${AF2_EXT_WHEEL_PYTHON:-3.12}
packages=(einops numpy tqdm expecttest)  # must match WHEEL_PACKAGES in scripts/gpu_check.sh

mkdir -p "$dest"
# None of the four needs another package on Linux, hence --no-deps. numpy's recent wheels are manylinux_2_27/2_28.
"${PYTHON:-python3}" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$target_python" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$dest" "${packages[@]}"
echo "wheels for CPython $target_python in $dest:"
ls -1 "$dest"
