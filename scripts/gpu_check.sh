#!/usr/bin/env bash
# GPU verification in one command, for a CUDA machine without network access:
#
#   bash scripts/gpu_check.sh OUTDIR [--quick] [--dry-run]
#
# Builds af2_ext._C for the visible GPU's architecture only, builds the cuda_tests and runs them (ctest),
# runs compute-sanitizer (memcheck, racecheck) on one small case per cuda_tests executable, the python tests'
# CUDA variants, and the benchmarks' quick modes on CUDA. Each step runs under its own time budget (killed past
# it) with its log in OUTDIR/<step>.log; a failing step never stops the later ones. OUTDIR/summary.md lists
# every step with its result and seconds, the device, the torch/CUDA versions and the commit.
#
#   --quick    build, cuda_tests, the kernel modules' CUDA tests only: the rerun after a fix
#   --dry-run  print the commands each step would run and run none of them; needs no GPU, verifies nothing,
#              and exits 3
#
# Exit status: 0 only when a GPU was visible and every step passed (or was skipped with a reason, e.g. no
# compute-sanitizer); 1 when no GPU is visible (at once) or any step failed or timed out; 2 on a usage error.
#
# Environment: PYTHON (default python3); AF2_EXT_WHEELHOUSE (default wheelhouse/ at the repository root:
# wheels for the packages in WHEEL_PACKAGES, installed offline when missing; scripts/prepare_gpu_wheelhouse.sh
# fills it); AF2_EXT_CUDA_ARCHS (default: the GPU's compute capability, e.g. 90); AF2_EXT_GPU_CHECK_TOTAL_S
# (the whole run's budget in seconds, default 360, 180 with --quick: a step is not started past it).

# shellcheck disable=SC2317  # the steps and their helpers are called by name ("step_$name", --run-step)
set -uo pipefail

# --- what the steps run: edit here -------------------------------------------------------------------------

# One small case per cuda_tests executable for compute-sanitizer, as "executable:filter"; the filter is the
# executable's argv[1], a substring of TEST_CASE names (cuda_tests/test_main.h).
SANITIZER_CASES=(
  "test_block_sparse_attention:partial_gradients"  # 3 fp16 problems, B=2 H=2 Nq=45 Nk=37 D=32 bs=16, fwd+bwd
  "test_compressed_attention:without_bias"         # 3 dtypes, B=2 H=2 Nk=45 D=64 ratio 4, fwd+bwd
  "test_reversible:two_updates_one_launch"         # 1000 + 333 elements, one launch
  "test_cuda_utils:warp_reduce_width_32"
)
SANITIZER_TOOLS=(memcheck racecheck)
SANITIZER_EACH_S=20  # budget of one compute-sanitizer run

# --quick runs the CUDA tests of these modules only; the full run those of all of python_tests.
KERNEL_TEST_MODULES=(
  python_tests/test_block_sparse_attention.py
  python_tests/test_compressed_attention.py
  python_tests/test_coupling.py
  python_tests/test_reversible.py
  python_tests/test_triangle_attention.py
  python_tests/test_triangle_modules.py
)

# Packages the tests import that a bare CUDA image may lack: installed from the wheelhouse when missing.
WHEEL_PACKAGES=(einops numpy tqdm expecttest)
REQUIRED_PACKAGES=(einops numpy expecttest)  # tqdm serves only the application, whose tests skip without it

# Time budgets in seconds, one per step; the whole run's budget (AF2_EXT_GPU_CHECK_TOTAL_S) caps them too.
# build and cuda_tests_build run side by side: each waits mostly on its largest translation unit, the
# block-sparse kernel, which nvcc compiles on one core. Their budgets are generous because every later step
# needs them; the later steps get what is left of the whole run's budget.
declare -A BUDGET=(
  [deps]=60
  [build]=240
  [cuda_tests_build]=240
  [ctest]=90
  [sanitizer]=60
  [pytest]=120
  [bench_attention]=40
  [bench_compressed_attention]=40
  [bench_reversible]=40
  [bench_model]=40
  [bench_triangle]=60
)
MIN_STEP_S=10  # a step is started only with at least this much of the whole run's budget left

