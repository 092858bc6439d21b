"""Tests for the benchmark harness (af2_ext.bench) on tiny configurations; no timing claims."""

import json

import pytest
import torch

import helpers
from af2_ext import layouts, ops
from af2_ext.bench import __main__ as bench_cli
from af2_ext.bench import attention, common

TINY = attention.AttentionConfig(N=64, D=16, block_size=16, target_density=0.5, B=1, H=2)
RESULT_FIELDS = {"fwd_ms", "fwd_bwd_ms", "fwd_gflops", "fwd_bwd_gflops", "computed_density", "peak_mib",
                 "peak_method", "max_abs_diff_vs_ours", "notes"}


def test_flops_hand_computed():
    # B=1, H=8, N=1024, D=32, 25%: forward 4 * 8 * 1024 * 1024 * 32 / 4 = 268,435,456.
    assert attention.flops(1, 8, 1024, 1024, 32, 0.25, "fwd") == 268_435_456
    assert attention.flops(1, 8, 1024, 1024, 32, 0.25, "bwd") == 2.5 * 268_435_456
    assert attention.flops(1, 8, 1024, 1024, 32, 0.25, "fwd_bwd") == 3.5 * 268_435_456
    assert attention.flops(2, 1, 3, 5, 16, 1.0, "fwd") == 4 * 2 * 3 * 5 * 16
    with pytest.raises(ValueError, match="mode"):
        attention.flops(1, 1, 1, 1, 16, 1.0, "backward")


def test_bigbird_params_near_target():
    for target in (0.1, 0.25, 0.5):
        layout, info = attention.make_layout(attention.AttentionConfig(1024, 32, 32, target))
        assert info["kind"] == "bigbird", info
        assert abs(layouts.density(layout) - target) <= 0.02, (target, info, layouts.density(layout))
        assert layout.shape == (8, 32, 32), tuple(layout.shape)
    layout, info = attention.make_layout(attention.AttentionConfig(512, 32, 64, 1.0))
    assert info == {"kind": "dense"} and bool(layout.all()), info


def test_flex_block_mask_matches_layout():
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout, _ = attention.make_layout(TINY)
    block_mask = attention.flex_block_mask(layout, TINY.block_size, TINY.N, TINY.N)
    dense = block_mask.to_dense()  # [1, H, nqb, nkb] int, 1 where a block is computed
    assert torch.equal(dense[0].bool(), layout), f"\n{dense[0]}\n{layout.int()}"


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_run_attention(device):
    helpers.require_device(device, "block_sparse_attention_forward")
    impls = ("ours", "sdpa", "reference") if ops.extension_available() else ("sdpa", "reference")
    records = attention.run_attention([TINY], device=device, reps=1, warmup=0, impls=impls, show_progress=False)
    assert len(records) == 1
    record = records[0]
    assert set(record) == {"config", "layout", "density", "flops", "results", "speedup"}, sorted(record)
    assert record["config"] == {"N": 64, "D": 16, "block_size": 16, "target_density": 0.5, "B": 1, "H": 2,
                                "dtype": "float32", "device": device}, record["config"]
    assert 0.0 < record["density"] <= 1.0
    assert record["flops"]["fwd"] == attention.flops(1, 2, 64, 64, 16, record["density"], "fwd")
    assert set(record["results"]) == set(impls), sorted(record["results"])
    for impl, result in record["results"].items():
        assert set(result) == RESULT_FIELDS, (impl, sorted(result))
        assert result["notes"] == [], (impl, result["notes"])
        assert result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0, (impl, result)
        assert result["fwd_gflops"] > 0 and result["fwd_bwd_gflops"] > 0, (impl, result)
    if "ours" in impls:
        assert record["results"]["reference"]["max_abs_diff_vs_ours"] < 1e-5, record["results"]["reference"]
        ratio = record["results"]["sdpa"]["fwd_ms"] / record["results"]["ours"]["fwd_ms"]
        assert record["speedup"]["fwd_vs_sdpa"] == pytest.approx(ratio)
        assert record["speedup"]["fwd_vs_flex"] is None  # flex not run


def test_failing_impl_is_recorded_not_raised(monkeypatch):
    def broken(layout, block_size):
        raise RuntimeError("no kernel here\nsecond line")

    monkeypatch.setitem(attention.BUILDERS, "flex", broken)
    [record] = attention.run_attention([TINY], reps=1, warmup=0, impls=("sdpa", "flex"), show_progress=False)
    flex = record["results"]["flex"]
    assert flex["fwd_ms"] is None and flex["fwd_bwd_ms"] is None, flex
    assert flex["notes"] == ["fwd skipped: RuntimeError: no kernel here"], flex["notes"]
    assert "no kernel here" in attention.format_records([record])


def test_reference_skipped_above_limit(monkeypatch):
    monkeypatch.setattr(attention, "REFERENCE_MAX_N", 32)
    [record] = attention.run_attention([TINY], reps=1, warmup=0, impls=("reference",), show_progress=False)
    assert record["results"]["reference"]["fwd_ms"] is None
    assert "N > 32" in record["results"]["reference"]["notes"][0]


