"""The ``--device`` of the command line: a name checked against what this machine has, before anything runs."""
from __future__ import annotations

from typing import Union

import torch

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: Union[str, torch.device, None], local_rank: int = 0) -> torch.device:
    """The device ``name`` asks for: "auto" (or None) is CUDA when available, else the CPU; a bare "cuda" is
    CUDA device ``local_rank`` (a torchrun process's own GPU). A ValueError naming ``name`` when it is not a
    device name, not a device af2_ext runs on, or a device this machine does not have."""
    if name is None or str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {str(name)!r} is not a device name; expected {DEVICE_NAMES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device {str(name)!r} is not supported; expected {DEVICE_NAMES}")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"device {str(name)!r}: no CUDA device is available ({why}); use --device cpu")
    index = local_rank if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {str(name)!r}: CUDA device {index} asked for, {count} visible")
    return torch.device("cuda", index)
