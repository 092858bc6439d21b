"""Shared test helpers: devices, seeded input builders and THE tolerance policy.

Tolerance policy (one place, :func:`assert_matches`):
- float32 / float64: tight absolute + relative tolerances (:data:`TOLERANCES`) against an oracle.
- float16 / bfloat16: the flash-attention rule. With ``ref`` the oracle run in fp32 on the same
  (low-precision) values and ``ref_lowp`` the same math done in the low-precision dtype,
  ``max|got - ref| <= factor * max|ref_lowp - ref| + floor``, factor 2 for outputs and 3 for gradients:
  the op may be at most a few times worse than computing naively in that dtype.

Nothing here touches CUDA at import time; CUDA availability is asked when a CUDA test runs.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import pytest
import torch

from af2_ext import layouts

LOW_PRECISION = (torch.float16, torch.bfloat16)

# (atol, rtol) per dtype for outputs and for gradients.
TOLERANCES = {
    torch.float32: {"out": (1e-5, 1e-5), "grad": (5e-5, 5e-5)},
    torch.float64: {"out": (1e-10, 1e-10), "grad": (1e-10, 1e-10)},
}
LOW_PRECISION_FACTOR = {"out": 2.0, "grad": 3.0}


def low_precision_floor(dtype: torch.dtype) -> float:
    """Additive floor of the low-precision rule: one ulp at 1, so the rule is not degenerate when naive
    low-precision math happens to be exact."""
    return torch.finfo(dtype).eps


# ----------------------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------------------


def cuda_skip_reason(op: Optional[str] = None) -> Optional[str]:
    """Why CUDA tests cannot run here (None if they can). Asked at test time, never at import."""
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if op is None:
        return None
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"af2_ext::{op}", "CUDA")
    except RuntimeError:  # the operator is not registered at all
        return f"af2_ext._C is not built (no operator af2_ext::{op})"
    return None if has_kernel else f"af2_ext was built without a CUDA kernel for {op}"


def gpu_required() -> bool:
    """``AF2_EXT_REQUIRE_GPU`` set (not empty, not 0): a CUDA test that cannot run fails instead of skipping, so a
    GPU machine with a broken driver or a CPU-only build cannot pass (cuda_tests/test_main.h reads it too)."""
    return os.environ.get("AF2_EXT_REQUIRE_GPU", "") not in ("", "0")


def skip_cuda(reason: str) -> None:
    """Skips a CUDA case that cannot run here, with the reason; fails it instead under ``AF2_EXT_REQUIRE_GPU``."""
    if gpu_required():
        pytest.fail(f"AF2_EXT_REQUIRE_GPU is set but {reason}")
    pytest.skip(reason)


# Device parametrisation: each test written once, ``@pytest.mark.parametrize("device", DEVICES)``, and
# ``require_device(device, op)`` first in its body (CUDA is asked then, never at collection).
DEVICES = ["cpu", "cuda"]


def per_device(**cases: list) -> list:
    """Device parametrisation for a test whose devices run different cases, e.g. fp64 on the CPU only:
    ``@pytest.mark.parametrize("device, dtype", per_device(cpu=[fp32, fp64], cuda=[fp32]))``. A case that is a
    tuple is spread (``"device, dtype, other"``); ids read ``<case>-<device>`` like stacked parametrisations."""
    params = []
    for device, device_cases in cases.items():
        assert device in DEVICES, f"unknown device {device!r}"
        for case in device_cases:
            values = case if isinstance(case, tuple) else (case,)
            params.append(pytest.param(device, *values, id="-".join([*map(str, values), device])))
    return params


def require_device(device: str, op: Optional[str] = None) -> None:
    """Skips a CUDA case (with the reason) when CUDA or the op's CUDA kernel is missing; fails it under
    ``AF2_EXT_REQUIRE_GPU``."""
    if torch.device(device).type == "cuda":
        reason = cuda_skip_reason(op)
        if reason is not None:
            skip_cuda(reason)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def other_device(device: str) -> str:
    """A device different from ``device`` that exists everywhere: meta for CPU, CPU for CUDA."""
    return "meta" if torch.device(device).type == "cpu" else "cpu"


# ----------------------------------------------------------------------------------------------------------
# Inputs (built on the CPU from a local generator, then moved: the same seed gives the same values anywhere)
# ----------------------------------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, device="cpu", scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    t = (torch.randn(*shape, generator=generator(seed), dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def make_qkv(B: int, H: int, Nq: int, Nk: int, D: int, *, seed: int, dtype=torch.float32, device="cpu",
             requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, Nq, D), k and v (B, H, Nk, D), standard normal."""
    return tuple(randn(B, H, n, D, seed=seed + i, dtype=dtype, device=device, requires_grad=requires_grad)
                 for i, n in enumerate((Nq, Nk, Nk)))


