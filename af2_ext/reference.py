"""Pure-PyTorch references for the af2_ext ops: fp32 math (fp64 for fp64 inputs), dense masks.

These are the test oracles and the fallback when the compiled extension is missing. They materialise the
full Nq x Nk attention matrix, so they are only for small problems.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from af2_ext import layouts


def _expand_bias(bias: torch.Tensor, batch: int) -> torch.Tensor:
    """(Bb, Hb, Nq, Nk) -> (B, Hb, Nq, Nk): batch row b uses bias row b // (B // Bb)."""
    return bias.repeat_interleave(batch // bias.shape[0], dim=0)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def _masked_matmul_values(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """sum over j with keep[..., i, j] of a[..., i, j] * b[..., j, d]. A term outside ``keep`` is absent (not a
    product with zero); a kept term with a non-finite factor makes its output NaN (where IEEE arithmetic would give
    NaN or +-inf)."""
    out = torch.matmul(torch.where(keep, _finite_or_zero(a), 0.0), _finite_or_zero(b))
    touched = (keep & ~torch.isfinite(a)).any(-1, keepdim=True)
    touched = touched | (torch.matmul(keep.to(a.dtype), (~torch.isfinite(b)).to(a.dtype)) > 0)
    return out.masked_fill(touched, float("nan"))


class _MaskedMatmul(torch.autograd.Function):
    """(a, b, keep) -> sum_j [keep_ij] a_ij b_jd, batched: a (..., I, J), b (..., J, D), keep bool broadcastable to
    a. The gradients are the same kind of products, so nothing an absent term holds reaches any of them."""

    @staticmethod
    def forward(a, b, keep):
        return _masked_matmul_values(a, b, keep)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        a, b, keep = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _SampledMatmul.apply(grad, b, keep, 1.0)
        if ctx.needs_input_grad[1]:
            grad_b = _MaskedMatmul.apply(a.transpose(-1, -2), grad, keep.transpose(-1, -2))
        return grad_a, grad_b, None


class _SampledMatmul(torch.autograd.Function):
    """(x, y, keep, scale) -> scale * sum_d x_id y_jd where keep_ij, else 0, batched: x (..., I, D), y (..., J, D).
    Its gradients are masked products over the kept pairs only; a zero gradient stays zero whatever the scale (an
    infinite scale must not turn the zero gradient of a masked logit into NaN)."""

    @staticmethod
    def forward(x, y, keep, scale):
        return torch.where(keep, torch.matmul(x, y.transpose(-1, -2)) * scale, 0.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, keep, scale = inputs
        ctx.save_for_backward(x, y, keep)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, grad):
        x, y, keep = ctx.saved_tensors
        scale = ctx.scale
        grad = grad * scale if math.isfinite(scale) else torch.where(grad == 0, 0.0, grad * scale)
        grad_x = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_x = _MaskedMatmul.apply(grad, y, keep)
        if ctx.needs_input_grad[1]:
            grad_y = _MaskedMatmul.apply(grad.transpose(-1, -2), x, keep.transpose(-1, -2))
        return grad_x, grad_y, None, None


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    *,
    block_size: int = 16,
    key_padding_mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Block-sparse attention by expanding ``layout`` to a dense mask; same contract as
    :func:`af2_ext.ops.block_sparse_attention`. ``dropout_p`` > 0 drops attention probabilities (training).

    Non-finite values (the kernels' contract too). A pair outside the layout, at a padded key or past the sequence
    ends is absent: nothing its q, k, v or bias hold (NaN, inf) reaches any output or gradient. A NaN among a row's
    logits (from q, k, the bias or the scale; +inf too) makes that row's output NaN, as a softmax does. A logit of
    -inf (a -inf bias) masks its pair: probability and logit gradient exactly 0 — though, unlike an absent pair, its
    terms still meet in the products, so a non-finite v (or k, q) there still reaches the row. A query row with no
    visible key is zero with zero gradients, whatever it holds. Otherwise a non-finite input reaches exactly the
    outputs and gradients it touches; where exactly NaN or +-inf appears may differ from the kernels.

    Args:
        q: (B, H, Nq, D). k, v: (B, H, Nk, D).
        layout: bool (H or 1, ceil(Nq / block_size), ceil(Nk / block_size)).
        key_padding_mask: bool (B, Nk), True = keep.
        bias: float (Bb, H or 1, Nq, Nk) with B % Bb == 0.
        scale: defaults to D ** -0.5.

    Returns:
        (B, H, Nq, D) in q's dtype; a query row with no visible key is zero.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keep = layouts.to_mask(layout.to(q.device), block_size, nq, nk).unsqueeze(0)  # [1, Hl, Nq, Nk]
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]  # [B, Hl, Nq, Nk]
    # Products over the kept pairs only (_SampledMatmul, _MaskedMatmul): a dense matmul would multiply what a masked
    # key holds by zero, and 0 * NaN is NaN, in the forward and in every gradient.
    logits = _SampledMatmul.apply(q.to(compute), k.to(compute), keep, float(scale))  # [B, H, Nq, Nk]
    if bias is not None:
        logits = logits + _expand_bias(bias.to(compute), batch)
    # -inf from the bias counts as masked too. Masked logits become the most negative finite value: an empty row
    # yields a finite softmax (zeroed below), and masked_fill gives masked logits an exactly-zero gradient.
    visible = keep & ~torch.isneginf(logits)
    probs = torch.softmax(logits.masked_fill(~visible, torch.finfo(compute).min), dim=-1)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    out = _MaskedMatmul.apply(probs, v.to(compute), keep)  # [B, H, Nq, D]
    return out.masked_fill(~visible.any(-1, keepdim=True), 0.0).to(q.dtype)


def triangle_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                           mask: Optional[torch.Tensor] = None, *, scale: Optional[float] = None) -> torch.Tensor:
    """Triangle attention as OpenFold writes it, dense, in fp32 (fp64 for fp64 inputs): per (b, n, h),
    ``softmax(scale * q k^T + bias[b, h], over unmasked keys) v``; a row whose keys are all masked is zero.

    Args:
        q: (B, N, H, Q, D); k, v: (B, N, H, K, D); bias: (B, 1, H, Q, K) or (B, H, Q, K); mask: bool
            (B, N, 1, 1, K) or (B, N, K), True = keep.

    Returns:
        (B, N, H, Q, D) in q's dtype.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, N, H, Q, _ = q.shape
    K = k.shape[3]
    bias = (bias.squeeze(1) if bias.dim() == 5 else bias).to(compute)  # [B, H, Q, K]
    logits = torch.einsum("bnhqd,bnhkd->bnhqk", q.to(compute), k.to(compute)) * scale + bias[:, None]
    if mask is None:
        return torch.einsum("bnhqk,bnhkd->bnhqd", torch.softmax(logits, -1), v.to(compute)).to(q.dtype)
    keep = mask.reshape(B, N, 1, 1, K)
    probs = torch.softmax(logits.masked_fill(~keep, torch.finfo(compute).min), -1).masked_fill(~keep, 0.0)
    out = torch.einsum("bnhqk,bnhkd->bnhqd", probs, v.to(compute))
    return out.masked_fill(~keep.any(-1, keepdim=True), 0.0).to(q.dtype)


