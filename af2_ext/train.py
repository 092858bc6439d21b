"""Distogram pre-training: ``af2-ext train``.

The target is the binned Cα-Cα (or virtual Cβ-Cβ) distance of every residue pair with coordinates, in the
model's 37 bins (:func:`af2_ext.utils.get_bucketed_distance_matrix`); the loss is the cross-entropy over those
pairs. The MSA stream gets the query sequence as its one row (``msa="single"``, the default: sidechainnet has
no alignments, and this keeps the cross-attention in the trunk) or nothing (``msa="none"``).

Reproducible and resumable: the data order and crops come from generators of their own
(:class:`af2_ext.data.ProteinLoader`), checkpoints carry the model, optimiser, scheduler, the RNG states and the
data position, and ``--resume`` continues with the same losses as a run that was never interrupted.

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

from af2_ext import checkpoint as ckpt_io
from af2_ext import utils
from af2_ext.fileio import atomic_open, save_figure_atomic
from af2_ext.model import DISTOGRAM_BUCKETS, Alphafold2

IGNORE = -100
MODEL_KEYS = ("dim", "depth", "heads", "dim_head", "max_seq_len", "attn_dropout", "ff_dropout", "reversible",
              "sparse_self_attn", "cross_attn_compress_ratio", "inter_msa_self_attn", "block_size",
              "sparse_block_size", "relative_positions")


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

    def model_config(self) -> dict:
        return {k: getattr(self, k) for k in MODEL_KEYS}

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
        for name, allowed in (("target", ("ca", "cb")), ("msa", ("single", "none")),
                              ("precision", ("auto", "fp32", "bf16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.crop_len > self.max_seq_len:
            raise ValueError(f"crop_len ({self.crop_len}) must be <= max_seq_len ({self.max_seq_len})")
        return self


def load_config_file(path: str) -> dict:
    """A JSON or TOML file of :class:`TrainConfig` keys; unknown keys are an error naming them."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
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
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA device is available")
        device = torch.device("cuda", d.local_rank if device.index is None else device.index)
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
    """Alphafold2 keyword arguments for a :class:`af2_ext.data.ProteinBatch`."""
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
    """``metrics.jsonl`` (one JSON object per line, ``kind`` = "train" | "eval") and ``loss.png``. On resume the
    rows past the checkpoint's step are dropped (rewritten atomically), so the log matches the run."""

    def __init__(self, output_dir: str, resume_step: Optional[int]):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.plot_path = os.path.join(output_dir, "loss.png")
        self.rows: list[dict] = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                self.rows = [r for r in (json.loads(line) for line in f if line.strip()) if r["step"] <= resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        with atomic_open(self.path, "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

        train = [r for r in self.rows if r["kind"] == "train"]
        evals = [r for r in self.rows if r["kind"] == "eval"]
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("distogram cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure_atomic(fig, self.plot_path)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def _loaders(config: TrainConfig, d: Dist):
    from af2_ext import data

    if config.data == "demo":
        source = dict(local_scn_path=data.demo_dataset_path())
    elif config.data == "sidechainnet":
        source = dict(casp_version=config.casp_version, casp_thinning=config.casp_thinning, scn_dir=config.scn_dir)
    else:
        source = dict(local_scn_path=config.data)
    scn = data.load_scn_dict(**source)
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
    allowed = {"steps", "output_dir", "log_every", "eval_every", "save_every", "eval_fold", "device"}
    differ = sorted(k for k, v in dataclasses.asdict(config).items() if k not in allowed and saved.get(k) != v)
    if differ:
        raise ValueError(f"--resume: the checkpoint was trained with other settings for {differ} "
                         f"(checkpoint: {[saved.get(k) for k in differ]}, now: "
                         f"{[getattr(config, k) for k in differ]})")


def train(config: TrainConfig, *, resume: Optional[str] = None, progress: bool = True,
          stop_after: Optional[int] = None) -> dict:
    """Run (or continue) a training run; returns a summary with the losses and the last evaluation.

    ``stop_after``: stop once this many optimiser steps are done (the schedule still spans ``config.steps``), as
    an interruption would — used to test resuming.
    """
    config.validate()
    d = init_distributed("cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
                         else "cpu")
    device = resolve_device(config.device, d)
    torch.manual_seed(config.seed + d.rank)
    train_loader, valid_loader = _loaders(config, d)
    if len(train_loader) == 0:
        raise ValueError(f"the training data {config.data!r} gives no batch of {config.batch_size} for "
                         f"{d.world_size} process(es)")

    model = Alphafold2(**config.model_config()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.steps))
    step, epoch, batch_index = 0, 0, 0
    if resume is not None:
        saved = ckpt_io.load_checkpoint(resume, map_location=device)
        _same_run(saved["config"], config)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, epoch, batch_index = saved["step"], saved["epoch"], saved["batch_index"]
        rank_rng = saved.get("rank_rng") or [saved["rng"]]
        if len(rank_rng) != d.world_size:
            raise ValueError(f"--resume: the checkpoint was written by {len(rank_rng)} process(es), this run has "
                             f"{d.world_size}; resume with the same number (the RNG streams are per process)")
        ckpt_io.set_rng_state(rank_rng[d.rank])
    # some parameters get no gradient in a given setting (embedd_project without embedds, the last layer's MSA
    # branch in the sequential trunk, the MSA stream with msa="none"): DDP must be told
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                    find_unused_parameters=True) if d.enabled else model
    model.train()

    os.makedirs(config.output_dir, exist_ok=True)
    log = MetricsLog(config.output_dir, step if resume is not None else None) if d.main else None
    majority = majority_bin(train_loader, config)
    ckpt_path = os.path.join(config.output_dir, "checkpoint.pt")
    summary: dict[str, Any] = {"losses": [], "evals": [], "majority_bin": majority, "checkpoint": ckpt_path}

    def save(metrics: dict) -> None:
        rank_rng = [ckpt_io.rng_state()]
        if d.enabled:  # every rank's generators, so a resumed DDP run continues each stream
            rank_rng = [None] * d.world_size
            dist.all_gather_object(rank_rng, ckpt_io.rng_state())
        if d.main:
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
                log.add(metrics)
            window_loss, window_steps, window_res, window_start = 0.0, 0, 0, time.perf_counter()
        if step % config.eval_every == 0 or step == config.steps:
            if d.main:
                evaluation = {"kind": "eval", "step": step,
                              **evaluate(model, valid_loader, config, device, majority, config.eval_fold)}
                summary["evals"].append(evaluation)
                log.add(evaluation)
                log.plot()
                if bar is not None:
                    bar.write(f"step {step}: val loss {evaluation['val_loss']:.3f}, acc {evaluation['val_acc']:.3f} "
                              f"(majority bin {evaluation['val_baseline_acc']:.3f})"
                              + (f", lDDT-Ca {evaluation['val_lddt_ca']:.3f}" if "val_lddt_ca" in evaluation else ""))
        if step % config.save_every == 0 or step == end:
            save(metrics)
    if bar is not None:
        bar.close()
    if log is not None:
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
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML file of settings (flags override it)")
    parser.add_argument("--resume", metavar="CKPT", nargs="?", const="auto",
                        help="continue from a checkpoint (default: OUTPUT_DIR/checkpoint.pt)")
    choices = {"target": ("ca", "cb"), "msa": ("single", "none"), "precision": ("auto", "fp32", "bf16")}
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
    summary = train(config, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics_path']}\n"
              f"loss curve: {summary['plot_path']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