def make_bias(Bb: int, Hb: int, Nq: int, Nk: int, *, seed: int, dtype=torch.float32, device="cpu",
              neg_inf_fraction: float = 0.0, requires_grad: bool = False) -> torch.Tensor:
    """Additive bias (Bb, Hb, Nq, Nk), standard normal; about ``neg_inf_fraction`` of the entries -inf."""
    bias = torch.randn(Bb, Hb, Nq, Nk, generator=generator(seed), dtype=torch.float64)
    if neg_inf_fraction > 0:
        drop = torch.rand(Bb, Hb, Nq, Nk, generator=generator(seed + 1), dtype=torch.float64) < neg_inf_fraction
        bias = bias.masked_fill(drop, -torch.inf)
    return bias.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def make_key_padding_mask(B: int, Nk: int, *, seed: int, keep: float = 0.8, device="cpu",
                          fully_padded: tuple[int, ...] = ()) -> torch.Tensor:
    """bool (B, Nk), True = keep, each key kept with probability ``keep``; batch rows in ``fully_padded``
    keep nothing. Key 0 is kept in the other rows so that only the rows asked for are empty."""
    mask = torch.rand(B, Nk, generator=generator(seed)) < keep
    mask[:, 0] = True
    for b in fully_padded:
        mask[b] = False
    return mask.to(device)


