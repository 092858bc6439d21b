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
) -> torch.Tensor:
    """Block-sparse attention by expanding ``layout`` to a dense mask; same contract as
    :func:`af2_ext.ops.block_sparse_attention`.

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
    return torch.matmul(probs, v.to(compute)).to(q.dtype)
