"""Tests for ``python -m af2_ext.bench reversible`` on a tiny trunk; no timing claims."""

import json

import torch

from af2_ext.bench import __main__ as bench_cli
from af2_ext.bench import reversible as bench

TINY = bench.TrunkConfig(n=4, M=2, dim=16, heads=2, dim_head=16)


def test_modes_compute_the_same_gradients():
    """The three ways of running the stack are the same function: equal gradients for the same seed."""
    halves, context = bench.inputs(TINY, torch.device("cpu"))
    grads = {}
    for mode in bench.MODES:
        model = bench.build(mode, TINY, depth=2, seed=3)
        torch.manual_seed(11)
        bench.train_step(model, halves, context)
        grads[mode] = [h.grad.clone() for h in halves] + [p.grad.clone() for p in model.parameters()]
    for mode in ("reversible", "checkpoint"):
        for a, b in zip(grads[mode], grads["sequential"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{mode}: {m}")


def test_run_records_and_targets():
    records = bench.run_reversible(TINY, depths=(1, 12), reps=1, warmup=0, show_progress=False)
    assert len(records) == 2 * len(bench.MODES)
    for r in records:
        assert r["notes"] == [] and r["step_ms"] > 0 and r["saved_mib"] > 0, r
    get = lambda d, m: bench._get(records, d, m, "saved_mib")  # noqa: E731
    assert get(12, "reversible") <= 1.25 * get(1, "reversible")
    assert 10 <= get(12, "sequential") / get(1, "sequential") <= 13
    assert get(12, "checkpoint") > 5 * get(1, "checkpoint"), "checkpointing keeps every layer's inputs"
    targets = {t["name"]: t for t in bench.evaluate_targets(records)}
    assert targets["reversible saved memory, depth 12 / depth 1 (<= 1.25x)"]["status"] == "PASS"
    assert all(t["status"] in ("PASS", "MISS") for t in targets.values()), targets
    assert all(t["status"] == "n/a" for t in bench.evaluate_targets([]))


def test_drift_is_small_in_fp32():
    assert bench.drift(TINY, depth=4, device=torch.device("cpu"), dtype=torch.float32) < 1e-5


def test_cli_writes_json(tmp_path):
    path = tmp_path / "rev.json"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["reversible", "--depths", "1", "2", "--n", "4", "--msa", "2", "--dim", "16",
                               "--reps", "1", "--threads", "1", "--device", "cpu", "--drift-depth", "3", "--json",
                               str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "reversible" and doc["settings"]["depths"] == [1, 2]
    assert set(doc["drift"]) == {"depth", "float32", "bfloat16"} and doc["drift"]["depth"] == 3
    assert len(doc["records"]) == 6 and [p.name for p in tmp_path.iterdir()] == ["rev.json"]


def test_cli_quick_depths_and_markdown(tmp_path):
    path, page = tmp_path / "rev.json", tmp_path / "rev.md"
    threads = torch.get_num_threads()
    try:
        assert bench_cli.main(["reversible", "--quick", "--n", "4", "--msa", "2", "--dim", "16", "--threads", "1",
                               "--device", "cpu", "--json", str(path), "--markdown", str(page)]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    assert doc["settings"]["depths"] == list(bench.QUICK_DEPTHS) and doc["settings"]["reps"] == 3
    assert doc["settings"]["quick"] is True and doc["drift"]["depth"] == 12
    assert all(t["status"] != "n/a" for t in doc["targets"]), "--quick measures the depths the targets compare"
    assert page.read_text().startswith("# af2_ext benchmark: reversible\n")
