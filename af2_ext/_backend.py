"""torch-or-numpy arguments for the structure tools (geometry, MDS, scores): one tensor view of either kind, and
results returned as the kind the caller gave (``backend="torch" | "numpy"`` forces one, as the seed's ``backend``
keyword did). Errors name the argument."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

BACKENDS = ("auto", "torch", "numpy")


def as_tensor(name: str, value, *, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, bool]:
    """Tensor view of a torch/numpy argument and whether it was numpy."""
    if isinstance(value, torch.Tensor):
        t, was_numpy = value, False
    elif isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real numeric array, got dtype {value.dtype}")
        t, was_numpy = torch.from_numpy(np.ascontiguousarray(value)), True
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be real, got {t.dtype}")
    if dtype is not None:
        t = t.to(dtype)
    return t, was_numpy


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Compute dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch' or 'numpy', got {backend!r}")
    return backend


def wants_numpy(backend: str, was_numpy: bool) -> bool:
    """Whether to return numpy: forced by ``backend``, or ``"auto"`` and the input was numpy."""
    return backend == "numpy" or (backend == "auto" and was_numpy)


def to_output(t: torch.Tensor, to_numpy: bool, np_dtype=None):
    """``t`` as it goes back to the caller: the tensor, or a numpy copy (in ``np_dtype`` when given)."""
    if not to_numpy:
        return t
    arr = t.detach().cpu().numpy()
    return arr.astype(np_dtype, copy=False) if np_dtype is not None else arr


def numpy_float_dtype(value) -> Optional[np.dtype]:
    """The float dtype of a numpy argument (numpy results keep it), else None."""
    return value.dtype if isinstance(value, np.ndarray) and value.dtype.kind == "f" else None
