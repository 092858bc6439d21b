"""Tests for ``python -m af2_ext.bench model`` on a tiny configuration; no timing claims."""

import collections
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from af2_ext import Alphafold2, blocks, layouts, ops, reference
from af2_ext.bench import __main__ as bench_cli
from af2_ext.bench import model as bench
from af2_ext.bench import model_scan

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


def test_cli_evoformer_trunk_measures_ours_and_the_reference(tmp_path):
    path = tmp_path / "model.json"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["model", "--trunk", "evoformer", "--n", "8", "--reps", "1", "--warmup", "0",
                               "--threads", "1", "--device", "cpu", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    assert doc["settings"]["trunk"] == "evoformer"
    assert [r["impl"] for r in doc["results"]] == ["ours", "reference"]
    for r in doc["results"]:
        assert r["config"]["trunk"] == "evoformer" and r["config"]["msa_cols"] == 8, r
        assert r["step_ms"] > 0 and r["peak_mib"] is not None and not r["notes"], r
    target = doc["targets"][0]
    assert target["speedup_vs_reference"] == pytest.approx(doc["results"][1]["step_ms"] / doc["results"][0]["step_ms"])


# ----------------------------------------------------------------------------------------------------------
# The length scan: python -m af2_ext.bench model_scan
# ----------------------------------------------------------------------------------------------------------

SCAN_TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--msa-rows", "2", "--reps", "1",
             "--threads", "1", "--device", "cpu", "--ceiling-size", "0"]


