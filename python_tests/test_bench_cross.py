"""Tests for ``python -m af2_ext.bench cross`` on tiny configurations; no timing claims."""

import json

import pytest
import torch

from af2_ext.bench import __main__ as bench_cli
from af2_ext.bench import cross

TINY = cross.CrossConfig(n=8, M=5, ratio=3, H=2, D=16)


def test_config_shapes_and_flops():
    assert (cross.TARGET.Nq, cross.TARGET.Nk, cross.TARGET.Nc, cross.TARGET.ratio) == (16384, 6144, 2048, 3)
    config = cross.CrossConfig(n=4, M=5, ratio=3, B=1, H=2, D=16)
    assert (config.Nq, config.Nk, config.Nc) == (16, 20, 7)
    attention = 4 * 1 * 2 * 16 * 7 * 16
    compression = 4 * 1 * 2 * 20 * 16 * 16
    assert cross.flops(config, "fwd") == attention + compression
    assert cross.flops(config, "fwd_bwd") == 3.5 * attention + 3 * compression
    assert cross.flops(cross.CrossConfig(n=4, M=5, ratio=1, H=2, D=16), "fwd") == 4 * 2 * 16 * 20 * 16
    with pytest.raises(ValueError, match="mode"):
        cross.flops(config, "bwd")
    # The full grid is the issue's: n in {64, 128, 256} x M in {5, 20, 64} x ratio 1-4, plus the target.
    assert len(cross.FULL) == 1 + 3 * 3 * 4 and cross.FULL[0] == cross.TARGET


def test_run_cross_records():
    records = cross.run_cross([TINY, cross.CrossConfig(n=8, M=5, ratio=1, H=2, D=16)], reps=1, warmup=0,
                              memory=False, show_progress=False)
    assert len(records) == 2
    for record in records:
        for impl in cross.IMPLS:
            result = record["results"][impl]
            assert result["notes"] == [], (impl, result["notes"])
            assert result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0, result
        ref = record["results"]["reference"]
        assert ref["max_abs_diff_vs_ours"] < 1e-5, ref
        expected = ref["fwd_bwd_ms"] / record["results"]["ours"]["fwd_bwd_ms"]
        assert record["speedup"]["fwd_bwd_speedup"] == pytest.approx(expected)
    assert records[0]["config"]["Nc"] == 14 and records[1]["config"]["Nc"] == 40


def test_reference_skipped_when_it_does_not_fit(monkeypatch):
    monkeypatch.setattr(cross, "available_bytes", lambda device: 1024)
    [record] = cross.run_cross([TINY], reps=1, warmup=0, memory=False, show_progress=False)
    ref = record["results"]["reference"]
    assert ref["fwd_ms"] is None and "skipped: needs" in ref["notes"][0], ref
    assert record["results"]["ours"]["fwd_ms"] > 0
    assert record["speedup"]["fwd_bwd_speedup"] is None


def test_cpu_peak_memory_in_child_process():
    [record] = cross.run_cross([TINY], reps=1, warmup=0, memory=True, show_progress=False)
    for impl in cross.IMPLS:
        result = record["results"][impl]
        assert result["notes"] == [], result["notes"]
        assert result["peak_mib"] >= 0 and result["process_peak_mib"] > 0 and result["peak_method"], result


def _target_record(device, peak_ratio, speedup):
    config = {"n": 128, "M": 48, "ratio": 3, "B": 1, "H": 8, "D": 64, "device": device}
    return {"config": config, "peak_ratio": peak_ratio, "speedup": {"fwd_bwd_speedup": speedup},
            "results": {"ours": {"notes": []}, "reference": {"notes": []}}}


def test_evaluate_targets():
    targets = cross.evaluate_targets([_target_record("cpu", 0.05, 1.5)])
    assert [t["status"] for t in targets] == ["PASS", "MISS", "n/a"], targets
    targets = cross.evaluate_targets([_target_record("cuda", 0.2, 4.0)])
    assert [t["status"] for t in targets] == ["MISS", "n/a", "PASS"], targets
    assert all(t["status"] == "n/a" for t in cross.evaluate_targets([]))


def test_cli_writes_complete_json(tmp_path, monkeypatch):
    monkeypatch.setattr(cross, "QUICK", (TINY,))
    path = tmp_path / "out" / "cross.json"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["cross", "--device", "cpu", "--reps", "1", "--warmup", "0", "--threads", "1",
                               "--no-memory", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    assert set(doc) == {"benchmark", "environment", "settings", "records", "targets"}, sorted(doc)
    assert doc["benchmark"] == "cross" and doc["settings"]["memory"] is False and doc["settings"]["threads"] == 1
    assert len(doc["records"]) == 1 and len(doc["targets"]) == len(cross.TARGETS)
    assert [p.name for p in path.parent.iterdir()] == ["cross.json"], "temporary file left behind"