def _record(block_size, fwd_vs_sdpa, fwd_bwd_vs_sdpa, fwd_vs_flex):
    config = {"N": 1024, "D": 32, "block_size": block_size, "target_density": 0.25, "B": 1, "H": 8,
              "dtype": "float32", "device": "cpu"}
    speedup = {"fwd_vs_sdpa": fwd_vs_sdpa, "fwd_bwd_vs_sdpa": fwd_bwd_vs_sdpa, "fwd_vs_flex": fwd_vs_flex,
               "fwd_bwd_vs_flex": None}
    results = {impl: {"notes": []} for impl in ("ours", "sdpa")}
    results["flex"] = {"notes": ["fwd skipped: RuntimeError: nope"]}
    return {"config": config, "layout": {"kind": "bigbird"}, "speedup": speedup, "results": results}


def test_evaluate_targets():
    targets = attention.evaluate_targets([_record(64, 3.5, 1.5, None), _record(32, 2.0, 1.0, 9.0)])
    by_name = {t["name"]: t for t in targets}
    assert [t["status"] for t in targets] == ["PASS", "PASS", "MISS", "n/a"], targets
    assert by_name["forward vs compiled FlexAttention, block 64"]["note"] == "fwd skipped: RuntimeError: nope"
    assert all(t["status"] == "n/a" for t in attention.evaluate_targets([])), "no records, no verdicts"
    assert "PASS" in attention.format_targets(targets)


def test_cli_writes_complete_json(tmp_path, monkeypatch):
    # The CLI end to end on the tiny configuration (the real grids are too slow for a unit test).
    monkeypatch.setattr(attention, "QUICK", (TINY,))
    monkeypatch.setitem(attention.BUILDERS, "flex", attention._sdpa)  # skip a torch.compile in a unit test
    path = tmp_path / "out" / "attention.json"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["attention", "--device", "cpu", "--reps", "1", "--warmup", "0", "--threads", "1",
                               "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    assert set(doc) == {"benchmark", "environment", "settings", "records", "targets"}, sorted(doc)
    env = doc["environment"]
    for field in ("date", "torch", "cpu_isa", "cpu_model", "device", "device_name", "threads",
                  "extension_available"):
        assert env.get(field) is not None, (field, env)
    assert env["threads"] == 1 and env["device"] == "cpu" and env["torch"] == torch.__version__
    assert doc["settings"]["reps"] == 1 and doc["settings"]["grid"] == "quick"
    assert len(doc["records"]) == 1 and set(doc["records"][0]["results"]) == set(attention.IMPLS)
    assert len(doc["targets"]) == len(attention.TARGETS)
    assert [p.name for p in path.parent.iterdir()] == ["attention.json"], "temporary file left behind"


def test_cli_impls_and_markdown(tmp_path, monkeypatch, capsys):
    """--impls runs only those implementations; --markdown saves the printed report as a markdown page."""
    monkeypatch.setattr(attention, "QUICK", (TINY,))
    path, page = tmp_path / "a.json", tmp_path / "a.md"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["attention", "--device", "cpu", "--reps", "1", "--warmup", "0", "--threads", "1",
                               "--impls", "reference", "sdpa", "--json", str(path), "--markdown", str(page)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    assert doc["settings"]["impls"] == ["sdpa", "reference"], doc["settings"]
    assert set(doc["records"][0]["results"]) == {"sdpa", "reference"}
    printed = capsys.readouterr().out
    text = page.read_text()
    assert text.startswith("# af2_ext benchmark: attention\n\n`python -m af2_ext.bench attention --device cpu")
    report = printed[:printed.index(f"wrote {page}")]
    assert f"```text\n{report.rstrip()}\n```\n" in text, "the page holds the printed report verbatim"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.md"]


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    common.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(ValueError):
        common.write_json_atomic(str(path), {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_cli_parser():
    args = bench_cli.build_parser().parse_args(["attention", "--full", "--dtype", "bfloat16", "--threads", "2"])
    assert (args.grid, args.dtype, args.threads, args.memory) == ("full", "bfloat16", 2, False)
    assert bench_cli.build_parser().parse_args(["attention"]).grid == "quick"
    with pytest.raises(SystemExit):
        bench_cli.build_parser().parse_args(["attention", "--quick", "--full"])


PEAK_CHILD = """
import json, sys, torch
from af2_ext.bench import common
numel = json.loads(sys.stdin.read())["mib"] * 2**20 // 4
print(json.dumps(common.child_peak_rss_mib(lambda: torch.ones(numel).sum(), warmup=lambda: None)))
"""


def test_child_peak_memory_measures_a_known_allocation():
    """A step that allocates (and fills) 64 MiB and nothing else large: the child's peak is those 64 MiB."""
    measured = common.run_child(PEAK_CHILD, {"mib": 64}, threads=1)
    assert 64 <= measured["peak_mib"] < 64 + 16, measured
    assert measured["process_peak_mib"] >= measured["peak_mib"] + 50, "the whole process holds torch too"


def test_cpu_peak_memory_in_child_process():
    """The reference materialises fp32 (B, H, N, N) logits, probabilities and their gradients: its measured peak
    of one forward+backward is at least one such matrix."""
    config = attention.AttentionConfig(N=512, D=16, block_size=16, target_density=0.5, B=1, H=4)
    [record] = attention.run_attention([config], reps=1, warmup=0, impls=("sdpa", "reference"), memory=True,
                                       show_progress=False)
    for impl, result in record["results"].items():
        assert result["notes"] == [] and result["peak_method"], (impl, result)
        assert result["peak_mib"] is not None, (impl, result)
    logits_mib = config.B * config.H * config.N * config.N * 4 / 2**20
    assert record["results"]["reference"]["peak_mib"] >= logits_mib, record["results"]["reference"]