def kv_compress_ref(k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values compressed by ``conv1d(weight, bias, stride=ratio, groups=H)`` after an explicit zero pad
    of the sequence to a multiple of ``ratio``, in fp32 (fp64 for fp64 inputs).

    Args:
        k, v: (B, H, Nk, D). weight: (H*D, D, ratio). bias: (H*D,) or None.

    Returns:
        kc, vc: (B, H, ceil(Nk / ratio), D) in the compute dtype.
    """
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    batch, heads, seq, dim = k.shape
    pad = (-seq) % ratio
    weight = weight.to(compute)
    bias = None if bias is None else bias.to(compute)

    def compress(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x.to(compute), (0, 0, 0, pad))  # [b, h, Nk + pad, d]
        x = x.permute(0, 1, 3, 2).reshape(batch, heads * dim, seq + pad)  # [b, (h d), n]
        y = torch.nn.functional.conv1d(x, weight, bias, stride=ratio, groups=heads)  # [b, (h d), Nc]
        return y.reshape(batch, heads, dim, -1).permute(0, 1, 3, 2)  # [b, h, Nc, d]

    return compress(k), compress(v)


def zero_padded(x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) with the rows of padded positions (key_padding_mask (B, N) False) set to zero, whatever they
    held (NaN included): padded inputs never reach a compressed key or value, nor the weight's gradient."""
    return torch.where(key_padding_mask[:, None, :, None], x, x.new_zeros(()))


def compressed_key_padding_mask_ref(key_padding_mask: torch.Tensor, ratio: int) -> torch.Tensor:
    """(B, Nk) keep mask -> (B, ceil(Nk / ratio)) by max-pooling windows of ``ratio``: a compressed position is
    kept when any of its inputs is kept (the zero padding past Nk is never kept)."""
    pad = (-key_padding_mask.shape[-1]) % ratio
    keep = torch.nn.functional.pad(key_padding_mask.float(), (0, pad))  # [b, Nk + pad]
    return torch.nn.functional.max_pool1d(keep.unsqueeze(1), ratio, ratio).squeeze(1) > 0


def compressed_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ratio: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    layout: Optional[torch.Tensor] = None,
    block_size: int = 16,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Memory-compressed attention the explicit way: pad, ``conv1d``, pool the mask, dense attention in fp32;
    same contract as :func:`af2_ext.ops.compressed_attention`. Materialises the Nq x ceil(Nk / ratio) logits.

    Args:
        q: (B, H, Nq, D). k, v: (B, H, Nk, D), uncompressed.
        ratio: compression ratio; 1 = plain attention (weight and bias must be None).
        weight: (H*D, D, ratio). bias: (H*D,) or None.
        key_padding_mask: bool (B, Nk), True = keep.
        layout: bool (H or 1, ceil(Nq / block_size), ceil(Nc / block_size)) over compressed key blocks, or
            None for dense attention.

    Returns:
        (B, H, Nq, D) in q's dtype.
    """
    if ratio == 1:
        kc, vc, mask = k, v, key_padding_mask
    else:
        if key_padding_mask is not None:
            k, v = zero_padded(k, key_padding_mask), zero_padded(v, key_padding_mask)
        kc, vc = kv_compress_ref(k, v, weight, bias, ratio)
        mask = None if key_padding_mask is None else compressed_key_padding_mask_ref(key_padding_mask, ratio)
    if layout is None:
        layout = layouts.dense(layouts.num_blocks(q.shape[2], block_size), layouts.num_blocks(kc.shape[2], block_size))
    return block_sparse_attention_ref(q, kc, vc, layout, block_size=block_size, key_padding_mask=mask, scale=scale,
                                      dropout_p=dropout_p)


def _coupling_opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def coupling_forward_ref(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``x += f`` in place, the contract of :func:`af2_ext.ops.coupling_forward_` (a reversible coupling's
    forward ``y = x + f``): the sum in fp32 (fp64 for fp64 x) of x and f, f never rounded to x's dtype first,
    rounded once to x's dtype.

    Args:
        x: contiguous, float32 / float16 / bfloat16 (float64 on CPU); updated in place.
        f: x's shape, in x's dtype or float32 / float16 / bfloat16; may be x itself.

    Returns:
        x.
    """
    opmath = _coupling_opmath(x.dtype)
    return x.copy_(x.to(opmath) + f.to(opmath))


def coupling_backward_ref(y: torch.Tensor, f: torch.Tensor, grad: torch.Tensor, vjp: torch.Tensor) -> None:
    """``y -= f`` (rebuild a coupling's target input from its output) and ``grad += vjp`` (accumulate the
    gradient of the coupling's input half), both in place, the contract of :func:`af2_ext.ops.coupling_backward_`:
    each in fp32 (fp64 for fp64 buffers), rounded once to the buffer's dtype.

    Args:
        y, grad: contiguous buffers updated in place; distinct, and each overlaps neither the other's source.
        f: y's shape; vjp: grad's shape; each in its buffer's dtype or float32 / float16 / bfloat16.
    """
    y_opmath, grad_opmath = _coupling_opmath(y.dtype), _coupling_opmath(grad.dtype)
    y.copy_(y.to(y_opmath) - f.to(y_opmath))
    grad.copy_(grad.to(grad_opmath) + vjp.to(grad_opmath))
