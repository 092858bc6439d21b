"""The seed module ``alphafold2_pytorch.alphafold2`` (alphafold2-pytorch 0.0.19) on the af2_ext ops.

A seed user swaps the import and keeps every call: the building blocks have the seed's signatures, defaults,
return shapes and parameter names (a seed ``state_dict`` loads), and their attention runs on
:func:`af2_ext.ops.block_sparse_attention` (self-attention, dense or with the seed's sparse layout) and
:func:`af2_ext.ops.compressed_attention` (cross-attention). ``Alphafold2`` itself is :class:`af2_ext.model.Alphafold2`.

Masks are bool, True = keep. Padding is invisible: what a padded position holds never reaches a kept
position's output; the outputs at padded query positions are unspecified (the seed's were too).

Deliberate differences from the seed, each a bug fix:

- ``PreNormCross`` normalises the context with its own ``norm_context`` (the seed applied the query's norm);
- memory-compressed attention compresses whatever the context length (the seed skipped the compression when it
  was a multiple of ``compress_ratio``) and zeroes padded context positions first (the seed convolved them into
  the kept compressed keys);
- ``SparseAttention`` keeps the caller's mask when the length is not a multiple of ``block_size`` (the seed
  replaced it by all-ones);
- misuse raises ``ValueError`` naming the argument where the seed asserted or crashed.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from af2_ext import layouts, ops, reference
from af2_ext.model import DISTOGRAM_BUCKETS, MAX_NUM_MSA, NUM_AMINO_ACIDS, NUM_EMBEDDS_TR, Alphafold2
from af2_ext.reversible import ReversibleSequence

__all__ = [
    "Alphafold2", "MAX_NUM_MSA", "NUM_AMINO_ACIDS", "NUM_EMBEDDS_TR", "DISTOGRAM_BUCKETS", "PreNorm",
    "PreNormCross", "GEGLU", "FeedForward", "Attention", "SparseAttention", "AxialAttention", "SequentialSequence",
    "ReversibleSequence",
]


# ----------------------------------------------------------------------------------------------------------
# helper classes
# ----------------------------------------------------------------------------------------------------------


class PreNorm(nn.Module):
    """``fn(LayerNorm(x), *args, **kwargs)``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return self.fn(self.norm(x), *args, **kwargs)


class PreNormCross(nn.Module):
    """``fn(LayerNorm(x), LayerNorm_context(context), *args, **kwargs)``.

    The context goes through ``norm_context`` (the seed normalised it with the query's ``norm`` and left
    ``norm_context`` unused).
    """

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, *args, **kwargs):
        return self.fn(self.norm(x), self.norm_context(context), *args, **kwargs)


class GEGLU(nn.Module):
    """(..., 2k) -> (..., k): the first half gated by GELU of the second."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    """GEGLU feed-forward of inner width ``mult * dim``: ``net`` = Linear, GEGLU, Dropout, Linear."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim * mult * 2),
            GEGLU(),
            nn.Dropout(dropout),
            nn.Linear(dim * mult, dim),
        )

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """x: (..., dim). Keyword arguments (a trunk's masks) are ignored."""
        return self.net(x)


# ----------------------------------------------------------------------------------------------------------
# attention on the ops
# ----------------------------------------------------------------------------------------------------------


def _kernel_head_dim(head_dim: int) -> Optional[int]:
    """The smallest head dim the kernels take that holds ``head_dim``, or None past the largest."""
    return next((d for d in ops.HEAD_DIMS if d >= head_dim), None)


@functools.lru_cache(maxsize=64)
def _dense_layout(num_q_blocks: int, num_k_blocks: int, device: torch.device) -> torch.Tensor:
    # One tensor per shape: the ops build a CPU layout's block index once per tensor.
    return torch.ones(1, num_q_blocks, num_k_blocks, dtype=torch.bool, device=device)