# ------------------------------------------------------------------------------------------------------------

SKIP_RC=77  # a step that exits with this was skipped; it wrote why to $STEP_NOTE

usage() {
  sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

now_ms() { date +%s%3N; }

seconds() {  # milliseconds -> "12.3"
  printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100))
}

x() {  # print a command, then run it; under --dry-run only print it
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  [[ $DRY_RUN == 1 ]] || "$@"
}

note() {  # one line for the step's row in summary.md
  if [[ $DRY_RUN == 1 ]]; then
    echo "(note: $*)"
  else
    echo "$*" >>"$STEP_NOTE"
  fi
}

# --- steps: each runs in its own bash under `timeout`, in the repository root; output goes to its log ----------

step_deps() {
  local missing=() still=() installed=() pkg
  read -r -a missing <<<"$(missing_packages "${WHEEL_PACKAGES[@]}")"
  if [[ $DRY_RUN == 1 ]]; then
    echo "(for each of ${WHEEL_PACKAGES[*]} that is missing, when $WHEELHOUSE exists)"
    x "$PY" -m pip install --disable-pip-version-check --no-index --no-deps --find-links "$WHEELHOUSE" PACKAGE
    return 0
  fi
  if [[ ${#missing[@]} -eq 0 ]]; then
    echo "all of ${WHEEL_PACKAGES[*]} are installed"
    return 0
  fi
  echo "missing: ${missing[*]}"
  if [[ -d $WHEELHOUSE ]]; then
    for pkg in "${missing[@]}"; do  # one at a time: a wheel that does not fit must not block the others
      x "$PY" -m pip install --disable-pip-version-check --no-index --no-deps --find-links "$WHEELHOUSE" "$pkg"
    done
    read -r -a still <<<"$(missing_packages "${missing[@]}")"
    for pkg in "${missing[@]}"; do
      [[ " ${still[*]} " == *" $pkg "* ]] || installed+=("$pkg")
    done
    [[ ${#installed[@]} -eq 0 ]] || note "installed from the wheelhouse: ${installed[*]}"
  else
    echo "no wheelhouse at $WHEELHOUSE (scripts/prepare_gpu_wheelhouse.sh makes one)"
    still=("${missing[@]}")
  fi
  [[ ${#still[@]} -eq 0 ]] && return 0
  note "missing: ${still[*]}"
  for pkg in "${still[@]}"; do
    [[ " ${REQUIRED_PACKAGES[*]} " == *" $pkg "* ]] && return 1
  done
  return 0
}

missing_packages() {  # prints those of the named modules that do not import
  [[ $DRY_RUN == 1 ]] && return 0
  "$PY" - "$@" <<'PY'
import importlib.util, sys
print(" ".join(name for name in sys.argv[1:] if importlib.util.find_spec(name) is None))
PY
}

xpy() {  # xpy WHAT: print, then run, the python program on stdin (under --dry-run only print it)
  local code
  code=$(cat)
  echo "+ $PY - <<'PY'  # $1"
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\nPY\n' "$code"
  else
    "$PY" - <<<"$code"
  fi
}

verify_kernels() {  # every af2_ext op with a CPU kernel must have a CUDA kernel after the build
  xpy "every af2_ext op has a CUDA kernel" <<'PY'
import torch
import af2_ext.ops as ops
assert ops.extension_available(), "af2_ext._C did not load"
cpu = sorted(n for n in torch._C._dispatch_get_registrations_for_dispatch_key("CPU") if n.startswith("af2_ext::"))
assert cpu, "af2_ext._C registered no CPU kernels"
missing = [n for n in cpu if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert not missing, f"no CUDA kernel for {missing}: af2_ext._C was built without the CUDA sources"
print("CUDA kernels for", ", ".join(cpu))
PY
}

step_build() {
  x env -u TORCH_CUDA_ARCH_LIST AF2_EXT_CUDA_ARCHS="$ARCH" AF2_EXT_FORCE_CUDA=1 MAX_JOBS="$JOBS" \
    "$PY" -m pip install --disable-pip-version-check --no-cache-dir --no-index --no-build-isolation --no-deps \
    -v -e . || return
  verify_kernels
}

step_cuda_tests_build() {
  x cmake -S . -B "$BUILD_DIR" -G Ninja -DAF2_EXT_CUDA_ARCHS="$ARCH" -DCMAKE_BUILD_TYPE=Release || return
  x cmake --build "$BUILD_DIR" -j "$JOBS"
}

step_ctest() {
  x env AF2_EXT_REQUIRE_GPU=1 ctest --test-dir "$BUILD_DIR" --output-on-failure --no-tests=error -j 4
}

find_sanitizer() {
  local candidate nvcc_path
  nvcc_path=$(command -v nvcc 2>/dev/null) || nvcc_path=""
  for candidate in "$(command -v compute-sanitizer 2>/dev/null)" \
      "${nvcc_path:+$(dirname "$nvcc_path")/compute-sanitizer}" \
      "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" /usr/local/cuda/bin/compute-sanitizer; do
    [[ -n $candidate && -x $candidate ]] && { echo "$candidate"; return 0; }
  done
  return 1
}

step_sanitizer() {
  local sanitizer entry exe filter tool rc output started ran=0 failed=0 timed_out=0 unsupported=0
  if ! sanitizer=$(find_sanitizer); then
    if [[ $DRY_RUN == 1 ]]; then
      sanitizer=compute-sanitizer
      echo "(skipped where compute-sanitizer is not found)"
    else
      note "compute-sanitizer not found (PATH, next to nvcc, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
      return "$SKIP_RC"
    fi
  fi
  for entry in "${SANITIZER_CASES[@]}"; do
    exe=${entry%%:*}
    filter=${entry#*:}
    for tool in "${SANITIZER_TOOLS[@]}"; do
      echo "== $tool: $exe $filter"
      started=$(now_ms)
      rc=0
      if [[ $DRY_RUN == 1 ]]; then
        x env AF2_EXT_REQUIRE_GPU=1 timeout -k 5 "$SANITIZER_EACH_S" "$sanitizer" --tool "$tool" \
          --error-exitcode 86 "$BUILD_DIR/cuda_tests/$exe" "$filter"
        continue
      fi
      output=$(x env AF2_EXT_REQUIRE_GPU=1 timeout -k 5 "$SANITIZER_EACH_S" "$sanitizer" --tool "$tool" \
        --error-exitcode 86 "$BUILD_DIR/cuda_tests/$exe" "$filter" 2>&1) || rc=$?
      printf '%s\n' "$output"
      ran=$((ran + 1))
      if [[ $rc -eq 0 ]]; then
        echo "== ok ($(seconds $(($(now_ms) - started))) s)"
      elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "== TIMEOUT after ${SANITIZER_EACH_S} s"
        timed_out=$((timed_out + 1))
        note "$tool $exe $filter: killed after ${SANITIZER_EACH_S} s"
      elif grep -q "Device not supported" <<<"$output"; then
        echo "== compute-sanitizer does not support this device"
        unsupported=$((unsupported + 1))
      else
        echo "== FAILED (exit $rc)"
        failed=$((failed + 1))
        note "$tool $exe $filter: exit $rc"
      fi
    done
  done
  [[ $DRY_RUN == 1 ]] && return 0
  if [[ $unsupported -eq $ran ]]; then
    note "compute-sanitizer reports 'Device not supported' here (e.g. under gVisor)"
    return "$SKIP_RC"
  fi
  [[ $unsupported -gt 0 ]] && note "$unsupported of $ran runs: 'Device not supported'" && failed=$((failed + 1))
  [[ $failed -gt 0 ]] && return 1
  [[ $timed_out -gt 0 ]] && return 124
  note "$ran runs clean: ${SANITIZER_TOOLS[*]} x ${#SANITIZER_CASES[@]} cases"
  return 0
}

junit_counts() {  # junit_counts FILE: "N passed, N failed, N errors, N skipped"
  "$PY" - "$1" <<'PY'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tests, failed, errors, skipped = (sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped"))
print(f"{tests - failed - errors - skipped} passed, {failed} failed, {errors} errors, {skipped} skipped")
PY
}

step_pytest() {
  local targets=(python_tests) rc=0
  [[ $QUICK == 1 ]] && targets=("${KERNEL_TEST_MODULES[@]}")
  x env AF2_EXT_REQUIRE_GPU=1 PYTHONUNBUFFERED=1 "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    --continue-on-collection-errors -o faulthandler_timeout=60 --junitxml="$OUTDIR/pytest.xml" \
    -k cuda "${targets[@]}" || rc=$?
  [[ $DRY_RUN == 1 || ! -f $OUTDIR/pytest.xml ]] || note "$(junit_counts "$OUTDIR/pytest.xml")"
  return "$rc"
}

bench() {  # bench NAME [ARGS...]: the quick mode of `python -m af2_ext.bench NAME` on CUDA
  local name=$1
  shift
  x env PYTHONUNBUFFERED=1 "$PY" -m af2_ext.bench "$name" --quick --device cuda "$@" \
    --json "$OUTDIR/bench_$name.json" --markdown "$OUTDIR/bench_$name.md"
}

# FlexAttention is left out: its torch.compile per configuration would take most of the budget.
step_bench_attention() { bench attention --impls ours sdpa reference --reps 10; }
step_bench_compressed_attention() { bench compressed_attention --reps 5; }
step_bench_reversible() { bench reversible; }
step_bench_model() { bench model; }
# Issue 16's GPU case: bf16, N 1024, H 4, D 32, beside trifast / cuEquivariance / DS4Sci where installed.
step_bench_triangle() { bench triangle --dtype bfloat16 --lengths 1024 --no-memory; }

# --- running steps and the summary -------------------------------------------------------------------------

STEPS=()
declare -A STATUS SECS NOTE PID START LIMIT

start_step() {  # start_step NAME: runs step_NAME in the background under its budget
  local name=$1 left budget=${BUDGET[$1]}
  STEPS+=("$name")
  if [[ $DRY_RUN == 1 ]]; then
    echo
    echo "== step $name (budget $budget s)"
    (STEP_NOTE=/dev/null; "step_$name")
    STATUS[$name]="not run (dry run)"
    return
  fi
  left=$((TOTAL_S - ($(now_ms) - RUN_START) / 1000))
  if [[ $left -lt $MIN_STEP_S ]]; then
    STATUS[$name]=timeout
    SECS[$name]=0
    LIMIT[$name]=$budget
    NOTE[$name]="not started: the run's ${TOTAL_S} s were spent"
    echo "== $name: not started, the run's ${TOTAL_S} s were spent"
    write_summary
    return
  fi
  [[ $budget -gt $left ]] && budget=$left
  LIMIT[$name]=$budget
  STATUS[$name]=running
  : >"$OUTDIR/$name.note"
  echo "== $name (budget $budget s, log $OUTDIR/$name.log)"
  START[$name]=$(now_ms)
  STEP_NOTE="$OUTDIR/$name.note" timeout -k 10 "$budget" bash "$SELF" --run-step "$name" >"$OUTDIR/$name.log" 2>&1 &
  PID[$name]=$!
}

finish_step() {  # finish_step NAME: waits for it and records its result
  local name=$1 rc=0 text
  [[ ${STATUS[$name]} == running ]] || return 0
  wait "${PID[$name]}" || rc=$?
  SECS[$name]=$(seconds $(($(now_ms) - START[$name])))
  text=$(paste -sd ';' "$OUTDIR/$name.note" | sed 's/;/; /g')
  rm -f "$OUTDIR/$name.note"
  case $rc in
    0) STATUS[$name]=pass ;;
    124 | 137)
      STATUS[$name]=timeout
      [[ -n $text ]] || text="killed after ${LIMIT[$name]} s"
      ;;
    "$SKIP_RC") STATUS[$name]=skipped ;;
    *)
      STATUS[$name]=fail
      text="exit $rc${text:+; $text}"
      ;;
  esac
  NOTE[$name]=$text
  echo "== $name: ${STATUS[$name]} (${SECS[$name]} s)${text:+: $text}"
  write_summary
}

run_step() {
  start_step "$1"
  [[ $DRY_RUN == 1 ]] || finish_step "$1"
}

overall() {  # PASS / FAIL / RUNNING for the summary
  local name bad=0 running=0
  for name in "${STEPS[@]}"; do
    case ${STATUS[$name]} in
      fail | timeout) bad=$((bad + 1)) ;;
      running) running=$((running + 1)) ;;
    esac
  done
  if [[ $bad -gt 0 ]]; then
    echo "**FAIL**: $bad of ${#STEPS[@]} steps failed or timed out"
  elif [[ $running -gt 0 || $DONE == 0 ]]; then
    echo "**INCOMPLETE**: the run has not finished"
  else
    echo "**PASS**"
  fi
}

cell() {  # text for a markdown table cell: one line, '|' escaped
  local text=${1//|/\\|}
  printf '%s' "${text//$'\n'/ }"
}

write_summary() {
  local name file
  {
    echo "# af2_ext GPU check"
    echo
    echo "| | |"
    echo "| --- | --- |"
    echo "| result | $(overall) |"
    echo "| mode | $MODE |"
    echo "| date | $RUN_DATE |"
    echo "| device | $(cell "$DEVICE") |"
    echo "| built for | AF2_EXT_CUDA_ARCHS=$ARCH |"
    echo "| torch | $(cell "$TORCH_INFO") |"
    echo "| nvcc | $(cell "$NVCC_VERSION") |"
    echo "| git commit | $(cell "$GIT_COMMIT") |"
    echo "| host | $JOBS cores |"
    echo "| time | $(seconds $(($(now_ms) - RUN_START))) s (budget $TOTAL_S s) |"
    echo
    echo "| step | result | seconds | budget | note |"
    echo "| --- | --- | --- | --- | --- |"
    for name in "${STEPS[@]}"; do
      echo "| $name | ${STATUS[$name]} | ${SECS[$name]:--} | ${LIMIT[$name]:--} | $(cell "${NOTE[$name]:-}") |"
    done
    echo
    echo "build and cuda_tests_build run side by side. Logs: \`<step>.log\`."
    for file in pytest.xml bench_attention.md bench_compressed_attention.md bench_reversible.md bench_model.md \
      bench_triangle.md; do
      if [[ -f $OUTDIR/$file ]]; then echo "- \`$file\`"; fi
    done
  } >"$OUTDIR/summary.md.tmp" && mv "$OUTDIR/summary.md.tmp" "$OUTDIR/summary.md"
}

# --- checks before any step --------------------------------------------------------------------------------

no_gpu() {  # no_gpu REASON: the one way out when no GPU is visible
  echo "gpu_check: no GPU visible: $1" >&2
  echo "gpu_check: nothing was built or run; this check never passes without a GPU" >&2
  {
    echo "# af2_ext GPU check"
    echo
    echo "**FAIL**: no GPU visible ($(cell "$1")). Nothing was built or run."
  } >"$OUTDIR/summary.md"
  exit 1
}

require_gpu() {
  local listing
  command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found (no NVIDIA driver)"
  listing=$(nvidia-smi -L 2>&1) || no_gpu "nvidia-smi -L failed: $listing"
  grep -q '^GPU ' <<<"$listing" || no_gpu "nvidia-smi -L lists no GPU: ${listing:-<empty>}"
  echo "$listing"
  TORCH_INFO=$("$PY" - 2>&1 <<'PY'
import platform

import torch

assert torch.cuda.is_available(), f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"
print(f"{torch.__version__} (CUDA {torch.version.cuda}), python {platform.python_version()}")
PY
  ) || no_gpu "$(tail -n 1 <<<"$TORCH_INFO")"
}

detect_arch() {  # AF2_EXT_CUDA_ARCHS if set, else the first GPU's compute capability ("9.0" -> "90")
  local cap
  if [[ -n ${AF2_EXT_CUDA_ARCHS:-} ]]; then
    echo "$AF2_EXT_CUDA_ARCHS"
    return
  fi
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  [[ $cap =~ ^[0-9]+\.[0-9]$ ]] ||
    cap=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)
  [[ $cap =~ ^[0-9]+\.[0-9]$ ]] || return 1
  echo "${cap/./}"
}

git_commit() {
  local commit dirty
  commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null) || { echo "unknown (no git metadata)"; return; }
  dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | wc -l)
  [[ $dirty -eq 0 ]] && echo "$commit" || echo "$commit with $dirty modified tracked files"
}

main() {
  local arg outdir=""
  if [[ ${1:-} == --run-step ]]; then  # internal: one step, in its own bash under `timeout` (start_step)
    "step_$2"
    exit
  fi
  SELF=$(realpath "${BASH_SOURCE[0]}")
  QUICK=0
  DRY_RUN=0
  for arg in "$@"; do
    case $arg in
      --quick) QUICK=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      -*) echo "gpu_check: unknown option $arg" >&2; usage >&2; exit 2 ;;
      *)
        [[ -z $outdir ]] || { echo "gpu_check: one OUTDIR only (got '$outdir' and '$arg')" >&2; exit 2; }
        outdir=$arg
        ;;
    esac
  done
  [[ -n $outdir ]] || { usage >&2; exit 2; }

  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  PY=${PYTHON:-python3}
  WHEELHOUSE=${AF2_EXT_WHEELHOUSE:-$ROOT/wheelhouse}
  BUILD_DIR=build-gpu
  JOBS=$(nproc)
  MODE=$([[ $QUICK == 1 ]] && echo quick || echo full)
  TOTAL_S=${AF2_EXT_GPU_CHECK_TOTAL_S:-$([[ $QUICK == 1 ]] && echo 180 || echo 360)}
  DONE=0
  RUN_START=$(now_ms)
  RUN_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)

  if [[ $DRY_RUN == 1 ]]; then
    OUTDIR=$(realpath -m "$outdir")
    ARCH=${AF2_EXT_CUDA_ARCHS:-ARCH}
    export ARCH
  else
    mkdir -p "$outdir" || exit 2
    OUTDIR=$(cd "$outdir" && pwd)
  fi
  cd "$ROOT" || exit 2
  export ROOT PY WHEELHOUSE BUILD_DIR JOBS QUICK DRY_RUN OUTDIR
  if [[ $DRY_RUN == 1 ]]; then
    echo "gpu_check --dry-run: the commands each step would run ($MODE mode, repository $ROOT, OUTDIR $OUTDIR)."
    echo "Nothing is run: no GPU is looked for and nothing is verified. ARCH stands for the GPU's compute"
    echo "capability (e.g. 90), read from nvidia-smi when AF2_EXT_CUDA_ARCHS is not set."
  else
    require_gpu
    ARCH=$(detect_arch) || no_gpu "cannot read the GPU's compute capability (nvidia-smi or torch)"
    export ARCH
    DEVICE=$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 |
      head -n 1 | awk -F', ' '{printf "%s (compute capability %s, driver %s, %s)", $1, $2, $3, $4}')
    NVCC_VERSION=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
    NVCC_VERSION=${NVCC_VERSION:-"nvcc not on PATH"}
    GIT_COMMIT=$(git_commit)
    echo "gpu_check ($MODE): $DEVICE; torch $TORCH_INFO; nvcc $NVCC_VERSION; building for $ARCH; OUTDIR $OUTDIR"
  fi

  run_step deps
  start_step build
  start_step cuda_tests_build
  if [[ $DRY_RUN == 0 ]]; then
    finish_step build
    finish_step cuda_tests_build
  fi
  run_step ctest
  [[ $QUICK == 1 ]] || run_step sanitizer
  run_step pytest
  if [[ $QUICK == 0 ]]; then
    run_step bench_attention
    run_step bench_compressed_attention
    run_step bench_reversible
    run_step bench_model
    run_step bench_triangle
  fi

  if [[ $DRY_RUN == 1 ]]; then
    echo
    echo "DRY RUN: nothing was run and nothing was verified (exit 3)."
    exit 3
  fi
  DONE=1
  write_summary
  echo
  cat "$OUTDIR/summary.md"
  local name
  for name in "${STEPS[@]}"; do
    [[ ${STATUS[$name]} == pass || ${STATUS[$name]} == skipped ]] || exit 1
  done
  exit 0
}

main "$@"
