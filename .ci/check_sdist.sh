#!/usr/bin/env bash
# Packaging check: build the source distribution, install it into a fresh virtual environment that has only the
# kernel library's dependencies (torch, numpy, einops; plus the build tools), and use it from outside the
# checkout: the extension compiles from the sdist alone, the ops run and match the reference, Alphafold2 runs,
# importing the library loads neither af2_ext.app nor an application package, and the af2-ext command (and
# python -m af2_ext) says how to install the app.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m build --sdist --no-isolation -o "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/af2_ext-*.tar.gz)
echo "sdist: $(basename "$sdist"), $(tar tzf "$sdist" | grep -cE '\.(h|cuh|cu|cpp)$') C++/CUDA sources"
"$PY" -m venv "$work/venv"
venv_py="$work/venv/bin/python"
torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
"$venv_py" -m pip install -q --disable-pip-version-check "torch==$torch_version" numpy einops setuptools wheel ninja
MAX_JOBS="${MAX_JOBS:-2}" "$venv_py" -m pip install -q --disable-pip-version-check --no-build-isolation "$sdist"
cd "$work"  # away from the checkout: the installed package, not the source tree
"$venv_py" - <<'PY'
import sys
import torch
import af2_ext
from af2_ext import Alphafold2, layouts, ops, reference

assert ops.extension_available(), "af2_ext._C did not build from the sdist"
assert "site-packages" in af2_ext.__file__, af2_ext.__file__
q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
layout = layouts.bigbird(3, window=1, num_global=1, num_random=0, num_heads=2)
out = ops.block_sparse_attention(q, k, v, layout, block_size=16, impl="kernel")
ref = reference.block_sparse_attention_ref(q, k, v, layout, block_size=16)
torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
model = Alphafold2(dim=32, depth=1, heads=2, dim_head=16)
logits = model(torch.randint(0, 21, (1, 16)), torch.randint(0, 21, (1, 2, 16)))
assert logits.shape == (1, 16, 16, 37), logits.shape
app = [m for m in ("af2_ext.app", "sidechainnet", "openmm", "Bio", "matplotlib", "pdbfixer", "tqdm")
       if m in sys.modules]
assert not app, f"importing the kernel library loaded the application or its packages: {app}"
print("installed from the sdist: ops match the reference, Alphafold2 runs, no application package imported")
PY
for command in "$work/venv/bin/af2-ext" "$venv_py -m af2_ext"; do
  set +e
  message=$($command train --help 2>&1)
  status=$?
  set -e
  if [ "$status" -ne 2 ] || ! grep -q "af2_ext\[app\]" <<<"$message"; then
    echo "$command without the app extra: expected exit 2 naming af2_ext[app], got $status: $message" >&2
    exit 1
  fi
  echo "$command without the app extra: exit 2, '$message'"
done
