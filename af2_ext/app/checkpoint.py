"""Checkpoints of ``af2-ext train``: one file holds everything a run needs to continue or to fold.

Content (a dict, ``format == CHECKPOINT_FORMAT``), tensors and plain Python values only:

- ``model_config``: the ``Alphafold2`` keyword arguments, so :func:`load_model` rebuilds the model alone;
- ``model``: its state dict (of the bare model, never a DDP wrapper);
- ``optimizer``, ``scheduler``: their state dicts (training only);
- ``step`` (optimiser steps done), ``epoch`` and ``batch_index`` (the next batch to read): the data position;
- ``rng``: the CPU, CUDA and Python generator states; ``rank_rng``: those of every process of a DDP run;
- ``config``: the training configuration it ran with; ``metrics``: the last logged metrics.

File (version 2): a header, then the ``torch.save`` bytes of the dict (the payload)::

    MAGIC (b"af2_ext checkpoint 2\\n"), payload length (8 bytes, little-endian), SHA-256 of the payload (32 bytes)

Reading checks the length and the digest before anything is unpickled, so a damaged file (a flipped bit
anywhere, truncated, or with bytes appended) is refused whole, never half-loaded. The payload is then read with
``torch.load(weights_only=True)``: tensors and plain values only, so loading a checkpoint cannot run code from
it. Files written before version 2 (a bare ``torch.save``, no checksum) are read the same way with a warning
that their integrity cannot be checked; the next save of a resumed run writes version 2. Every failure to read
a checkpoint is one :class:`CheckpointError` (a ValueError) naming the file.

Files are written atomically: to a temporary file in the same directory, flushed, then renamed over the target,
so a crash leaves either the old checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import random
import struct
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch

from af2_ext.devices import resolve_device
from af2_ext.fileio import PathLike, atomic_open, check_input_file
from af2_ext.model import Alphafold2

CHECKPOINT_FORMAT = "af2_ext.checkpoint/1"  # the content's layout (the dict above)
MAGIC = b"af2_ext checkpoint 2\n"  # the file's: header + payload
_LENGTH = struct.Struct("<Q")
_DIGEST_SIZE = hashlib.sha256().digest_size
HEADER_SIZE = len(MAGIC) + _LENGTH.size + _DIGEST_SIZE
_TORCH_ZIP = b"PK\x03\x04"  # what a bare torch.save file starts with (a version-1 checkpoint)
_REQUIRED = {"model_config": dict, "model": dict, "step": int, "epoch": int, "batch_index": int}
_OPTIONAL = {"optimizer": dict, "scheduler": dict, "rng": dict, "rank_rng": list, "config": dict, "metrics": dict}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing pieces, damaged, foreign, or holding more than plain data."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy scalars and arrays made Python numbers and tensors; a TypeError naming ``where`` for
    anything else that is not a tensor or a plain value (``torch.load(weights_only=True)`` would refuse it)."""
    if isinstance(value, np.generic):  # before the Python types: np.float64 is a float
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.Size)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):  # a state dict's OrderedDict stays one, with the module versions it carries
        out = collections.OrderedDict() if isinstance(value, collections.OrderedDict) else {}
        out.update((k, _plain(v, f"{where}[{k!r}]")) for k, v in value.items())
        if isinstance(value, collections.OrderedDict) and hasattr(value, "_metadata"):
            out._metadata = _plain(value._metadata, f"{where}._metadata")
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} is a {type(value).__name__}: checkpoints hold only tensors and plain values")


def _header(payload) -> bytes:
    return MAGIC + _LENGTH.pack(len(payload)) + hashlib.sha256(payload).digest()


