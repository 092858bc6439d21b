"""Trunk building blocks on the af2_ext ops: pre-norm self-attention (block-sparse kernel), MSA row
attention, compressed cross-attention, GEGLU feed-forward, and the reversible trunk's couplings.

Every module maps ``(b, n, dim) -> (b, n, dim)`` and takes the per-call context (masks, the MSA row
structure) as keyword arguments, so it can be a :class:`af2_ext.reversible.Coupling` function.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from af2_ext import layouts, ops
from af2_ext.reversible import Coupling


def _split_projection(x: torch.Tensor, weight: torch.Tensor, parts: int, heads: int) -> list[torch.Tensor]:
    """x (b, n, dim) projected by each of ``parts`` row blocks of one packed weight (parts * h * d, dim), as
    (b, h, n, d) views of (b, n, h * d) products. One product per part (the same FLOPs as the packed one) so that
    each gradient, which the CPU kernels write in (b, n, h, d) memory, feeds its product's backward as it is: the
    packed projection's backward would stack the gradients and copy them into (b, n, parts, h, d)."""
    return [rearrange(F.linear(x, w), "b n (h d) -> b h n d", h=heads) for w in weight.chunk(parts, dim=0)]


class FeedForward(nn.Module):
    """Pre-norm GEGLU feed-forward (the seed's: inner width ``mult * dim``).

    Args:
        chunk_size: None, or run at most this many tokens at a time. The hidden layer is ``2 * mult`` times the
            width for every token (8x the pair stream at mult 4), so at length it is the largest activation of
            the trunk. Chunked, a forward without autograd holds one chunk's hidden, and a forward with autograd
            saves only its input: each chunk is recomputed in the backward (``torch.utils.checkpoint``, dropout
            replayed), one more feed-forward forward per step. The same function either way (tokens are
            independent); only the order in which dropout draws its masks differs.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, *, chunk_size: Optional[int] = None):
        super().__init__()
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(mult * dim, dim)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)  # [b, n, mult*dim] each
        return self.proj_out(self.dropout(hidden * F.gelu(gate)))

    def forward(self, x: torch.Tensor, **context) -> torch.Tensor:
        """x: (b, n, dim)."""
        if self.chunk_size is None or x.shape[1] <= self.chunk_size:
            return self._ff(x)
        chunks = x.split(self.chunk_size, dim=1)  # [b, <=chunk, dim] each
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            outs = [checkpoint(self._ff, c, use_reentrant=False) for c in chunks]
            return torch.cat(outs, dim=1)
        out = x.new_empty(x.shape)
        for c, o in zip(chunks, out.split(self.chunk_size, dim=1)):
            o.copy_(self._ff(c))
        return out


class SelfAttention(nn.Module):
    """Multi-head self-attention through :func:`af2_ext.ops.block_sparse_attention`, pre-norm by default.

    Args:
        dim: model width. heads, dim_head: attention shape (dim_head in 16, 32, 64, 128).
        attn_dropout: dropout on the attention probabilities in training (the kernels have none: > 0 runs the
            reference there, see :func:`af2_ext.ops.block_sparse_attention`).
        block_size: the kernel's tile (and the layout's block) size.
        layout_fn: ``num_blocks -> bool (H or 1, nb, nb)`` for block-sparse attention; None = dense.
        mask_key: name of the context's (b, n) keep mask.
        prenorm: LayerNorm the input first.
        impl: "auto" | "kernel" | "reference" for the attention op; None = the process default.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, attn_dropout: float = 0.0, *,
                 block_size: int = 64, layout_fn=None, mask_key: str = "mask", prenorm: bool = True,
                 impl: Optional[str] = None):
        super().__init__()
        self.heads, self.block_size, self.layout_fn, self.mask_key = heads, block_size, layout_fn, mask_key
        self.attn_dropout, self.impl = attn_dropout, impl
        self.norm = nn.LayerNorm(dim) if prenorm else nn.Identity()
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self._layouts: dict = {}

    @property
    def sparse(self) -> bool:
        return self.layout_fn is not None

    def layout(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """The (cached) layout for ``seq_len`` tokens."""
        nb = layouts.num_blocks(seq_len, self.block_size)
        key = (nb, str(device))
        if key not in self._layouts:
            layout = torch.ones(1, nb, nb, dtype=torch.bool) if self.layout_fn is None else self.layout_fn(nb)
            self._layouts[key] = layout.to(device)
        return self._layouts[key]

    def attend(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (b, n, dim) (already normalised); mask: bool (b, n) or None."""
        q, k, v = _split_projection(x.contiguous(), self.to_qkv.weight, 3, self.heads)
        out = ops.block_sparse_attention(q, k, v, self.layout(x.shape[1], x.device), block_size=self.block_size,
                                         key_padding_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
                                         impl=self.impl)  # [b, h, n, d]
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def forward(self, x: torch.Tensor, **context) -> torch.Tensor:
        """x: (b, n, dim); context[mask_key]: bool (b, n), True = keep."""
        return self.attend(self.norm(x), context.get(self.mask_key))


class MSARowAttention(SelfAttention):
    """Self-attention within each MSA row; the flattened MSA (b, M*N, dim) is split by the context's
    ``msa_shape = (M, N)``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("mask_key", "msa_mask")
        super().__init__(*args, **kwargs)

    def forward(self, m: torch.Tensor, *, msa_shape, **context) -> torch.Tensor:
        rows = msa_shape[0]
        b = m.shape[0]
        mask = context.get(self.mask_key)
        m = rearrange(self.norm(m), "b (r c) d -> (b r) c d", r=rows)  # [b*M, N, d]
        mask = None if mask is None else rearrange(mask, "b (r c) -> (b r) c", r=rows)
        return rearrange(self.attend(m, mask), "(b r) c d -> b (r c) d", b=b)


class AxialAttention(nn.Module):
    """Axial attention on the flattened pair representation (b, n*n, dim): attention along each row plus
    attention along each column, summed, after one shared LayerNorm (the seed's). The context gives
    ``seq_len`` = n and the pair keep mask ``mask`` (b, n*n)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, attn_dropout: float = 0.0, *,
                 block_size: int = 64, layout_fn=None, impl: Optional[str] = None):
        super().__init__()
        kw = dict(heads=heads, dim_head=dim_head, attn_dropout=attn_dropout, block_size=block_size,
                  layout_fn=layout_fn, prenorm=False, impl=impl)
        self.norm = nn.LayerNorm(dim)
        self.attn_rows, self.attn_cols = SelfAttention(dim, **kw), SelfAttention(dim, **kw)

    def forward(self, x: torch.Tensor, *, seq_len: int, mask: Optional[torch.Tensor] = None, **context):
        b, n = x.shape[0], seq_len
        x = self.norm(x)
        rows = rearrange(x, "b (i j) d -> (b i) j d", i=n)  # [b*n, n, d]: along j for each i
        cols = rearrange(x, "b (i j) d -> (b j) i d", i=n)  # [b*n, n, d]: along i for each j
        row_mask = col_mask = None
        if mask is not None:
            row_mask = rearrange(mask, "b (i j) -> (b i) j", i=n)
            col_mask = rearrange(mask, "b (i j) -> (b j) i", i=n)
        out_rows = rearrange(self.attn_rows.attend(rows, row_mask), "(b i) j d -> b (i j) d", b=b)
        out_cols = rearrange(self.attn_cols.attend(cols, col_mask), "(b j) i d -> b (i j) d", b=b)
        return out_rows + out_cols


class CrossAttention(nn.Module):
    """Pre-norm cross-attention from one stream to another through :func:`af2_ext.ops.compressed_attention`:
    keys and values compressed by ``Conv1d(kernel=ratio, stride=ratio, groups=heads)`` (none at ratio 1).

    The context gets its own LayerNorm (deliberate difference from the seed, whose cross-attention pre-norm
    applied the query's norm to the context and never used its own).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, attn_dropout: float = 0.0, *,
                 ratio: int = 1, context_mask_key: str = "msa_mask", impl: Optional[str] = None):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.ratio, self.context_mask_key = heads, ratio, context_mask_key
        self.attn_dropout, self.impl = attn_dropout, impl
        self.norm, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.compress = nn.Conv1d(inner, inner, ratio, stride=ratio, groups=heads) if ratio > 1 else None
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        """x: (b, n, dim) queries; context: (b, m, dim) keys/values; kwargs[context_mask_key]: bool (b, m)."""
        q = rearrange(self.to_q(self.norm(x)), "b n (h d) -> b h n d", h=self.heads)
        k, v = _split_projection(self.norm_context(context), self.to_kv.weight, 2, self.heads)
        weight = bias = None
        if self.compress is not None:
            weight, bias = self.compress.weight, self.compress.bias
        out = ops.compressed_attention(q, k, v, self.ratio, weight, bias,
                                       key_padding_mask=kwargs.get(self.context_mask_key),
                                       dropout_p=self.attn_dropout if self.training else 0.0,
                                       impl=self.impl)  # [b, h, n, d]
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


# The trunk's halves: the pair stream x = (x1, x2), the MSA stream m = (m1, m2).
X1, X2, M1, M2 = range(4)


def trunk_couplings(dim: int, *, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, attn_dropout: float = 0.0,
                    ratio: int = 1, block_size: int = 64, impl: Optional[str] = None) -> list[Coupling]:
    """A generic reversible trunk layer (flattened pair attention, no axial split) as couplings over the
    halves (x1, x2, m1, m2), for tests and benchmarks of the reversible machinery:

        x1 += attn(x2)   x2 += ff(x1)   m1 += msa_row_attn(m2)   m2 += ff(m1)
        x1 += cross(x2 -> m2)   x2 += ff(x1)   m1 += cross(m2 -> x2)   m2 += ff(m1)

    ``dropout`` is the feed-forwards' (the kernels run), ``attn_dropout`` the attention probabilities'. Without
    an MSA (m1, m2 None) only the pair couplings run. :class:`af2_ext.model.Alphafold2` builds its own layers.
    """
    kw = dict(heads=heads, dim_head=dim_head, attn_dropout=attn_dropout, impl=impl)
    return [
        Coupling(SelfAttention(dim, block_size=block_size, **kw), X1, [X2]),
        Coupling(FeedForward(dim, dropout=dropout), X2, [X1]),
        Coupling(MSARowAttention(dim, block_size=block_size, **kw), M1, [M2]),
        Coupling(FeedForward(dim, dropout=dropout), M2, [M1]),
        Coupling(CrossAttention(dim, ratio=ratio, context_mask_key="msa_mask", **kw), X1, [X2, M2]),
        Coupling(FeedForward(dim, dropout=dropout), X2, [X1]),
        Coupling(CrossAttention(dim, ratio=ratio, context_mask_key="mask", **kw), M1, [M2, X2]),
        Coupling(FeedForward(dim, dropout=dropout), M2, [M1]),
    ]