def _scan(tmp_path, *extra) -> dict:
    path = tmp_path / "scan.json"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["model_scan", *SCAN_TINY, *extra, "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(path.read_text())


class _PlainAttention:
    """``blocks.ops`` with plain dense attention in ordinary torch ops (``q @ k^T``, softmax, ``@ v``; the
    compression by ``conv1d``), which a FLOP counter sees, unlike our kernels or the reference's masked products."""

    def __enter__(self):
        def attention(q, k, v, layout, *, block_size=16, key_padding_mask=None, **kwargs):
            keep = layouts.to_mask(layout, block_size, q.shape[2], k.shape[2])
            logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            return logits.masked_fill(~keep, torch.finfo(q.dtype).min).softmax(-1) @ v

        def compressed(q, k, v, ratio, weight, bias=None, **kwargs):
            if ratio > 1:
                k, v = reference.kv_compress_ref(k, v, weight, bias, ratio)
            return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v

        self.saved = blocks.ops
        blocks.ops = type("PlainOps", (), {"block_sparse_attention": staticmethod(attention),
                                           "compressed_attention": staticmethod(compressed)})
        return self

    def __exit__(self, *exc):
        blocks.ops = self.saved


class _CountFlops(TorchDispatchMode):
    """Sums torch.utils.flop_counter's count of every op it knows (matmuls, convolutions). A dispatch mode, not
    FlopCounterMode, whose module hooks refuse the reversible backward's torch.autograd.grad."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


@pytest.mark.parametrize("inter_msa,ratio,reversible,impl", [
    (True, 1, False, "reference"), (False, 3, False, "reference"), (True, 2, True, "reference"),
    (True, 1, True, "kernel"), (False, 3, True, "kernel")])
def test_model_flops_match_a_brute_force_count(inter_msa, ratio, reversible, impl):
    """model_flops against torch's FLOP counter on a tiny model whose attention is plain torch: the forward exactly
    (an explicit count of the same products), the backward (the reversible kernel trunk's recompute included)
    within 2 % (the counter's convention for a strided convolution's input gradient differs slightly)."""
    config = model_scan.ScanConfig(dim=32, depth=2, heads=2, dim_head=16, msa_rows=3, inter_msa_self_attn=inter_msa,
                                   cross_attn_compress_ratio=ratio)
    n = 10
    torch.manual_seed(0)
    model = Alphafold2(dim=32, depth=2, heads=2, dim_head=16, inter_msa_self_attn=inter_msa,
                       cross_attn_compress_ratio=ratio, reversible=reversible, impl=impl)
    data = model_scan.make_batch(n, config.msa_rows, torch.device("cpu"))
    inputs = {k: v for k, v in data.items() if k != "target"}
    with _PlainAttention():
        with _CountFlops() as forward:
            logits = model(**inputs)
        with _CountFlops() as backward:
            torch.nn.functional.cross_entropy(logits.reshape(-1, 37), data["target"].reshape(-1)).backward()
    counted = model_scan.model_flops(config, n, reversible=reversible, recompute=reversible and impl == "kernel")
    assert forward.total == pytest.approx(counted["forward"], rel=1e-9), (forward.total, counted)
    expected = counted["backward"] + counted["recompute"]
    assert backward.total == pytest.approx(expected, rel=0.02), (backward.total, counted)
    assert counted["total"] == counted["forward"] + expected


@pytest.mark.parametrize("reversible, impl", [(False, "reference"), (True, "reference"), (True, "kernel")])
def test_evoformer_flops_match_a_brute_force_count(reversible, impl, monkeypatch):
    """The Evoformer trunk's count (af2_ext.bench.evoformer_flops) against torch's FLOP counter, as above (the
    triangle and MSA attentions reach af2_ext.ops.block_sparse_attention: plain attention there)."""
    from af2_ext import ops
    from af2_ext.bench.evoformer_flops import evoformer_flops

    def attention(q, k, v, layout, *, block_size=16, key_padding_mask=None, bias=None, **kwargs):
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [b, h, q, k]
        if bias is not None:
            logits = logits + bias.repeat_interleave(q.shape[0] // bias.shape[0], dim=0)
        if key_padding_mask is not None:
            logits = logits.masked_fill(~key_padding_mask[:, None, None], torch.finfo(q.dtype).min)
        return logits.softmax(-1) @ v

    monkeypatch.setattr(ops, "block_sparse_attention", attention)

    n, rows = 10, 3
    torch.manual_seed(0)
    model = Alphafold2(dim=32, depth=2, heads=2, dim_head=16, trunk="evoformer", pair_dim=16, reversible=reversible,
                       impl=impl)
    data = model_scan.make_batch(n, rows, torch.device("cpu"))
    inputs = {k: v for k, v in data.items() if k != "target"}
    with _PlainAttention():
        with _CountFlops() as forward:
            logits = model(**inputs)
        with _CountFlops() as backward:
            torch.nn.functional.cross_entropy(logits.reshape(-1, 37), data["target"].reshape(-1)).backward()
    counted = evoformer_flops(n=n, msa_rows=rows, c_m=32, c_z=16, heads=2, dim_head=16, depth=2,
                              reversible=reversible, recompute=reversible and impl == "kernel")
    assert forward.total == pytest.approx(counted["forward"], rel=1e-9), (forward.total, counted)
    assert backward.total == pytest.approx(counted["backward"] + counted["recompute"], rel=0.05), \
        (backward.total, counted)


def test_model_flops_sparse_counts_the_layout_the_model_builds():
    """Sparse: the axial and MSA self-attention products scale by the fraction of pairs the model's own layout
    computes; everything else is the dense count."""
    config = model_scan.ScanConfig(dim=32, depth=1, heads=2, dim_head=16, msa_rows=2)
    n = 100
    model = Alphafold2(dim=32, depth=1, heads=2, dim_head=16, sparse_self_attn=True,
                       max_seq_len=config.seq_len_limit(n))
    axial = model.layers[0][0].fn.attn_rows
    keep = layouts.to_mask(axial.layout(n, torch.device("cpu")), axial.block_size, n, n)
    density = keep.sum().item() / keep.numel()
    assert 0 < density < 1
    assert model_scan.sparse_density(n, heads=2, max_seq_len=config.seq_len_limit(n)) == pytest.approx(density)
    dense = model_scan.model_flops(config, n)
    sparse = model_scan.model_flops(config, n, sparse=True)
    assert sparse["parts"]["axial_attn"] == pytest.approx(dense["parts"]["axial_attn"] * density)
    assert 0 < sparse["parts"]["msa_attn"] < dense["parts"]["msa_attn"]
    for part in ("axial_proj", "cross_attn", "ff_pair", "ff_msa", "head"):
        assert sparse["parts"][part] == dense["parts"][part]


def test_scan_child_batch_is_the_model_benchmark_batch():
    """The scan's children (self-contained, for the seed's interpreter) draw the model benchmark's data."""
    config = bench.ModelConfig(n=12, msa_rows=3, msa_cols=12)
    ours, theirs = model_scan.make_batch(12, 3, torch.device("cpu")), bench.batch(config, torch.device("cpu"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.slow
def test_scan_runs_a_fresh_process_per_length_and_implementation(tmp_path):
    """Every default implementation at lengths 8 and 16, each in its own child: the times and memory come from
    the children (their pids), FLOPs and rates are filled in, the JSON holds the table's rows."""
    doc = _scan(tmp_path, "--lengths", "8,16", "--ceiling-size", "128", "--plot", str(tmp_path / "scan.png"))
    assert doc["benchmark"] == "model_scan" and doc["settings"]["lengths"] == [8, 16]
    assert doc["ceiling"]["status"] == "ok" and doc["ceiling"]["gflops"] > 0 and doc["ceiling"]["pid"] != os.getpid()
    assert [(r["n"], r["impl"]) for r in doc["results"]] == [(n, i) for n in (8, 16) for i in model_scan.DEFAULT_IMPLS]
    pids = set()
    for r in doc["results"]:
        if r["impl"] == "seed" and model_scan.seed_python_check(None)[0] is None:
            assert r["status"] == "not available" and r["reason"].startswith("not available: "), r
            continue
        assert r["status"] == "ok", r
        assert r["pid"] != os.getpid() and r["pid"] not in pids, r
        pids.add(r["pid"])
        assert r["step_ms"] > 0 and 0 < r["step_ms_min"] <= r["step_ms"] and len(r["times_ms"]) == 1, r
        assert r["process_peak_mib"] > 0 and r["step_peak_mib"] is not None and r["rss_max_seen_mib"] > 0, r
        assert r["flops"]["total"] > 0 and r["gflops_per_s"] > 0 and r["ceiling_fraction"] > 0, r
    assert doc["longest"]["ours"] == 16 and doc["longest"]["reference"] == 16
    assert (tmp_path / "scan.png").exists() or importlib.util.find_spec("matplotlib") is None


@pytest.mark.slow
def test_scan_evoformer_trunk(tmp_path):
    """--trunk evoformer: ours and the pure-PyTorch reference measured in their children, the seed reported as not
    having that trunk, the Evoformer FLOP count in the records."""
    from af2_ext.bench.evoformer_flops import evoformer_flops

    doc = _scan(tmp_path, "--trunk", "evoformer", "--pair-dim", "16", "--lengths", "8",
                "--impls", "ours,reference,seed")
    results = {r["impl"]: r for r in doc["results"]}
    assert doc["settings"]["config"]["trunk"] == "evoformer" and doc["settings"]["config"]["pair_dim"] == 16
    for impl in ("ours", "reference"):
        assert results[impl]["status"] == "ok" and results[impl]["step_ms"] > 0, results[impl]
    assert results["seed"]["status"] == "not available" and "no evoformer trunk" in results["seed"]["reason"]
    expected = evoformer_flops(n=8, msa_rows=2, c_m=32, c_z=16, heads=2, dim_head=16, depth=1)
    assert results["ours"]["flops"]["forward"] == pytest.approx(expected["forward"])


def test_scan_stops_a_child_over_budget_and_skips_longer_lengths(tmp_path):
    """A 0.05 GiB budget is below what the child's interpreter and torch alone hold: the first length is over
    budget (killed, the RSS seen recorded), the next skipped, and no length trains within the budget."""
    doc = _scan(tmp_path, "--lengths", "8,16", "--impls", "ours", "--budget-gb", "0.05")
    first, second = doc["results"]
    assert first["status"] == "over budget" and first["rss_max_seen_mib"] > 0.05 * 1024, first
    assert second["status"] == "skipped" and second["reason"] == "skipped: over budget at n=8", second
    assert doc["longest"] == {"ours": None}


@pytest.mark.slow
def test_scan_reports_a_timeout_and_a_failure(tmp_path):
    doc = _scan(tmp_path, "--lengths", "8,16", "--impls", "ours", "--timeout", "0.2")
    assert [r["status"] for r in doc["results"]] == ["timeout", "skipped"], doc["results"]
    assert doc["results"][1]["reason"] == "skipped: timeout at n=8"
    # dim_head 24 is not a kernel head size: the child raises, the row says why, the next length is skipped
    doc = _scan(tmp_path, "--lengths", "8,16", "--impls", "reference", "--dim-head", "24")
    first, second = doc["results"]
    assert first["status"] == "failed" and "dim_head" in first["reason"], first
    assert second["status"] == "skipped" and doc["longest"] == {"reference": None}


def test_scan_skips_an_implementation_after_it_stops_and_reports_the_longest_length():
    """The scan's bookkeeping with a stand-in for the children: each implementation stops at its own length."""
    calls = []

    def runner(python, payload, **kwargs):
        calls.append((payload["n"], payload["base"], payload["reversible"]))
        limit = 16 if payload["reversible"] else 8
        if payload["n"] > limit:
            return {"status": "over budget", "reason": "stand-in"}
        return {"status": "ok", "step_ms": float(payload["n"]), "step_ms_min": 1.0, "process_peak_mib": 1.0,
                "step_peak_mib": 1.0, "pid": 1}

    impls = [model_scan.parse_impl("ours"), model_scan.parse_impl("ours-reversible")]
    records = model_scan.scan(model_scan.ScanConfig(dim=32, heads=2, dim_head=16), [32, 8, 16], impls, reps=1,
                              warmup=1, device="cpu", threads=1, budget_bytes=2**30, timeout_s=10, runner=runner)
    assert calls == [(8, "ours", False), (8, "ours", True), (16, "ours", False), (16, "ours", True),
                     (32, "ours", True)]
    assert [(r["n"], r["impl"], r["status"]) for r in records] == [
        (8, "ours", "ok"), (8, "ours-reversible", "ok"), (16, "ours", "over budget"),
        (16, "ours-reversible", "ok"), (32, "ours", "skipped"), (32, "ours-reversible", "over budget")]
    assert records[4]["reason"] == "skipped: over budget at n=16"
    assert model_scan.longest(records, impls) == {"ours": 8, "ours-reversible": 16}
    model_scan.summarise(records, {"status": "ok", "gflops": 100.0})
    assert records[0]["gflops_per_s"] == pytest.approx(records[0]["flops"]["total"] / 8e6)
    table = model_scan.report(records, impls, None, 2**30, "cpu")
    assert "| 16 | ours | over budget |" in table and "ours-reversible: 16" in table


def test_seed_rows_say_not_available_without_the_package(tmp_path):
    """No alphafold2_pytorch here (or a --seed-python without it): every seed row says why, nothing crashes."""
    impls = [model_scan.parse_impl("seed")]
    cases = [str(tmp_path / "no-such-python")]
    if model_scan.seed_python_check(None)[0] is None:
        cases.append(None)
    for python in cases:
        records = model_scan.scan(model_scan.ScanConfig(), [8, 16], impls, reps=1, warmup=1, device="cpu", threads=1,
                                  budget_bytes=None, timeout_s=60, seed_python=python,
                                  runner=lambda *a, **k: pytest.fail("the seed ran"))
        assert [r["status"] for r in records] == ["not available"] * 2
        assert all(r["reason"].startswith("not available: ") for r in records), records


@pytest.mark.slow
def test_seed_python_without_the_package_is_not_available():
    """--seed-python given an interpreter that lacks alphafold2_pytorch: the import check runs there and fails."""
    python, why = model_scan.seed_python_check(sys.executable)
    if model_scan.seed_python_check(None)[0] is not None:
        pytest.skip("alphafold2_pytorch is importable here")
    assert python is None and "not importable" in why and "ModuleNotFoundError" in why, why


def test_parse_impl():
    assert model_scan.parse_impl("ours-reversible-sparse") == model_scan.Impl("ours-reversible-sparse", "ours", True,
                                                                              True)
    assert not model_scan.parse_impl("reference-reversible").recomputes
    for bad in ("mine", "ours-fast", "ours-sparse-sparse"):
        with pytest.raises(ValueError):
            model_scan.parse_impl(bad)


@pytest.mark.slow
def test_scan_child_imports_nothing_of_af2_ext(tmp_path):
    """The children run this module as a script; the seed's interpreter has no af2_ext, so a child that does not
    build our model (here the matmul ceiling) must not import it."""
    code = ("import json, runpy, sys\n"
            "sys.argv = ['-c', sys.argv[1], json.dumps({'base': 'matmul', 'size': 32, 'reps': 1, 'threads': 1,"
            " 'device': 'cpu'})]\n"
            "try:\n    runpy.run_path(sys.argv[1], run_name='__model_scan_child__')\nexcept SystemExit:\n    pass\n"
            "print('AF2_EXT', any(m.split('.')[0] == 'af2_ext' for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, model_scan.__file__], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert model_scan.RESULT_MARK in out.stdout and "AF2_EXT False" in out.stdout, out.stdout


def test_ffwhole_impl_and_the_chunked_flops():
    """af2_ext's feed-forwards run in chunks of 4096 tokens by default, each recomputed in the backward: the count
    adds one feed-forward forward for a stream longer than the chunk (sequential and reversible trunks alike);
    ``-ffwhole`` (ff_chunk_size=None) does not. The constant is the model's."""
    from af2_ext.bench import model_scan
    from af2_ext.model import FF_CHUNK_SIZE

    assert model_scan.FF_CHUNK == FF_CHUNK_SIZE
    config = model_scan.ScanConfig(dim=32, depth=1, heads=2, dim_head=16)
    chunked, whole = (model_scan.impl_flops(config, model_scan.parse_impl(name), 96) for name in ("ours", "ours-ffwhole"))
    assert chunked["recompute"] == whole["parts"]["ff_pair"] > 0 and whole["recompute"] == 0  # 9216 pair tokens
    assert chunked["forward"] == whole["forward"] and chunked["backward"] == whole["backward"]
    short = model_scan.impl_flops(config, model_scan.parse_impl("ours"), 32)  # 1024 tokens: no chunking
    assert short["recompute"] == 0
    rev = model_scan.impl_flops(config, model_scan.parse_impl("ours-reversible"), 96)
    no_chunk = model_scan.model_flops(config, 96, reversible=True)
    assert rev["recompute"] - no_chunk["recompute"] == rev["parts"]["ff_pair"]
    seed = model_scan.impl_flops(config, model_scan.parse_impl("seed"), 96)
    assert seed["recompute"] == 0
    with pytest.raises(ValueError, match="ffwhole"):
        model_scan.parse_impl("seed-ffwhole")