def seal(payload: bytes) -> bytes:
    """A version-2 checkpoint file's bytes: the header for ``payload`` (``torch.save`` bytes), then the payload."""
    return _header(payload) + bytes(payload)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``obj`` (tensors and plain values) as a version-2 checkpoint file, written atomically."""
    buffer = io.BytesIO()
    torch.save(_plain(obj, "checkpoint"), buffer)
    payload = buffer.getbuffer()
    with atomic_open(path, "wb") as f:
        f.write(_header(payload))
        f.write(payload)


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


def _payload(blob: bytes, path: str) -> Optional[bytes]:
    """The verified payload of a version-2 file; None for a bare torch file (version 1)."""
    if blob.startswith(MAGIC):
        if len(blob) < HEADER_SIZE:
            raise CheckpointError(f"checkpoint {path!r} is truncated: {len(blob)} bytes, less than its "
                                  f"{HEADER_SIZE}-byte header")
        (length,) = _LENGTH.unpack_from(blob, len(MAGIC))
        digest = blob[len(MAGIC) + _LENGTH.size:HEADER_SIZE]
        payload = memoryview(blob)[HEADER_SIZE:]
        if len(payload) != length:
            state = "is truncated" if len(payload) < length else "has bytes past its end"
            raise CheckpointError(f"checkpoint {path!r} {state} (or a damaged header): its header gives "
                                  f"{length} bytes of content, the file holds {len(payload)}")
        if hashlib.sha256(payload).digest() != digest:
            raise CheckpointError(f"checkpoint {path!r} is damaged: its content does not match its SHA-256 "
                                  "checksum (a corrupted or incompletely copied file)")
        return payload
    if not blob:
        raise CheckpointError(f"checkpoint {path!r} is empty")
    if len(blob) < len(MAGIC) and MAGIC.startswith(blob):
        raise CheckpointError(f"checkpoint {path!r} is truncated: {len(blob)} bytes, less than its header")
    if blob.startswith(_TORCH_ZIP):
        return None
    raise CheckpointError(f"checkpoint {path!r} is not an af2_ext checkpoint (it starts with {blob[:8]!r}, "
                          f"not {MAGIC[:8]!r})")


def _check_fields(ckpt: Any, path: str) -> dict:
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path!r} is not an af2_ext checkpoint (format {found!r}, "
                              f"expected {CHECKPOINT_FORMAT!r})")
    for fields, required in ((_REQUIRED, True), (_OPTIONAL, False)):
        for key, kind in fields.items():
            value = ckpt.get(key)
            if (value is None and not required) or (isinstance(value, kind) and not isinstance(value, bool)):
                continue
            raise CheckpointError(f"checkpoint {path!r} has {'no' if value is None else 'a broken'} {key!r} "
                                  f"(expected a {kind.__name__}, got {type(value).__name__})")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise CheckpointError(f"checkpoint {path!r} has a broken 'model' state dict (values that are not tensors)")
    return ckpt


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict:
    """Read and verify a checkpoint. FileNotFoundError when there is no file; any other failure to read it is
    one :class:`CheckpointError` naming it."""
    try:
        path = check_input_file(path, "checkpoint")
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    if isinstance(map_location, (str, torch.device)):
        map_location = resolve_device(map_location)  # a ValueError naming the device, not the file
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as error:
        raise CheckpointError(f"checkpoint {path!r} could not be read: {error.strerror or error}") from error
    payload = _payload(blob, path)
    try:
        ckpt = torch.load(io.BytesIO(blob if payload is None else payload), map_location=map_location,
                          weights_only=True)
    except Exception as error:  # damage in a version-1 file (any error), or a payload holding more than data
        raise CheckpointError(f"checkpoint {path!r} could not be read ({_first_line(error)})") from error
    ckpt = _check_fields(ckpt, path)
    if payload is None:
        warnings.warn(f"checkpoint {path!r} has no checksum (written by an af2_ext before version 2): its "
                      "integrity cannot be checked; a resumed run writes its next checkpoint with one",
                      stacklevel=2)
    return ckpt


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> tuple[Alphafold2, dict]:
    """Rebuild the trained ``Alphafold2`` from a checkpoint, in eval mode; returns ``(model, checkpoint)``."""
    if isinstance(map_location, (str, torch.device)):
        map_location = resolve_device(map_location)
    ckpt = load_checkpoint(path, map_location)
    path = os.fspath(path)
    try:
        model = Alphafold2(**ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path!r}: its model cannot be rebuilt ({_first_line(error)})") from error
    model.to(map_location).eval()
    return model, ckpt