def _keep_mask(mask: Optional[torch.Tensor], batch: int, name: str) -> Optional[torch.Tensor]:
    """A (b or 1, n) mask as the ops want it: bool (batch, n)."""
    if mask is None:
        return None
    if mask.dim() != 2 or mask.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be (batch={batch}, n), got {tuple(mask.shape)}")
    return mask.bool().expand(batch, -1)


def _attend(q, k, v, layout, block_size, key_padding_mask, scale, dropout_p):
    """Block-sparse attention (B, H, Nq, D) for any head dim and block size. A head dim the kernels lack is
    zero-padded to the next one they have (zero features change no logit; the scale stays D ** -0.5); past 128,
    or with a block size the kernels lack, the pure-PyTorch reference runs."""
    head_dim = q.shape[-1]
    padded = _kernel_head_dim(head_dim)
    if padded is None or block_size not in ops.BLOCK_SIZES:
        return reference.block_sparse_attention_ref(q, k, v, layout, block_size=block_size,
                                                    key_padding_mask=key_padding_mask, scale=scale,
                                                    dropout_p=dropout_p)
    q, k, v = (F.pad(t, (0, padded - head_dim)) for t in (q, k, v))  # [b, h, n, padded]
    out = ops.block_sparse_attention(q, k, v, layout, block_size=block_size, key_padding_mask=key_padding_mask,
                                     scale=scale, dropout_p=dropout_p)
    return out[..., :head_dim]


def _attend_compressed(q, k, v, ratio, weight, bias, key_padding_mask, scale, dropout_p):
    """Memory-compressed attention (B, H, Nq, D) for any head dim: padded to a kernel head dim as
    :func:`_attend`, the grouped convolution's weight and bias with it (zero rows and columns)."""
    heads, head_dim = q.shape[1], q.shape[-1]
    padded = _kernel_head_dim(head_dim)
    if padded is None:
        return reference.compressed_attention_ref(q, k, v, ratio, weight, bias, key_padding_mask=key_padding_mask,
                                                  scale=scale, dropout_p=dropout_p)
    grow = padded - head_dim
    q, k, v = (F.pad(t, (0, grow)) for t in (q, k, v))  # [b, h, n, padded]
    if weight is not None and grow:
        weight = weight.reshape(heads, head_dim, head_dim, ratio)  # [h, d_out, d_in, ratio]
        weight = F.pad(weight, (0, 0, 0, grow, 0, grow)).reshape(heads * padded, padded, ratio)
        if bias is not None:
            bias = F.pad(bias.reshape(heads, head_dim), (0, grow)).reshape(heads * padded)
    out = ops.compressed_attention(q, k, v, ratio, weight, bias, key_padding_mask=key_padding_mask, scale=scale,
                                   dropout_p=dropout_p)
    return out[..., :head_dim]


def _fold_lead_dims(x: torch.Tensor, masks: Sequence[Optional[torch.Tensor]], lead_dims):
    """The seed's ``lead_dims``: x (..., d) viewed as (*lead_dims, d) and attended along the last of them,
    (prod(lead_dims[:-1]), lead_dims[-1], d); masks likewise."""
    x = x.reshape(*lead_dims, x.shape[-1])
    x = x.reshape(-1, *x.shape[-2:])  # [prod(lead_dims[:-1]), lead_dims[-1], d]
    masks = [None if m is None else m.reshape(*lead_dims).reshape(-1, lead_dims[-1]) for m in masks]
    return x, masks


