"""Checkpoints of ``af2-ext train``: one file holds everything a run needs to continue or to fold.

Format (a ``torch.save`` dict, ``format == CHECKPOINT_FORMAT``):

- ``model_config``: the ``Alphafold2`` keyword arguments, so :func:`load_model` rebuilds the model alone;
- ``model``: its state dict (of the bare model, never a DDP wrapper);
- ``optimizer``, ``scheduler``: their state dicts (training only);
- ``step`` (optimiser steps done), ``epoch`` and ``batch_index`` (the next batch to read): the data position;
- ``rng``: the CPU, CUDA and Python generator states; ``rank_rng``: those of every process of a DDP run;
- ``config``: the training configuration it ran with; ``metrics``: the last logged metrics.

Files are written atomically: to a temporary file in the same directory, flushed, then renamed over the target,
so a crash leaves either the old checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from typing import Any, Optional, Union

import torch

from af2_ext.fileio import PathLike, atomic_open
from af2_ext.model import Alphafold2

CHECKPOINT_FORMAT = "af2_ext.checkpoint/1"


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename (see :mod:`af2_ext.fileio`)."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def rng_state() -> dict:
    """Every generator a training step draws from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: PathLike, *, model: torch.nn.Module, model_config: dict, optimizer=None, scheduler=None,
                    step: int = 0, epoch: int = 0, batch_index: int = 0, config: Optional[dict] = None,
                    metrics: Optional[dict] = None, rank_rng: Optional[list] = None) -> None:
    """Write a checkpoint atomically (see the module docstring for the format). ``rank_rng``: every process's
    :func:`rng_state` in a distributed run (default: this process's)."""
    model = getattr(model, "module", model)  # unwrap DDP
    atomic_save({
        "format": CHECKPOINT_FORMAT,
        "model_config": dict(model_config),
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "step": int(step), "epoch": int(epoch), "batch_index": int(batch_index),
        "rng": rank_rng[0] if rank_rng else rng_state(),
        "rank_rng": list(rank_rng) if rank_rng else [rng_state()],
        "config": dict(config or {}),
        "metrics": dict(metrics or {}),
    }, path)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict:
    """Read a checkpoint, with a clear error for a missing, truncated or foreign file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"checkpoint {path!r} could not be read (truncated or not a torch file): {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path!r} is not an af2_ext checkpoint (format {found!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    return ckpt


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> tuple[Alphafold2, dict]:
    """Rebuild the trained ``Alphafold2`` from a checkpoint, in eval mode; returns ``(model, checkpoint)``."""
    ckpt = load_checkpoint(path, map_location)
    model = Alphafold2(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.to(map_location).eval()
    return model, ckpt
