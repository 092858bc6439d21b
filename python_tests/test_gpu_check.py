"""scripts/gpu_check.sh where no GPU is usable: it fails at once and says why; --dry-run runs nothing and never
passes. nvidia-smi is a stand-in script first on PATH, so these run the same on any machine."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu_check.sh")
NO_DEVICES = "#!/bin/sh\necho 'No devices were found'\nexit 6\n"
ONE_GPU = "#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n"
FULL_STEPS = ("deps", "build", "cuda_tests_build", "ctest", "sanitizer", "pytest", "bench_attention",
              "bench_compressed_attention", "bench_reversible", "bench_model", "bench_triangle")


def _run(tmp_path, *args: str, nvidia_smi: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(nvidia_smi)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable)
    env.pop("AF2_EXT_CUDA_ARCHS", None)
    return subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _assert_failed_without_running(tmp_path, proc: subprocess.CompletedProcess, why: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert f"gpu_check: no GPU visible: {why}" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path / "out") == ["summary.md"], "nothing is built or run"
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "**FAIL**: no GPU visible" in summary and "PASS" not in summary, summary


def test_no_gpu_listed_fails_at_once(tmp_path):
    proc = _run(tmp_path, nvidia_smi=NO_DEVICES)
    _assert_failed_without_running(tmp_path, proc, "nvidia-smi -L failed: No devices were found")


def test_gpu_listed_but_torch_cannot_use_it_fails_at_once(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU: the check would go on to build")
    proc = _run(tmp_path, "--quick", nvidia_smi=ONE_GPU)
    _assert_failed_without_running(tmp_path, proc, "AssertionError: torch.cuda.is_available() is False")


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_dry_run_prints_the_steps_runs_nothing_and_exits_3(tmp_path, quick):
    proc = _run(tmp_path, "--dry-run", *(["--quick"] if quick else []), nvidia_smi=NO_DEVICES)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    steps = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("== step ")]
    assert steps == ([s for s in FULL_STEPS if s in ("deps", "build", "cuda_tests_build", "ctest", "pytest")]
                     if quick else list(FULL_STEPS)), steps
    assert "-DAF2_EXT_CUDA_ARCHS=ARCH" in proc.stdout and "AF2_EXT_FORCE_CUDA=1" in proc.stdout
    assert "AF2_EXT_REQUIRE_GPU=1 ctest --test-dir build-gpu" in proc.stdout
    assert proc.stdout.rstrip().endswith("DRY RUN: nothing was run and nothing was verified (exit 3).")
    assert "PASS" not in proc.stdout
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"