class Attention(nn.Module):
    """Multi-head attention with the seed's parameters: self-attention through
    :func:`af2_ext.ops.block_sparse_attention` (dense layout), cross-attention (``context`` given) through
    :func:`af2_ext.ops.compressed_attention`.

    Args:
        dim: model width. seq_len: longest sequence (used by :class:`SparseAttention`).
        heads, dim_head: attention shape; any dim_head: the kernels' 16, 32, 64, 128 natively, smaller ones
            zero-padded to the next of these, larger ones on the pure-PyTorch reference.
        dropout: dropout on the attention probabilities in training.
        compress_ratio: > 1 compresses the context's keys and values by ``compress_fn``
            (``Conv1d(inner, inner, ratio, stride=ratio, groups=heads)``); cross-attention only.
    """

    def __init__(self, dim: int, seq_len: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, compress_ratio: int = 1):
        super().__init__()
        inner_dim = dim_head * heads
        self.seq_len = seq_len
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)
        self.dropout = nn.Dropout(dropout)  # its p is the ops' dropout_p
        self.compress_ratio = compress_ratio
        self.compress_fn = (nn.Conv1d(inner_dim, inner_dim, compress_ratio, stride=compress_ratio, groups=heads)
                            if compress_ratio > 1 else None)

    def _dropout_p(self) -> float:
        return self.dropout.p if self.training else 0.0

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    def _out(self, out: torch.Tensor) -> torch.Tensor:
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, lead_dims=None) -> torch.Tensor:
        """x: (b, n, dim) (any shape reshaping to ``lead_dims`` with it); context: (b, m, dim) or None for
        self-attention; mask: bool (b, n); context_mask: bool (b, m) (for self-attention, the keys' mask in
        place of ``mask``). Returns x's shape."""
        shape = x.shape
        if lead_dims is not None:
            if context is None:  # a self-attention's context_mask is its keys' mask: folded with x
                x, (mask, context_mask) = _fold_lead_dims(x, (mask, context_mask), lead_dims)
            else:
                x, (mask,) = _fold_lead_dims(x, (mask,), lead_dims)
        if context is None:
            out = self._self_attend(x, context_mask if context_mask is not None else mask)
        else:
            out = self._cross_attend(x, context, context_mask)
        return out.reshape(shape) if lead_dims is not None else out

    def _self_attend(self, x: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.compress_fn is not None:
            raise ValueError(f"compress_ratio={self.compress_ratio} (memory-compressed attention) needs a context: "
                             "it is for cross-attention only")
        b, n = x.shape[:2]
        q, k, v = (self._heads(t) for t in (self.to_q(x), *self.to_kv(x).chunk(2, dim=-1)))  # [b, h, n, d]
        nb = layouts.num_blocks(n, ops.DENSE_BLOCK_SIZE)
        out = _attend(q, k, v, _dense_layout(nb, nb, x.device), ops.DENSE_BLOCK_SIZE,
                      _keep_mask(key_mask, b, "mask"), self.scale, self._dropout_p())
        return self._out(out)

    def _cross_attend(self, x: torch.Tensor, context: torch.Tensor,
                      context_mask: Optional[torch.Tensor]) -> torch.Tensor:
        q = self._heads(self.to_q(x))  # [b, h, n, d]
        k, v = (self._heads(t) for t in self.to_kv(context).chunk(2, dim=-1))  # [b, h, m, d]
        ratio, weight, bias = 1, None, None
        if self.compress_fn is not None:
            ratio, weight, bias = self.compress_ratio, self.compress_fn.weight, self.compress_fn.bias
        out = _attend_compressed(q, k, v, ratio, weight, bias, _keep_mask(context_mask, x.shape[0], "context_mask"),
                                 self.scale, self._dropout_p())
        return self._out(out)


class _LayoutBuffer(nn.Module):
    """The sparse layout under the seed's state_dict name, ``attn_fn.master_layout`` (the buffer of DeepSpeed's
    SparseSelfAttention: int64 (heads, nb, nb) for the longest sequence), so that a seed checkpoint loads and
    brings its layout with it."""

    def __init__(self, layout: torch.Tensor):
        super().__init__()
        self.register_buffer("master_layout", layout.to(torch.int64))


class SparseAttention(Attention):
    """Self-attention with the seed's block-sparse layout (DeepSpeed ``VariableSparsityConfig`` for ``seq_len``:
    windows of 4 blocks, block 0 global, ``num_random_blocks`` random blocks per row shared by the heads), cut
    to the blocks of the actual length, through :func:`af2_ext.ops.block_sparse_attention`. As the seed's, no
    attention dropout.

    Args:
        as :class:`Attention`; ``seq_len`` is required (the longest sequence). block_size: the layout's block.
        num_random_blocks: default ``seq_len // block_size // 4``.

    A length that is not a multiple of ``block_size`` keeps the caller's mask (the seed replaced it by all-ones).
    """

    def __init__(self, *args, block_size: int = 16, num_random_blocks: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.seq_len is None:
            raise ValueError("SparseAttention needs seq_len (the longest sequence it attends, the seed's "
                             "max_seq_len): its layout is built for it")
        if num_random_blocks is None:
            num_random_blocks = self.seq_len // block_size // 4
        self.block_size = block_size
        self.num_random_blocks = num_random_blocks
        self.attn_fn = _LayoutBuffer(layouts.variable(layouts.num_blocks(self.seq_len, block_size),
                                                      num_random_blocks=num_random_blocks, num_heads=self.heads))
        self._cut_layouts: dict = {}

    @property
    def layout(self) -> torch.Tensor:
        """bool (heads, nb, nb): the layout for ``seq_len`` tokens (a loaded seed checkpoint's, once loaded)."""
        return self.attn_fn.master_layout.bool()

    def layout_for(self, n: int, device: torch.device) -> torch.Tensor:
        """The layout cut to the blocks of ``n`` tokens, on ``device``; one head when the heads share it."""
        master = self.attn_fn.master_layout
        nb = layouts.num_blocks(n, self.block_size)
        key = (nb, str(device), master.data_ptr(), master._version)  # a moved or reloaded buffer is cut again
        if key not in self._cut_layouts:
            if len(self._cut_layouts) > 16:
                self._cut_layouts.clear()
            cut = master[:, :nb, :nb].bool()
            if bool((cut == cut[:1]).all()):
                cut = cut[:1]
            self._cut_layouts[key] = cut.contiguous().to(device)
        return self._cut_layouts[key]

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, lead_dims=None) -> torch.Tensor:
        """x: (b, n, dim) with n <= seq_len; mask: bool (b, n). Returns x's shape."""
        shape = x.shape
        if lead_dims is not None:
            x, (mask,) = _fold_lead_dims(x, (mask,), lead_dims)
        b, n = x.shape[:2]
        if n > self.seq_len:
            raise ValueError(f"sequence length {n} exceeds seq_len={self.seq_len} of this SparseAttention (set by "
                             "the model's max_seq_len)")
        q, k, v = (self._heads(t) for t in (self.to_q(x), *self.to_kv(x).chunk(2, dim=-1)))  # [b, h, n, d]
        out = _attend(q, k, v, self.layout_for(n, x.device), self.block_size, _keep_mask(mask, b, "mask"),
                      self.scale, 0.0)
        out = self._out(out)
        return out.reshape(shape) if lead_dims is not None else out


class AxialAttention(nn.Module):
    """Axial attention on a flattened square (b, h*w, d): ``attn_width`` attends along h (each column),
    ``attn_height`` along w (each row), summed, as the seed.

    Args:
        sparse_attn: :class:`SparseAttention` instead of :class:`Attention` (self-attention only).
        kwargs: for both attentions.
    """

    def __init__(self, sparse_attn: bool = False, **kwargs):
        super().__init__()
        attn_class = SparseAttention if sparse_attn else Attention
        self.attn_width = attn_class(**kwargs)
        self.attn_height = attn_class(**kwargs)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (b, n, d) with n a perfect square; mask: bool (b, n); context: (b, m, d), context_mask (b, m)."""
        b, n, _ = x.shape
        h = w = int(round(n ** 0.5))
        if h * w != n:
            raise ValueError(f"x must be a flattened square (b, h*w, d), got n={n} (not a perfect square)")
        if context is not None and isinstance(self.attn_width, SparseAttention):
            raise ValueError("context is not supported with sparse_attn=True (sparse attention is self-attention)")
        x = rearrange(x, "b (h w) d -> b h w d", h=h)
        w_kwargs, h_kwargs = {}, {}
        if mask is not None:
            mask = rearrange(mask, "b (h w) -> b h w", h=h)
            w_kwargs["mask"] = rearrange(mask, "b h w -> (b w) h")
            h_kwargs["mask"] = rearrange(mask, "b h w -> (b h) w")
        if context is not None:
            w_kwargs["context"] = repeat(context, "b m d -> (b w) m d", w=w)
            h_kwargs["context"] = repeat(context, "b m d -> (b h) m d", h=h)
            if context_mask is not None:
                w_kwargs["context_mask"] = repeat(context_mask, "b m -> (b w) m", w=w)
                h_kwargs["context_mask"] = repeat(context_mask, "b m -> (b h) m", h=h)
        w_out = self.attn_width(rearrange(x, "b h w d -> (b w) h d"), **w_kwargs)  # [b*w, h, d]
        h_out = self.attn_height(rearrange(x, "b h w d -> (b h) w d"), **h_kwargs)  # [b*h, w, d]
        out = rearrange(w_out, "(b w) h d -> b h w d", w=w) + rearrange(h_out, "(b h) w d -> b h w d", h=h)
        return rearrange(out, "b h w d -> b (h w) d")


# ----------------------------------------------------------------------------------------------------------
# trunk
# ----------------------------------------------------------------------------------------------------------


class SequentialSequence(nn.Module):
    """The seed's non-reversible trunk over ``blocks``: pairs of block lists, (attn, ff, msa_attn) then
    (cross_attn, msa_ff, msa_cross_attn), each a residual:

        x += attn(x, mask);  m += msa_attn(m, msa_mask, lead_dims)   (MSA steps only with an MSA)
        x += cross_attn(x, m);  m += msa_cross_attn(m, x)
        x += ff(x);  m += msa_ff(m)

    Args:
        blocks: an even number of 3-module lists (extra modules in a list are not used, as in the seed).
    """

    def __init__(self, blocks):
        super().__init__()
        if len(blocks) % 2:
            raise ValueError(f"blocks must alternate self-attention and cross-attention lists (an even number), "
                             f"got {len(blocks)}")
        for i, block in enumerate(blocks):
            if len(block) < 3:
                raise ValueError(f"blocks[{i}] must hold 3 modules, got {len(block)}")
        if not isinstance(blocks, nn.Module):
            blocks = nn.ModuleList(b if isinstance(b, nn.Module) else nn.ModuleList(b) for b in blocks)
        self.blocks = blocks

    def forward(self, x: torch.Tensor, m: Optional[torch.Tensor], mask: Optional[torch.Tensor] = None,
                msa_mask: Optional[torch.Tensor] = None, msa_lead_dims=None, **kwargs):
        """x: (b, n, d); m: (b, M, d) or None. Returns (x, m)."""
        blocks = list(self.blocks)
        for self_block, cross_block in zip(blocks[0::2], blocks[1::2]):
            attn, ff, msa_attn = list(self_block)[:3]
            cross_attn, msa_ff, msa_cross_attn = list(cross_block)[:3]
            x = attn(x, mask=mask) + x
            if m is not None:
                m = msa_attn(m, mask=msa_mask, lead_dims=msa_lead_dims) + m
                x = cross_attn(x, m, mask=mask, context_mask=msa_mask) + x
                m = msa_cross_attn(m, x, mask=msa_mask, context_mask=mask) + m
            x = ff(x) + x
            if m is not None:
                m = msa_ff(m) + m
        return x, m
