"""Pure-PyTorch references for the af2_ext ops: fp32 math (fp64 for fp64 inputs), dense masks.

These are the test oracles and the fallback when the compiled extension is missing. They materialise the
full Nq x Nk attention matrix, so they are only for small problems.
"""
from __future__ import annotations

from typing import Optional

import torch

from af2_ext import layouts


def _expand_bias(bias: torch.Tensor, batch: int) -> torch.Tensor:
    """(Bb, Hb, Nq, Nk) -> (B, Hb, Nq, Nk): batch row b uses bias row b // (B // Bb)."""
    return bias.repeat_interleave(batch // bias.shape[0], dim=0)


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
    visible = layouts.to_mask(layout.to(q.device), block_size, nq, nk).unsqueeze(0)  # [1, Hl, Nq, Nk]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]  # [B, Hl, Nq, Nk]
    logits = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    if bias is not None:
        logits = logits + _expand_bias(bias.to(compute), batch)
    # -inf from the bias counts as masked too; masked logits become the most negative finite value so that
    # an empty row yields a finite softmax that is then zeroed (no NaN in values or gradients).
    visible = visible & ~torch.isneginf(logits)
    logits = logits.masked_fill(~visible, torch.finfo(compute).min)
    probs = torch.softmax(logits, dim=-1).masked_fill(~visible, 0.0)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)


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
        kc, vc = kv_compress_ref(k, v, weight, bias, ratio)
        mask = None if key_padding_mask is None else compressed_key_padding_mask_ref(key_padding_mask, ratio)
    if layout is None:
        layout = layouts.dense(layouts.num_blocks(q.shape[2], block_size), layouts.num_blocks(kc.shape[2], block_size))
    return block_sparse_attention_ref(q, kc, vc, layout, block_size=block_size, key_padding_mask=mask, scale=scale,
                                      dropout_p=dropout_p)
