"""Distogram pre-training: ``af2-ext train``.

The target is the binned Cα-Cα (or virtual Cβ-Cβ) distance of every residue pair with coordinates, in the
model's 37 bins (:func:`af2_ext.utils.get_bucketed_distance_matrix`); the loss is the cross-entropy over those
pairs. The MSA stream gets the query sequence as its one row (``msa="single"``, the default: sidechainnet has
no alignments, and this keeps the cross-attention in the trunk) or nothing (``msa="none"``).

Reproducible and resumable: the data order and crops come from generators of their own
(:class:`af2_ext.app.data.ProteinLoader`), checkpoints carry the model, optimiser, scheduler, the RNG states and the
data position, and ``--resume`` continues with the same losses as a run that was never interrupted.

Nothing is lost: every setting is checked (the model runs one forward at the crop's shape) before the output
directory is touched, and a directory that already holds a run (``checkpoint.pt`` or ``metrics.jsonl``) is
continued only with ``--resume`` and replaced only with ``--overwrite``. The files on disk change only once the
new run writes for the first time (its first log row or checkpoint, after a successful step): a run that fails
before that leaves the previous run's files as they were.

Distributed: under ``torchrun`` every process trains a shard of each global batch (DDP; ``nccl`` on GPUs,
``gloo`` on CPUs). The loss of a step is the sum over all its pairs divided by the number of pairs in the whole
global step (all micro-batches of all ranks), so the gradient equals that of one process on the concatenated
batch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from af2_ext import utils
from af2_ext.app import checkpoint as ckpt_io
from af2_ext.app import data
from af2_ext.app.plots import plot_loss_curve
from af2_ext.devices import resolve_device as _resolve_device
from af2_ext.fileio import atomic_open, check_input_file, check_output_dir
from af2_ext.model import TRUNKS, Alphafold2
from af2_ext.residue_constants import DISTOGRAM_BUCKETS, UNKNOWN_TOKEN

IGNORE = -100
RUN_FILES = ("checkpoint.pt", "metrics.jsonl")  # an output directory holding either holds a run
MODEL_KEYS = ("dim", "depth", "heads", "dim_head", "max_seq_len", "attn_dropout", "ff_dropout", "reversible",
              "sparse_self_attn", "cross_attn_compress_ratio", "inter_msa_self_attn", "block_size",
              "sparse_block_size", "relative_positions", "trunk")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (the config file's keys; flags override them)."""

    # data
    data: str = "demo"  # "demo" (the bundled dataset), a sidechainnet pickle path, or "sidechainnet"
    casp_version: int = 12
    casp_thinning: int = 30
    scn_dir: str = "./sidechainnet_data"
    crop_len: int = 64
    batch_size: int = 1
    target: str = "ca"  # "ca" | "cb"
    msa: str = "single"  # "single" | "none"
    # model (Alphafold2 keyword arguments)
    dim: int = 64
    depth: int = 2
    heads: int = 4
    dim_head: int = 32
    max_seq_len: int = 256
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    reversible: bool = False
    sparse_self_attn: bool = False
    cross_attn_compress_ratio: int = 1
    inter_msa_self_attn: bool = True
    block_size: int = 64
    sparse_block_size: int = 16
    relative_positions: int = 32  # AlphaFold2's clipped relative position embedding (0 = the seed's model)
    trunk: str = "seed"  # "seed" (axial + cross-attention) | "evoformer" (AlphaFold2's Evoformer blocks)
    pair_dim: int = 0  # the Evoformer's pair width (0: dim)
    # optimisation
    steps: int = 200
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    clip_grad: float = 1.0
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16"
    seed: int = 0
    # bookkeeping
    output_dir: str = "runs/af2"
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 50
    eval_fold: bool = True  # lDDT-Cα of MDS-folded validation chains at each evaluation
    device: str = "auto"
    trusted_data: bool = False  # unpickle any class the --data pickle names (only for a trusted source)

    def model_config(self) -> dict:
        config = {k: getattr(self, k) for k in MODEL_KEYS}
        if self.trunk == "evoformer" and self.pair_dim:
            config["pair_dim"] = self.pair_dim
        return config

    def validate(self) -> "TrainConfig":
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), type(field.default)
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else
                  isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  if kind is float else isinstance(value, str))
            if not ok:
                raise ValueError(f"{field.name} must be {'a finite number' if kind is float else 'a ' + kind.__name__}"
                                 f", got {value!r}")
        positive = ("crop_len", "batch_size", "dim", "depth", "heads", "max_seq_len", "steps", "grad_accum",
                    "log_every", "eval_every", "save_every", "cross_attn_compress_ratio", "casp_version",
                    "casp_thinning")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("weight_decay and clip_grad must be >= 0")
        if self.pair_dim < 0 or (self.pair_dim and self.trunk != "evoformer"):
            raise ValueError(f"pair_dim must be >= 0 and is the Evoformer's pair width (--trunk evoformer), got "
                             f"{self.pair_dim!r} with trunk {self.trunk!r}")
        for name, allowed in (("target", ("ca", "cb")), ("msa", ("single", "none")),
                              ("precision", ("auto", "fp32", "bf16")), ("trunk", TRUNKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.crop_len > self.max_seq_len:
            raise ValueError(f"crop_len ({self.crop_len}) must be <= max_seq_len ({self.max_seq_len})")
        if self.crop_len < 3:  # the loader's crops then always hold two residues with coordinates: a pair
            raise ValueError(f"crop_len must be >= 3, got {self.crop_len}")
        return self


def load_config_file(path: str) -> dict:
    """A JSON or TOML file of :class:`TrainConfig` keys; unknown keys are an error naming them."""
    path = check_input_file(path, "config file")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                values = tomllib.load(f)
        else:
            with open(path) as f:
                values = json.load(f)
    except (ValueError, ImportError) as e:
        raise ValueError(f"config file {path!r} could not be parsed: {e}") from e
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path!r} has unknown keys {unknown}; known: {sorted(known)}")
    return values


# ----------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


# ----------------------------------------------------------------------------------------------------------
# Pieces of a step
# ----------------------------------------------------------------------------------------------------------


def resolve_device(name: str, d: Dist) -> torch.device:
    """The device of this process (a bare "cuda" is its local rank's GPU); a ValueError naming a bad one."""
    device = _resolve_device(name, d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def autocast_dtype(config: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(config: TrainConfig, device: torch.device):
    """The forward's autocast context (a disabled one in fp32)."""
    dtype = autocast_dtype(config, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def model_inputs(batch, msa: str) -> dict:
    """Alphafold2 keyword arguments for a :class:`af2_ext.app.data.ProteinBatch`."""
    inputs = dict(seq=batch.seq, mask=batch.mask)
    if msa == "single":
        inputs.update(msa=batch.seq[:, None, :], msa_mask=batch.mask[:, None, :])  # [b, 1, n]
    return inputs


def distogram_labels(batch, target: str) -> torch.Tensor:
    """(b, n, n) bin labels of the true distances; pairs without coordinates (or i == j) get IGNORE."""
    coords = batch.ca if target == "ca" else batch.cb
    present = batch.coord_mask & batch.mask
    labels = utils.get_bucketed_distance_matrix(coords.float(), present, ignore_index=IGNORE)
    eye = torch.eye(labels.shape[-1], dtype=torch.bool, device=labels.device)
    return labels.masked_fill(eye, IGNORE)


def pair_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the labelled pairs (fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, DISTOGRAM_BUCKETS), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, config: TrainConfig, device: torch.device, majority_bin: int,
             fold: bool) -> dict:
    """Validation loss, distogram accuracy (and the majority-bin baseline's), and the mean lDDT-Cα of the
    chains folded from the predicted distograms (``fold``). Runs on rank 0's copy; RNG state untouched."""
    bare = getattr(model, "module", model)
    was_training = bare.training
    bare.eval()
    total_loss, total_pairs, correct, baseline_correct, lddts = 0.0, 0, 0, 0, []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _, batch in loader.epoch_batches(0):
            batch = batch.to(device)
            with autocast(config, device):
                logits = bare(**model_inputs(batch, config.msa)).float()
            labels = distogram_labels(batch, config.target)
            valid = labels != IGNORE
            total_loss += pair_loss_sum(logits, labels).item()
            total_pairs += int(valid.sum())
            correct += int((logits.argmax(-1) == labels)[valid].sum())
            baseline_correct += int((labels[valid] == majority_bin).sum())
            if fold:
                for i in range(len(batch)):
                    keep = batch.mask[i]
                    coords = utils.distogram_to_coords(logits[i][keep][:, keep][None])[0].transpose(0, 1)  # [n, 3]
                    true = (batch.ca if config.target == "ca" else batch.cb)[i][keep].float()
                    present = batch.coord_mask[i][keep]
                    lddts.append(float(utils.lddt_ca(coords.float().cpu(), true.cpu(), present.cpu())))
    bare.train(was_training)
    pairs = max(total_pairs, 1)
    out = {"val_loss": total_loss / pairs, "val_acc": correct / pairs, "val_baseline_acc": baseline_correct / pairs,
           "val_pairs": total_pairs}
    if fold and lddts:
        out["val_lddt_ca"] = sum(lddts) / len(lddts)
    return out


def majority_bin(loader, config: TrainConfig, limit: int = 64) -> int:
    """The most frequent distogram bin over (up to ``limit``) training batches: the trivial baseline."""
    counts = torch.zeros(DISTOGRAM_BUCKETS, dtype=torch.long)
    for index, batch in loader.epoch_batches(0):
        if index >= limit:
            break
        labels = distogram_labels(batch, config.target)
        counts += torch.bincount(labels[labels != IGNORE].flatten(), minlength=DISTOGRAM_BUCKETS)
    return int(counts.argmax())


# ----------------------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line, ``kind`` = "train" | "eval") and ``loss.png``.

    The file on disk is left alone until the run writes its first row (or :meth:`write` is called before its
    first checkpoint): then it is replaced atomically by the rows kept plus the new ones, and later rows are
    appended. A new run keeps no rows; a resumed one keeps those up to the checkpoint's step, so the log
    matches the run and a run that fails before writing leaves the previous log intact."""

    def __init__(self, output_dir: str, resume_step: Optional[int]):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.plot_path = os.path.join(output_dir, "loss.png")
        self.rows: list[dict] = []
        self.written = False  # whether the file holds this run's rows (else the previous run's, or nothing)
        if resume_step is not None and os.path.exists(self.path):
            self.rows = [r for r in self._read() if r["step"] <= resume_step]

    def _read(self) -> list:
        rows = []
        with open(self.path) as f:
            for number, line in enumerate(f, start=1):
                try:
                    row = json.loads(line) if line.strip() else None
                    if row is not None and not isinstance(row.get("step"), int):
                        raise ValueError("no integer 'step'")
                except (ValueError, AttributeError) as error:
                    raise ValueError(f"metrics log {self.path!r}, line {number}, is not a metrics row "
                                     f"({error}); move the file away to resume without it") from None
                if row is not None:
                    rows.append(row)
        return rows

    def write(self) -> None:
        """Replace the file with the rows so far, atomically."""
        with atomic_open(self.path, "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        self.written = True

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if not self.written:
            self.write()
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        """Redraw ``loss.png`` from the rows so far (:func:`af2_ext.app.plots.plot_loss_curve`)."""
        plot_loss_curve(self.rows, self.plot_path)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def _loaders(config: TrainConfig, d: Dist):
    if config.data == "demo":
        source = dict(local_scn_path=data.demo_dataset_path())
    elif config.data == "sidechainnet":
        source = dict(casp_version=config.casp_version, casp_thinning=config.casp_thinning, scn_dir=config.scn_dir)
    else:
        source = dict(local_scn_path=config.data)
    scn = data.load_scn_dict(**source, trusted=config.trusted_data)
    name = os.fspath(source.get("local_scn_path", f"sidechainnet CASP {config.casp_version}"))
    train = data.ProteinLoader.from_scn_dict(scn, "train", source=name, batch_size=config.batch_size,
                                             crop_len=config.crop_len, max_seq_len=config.max_seq_len,
                                             too_long="crop", shuffle=True, seed=config.seed, rank=d.rank,
                                             world_size=d.world_size)
    # validation windows have the training crop's length (positions the model was trained on), drawn once
    valid = data.ProteinLoader.from_scn_dict(scn, "valid", source=name, batch_size=1, crop_len=config.crop_len,
                                             max_seq_len=config.max_seq_len, too_long="crop", shuffle=False,
                                             seed=config.seed)
    return train, valid


def _same_run(saved: dict, config: TrainConfig) -> None:
    """Resuming with other settings would not continue the same run: name the keys that differ."""
    allowed = {"steps", "output_dir", "log_every", "eval_every", "save_every", "eval_fold", "device", "trusted_data"}
    differ = sorted(k for k, v in dataclasses.asdict(config).items() if k not in allowed and saved.get(k) != v)
    if differ:
        raise ValueError(f"--resume: the checkpoint was trained with other settings for {differ} "
                         f"(checkpoint: {[saved.get(k) for k in differ]}, now: "
                         f"{[getattr(config, k) for k in differ]})")


def holds_run(output_dir: str) -> list:
    """The files of a training run (:data:`RUN_FILES`) that ``output_dir`` holds."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]


def _check_output_dir(config: TrainConfig, resume: Optional[str], overwrite: bool) -> None:
    """The run may write to ``config.output_dir``: a directory (or creatable), and not another run's unless
    continued (``resume``) or replaced (``overwrite``). Touches nothing."""
    if resume is not None and overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it: give one of them")
    check_output_dir(config.output_dir, "--output-dir")
    existing = holds_run(config.output_dir)
    if existing and resume is None and not overwrite:
        raise ValueError(f"--output-dir {config.output_dir!r} already holds a training run ({', '.join(existing)});"
                         " continue it with --resume, replace it with --overwrite, or choose another --output-dir")


def check_model(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> None:
    """One forward without gradients at the shape training feeds the model (a crop of ``crop_len`` with the
    configured MSA), so a setting the model rejects only when it runs fails before anything is written. The
    RNG states and the training mode are left as they were."""
    n = config.crop_len
    seq = torch.full((1, n), UNKNOWN_TOKEN, dtype=torch.long, device=device)
    inputs = dict(seq=seq, mask=torch.ones(1, n, dtype=torch.bool, device=device))
    if config.msa == "single":
        inputs.update(msa=seq[:, None, :], msa_mask=inputs["mask"][:, None, :])
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            with autocast(config, device):
                model(**inputs)
    except Exception as error:  # an option the kernels refuse, a model too large for the device, ...
        raise ValueError(f"the model settings {config.model_config()} fail on a {n}-residue crop on {device} "
                         f"({ckpt_io._first_line(error)})") from error
    finally:
        model.train(was_training)


def _resume_from(path: str, config: TrainConfig, device: torch.device, d: Dist, model, optimizer,
                 scheduler) -> tuple:
    """Load a checkpoint's state into the model, optimiser, scheduler and generators; returns (step, epoch,
    batch_index)."""
    saved = ckpt_io.load_checkpoint(path, map_location=device)
    if saved.get("optimizer") is None or saved.get("scheduler") is None:
        raise ckpt_io.CheckpointError(f"--resume: checkpoint {path!r} holds a model but no optimiser state: it "
                                      "cannot be resumed (start a new run)")
    _same_run(saved.get("config") or {}, config)
    rank_rng = saved.get("rank_rng") or [saved.get("rng")]
    if len(rank_rng) != d.world_size:
        raise ValueError(f"--resume: the checkpoint was written by {len(rank_rng)} process(es), this run has "
                         f"{d.world_size}; resume with the same number (the RNG streams are per process)")
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        ckpt_io.set_rng_state(rank_rng[d.rank])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ckpt_io.CheckpointError(f"--resume: checkpoint {path!r} does not fit this run "
                                      f"({ckpt_io._first_line(error)})") from error
    return saved["step"], saved["epoch"], saved["batch_index"]


def train(config: TrainConfig, *, resume: Optional[str] = None, overwrite: bool = False, progress: bool = True,
          stop_after: Optional[int] = None) -> dict:
    """Run (or continue) a training run; returns a summary with the losses and the last evaluation.

    ``resume``: a checkpoint to continue from (into ``config.output_dir``, which may hold the run).
    ``overwrite``: replace the run ``config.output_dir`` holds (its files go once this run writes its first).
    Without either, an output directory holding a run is refused. Everything is checked before the directory
    is touched (see the module docstring).
    ``stop_after``: stop once this many optimiser steps are done (the schedule still spans ``config.steps``), as
    an interruption would — used to test resuming.
    """
    config.validate()
    _check_output_dir(config, resume, overwrite)
    device_kind = _resolve_device(config.device).type  # checked before a process group is joined
    d = init_distributed(device_kind)
    device = resolve_device(config.device, d)
    torch.manual_seed(config.seed + d.rank)
    train_loader, valid_loader = _loaders(config, d)
    if len(train_loader) == 0:
        raise ValueError(f"the training data {config.data!r} gives no batch of {config.batch_size} for "
                         f"{d.world_size} process(es)")

    model = Alphafold2(**config.model_config()).to(device)
    check_model(model, config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.steps))
    step, epoch, batch_index = 0, 0, 0
    if resume is not None:
        step, epoch, batch_index = _resume_from(resume, config, device, d, model, optimizer, scheduler)
    # some parameters get no gradient in a given setting (embedd_project without embedds, the last layer's MSA
    # branch in the sequential trunk, the MSA stream with msa="none"): DDP must be told
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                    find_unused_parameters=True) if d.enabled else model
    model.train()

    majority = majority_bin(train_loader, config)
    log = MetricsLog(config.output_dir, step if resume is not None else None) if d.main else None
    ckpt_path = os.path.join(config.output_dir, "checkpoint.pt")
    summary: dict[str, Any] = {"losses": [], "evals": [], "majority_bin": majority, "checkpoint": ckpt_path}

    def log_row(row: dict) -> None:
        first = not log.written
        log.add(row)  # the first row replaces the log atomically
        if first:
            drop_previous_run()

    def drop_previous_run() -> None:
        """Once this run's log has replaced the previous one: --overwrite's previous checkpoint and plot go too."""
        if overwrite:
            for stale in (ckpt_path, log.plot_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)

    def save(metrics: dict) -> None:
        rank_rng = [ckpt_io.rng_state()]
        if d.enabled:  # every rank's generators, so a resumed DDP run continues each stream
            rank_rng = [None] * d.world_size
            dist.all_gather_object(rank_rng, ckpt_io.rng_state())
        if d.main:
            if not log.written:  # a checkpoint before the first row: the log must not be another run's
                log.write()
                drop_previous_run()
            ckpt_io.save_checkpoint(ckpt_path, model=model, model_config=config.model_config(), optimizer=optimizer,
                                    scheduler=scheduler, step=step, epoch=epoch, batch_index=batch_index,
                                    config=dataclasses.asdict(config), metrics=metrics, rank_rng=rank_rng)

    def micro_batches():
        nonlocal epoch, batch_index
        while True:
            for index, batch in train_loader.epoch_batches(epoch, start=batch_index):
                batch_index = index + 1
                yield batch
            epoch, batch_index = epoch + 1, 0

    stream = micro_batches()
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = None
    if progress and d.main:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
    window_loss, window_steps, window_res, window_start = 0.0, 0, 0, time.perf_counter()
    metrics: dict = {}
    while step < end:
        batches = [next(stream).to(device) for _ in range(config.grad_accum)]
        labels = [distogram_labels(b, config.target) for b in batches]
        pairs = _all_reduce_sum(torch.tensor(float(sum(int((lab != IGNORE).sum()) for lab in labels)),
                                             device=device), d)
        if pairs.item() == 0:
            raise ValueError(f"step {step}: no residue pair with coordinates in the batch (epoch {epoch}, "
                             f"batch {batch_index}); the dataset needs chains with resolved residues")
        step_loss = 0.0
        for i, (batch, lab) in enumerate(zip(batches, labels)):
            sync = contextlib.nullcontext() if (not d.enabled or i == len(batches) - 1) else ddp.no_sync()
            with sync:
                with autocast(config, device):
                    logits = ddp(**model_inputs(batch, config.msa))
                loss_sum = pair_loss_sum(logits, lab)
                # DDP averages gradients over ranks: scale by world_size so the result is sum / all pairs
                (loss_sum * (d.world_size / pairs)).backward()
            step_loss += loss_sum.item()
        if config.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        global_loss = _all_reduce_sum(torch.tensor(step_loss, device=device), d).item() / pairs.item()
        if not math.isfinite(global_loss):
            raise FloatingPointError(f"step {step}: the loss is {global_loss}; lower --lr or check the data")
        summary["losses"].append(global_loss)
        window_loss += global_loss
        window_steps += 1
        window_res += sum(int(b.mask.sum()) for b in batches) * d.world_size
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{global_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if step % config.log_every == 0 or step == end:
            elapsed = time.perf_counter() - window_start
            metrics = {"kind": "train", "step": step, "epoch": epoch, "loss": window_loss / window_steps,
                       "lr": scheduler.get_last_lr()[0], "residues_per_s": window_res / max(elapsed, 1e-9)}
            if log is not None:
                log_row(metrics)
            window_loss, window_steps, window_res, window_start = 0.0, 0, 0, time.perf_counter()
        if step % config.eval_every == 0 or step == config.steps:
            if d.main:
                evaluation = {"kind": "eval", "step": step,
                              **evaluate(model, valid_loader, config, device, majority, config.eval_fold)}
                summary["evals"].append(evaluation)
                log_row(evaluation)
                log.plot()
                if bar is not None:
                    bar.write(f"step {step}: val loss {evaluation['val_loss']:.3f}, acc {evaluation['val_acc']:.3f} "
                              f"(majority bin {evaluation['val_baseline_acc']:.3f})"
                              + (f", lDDT-Ca {evaluation['val_lddt_ca']:.3f}" if "val_lddt_ca" in evaluation else ""))
        if step % config.save_every == 0 or step == end:
            save(metrics)
    if bar is not None:
        bar.close()
    if log is not None and log.written:  # nothing to redraw when this call wrote nothing
        log.plot()
    summary.update(step=step, metrics_path=None if log is None else log.path,
                   plot_path=None if log is None else log.plot_path)
    return summary


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


HELP = {
    "data": "'demo' (the bundled dataset), a sidechainnet pickle, or 'sidechainnet' (CASP --casp-version, "
            "--casp-thinning in --scn-dir, downloaded by sidechainnet when missing)",
    "crop_len": "random window of longer chains, per batch item", "target": "distances between Ca or virtual Cb",
    "msa": "the query as a one-row MSA, or no MSA", "grad_accum": "micro-batches per optimiser step",
    "warmup_steps": "linear warm-up, then cosine decay to 10 %%", "precision": "auto: bf16 autocast on CUDA",
    "eval_fold": "fold the validation chains (MDS) for lDDT-Ca at each evaluation",
    "device": "auto (CUDA when available), cpu, cuda, cuda:1, ...",
    "relative_positions": "clipped relative-position embedding of the pair (0: the seed's model)",
    "trunk": "seed: the seed's axial + cross-attention layers; evoformer: AlphaFold2's Evoformer blocks",
    "pair_dim": "the Evoformer's pair width (0: --dim)",
    "trusted_data": "the --data pickle comes from a source you trust: unpickle any class it names (that can run "
                    "code from the file); without it only numpy arrays and plain values are read",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings (flags override it)")
    parser.add_argument("--resume", metavar="CKPT", nargs="?", const="auto",
                        help="continue from a checkpoint (default: OUTPUT_DIR/checkpoint.pt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run OUTPUT_DIR holds (its files go once the new run has written its "
                             "first); without --resume or this, an OUTPUT_DIR holding a run is refused")
    choices = {"target": ("ca", "cb"), "msa": ("single", "none"), "precision": ("auto", "fp32", "bf16"),
               "trunk": TRUNKS}
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = type(field.default)
        help_text = HELP.get(field.name, "") + f" (default {field.default!r})"
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=None, choices=choices.get(field.name),
                                metavar=None if field.name in choices else field.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    for field in dataclasses.fields(TrainConfig):
        flag = getattr(args, field.name, None)
        if flag is not None:
            values[field.name] = flag
    return TrainConfig(**values).validate()


def run_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    resume = args.resume
    if resume == "auto":
        resume = os.path.join(config.output_dir, "checkpoint.pt")
    summary = train(config, resume=resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics_path']}\n"
              f"loss curve: {summary['plot_path']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
