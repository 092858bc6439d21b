"""Tests for ``python -m af2_ext.bench compressed_attention`` on tiny configurations; no timing claims."""

import json

import pytest
import torch

from af2_ext.bench import __main__ as bench_cli
from af2_ext.bench import compressed_attention as bench

TINY = bench.CompressedAttentionConfig(n=8, M=5, ratio=3, H=2, D=16)


def test_config_shapes_and_flops():
    assert (bench.TARGET.Nq, bench.TARGET.Nk, bench.TARGET.Nc, bench.TARGET.ratio) == (16384, 6144, 2048, 3)
    config = bench.CompressedAttentionConfig(n=4, M=5, ratio=3, B=1, H=2, D=16)
    assert (config.Nq, config.Nk, config.Nc) == (16, 20, 7)
    attention = 4 * 1 * 2 * 16 * 7 * 16
    compression = 4 * 1 * 2 * 20 * 16 * 16
    assert bench.flops(config, "fwd") == attention + compression
    assert bench.flops(config, "fwd_bwd") == 3.5 * attention + 3 * compression
    assert bench.flops(bench.CompressedAttentionConfig(n=4, M=5, ratio=1, H=2, D=16), "fwd") == 4 * 2 * 16 * 20 * 16
    with pytest.raises(ValueError, match="mode"):
        bench.flops(config, "bwd")
    # The full grid is the issue's: n in {64, 128, 256} x M in {5, 20, 64} x ratio 1-4, plus the target.
    assert len(bench.FULL) == 1 + 3 * 3 * 4 and bench.FULL[0] == bench.TARGET


def test_run_records():
    configs = [TINY, bench.CompressedAttentionConfig(n=8, M=5, ratio=1, H=2, D=16)]
    records = bench.run_compressed_attention(configs, reps=1, warmup=0, memory=False, show_progress=False)
    assert len(records) == 2
    for record in records:
        for impl in bench.IMPLS:
            result = record["results"][impl]
            assert result["notes"] == [], (impl, result["notes"])
            assert result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0, result
        ref = record["results"]["reference"]
        assert ref["max_abs_diff_vs_ours"] < 1e-5, ref
        expected = ref["fwd_bwd_ms"] / record["results"]["ours"]["fwd_bwd_ms"]
        assert record["speedup"]["fwd_bwd_speedup"] == pytest.approx(expected)
    assert records[0]["config"]["Nc"] == 14 and records[1]["config"]["Nc"] == 40


def test_reference_skipped_when_it_does_not_fit(monkeypatch):
    monkeypatch.setattr(bench, "available_bytes", lambda device: 1024)
    [record] = bench.run_compressed_attention([TINY], reps=1, warmup=0, memory=False, show_progress=False)
    ref = record["results"]["reference"]
    assert ref["fwd_ms"] is None and "skipped: needs" in ref["notes"][0], ref
    assert record["results"]["ours"]["fwd_ms"] > 0
    assert record["speedup"]["fwd_bwd_speedup"] is None


def test_cpu_peak_memory_in_child_process():
    """The reference materialises fp32 (B, H, Nq, Nc) logits, probabilities and their gradients; ours holds no
    such matrix: the measured peaks show both (a fraction of the reference's is the benchmark's claim)."""
    config = bench.CompressedAttentionConfig(n=32, M=64, ratio=2, H=2, D=16)  # Nq = 1024, Nc = 1024
    [record] = bench.run_compressed_attention([config], reps=1, warmup=0, memory=True, show_progress=False)
    for impl in bench.IMPLS:
        result = record["results"][impl]
        assert result["notes"] == [] and result["peak_method"], (impl, result)
        assert result["process_peak_mib"] >= result["peak_mib"] + 50, "the whole process holds torch too"
    logits_mib = config.B * config.H * config.Nq * config.Nc * 4 / 2**20
    ours, ref = record["results"]["ours"]["peak_mib"], record["results"]["reference"]["peak_mib"]
    assert ref >= logits_mib, f"reference peak {ref:.1f} MiB < one {logits_mib:.0f} MiB logit matrix"
    assert ours < logits_mib and record["peak_ratio"] == ours / ref, (ours, ref, record["peak_ratio"])


def _target_record(device, peak_ratio, speedup):
    config = {"n": 128, "M": 48, "ratio": 3, "B": 1, "H": 8, "D": 64, "device": device}
    return {"config": config, "peak_ratio": peak_ratio, "speedup": {"fwd_bwd_speedup": speedup},
            "results": {"ours": {"notes": []}, "reference": {"notes": []}}}


def test_evaluate_targets():
    targets = bench.evaluate_targets([_target_record("cpu", 0.05, 1.5)])
    assert [t["status"] for t in targets] == ["PASS", "MISS", "n/a"], targets
    targets = bench.evaluate_targets([_target_record("cuda", 0.2, 4.0)])
    assert [t["status"] for t in targets] == ["MISS", "n/a", "PASS"], targets
    assert all(t["status"] == "n/a" for t in bench.evaluate_targets([]))


def test_cli_writes_complete_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "QUICK", (TINY,))
    path = tmp_path / "out" / "compressed_attention.json"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["compressed_attention", "--device", "cpu", "--reps", "1", "--warmup", "0",
                               "--threads", "1", "--no-memory", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    assert set(doc) == {"benchmark", "environment", "settings", "records", "targets"}, sorted(doc)
    assert doc["benchmark"] == "compressed_attention", doc["benchmark"]
    assert doc["settings"]["memory"] is False and doc["settings"]["threads"] == 1
    assert len(doc["records"]) == 1 and len(doc["targets"]) == len(bench.TARGETS)
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temporary file left behind"
