"""Tests for ``python -m af2_ext.bench triangle`` on tiny shapes; no timing claims."""

import itertools
import json

import pytest
import torch

from af2_ext.bench import __main__ as bench_cli
from af2_ext.bench import triangle as bench

TINY = dict(H=2, D=16, reps=1, warmup=0, memory=False, show_progress=False)


def _flex_without_backward(config):
    """FlexAttention's situation on CPU without a torch.compile: a forward, no backward."""
    math_forward = bench._math(config)

    def forward(q, k, v, bias, mask):
        if torch.is_grad_enabled() and q.requires_grad:
            raise NotImplementedError("FlexAttention does not support backward on CPU.")
        return math_forward(q, k, v, bias, mask)
    return forward


def test_flops_hand_computed():
    # B * N rows of N x N attention: 4 * B * N * H * N * N * D forward, 3.5x that for forward+backward.
    config = bench.TriangleConfig(N=16, B=1, H=2, D=16)
    assert bench.flops(config, "fwd") == 4 * 16 * 2 * 16 * 16 * 16
    assert bench.flops(config, "fwd_bwd") == 3.5 * bench.flops(config, "fwd")


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.BUILDERS, "flex", _flex_without_backward)  # no torch.compile in a unit test
    path, page = tmp_path / "out" / "triangle.json", tmp_path / "triangle.md"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["triangle", "--device", "cpu", "--lengths", "16", "--heads", "2", "--dim", "16",
                               "--reps", "1", "--warmup", "0", "--json", str(path), "--markdown", str(page)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert set(doc) == {"benchmark", "environment", "settings", "records", "check", "determinism", "targets"}
    assert doc["benchmark"] == "triangle" and doc["settings"]["lengths"] == [16] and doc["settings"]["memory"]
    [record] = doc["records"]
    assert record["config"] == {"N": 16, "B": 1, "H": 2, "D": 16, "block_size": 64, "dtype": "float32",
                                "device": "cpu"}, record["config"]
    results = record["results"]
    assert list(results) == list(bench.CPU_IMPLS), list(results)
    for impl in ("ours", "math", "sdpa"):
        res = results[impl]
        assert res["status"] == "ok" and res["notes"] == [], (impl, res)
        assert res["fwd_ms"] > 0 and res["fwd_bwd_ms"] > 0 and res["fwd_bwd_gflops"] > 0, (impl, res)
        # Measured in a child process: its whole high-water mark holds torch, far above one tiny call's increase.
        assert res["peak_method"] and 0 <= res["peak_mib"] < res["process_peak_mib"], (impl, res)
        assert res["process_peak_mib"] > 50, (impl, res)
    flex = results["flex"]
    assert flex["status"].startswith("unsupported: fwd+bwd: NotImplementedError"), flex
    assert flex["fwd_ms"] > 0 and flex["fwd_bwd_ms"] is None and flex["peak_mib"] is None, flex
    assert "unsupported: fwd+bwd" in printed and "FlexAttention does not support backward" in printed
    check = doc["check"]
    assert check["N"] == 16 and set(check["results"]) == {"math", "sdpa", "flex"}, check
    for impl in ("math", "sdpa"):
        entry = check["results"][impl]
        assert entry["passed"] is True and entry["out"] < 1e-5 and entry["dbias"] < 1e-4, (impl, entry)
    assert check["results"]["flex"]["dbias"] is None and check["results"]["flex"]["out"] < 1e-5
    fastest = record["fastest_baseline"]
    assert fastest in ("math", "sdpa"), record
    ours, base = results["ours"], results[fastest]
    assert record["x_fastest_baseline"] == pytest.approx(base["fwd_bwd_ms"] / ours["fwd_bwd_ms"])
    # A tiny case may fit in pages the process already holds: a zero peak gives no ratio, never a division by it.
    if base["peak_mib"] > 0:
        assert record["peak_vs_fastest_baseline"] == pytest.approx(ours["peak_mib"] / base["peak_mib"])
    else:
        assert record["peak_vs_fastest_baseline"] is None, record
    # output + dq, dk, dv (B, N, H, N, D) and dbias (B, H, N, N), fp32
    assert record["returned_mib"] == pytest.approx(4 * 2 * 16 * 16 * (4 * 16 + 1) / 2**20)
    determinism = doc["determinism"]
    assert determinism["deterministic"] is True and determinism["threads"][1] == 1 < determinism["threads"][0]
    assert [t["status"] for t in doc["targets"]] == ["n/a"] * len(bench.TARGETS)
    assert "bitwise equal" in printed and "correctness at N=16" in printed
    assert "determinism" in page.read_text() and "x fastest baseline" in page.read_text()
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temporary file left behind"


def test_wrong_baseline_cannot_win(monkeypatch):
    def wrong(config):  # fast, differentiable in every input, and wrong
        return lambda q, k, v, bias, mask: bench._heads_first(q + k + v) + bias.mean()
    monkeypatch.setitem(bench.BUILDERS, "sdpa", wrong)
    [record], check = bench.run_triangle([16], impls=["ours", "math", "sdpa"], **TINY)
    assert check["results"]["sdpa"]["passed"] is False and check["results"]["math"]["passed"] is True, check
    assert record["results"]["sdpa"]["status"] == "ok"
    assert record["fastest_baseline"] == "math" and record["vs_baselines"]["sdpa"]["check_passed"] is False
    assert "FAIL" in bench.format_check(check) and "FAIL" in bench.format_records([record], check)


def test_unavailable_baselines_are_recorded(monkeypatch):
    def missing(config):
        raise ModuleNotFoundError("No module named 'cuequivariance_torch'")

    def broken(config):
        raise RuntimeError("cannot build here\nsecond line")
    monkeypatch.setitem(bench.BUILDERS, "math", missing)
    monkeypatch.setitem(bench.BUILDERS, "flex", broken)
    monkeypatch.setattr(bench, "available_bytes", lambda device: 1024)  # sdpa's N x N scores do not fit
    [record], check = bench.run_triangle([16], impls=["math", "sdpa", "flex", "trifast"], **TINY)
    status = {impl: res["status"] for impl, res in record["results"].items()}
    assert status == {"ours": "ok",
                      "math": "skipped: not installed (ModuleNotFoundError: No module named 'cuequivariance_torch')",
                      "sdpa": status["sdpa"], "flex": "unsupported: RuntimeError: cannot build here",
                      "trifast": "skipped: CUDA only"}, status
    assert status["sdpa"].startswith("skipped: needs ~"), status
    assert record["fastest_baseline"] is None and record["x_fastest_baseline"] is None
    assert all(entry["passed"] is None for entry in check["results"].values()), check
    targets = bench.evaluate_targets([record])
    assert all(t["status"] == "n/a" for t in targets)


def test_check_determinism_detects_a_difference(monkeypatch):
    config = bench.TriangleConfig(N=16, H=2, D=16)
    result = bench.check_determinism(config)
    assert result["deterministic"] is True and result["max_abs_diff_threads"] == 0.0, result
    calls = itertools.count()

    def drifting(config):  # each call sees a slightly different bias
        forward = bench._math(config)
        return lambda q, k, v, bias, mask: forward(q, k, v, bias * (1 + 1e-3 * next(calls)), mask)
    monkeypatch.setattr(bench, "_ours", drifting)
    result = bench.check_determinism(config)
    assert result["deterministic"] is False and result["max_abs_diff_repeat"] > 0, result
    assert "NOT bitwise equal" in bench.format_determinism(result)


def _record(N, x, peak_ratio, device="cpu"):
    config = {"N": N, "B": 1, "H": 4, "D": 32, "block_size": 64, "dtype": "float32", "device": device}
    return {"config": config, "results": {"ours": {"status": "ok"}}, "fastest_baseline": "math",
            "x_fastest_baseline": x, "peak_vs_fastest_baseline": peak_ratio}


def test_evaluate_targets():
    targets = bench.evaluate_targets([_record(256, 3.5, 0.2), _record(512, 2.0, 0.05)])
    assert [t["status"] for t in targets] == ["PASS", "MISS", "MISS", "PASS"], targets
    assert all(t["baseline"] == "math" for t in targets)
    assert all(t["status"] == "n/a" for t in bench.evaluate_targets([_record(256, 9.0, 0.01, device="cuda")]))
    assert "PASS" in bench.format_targets(targets)


@pytest.mark.slow
def test_real_flex_on_cpu():
    """The real FlexAttention baseline (one torch.compile): its forward matches ours; its backward either runs and
    matches or is recorded as unsupported (torch 2.13 has no CPU backward)."""
    [record], check = bench.run_triangle([16], impls=["flex"], **TINY)
    flex = record["results"]["flex"]
    assert flex["fwd_ms"] > 0 and check["results"]["flex"]["out"] < 1e-5, (flex, check)
    assert flex["status"] == "ok" or flex["status"].startswith("unsupported: fwd+bwd:"), flex
    assert check["results"]["flex"]["passed"] is True, check
