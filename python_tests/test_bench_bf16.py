"""Tests for ``python -m af2_ext.bench bf16`` on small shapes; no timing claims."""

import json

import pytest
import torch

from af2_ext.bench import __main__ as bench_cli
from af2_ext.bench import bf16 as bench
from af2_ext.bench import model as bench_model


def _record(D, ms, ok=True):
    return {"config": {"D": D}, "ms": ms, "check": {"ok": ok}}


def test_targets_pass_miss_and_failed_check():
    ms = {"fwd ours bf16": 1.0, "fwd sdpa bf16": 3.0, "fwd ours fp32": 1.9, "fwd_bwd ours bf16": 5.0,
          "fwd_bwd sdpa bf16": 10.0}
    targets = bench.evaluate_targets([_record(32, ms)], {"fp32": 17.0, "bf16 autocast": 10.0})
    got = {t["name"]: (round(t["value"], 3), t["status"]) for t in targets}
    assert got == {
        "D 32: forward bf16 vs dense SDPA bf16": (3.0, "PASS"),
        "D 32: forward bf16 vs our fp32 kernel": (1.9, "MISS"),
        "D 32: fwd+bwd bf16 vs dense SDPA bf16": (2.0, "PASS"),
        "model step: bf16 autocast vs fp32 (n 128)": (1.7, "PASS"),
    }, got
    # A bf16 result that failed its accuracy check never passes a speed target.
    failed = bench.evaluate_targets([_record(32, ms, ok=False)], None)
    assert [t["status"] for t in failed] == ["MISS", "MISS", "MISS"]
    missing = bench.evaluate_targets([_record(64, {"fwd ours bf16": 1.0})], None)
    assert [t["status"] for t in missing] == ["n/a", "n/a", "n/a"]


def test_time_interleaved_rounds_and_failures():
    calls = []

    def make(name):
        return lambda: calls.append(name)

    def broken():
        raise ValueError("cannot run here")

    times, failed = bench.time_interleaved({"a": make("a"), "b": make("b"), "x": broken}, warmup=1, reps=4,
                                           block=2)
    assert set(times) == {"a", "b"} and all(ms >= 0 for ms in times.values()), times
    assert failed == {"x": "ValueError: cannot run here"}, failed
    # warm-up, then two rounds: per callable one untimed and two timed calls
    assert calls == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 2, calls


def test_check_bf16_catches_a_wrong_result(monkeypatch):
    layout = torch.ones(1, 2, 2, dtype=torch.bool)
    q, k, v = (torch.randn(1, 1, 128, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    assert bench.check_bf16(layout, 64, q, k, v)["ok"]
    real = bench.ops.block_sparse_attention
    monkeypatch.setattr(bench.ops, "block_sparse_attention", lambda *a, **kw: real(*a, **kw) * 1.05)
    assert not bench.check_bf16(layout, 64, q, k, v)["ok"]


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.SHAPE, "N", 256)  # 4 blocks of 64: fast, still sparse
    path = tmp_path / "out" / "bf16.json"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["bf16", "--quick", "--no-model", "--reps", "1", "--warmup", "0",
                               "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "bf16" and doc["model_ms"] is None
    assert doc["ceilings_gflops"]["float32"] > 0 and doc["ceilings_gflops"]["bfloat16"] > 0
    [record] = doc["records"]
    assert record["config"]["D"] == 32 and record["config"]["N"] == 256 and 0 < record["config"]["density"] < 1
    assert set(record["ms"]) == {f"{mode} {impl}" for mode in ("fwd", "fwd_bwd")
                                 for impl in ("ours bf16", "ours fp32", "sdpa bf16")}, record["ms"]
    assert all(ms > 0 for ms in record["ms"].values()) and record["check"]["ok"], record
    assert [t["status"] in ("PASS", "MISS") for t in doc["targets"]] == [True] * 3, doc["targets"]
    assert "forward bf16 vs our fp32 kernel" in printed and "check D 32" in printed


def test_model_step_runs_both_precisions():
    config = bench_model.ModelConfig(dim=32, depth=1, heads=2, dim_head=16, n=16, msa_rows=2, msa_cols=16)
    ms = bench.model_step_ms(1, config)
    assert set(ms) == {"fp32", "bf16 autocast"} and all(v > 0 for v in ms.values()), ms


@pytest.mark.parametrize("argv, match", [(["--reps", "0"], "--reps must be >= 1"),
                                         (["--threads", "0"], "--threads must be >= 1")])
def test_bad_arguments(argv, match):
    with pytest.raises(SystemExit, match=match):
        bench_cli.main(["bf16", "--no-model", *argv])
