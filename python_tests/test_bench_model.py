"""Tests for ``python -m af2_ext.bench model`` on a tiny configuration; no timing claims."""

import json

import torch

from af2_ext.bench import __main__ as bench_cli
from af2_ext.bench import model as bench

TINY = bench.ModelConfig(dim=32, depth=1, heads=2, dim_head=16, n=12, msa_rows=2, msa_cols=10)


def test_ours_and_reference_take_the_same_step():
    """Both builds start from the same parameters, and one step gives the same gradients."""
    device = torch.device("cpu")
    data = bench.batch(TINY, device)
    grads = {}
    for impl in ("ours", "reference"):
        model = bench.build(impl, TINY, device, seed=1)
        bench.step_fn(model, data)()
        grads[impl] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["ours"].keys() == grads["reference"].keys() and grads["ours"]
    for name, g in grads["ours"].items():
        torch.testing.assert_close(g, grads["reference"][name], atol=5e-5, rtol=5e-4)


def test_measure_records_time_and_memory():
    result = bench.measure("ours", TINY, torch.device("cpu"), reps=1, warmup=0, memory=True)
    assert result["notes"] == [] and result["step_ms"] > 0 and result["peak_mib"] >= 0, result


def test_seed_package_is_measured_or_skipped_with_a_reason():
    result = bench.measure("seed", TINY, torch.device("cpu"), reps=1, warmup=0, memory=False)
    if bench.seed_available() is None:
        assert result["notes"] == [] and result["step_ms"] > 0, result
    else:
        assert result["step_ms"] is None and result["notes"][0].startswith("skipped: alphafold2-pytorch"), result


def test_floor_step_runs_without_the_attention_ops_and_restores_them():
    """The floor's attention stand-in is active only inside its step; the ops are not called there."""
    from af2_ext import blocks, ops

    device = torch.device("cpu")
    model = bench.build("floor", TINY, device, seed=1)
    calls = []
    real = ops.block_sparse_attention
    ops.block_sparse_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        bench.step_fn(model, bench.batch(TINY, device), free_attention=True)()
        assert calls == [], "the floor step called the attention op"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), "no gradients"
        assert blocks.ops is ops, "the real ops were not restored"
        bench.step_fn(model, bench.batch(TINY, device))()
        assert calls, "the ordinary step did not call the attention op"
    finally:
        ops.block_sparse_attention = real


def test_cli_quick_runs_one_setting_and_names_a_missing_seed(tmp_path):
    path = tmp_path / "model.json"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["model", "--quick", "--n", "8", "--reps", "1", "--warmup", "0", "--no-memory",
                               "--threads", "1", "--device", "cpu", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    assert doc["settings"]["quick"] is True and doc["settings"]["reps"] == 1 and doc["settings"]["device"] == "cpu"
    assert [r["impl"] for r in doc["results"]] == list(bench.IMPLS)
    assert {r["config"]["inter_msa_self_attn"] for r in doc["results"]} == {True}
    assert [t["inter_msa_self_attn"] for t in doc["targets"]] == [True]
    seed = next(r for r in doc["results"] if r["impl"] == "seed")
    if bench.seed_available() is not None:
        assert seed["step_ms"] is None and seed["notes"][0].startswith("skipped: alphafold2-pytorch"), seed