def random_layout(H: int, nqb: int, nkb: int, *, seed: int, density: float = 0.5, device="cpu",
                  empty_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """bool (H, nqb, nkb) with about ``density`` of the blocks set; every query block row sees at least one
    key block except the rows in ``empty_rows`` (in every head), which see none."""
    layout = torch.rand(H, nqb, nkb, generator=generator(seed)) < density
    forced = torch.randint(0, nkb, (H, nqb, 1), generator=generator(seed + 1))
    layout.scatter_(-1, forced, True)
    for row in empty_rows:
        layout[:, row] = False
    return layout.to(device)


# ----------------------------------------------------------------------------------------------------------
# Low-precision oracle: the same dense masked attention as af2_ext.reference, but computed in the inputs'
# dtype (the reference upcasts to fp32).
# ----------------------------------------------------------------------------------------------------------


def block_sparse_attention_lowp(q, k, v, layout, *, block_size=16, key_padding_mask=None, bias=None,
                                scale=None) -> torch.Tensor:
    """Dense block-sparse attention computed in q's dtype (every intermediate rounded to it)."""
    dtype = q.dtype
    batch, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    visible = layouts.to_mask(layout, block_size, nq, nk).unsqueeze(0)  # [1, Hl, Nq, Nk]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]  # [B, Hl, Nq, Nk]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk] in dtype
    if bias is not None:
        logits = logits + bias.to(dtype).repeat_interleave(batch // bias.shape[0], dim=0)
    visible = visible & ~torch.isneginf(logits)
    logits = logits.masked_fill(~visible, torch.finfo(dtype).min)
    probs = torch.softmax(logits, dim=-1).masked_fill(~visible, 0.0)
    return torch.matmul(probs, v)


# ----------------------------------------------------------------------------------------------------------
# Running and comparing
# ----------------------------------------------------------------------------------------------------------


def forward_backward(fn: Callable, tensors: dict, grad_out: Optional[torch.Tensor], *, dtype=None,
                     **kwargs) -> tuple[torch.Tensor, dict]:
    """Runs ``fn(**tensors, **kwargs)`` on fresh leaf copies of ``tensors`` (cast to ``dtype`` if given), then
    backward with ``grad_out`` (skipped when None). Returns (out, {name: grad}) for the floating tensors that
    required grad."""
    leaves = {}
    for name, t in tensors.items():
        if t is not None and t.is_floating_point():
            leaf = t.detach().to(dtype if dtype is not None else t.dtype)
            leaves[name] = leaf.requires_grad_(t.requires_grad)
        else:
            leaves[name] = t
    out = fn(**leaves, **kwargs)
    grads = {}
    if grad_out is not None:
        out.backward(grad_out.to(out.dtype))
        grads = {name: leaf.grad for name, leaf in leaves.items()
                 if isinstance(leaf, torch.Tensor) and leaf.requires_grad}
        for name, g in grads.items():
            assert g is not None, f"{name}.grad is None after backward"
    return out.detach(), grads


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double().to(a.device)).abs().max().item()


def assert_finite(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t)
    assert not bad.any(), (f"{name} has {int(bad.sum())} non-finite entries (NaN {int(t.isnan().sum())}, "
                           f"inf {int(t.isinf().sum())}), first at {tuple(bad.nonzero()[0].tolist())}")


def assert_matches(name: str, got: torch.Tensor, ref: torch.Tensor, *, kind: str = "out",
                   ref_lowp: Optional[torch.Tensor] = None, precision: Optional[torch.dtype] = None) -> None:
    """THE tolerance policy. ``got`` is the op's result; ``ref`` the oracle in fp32 or fp64; ``precision`` the
    dtype the op computed in, whose tolerance applies (default ``got.dtype``; e.g. an fp32 bias gradient of an
    fp16 attention is judged as fp16); ``ref_lowp`` (required for fp16/bf16) is the oracle computed in it."""
    assert kind in ("out", "grad"), kind
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert_finite(name, got)
    dtype = got.dtype if precision is None else precision
    if dtype in LOW_PRECISION:
        assert ref_lowp is not None, f"{name}: the {dtype} rule needs the low-precision reference"
        err, base = max_abs_err(got, ref), max_abs_err(ref_lowp, ref)
        factor, floor = LOW_PRECISION_FACTOR[kind], low_precision_floor(dtype)
        bound = factor * base + floor
        assert err <= bound, (
            f"{name} ({dtype}): max |op - ref_fp32| = {err:.4g} exceeds {factor:g} * max |ref_{dtype} - "
            f"ref_fp32| ({base:.4g}) + {floor:.3g} = {bound:.4g}")
        return
    atol, rtol = TOLERANCES[dtype][kind]
    torch.testing.assert_close(got, ref.to(device=got.device, dtype=got.dtype), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name} ({dtype}, {kind} tolerance atol={atol}, rtol={rtol}): {m}")


def assert_opcheck(op, samples) -> None:
    """``torch.library.opcheck`` of ``op`` on every sample (a tuple of its arguments); all checks must pass."""
    for i, args in enumerate(samples):
        results = torch.library.opcheck(op, args)
        failed = {name: result for name, result in results.items() if result != "SUCCESS"}
        assert not failed, f"opcheck sample {i}: {failed}"


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fp32-math reference runs in to judge an op in ``dtype``: fp64 for fp32 and fp64 (so the
    fp32 tolerance measures the op, not the oracle's own rounding), fp32 for fp16/bf16 (the rule's ref_fp32)."""
    return torch.float32 if dtype in LOW_PRECISION else torch.float64


def compressed_attention_lowp(q, k, v, ratio, weight, bias=None, *, key_padding_mask=None, layout=None,
                              block_size=16, scale=None) -> torch.Tensor:
    """Memory-compressed attention computed in q's dtype: convolution, mask pooling and attention all rounded
    to it (the reference does the same math in fp32)."""
    dtype = q.dtype
    batch, heads, seq, dim = k.shape
    if ratio == 1:
        kc, vc, mask = k, v, key_padding_mask
    else:
        pad = (-seq) % ratio

        def compress(x):
            x = torch.nn.functional.pad(x, (0, 0, 0, pad)).permute(0, 1, 3, 2).reshape(batch, heads * dim, -1)
            y = torch.nn.functional.conv1d(x, weight.to(dtype), None if bias is None else bias.to(dtype),
                                           stride=ratio, groups=heads)
            return y.reshape(batch, heads, dim, -1).permute(0, 1, 3, 2)

        kc, vc = compress(k), compress(v)
        mask = None
        if key_padding_mask is not None:
            padded = torch.nn.functional.pad(key_padding_mask, (0, pad), value=False)
            mask = padded.view(batch, -1, ratio).any(-1)
    if layout is None:
        layout = layouts.dense(layouts.num_blocks(q.shape[2], block_size), layouts.num_blocks(kc.shape[2], block_size))
    return block_sparse_attention_lowp(q, kc, vc, layout.to(q.device), block_size=block_size, key_padding_mask=mask,
                                       scale=scale)
