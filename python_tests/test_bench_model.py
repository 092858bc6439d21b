"""Tests for ``python -m af2_ext.bench model`` on a tiny configuration; no timing claims."""

import collections
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from af2_ext import ops, reference
from af2_ext.bench import __main__ as bench_cli
from af2_ext.bench import model as bench

TINY = bench.ModelConfig(dim=32, depth=1, heads=2, dim_head=16, n=12, msa_rows=2, msa_cols=10)
ATTENTION_OPS = {"af2_ext::block_sparse_attention_forward", "af2_ext::block_sparse_attention_backward"}


class _CountOps(TorchDispatchMode):
    """Counts the af2_ext kernels dispatched (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "af2_ext":
            self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))


def _run_step(step, monkeypatch) -> tuple[collections.Counter, int]:
    """(af2_ext kernels dispatched, calls of the pure-PyTorch reference attention) in one ``step()``."""
    reference_calls = []
    real = reference.block_sparse_attention_ref
    monkeypatch.setattr(reference, "block_sparse_attention_ref",
                        lambda *a, **k: reference_calls.append(1) or real(*a, **k))
    with _CountOps() as counter:
        step()
    monkeypatch.setattr(reference, "block_sparse_attention_ref", real)
    return counter.counts, len(reference_calls)


def test_ours_and_reference_take_the_same_step(monkeypatch):
    """Both builds start from the same parameters, and one step gives the same gradients; ``ours`` runs the
    attention kernels forward and backward and never the reference, ``reference`` the other way round."""
    device = torch.device("cpu")
    data = bench.batch(TINY, device)
    grads = {}
    for impl in ("ours", "reference"):
        model = bench.build(impl, TINY, device, seed=1)
        kernels, reference_calls = _run_step(bench.step_fn(model, data), monkeypatch)
        if impl == "ours" and ops.extension_available():
            assert set(kernels) >= ATTENTION_OPS and reference_calls == 0, (kernels, reference_calls)
        if impl == "reference":
            assert not kernels and reference_calls > 0, (kernels, reference_calls)
        grads[impl] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["ours"].keys() == grads["reference"].keys() and grads["ours"]
    for name, g in grads["ours"].items():
        torch.testing.assert_close(g, grads["reference"][name], atol=5e-5, rtol=5e-4)


def test_measure_records_time_and_memory():
    """The step's peak holds at least the distogram logits, (1, n, n, 37) fp32."""
    config = bench.ModelConfig(dim=32, depth=1, heads=2, dim_head=16, n=128, msa_rows=2, msa_cols=16)
    result = bench.measure("ours", config, torch.device("cpu"), reps=1, warmup=0, memory=True)
    assert result["notes"] == [] and result["step_ms"] > 0, result
    logits_mib = config.n * config.n * 37 * 4 / 2**20
    assert result["peak_mib"] >= logits_mib, f"peak {result['peak_mib']} MiB < the {logits_mib:.1f} MiB of logits"


def test_seed_package_is_measured_or_skipped_with_a_reason():
    result = bench.measure("seed", TINY, torch.device("cpu"), reps=1, warmup=0, memory=False)
    if bench.seed_available() is None:
        assert result["notes"] == [] and result["step_ms"] > 0, result
    else:
        assert result["step_ms"] is None and result["notes"][0].startswith("skipped: alphafold2-pytorch"), result


def test_floor_step_runs_without_the_attention_ops_and_restores_them(monkeypatch):
    """The floor's attention stand-in is active only inside its step: there neither the attention kernels nor
    the reference run; the same model's ordinary step afterwards runs the kernels again."""
    device = torch.device("cpu")
    model = bench.build("floor", TINY, device, seed=1)
    public_calls = []
    real = ops.block_sparse_attention
    monkeypatch.setattr(ops, "block_sparse_attention", lambda *a, **k: public_calls.append(1) or real(*a, **k))
    kernels, reference_calls = _run_step(bench.step_fn(model, bench.batch(TINY, device), free_attention=True),
                                         monkeypatch)
    assert not kernels and reference_calls == 0 and not public_calls, (kernels, reference_calls, public_calls)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), "no gradients"
    kernels, reference_calls = _run_step(bench.step_fn(model, bench.batch(TINY, device)), monkeypatch)
    assert public_calls, "after the floor step the model no longer calls ops.block_sparse_attention"
    if ops.extension_available():
        assert set(kernels) >= ATTENTION_OPS and reference_calls == 0, (kernels, reference_calls)


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
