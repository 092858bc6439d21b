"""AlphaFold2's Evoformer block (supplementary Algorithm 6) and stack, around :mod:`af2_ext.triangle`'s attention:
MSA column attention (Alg. 8), the MSA and pair transitions (Alg. 9, 15), the outer product mean (Alg. 10), the
triangle multiplicative updates (Alg. 11, 12) and the row- and column-wise dropout of section 1.11.6.

Parameter names and init are OpenFold's (``openfold/model/evoformer.py``, ``msa.py``, ``outer_product_mean.py``,
``triangular_multiplicative_update.py``, ``pair_transition.py``); every module returns its update, not added to its
input, and takes bool masks (True = keep), as :mod:`af2_ext.triangle` does.

Memory at length: the outer product mean's (N, N, c_hidden**2) product, the multiplicative updates' (N, N,
c_hidden) tensors and the pair transition's (N, N, n * c_z) hidden layer grow with N**2. ``chunk_size`` (None =
whole) runs them, and the MSA transition, that many residues i at a time, each chunk under
``torch.utils.checkpoint`` when autograd records: the forward keeps only a chunk's intermediates and the backward
recomputes them chunk by chunk. The same function either way.

Deliberate differences from OpenFold: the block's modules are its direct children (OpenFold nests most under
``core.``); column attention reads no all-zero bias; masked entries are left out with ``torch.where``, not
multiplied by zero (the same for finite values; a non-finite padded value cannot leak); a row with no kept key
attends to nothing (as :mod:`af2_ext.triangle`). The outer product mean's bias division and the masked transition
updates differ from the supplement's text, as OpenFold's do; each module's docstring says so.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from af2_ext import ops
from af2_ext._checks import check_int
from af2_ext.triangle import (MSARowAttentionWithPairBias, TriangleAttention, _check_config, _check_features,
                              _check_mask, _check_msa_and_pair, _GatedAttention, _init_final_,
                              _init_gating_)

# Standard deviation of a unit normal truncated to [-2, 2]: OpenFold's truncated inits divide by it so that the
# weights keep the intended fan-in variance.
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def _init_truncated_normal_(linear: nn.Linear, scale: float) -> None:
    """Fan-in truncated normal of variance ``scale / fan_in``, bias zero: OpenFold's 'default' (scale 1, LeCun) and
    'relu' (scale 2, He) inits."""
    std = math.sqrt(scale / linear.in_features) / _TRUNCATED_NORMAL_STD
    nn.init.trunc_normal_(linear.weight, std=std, a=-2.0 * std, b=2.0 * std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _check_chunk_size(chunk_size) -> Optional[int]:
    return check_int("chunk_size", chunk_size, minimum=1, optional=True)


def _check_pair(z, c_z: int) -> torch.Tensor:
    _check_features("z", z, f"(B, N, N, c_z={c_z})", c_z)
    if z.shape[1] != z.shape[2]:
        raise ValueError(f"z must be (B, N, N, c_z={c_z}) with two equal N, got {tuple(z.shape)}")
    return z


def _by_row_chunks(module: nn.Module, fn: Callable[..., torch.Tensor], chunk_size: Optional[int],
                   sliced: Sequence[Optional[torch.Tensor]], shared: Sequence[torch.Tensor] = (), *,
                   out_dim: int = 1) -> torch.Tensor:
    """``fn(*sliced, *shared)``, with every tensor of ``sliced`` (None passes through) cut into chunks of
    ``chunk_size`` along dim 1 and the results concatenated along ``out_dim``. ``fn`` must treat the indices of
    dim 1 independently and return them along ``out_dim``, so that the result is the unchunked one.

    With autograd recording (grad enabled and a ``sliced``/``shared`` tensor or a parameter of ``module``
    requiring grad), each chunk runs under ``torch.utils.checkpoint``: only its inputs are saved and the backward
    recomputes it. Without, the chunks are written into one preallocated output.
    """
    rows = next(t for t in sliced if t is not None).shape[1]
    if chunk_size is None or rows <= chunk_size:
        return fn(*sliced, *shared)
    starts = range(0, rows, chunk_size)

    def chunk(start: int) -> list:
        return [None if t is None else t[:, start:start + chunk_size] for t in sliced]

    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*sliced, *shared, *module.parameters()))
    if recording:
        return torch.cat([checkpoint(fn, *chunk(start), *shared, use_reentrant=False) for start in starts],
                         dim=out_dim)
    out = None
    for start in starts:
        piece = fn(*chunk(start), *shared)
        if out is None:
            shape = list(piece.shape)
            shape[out_dim] = rows
            out = piece.new_empty(shape)
        out.narrow(out_dim, start, piece.shape[out_dim]).copy_(piece)
    return out


class _GatedColumnAttention(_GatedAttention):
    """:class:`af2_ext.triangle._GatedAttention` without a bias, for attention within the rows of x: the rows are
    folded into the batch of :func:`af2_ext.ops.block_sparse_attention` with a dense layout, so no bias tensor is
    built or read. Same parameters (OpenFold's ``mha``)."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        """
        Args:
            x: (B, R, S, c_in), already normalised: R rows of S entries each.
            mask: bool (B, R, S) or None, True = keep the key.

        Returns:
            (B, R, S, c_in).
        """
        B, R, S = x.shape[:3]
        # Each projection is a contiguous (B, R, S, H*D) product; merging B and R leaves a view the op reads in place.
        q, k, v = (rearrange(linear(x), "b r s (h d) -> (b r) h s d", h=self.heads)  # [b*r, h, s, d]
                   for linear in (self.linear_q, self.linear_k, self.linear_v))
        key_padding_mask = None if mask is None else rearrange(mask, "b r s -> (b r) s")  # [b*r, s]
        num_blocks = -(-S // self.block_size)
        layout = ops._dense_layout(num_blocks, num_blocks, x.device)  # cached per shape, as triangle_attention's
        out = ops.block_sparse_attention(q, k, v, layout, block_size=self.block_size,
                                         key_padding_mask=key_padding_mask, impl=self.impl)  # [b*r, h, s, d]
        out = rearrange(out, "(b r) h s d -> b r s (h d)", b=B)  # [b, r, s, h*d]
        return self.linear_o(torch.sigmoid(self.linear_g(x)) * out)  # [b, r, s, c_in]


class _MSAAttention(nn.Module):
    """Holder of OpenFold's ``MSAAttention`` parameters without pair bias (``layer_norm_m``, ``mha``), so that the
    column attention's state dict keys are OpenFold's (``_msa_att.mha.linear_q.weight``, ...)."""

    def __init__(self, c_m: int, c_hidden: int, heads: int, *, block_size: int, impl: Optional[str]):
        super().__init__()
        self.layer_norm_m = nn.LayerNorm(c_m)
        self.mha = _GatedColumnAttention(c_m, c_hidden, heads, block_size=block_size, impl=impl)


class MSAColumnAttention(nn.Module):
    """MSA column-wise gated self-attention (AF2 supplementary Algorithm 8): each residue column i of the MSA
    attends along its S sequences, ``softmax_t(q_si . k_ti / sqrt(c_hidden)) v_ti``, gated and projected; no bias.

    Runs on :func:`af2_ext.ops.block_sparse_attention` with the columns folded into the batch: OpenFold adds an
    all-zero pair bias here (``MSAAttention`` with ``pair_bias=False``), which we neither build nor read.

    Args:
        c_m: MSA width. c_hidden: per-head width, one of 16, 32, 64, 128. heads: number of heads.
        block_size: the attention kernels' tile, 16, 32, 64 or 128.
        impl: "auto" | "kernel" | "reference" for the op; None = the process default.
    """

    def __init__(self, c_m: int, c_hidden: int, heads: int, *, block_size: int = 64, impl: Optional[str] = None):
        super().__init__()
        _check_config(c_hidden, heads, block_size, impl, c_m=c_m)
        self.c_m, self.c_hidden, self.heads = c_m, c_hidden, heads
        self._msa_att = _MSAAttention(c_m, c_hidden, heads, block_size=block_size, impl=impl)

    def forward(self, m: torch.Tensor, msa_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            m: (B, S, N, c_m) MSA representation.
            msa_mask: bool (B, S, N) or None, True = keep: column i ignores the sequences t with msa_mask[b, t, i]
                False. A column whose sequences are all masked (a padded residue) attends to nothing: its update
                is ``mha.linear_o``'s bias (OpenFold's additive mask would leave it unmasked).

        Returns:
            (B, S, N, c_m): the update, not added to m (a transposed view of a (B, N, S, c_m) tensor).
        """
        _check_features("m", m, f"(B, S, N, c_m={self.c_m})", self.c_m)
        B, S, N = m.shape[:3]
        _check_mask("msa_mask", msa_mask, (B, S, N), f"(B={B}, S={S}, N={N})", m.device)
        # LayerNorm writes its output contiguous in the transposed shape: the one copy of the columns-as-rows.
        x = self._msa_att.layer_norm_m(rearrange(m, "b s n c -> b n s c"))  # [b, n, s, c]
        mask = None if msa_mask is None else rearrange(msa_mask, "b s n -> b n s")  # [b, n, s]
        out = self._msa_att.mha(x, mask)  # [b, n, s, c]
        return rearrange(out, "b n s c -> b s n c")  # [b, s, n, c]


class _Transition(nn.Module):
    """LayerNorm, Linear to n * c, ReLU, Linear back (zero-initialised), the update zeroed where masked.

    Masking the update is OpenFold's (its ``_mask_trans``, on by default); DeepMind's code leaves padded entries'
    updates unmasked. Either way a position's update depends on that position alone.
    """

    def __init__(self, c: int, n: int, chunk_size: Optional[int]):
        super().__init__()
        self.n = check_int("n", n, minimum=1)
        self.chunk_size = _check_chunk_size(chunk_size)
        self.layer_norm = nn.LayerNorm(c)
        self.linear_1 = nn.Linear(c, n * c)
        self.linear_2 = nn.Linear(n * c, c)
        _init_truncated_normal_(self.linear_1, 2.0)  # OpenFold's 'relu'
        _init_final_(self.linear_2)

    def _transition(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        out = self.linear_2(F.relu(self.linear_1(self.layer_norm(x))))  # [..., c] through [..., n*c]
        return out if mask is None else torch.where(mask[..., None], out, 0.0)


class MSATransition(_Transition):
    """MSA transition (AF2 supplementary Algorithm 9): LayerNorm, Linear c_m -> n * c_m, ReLU, Linear back.

    Args:
        c_m: MSA width. n: hidden-width factor (4 in AF2).
        chunk_size: None, or run this many residues (all S sequences of them) at a time, each chunk recomputed in
            the backward; the (B, S, N, n * c_m) hidden layer then exists one chunk at a time.
    """

    def __init__(self, c_m: int, n: int = 4, *, chunk_size: Optional[int] = None):
        check_int("c_m", c_m, minimum=1)
        super().__init__(c_m, n, chunk_size)
        self.c_m = c_m

    def forward(self, m: torch.Tensor, msa_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            m: (B, S, N, c_m) MSA representation.
            msa_mask: bool (B, S, N) or None, True = keep; masked entries get a zero update.

        Returns:
            (B, S, N, c_m): the update, not added to m.
        """
        _check_features("m", m, f"(B, S, N, c_m={self.c_m})", self.c_m)
        B, S, N = m.shape[:3]
        _check_mask("msa_mask", msa_mask, (B, S, N), f"(B={B}, S={S}, N={N})", m.device)
        if self.chunk_size is None or N <= self.chunk_size:
            return self._transition(m, msa_mask)
        # Chunks of residues: the residue dimension moved to dim 1 (views), back after.
        x = rearrange(m, "b s n c -> b n s c")  # [b, n, s, c]
        mask = None if msa_mask is None else rearrange(msa_mask, "b s n -> b n s")  # [b, n, s]
        out = _by_row_chunks(self, self._transition, self.chunk_size, (x, mask))  # [b, n, s, c]
        return rearrange(out, "b n s c -> b s n c")  # [b, s, n, c]


class PairTransition(_Transition):
    """Pair transition (AF2 supplementary Algorithm 15): LayerNorm, Linear c_z -> n * c_z, ReLU, Linear back.

    Args:
        c_z: pair width. n: hidden-width factor (4 in AF2).
        chunk_size: None, or run this many rows i at a time, each chunk recomputed in the backward; the
            (B, N, N, n * c_z) hidden layer then exists one chunk at a time.
    """

    def __init__(self, c_z: int, n: int = 4, *, chunk_size: Optional[int] = None):
        check_int("c_z", c_z, minimum=1)
        super().__init__(c_z, n, chunk_size)
        self.c_z = c_z

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            z: (B, N, N, c_z) pair representation.
            mask: bool (B, N, N) or None, True = keep; masked pairs get a zero update.

        Returns:
            (B, N, N, c_z): the update, not added to z.
        """
        _check_pair(z, self.c_z)
        B, N = z.shape[:2]
        _check_mask("mask", mask, (B, N, N), f"(B={B}, N={N}, N={N})", z.device)
        return _by_row_chunks(self, self._transition, self.chunk_size, (z, mask))  # [b, i, j, c]


class OuterProductMean(nn.Module):
    """Outer product mean (AF2 supplementary Algorithm 10): the pair update z_ij from the MSA,
    ``Linear(flatten(sum_s a_si (x) b_sj)) / (eps + #{s: both kept})`` with a, b = Linear(LayerNorm(m)) of width
    c_hidden and the masked sequences left out of sum and count.

    As DeepMind's and OpenFold's code (so their weights give their numbers), the output Linear's bias is divided by
    the count too; the supplement's "mean, then Linear" would add it undivided.

    Args:
        c_m: MSA width. c_z: pair width. c_hidden: width of a and b (32 in AF2); the product is c_hidden**2 wide.
        eps: added to the count (OpenFold's 1e-3): a pair without a kept sequence gets the bias / eps.
        chunk_size: None, or compute this many rows i at a time, each chunk recomputed in the backward; the
            (B, N, N, c_hidden**2) product then exists one chunk at a time.
    """

    def __init__(self, c_m: int, c_z: int, c_hidden: int = 32, *, eps: float = 1e-3,
                 chunk_size: Optional[int] = None):
        super().__init__()
        self.c_m, self.c_z = check_int("c_m", c_m, minimum=1), check_int("c_z", c_z, minimum=1)
        self.c_hidden = check_int("c_hidden", c_hidden, minimum=1)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.eps = float(eps)
        self.chunk_size = _check_chunk_size(chunk_size)
        self.layer_norm = nn.LayerNorm(c_m)
        self.linear_1 = nn.Linear(c_m, c_hidden)
        self.linear_2 = nn.Linear(c_m, c_hidden)
        self.linear_out = nn.Linear(c_hidden * c_hidden, c_z)
        _init_truncated_normal_(self.linear_1, 1.0)  # OpenFold's 'default'
        _init_truncated_normal_(self.linear_2, 1.0)
        _init_final_(self.linear_out)

    def _rows(self, a: torch.Tensor, count: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a (B, I, S, c) for rows i, count (B, I, N), b (B, S, N, c) -> (B, I, N, c_z)."""
        outer = torch.einsum("bisc,bsjd->bijcd", a, b)  # [b, i, j, c, c]
        outer = rearrange(outer, "b i j c d -> b i j (c d)")  # [b, i, j, c*c]
        return self.linear_out(outer) / (count + self.eps)[..., None]  # [b, i, j, c_z]

    def forward(self, m: torch.Tensor, msa_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            m: (B, S, N, c_m) MSA representation.
            msa_mask: bool (B, S, N) or None, True = keep: z_ij sums over the sequences s with msa_mask[b, s, i]
                and msa_mask[b, s, j], and divides by their number (+ eps).

        Returns:
            (B, N, N, c_z): the pair update, not added to z.
        """
        _check_features("m", m, f"(B, S, N, c_m={self.c_m})", self.c_m)
        B, S, N = m.shape[:3]
        _check_mask("msa_mask", msa_mask, (B, S, N), f"(B={B}, S={S}, N={N})", m.device)
        x = self.layer_norm(m)  # [b, s, n, c_m]
        a, b = self.linear_1(x), self.linear_2(x)  # [b, s, n, c]
        if msa_mask is None:
            count = a.new_full((B, N, N), float(S))  # [b, i, j]
        else:
            a = torch.where(msa_mask[..., None], a, 0.0)
            b = torch.where(msa_mask[..., None], b, 0.0)
            keep = msa_mask.to(a.dtype)  # [b, s, n]
            count = torch.einsum("bsi,bsj->bij", keep, keep)  # [b, i, j]
        a = rearrange(a, "b s i c -> b i s c")  # [b, i, s, c]: the rows i first, for the chunks
        return _by_row_chunks(self, self._rows, self.chunk_size, (a, count), (b,))  # [b, i, j, c_z]


class TriangleMultiplicativeUpdate(nn.Module):
    """Triangle multiplicative update using outgoing edges (AF2 supplementary Algorithm 11) or incoming edges
    (Algorithm 12): with a, b = sigmoid(Linear(z)) * Linear(z) (masked) and g = sigmoid(Linear(z)) from
    z = LayerNorm(z), the update is ``g_ij * Linear(LayerNorm(sum_k a_ik b_jk))`` (outgoing) or
    ``... sum_k a_ki b_kj`` (incoming).

    Args:
        c_z: pair width. c_hidden: width of a and b (128 in AF2).
        outgoing: True for Algorithm 11, False for Algorithm 12.
        chunk_size: None, or compute this many rows i at a time (the input LayerNorm, a, the product, its
            LayerNorm and the gate), each chunk recomputed in the backward; only b is held whole.
    """

    def __init__(self, c_z: int, c_hidden: int = 128, outgoing: bool = True, *, chunk_size: Optional[int] = None):
        super().__init__()
        self.c_z, self.c_hidden = check_int("c_z", c_z, minimum=1), check_int("c_hidden", c_hidden, minimum=1)
        self.outgoing = bool(outgoing)
        self.chunk_size = _check_chunk_size(chunk_size)
        self.linear_a_p = nn.Linear(c_z, c_hidden)
        self.linear_a_g = nn.Linear(c_z, c_hidden)
        self.linear_b_p = nn.Linear(c_z, c_hidden)
        self.linear_b_g = nn.Linear(c_z, c_hidden)
        self.linear_g = nn.Linear(c_z, c_z)
        self.linear_z = nn.Linear(c_hidden, c_z)
        self.layer_norm_in = nn.LayerNorm(c_z)
        self.layer_norm_out = nn.LayerNorm(c_hidden)
        _init_truncated_normal_(self.linear_a_p, 1.0)  # OpenFold's 'default'
        _init_truncated_normal_(self.linear_b_p, 1.0)
        for gate in (self.linear_a_g, self.linear_b_g, self.linear_g):
            _init_gating_(gate)
        _init_final_(self.linear_z)

    @staticmethod
    def _edges(x: torch.Tensor, mask: Optional[torch.Tensor], proj: nn.Linear, gate: nn.Linear) -> torch.Tensor:
        """sigmoid(gate(x)) * proj(x), zero where masked: (B, I, K, c_z) -> (B, I, K, c_hidden)."""
        out = torch.sigmoid(gate(x)) * proj(x)
        return out if mask is None else torch.where(mask[..., None], out, 0.0)

    def _b_rows(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """b for rows j, channels first for the products: (B, J, K, c_z) -> (B, c_hidden, J, K)."""
        b = self._edges(x, mask, self.linear_b_p, self.linear_b_g)  # [b, j, k, c]
        return rearrange(b, "b j k c -> b c j k").contiguous()  # [b, c, j, k]

    def _rows(self, x: torch.Tensor, mask: Optional[torch.Tensor], z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The update's rows i: x, mask the (transposed, if incoming) normalised pair's rows i, z the normalised
        pair's rows i (for the gate), b (B, c_hidden, N, N) whole."""
        a = self._edges(x, mask, self.linear_a_p, self.linear_a_g)  # [b, i, k, c]
        a = rearrange(a, "b i k c -> b c i k")  # [b, c, i, k]
        p = torch.matmul(a, b.transpose(-1, -2))  # [b, c, i, j]: sum_k a_ik b_jk
        p = self.linear_z(self.layer_norm_out(rearrange(p, "b c i j -> b i j c")))  # [b, i, j, c_z]
        return torch.sigmoid(self.linear_g(z)) * p

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            z: (B, N, N, c_z) pair representation.
            mask: bool (B, N, N) or None, True = keep: masked pairs' a and b are zero, so they are absent from
                every sum over k.

        Returns:
            (B, N, N, c_z): the update, not added to z.
        """
        _check_pair(z, self.c_z)
        B, N = z.shape[:2]
        _check_mask("mask", mask, (B, N, N), f"(B={B}, N={N}, N={N})", z.device)
        if self.chunk_size is None or N <= self.chunk_size:
            z = self.layer_norm_in(z)  # [b, i, j, c]
            x, x_mask = self._edge_rows(z, mask)
            return self._rows(x, x_mask, z, self._b_rows(x, x_mask))  # [b, i, j, c_z]
        # In chunks, each normalises its own rows (LayerNorm is per pair): the normalised pair is never held
        # whole, and the backward recomputes it a chunk at a time. The gate reads z's rows i, which are x's
        # (outgoing: passed as None) or, incoming, x's columns.
        x, x_mask = self._edge_rows(z, mask)
        b = _by_row_chunks(self, self._b_rows_raw, self.chunk_size, (x, x_mask), out_dim=2)  # [b, c, j, k]
        return _by_row_chunks(self, self._rows_raw, self.chunk_size,
                              (x, x_mask, None if self.outgoing else z), (b,))  # [b, i, j, c_z]

    def _edge_rows(self, z: torch.Tensor, mask: Optional[torch.Tensor]):
        """The pair (and mask) whose rows the edges a, b run along: z itself (outgoing) or, incoming, its
        transpose: sum_k a_ki b_kj is Algorithm 11's sum_k a'_ik b'_jk on the transposed pair. Views."""
        if self.outgoing:
            return z, mask
        return (rearrange(z, "b i j c -> b j i c"),  # [b, j, i, c]
                None if mask is None else rearrange(mask, "b i j -> b j i"))  # [b, j, i]

    def _b_rows_raw(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self._b_rows(self.layer_norm_in(x), mask)

    def _rows_raw(self, x: torch.Tensor, mask: Optional[torch.Tensor], z: Optional[torch.Tensor],
                  b: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm_in(x)
        return self._rows(x, mask, x if z is None else self.layer_norm_in(z), b)


class TriangleMultiplicationOutgoing(TriangleMultiplicativeUpdate):
    """Algorithm 11 (OpenFold's name)."""

    def __init__(self, c_z: int, c_hidden: int = 128, *, chunk_size: Optional[int] = None):
        super().__init__(c_z, c_hidden, True, chunk_size=chunk_size)


class TriangleMultiplicationIncoming(TriangleMultiplicativeUpdate):
    """Algorithm 12 (OpenFold's name)."""

    def __init__(self, c_z: int, c_hidden: int = 128, *, chunk_size: Optional[int] = None):
        super().__init__(c_z, c_hidden, False, chunk_size=chunk_size)


class _SharedDropout(nn.Module):
    """Dropout whose mask is shared along one dimension of the input (AF2 supplementary 1.11.6); the identity
    outside training.

    Args:
        p: probability of dropping an entry, in [0, 1].
    """

    shared_dim = -3

    def __init__(self, p: float):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p (the dropout probability) must be a float in [0, 1], got {p!r}")
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., R, C, c) with at least 3 dimensions. Returns x with one mask drawn for every index of the
        shared dimension, entries kept scaled by 1 / (1 - p)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 3:
            raise ValueError(f"x must have at least 3 dimensions (..., rows, columns, channels), got {tuple(x.shape)}")
        if not self.training or self.p == 0.0:
            return x
        shape = list(x.shape)
        shape[self.shared_dim] = 1
        return x * F.dropout(x.new_ones(shape), self.p, training=True)


class DropoutRowwise(_SharedDropout):
    """Row-wise dropout: one mask (..., 1, N, c) shared by every row (dimension -3), as OpenFold's."""

    shared_dim = -3


class DropoutColumnwise(_SharedDropout):
    """Column-wise dropout: one mask (..., N, 1, c) shared by every column (dimension -2), as OpenFold's."""

    shared_dim = -2


class EvoformerBlock(nn.Module):
    """One Evoformer block (AF2 supplementary Algorithm 6): MSA row attention with pair bias (row-wise dropout),
    MSA column attention, MSA transition, outer product mean, triangle multiplicative updates outgoing and incoming
    and triangle attention around the starting node (row-wise dropout), around the ending node (column-wise
    dropout), pair transition; each a residual update, in that order.

    Submodule names are OpenFold's, but direct children: OpenFold nests the transitions, the outer product mean and
    the pair updates under ``core.`` (strip that prefix to load its state dict); its ending-node dropout is the
    row-wise one on the transposed pair, here ``ps_dropout_col_layer``.

    Args:
        c_m: MSA width. c_z: pair width.
        c_hidden_msa_att, heads_msa: per-head width and heads of the MSA row and column attention.
        c_hidden_opm: the outer product mean's width. c_hidden_mul: the multiplicative updates' width.
        c_hidden_pair_att, heads_pair: per-head width and heads of the triangle attention.
        transition_n: the transitions' hidden-width factor.
        msa_dropout, pair_dropout: dropout rates (AF2: 0.15 and 0.25), in training only.
        block_size, impl: the attention kernels' tile and "auto" | "kernel" | "reference" (None = the default).
        chunk_size: rows per chunk of the outer product mean, the multiplicative updates and the transitions (see
            the module docstring); None = whole.
        row_layout_fn, row_block_size: a block-sparse layout (``num_blocks -> bool (H or 1, nb, nb)``, blocks of
            ``row_block_size``, default ``block_size``) for the MSA row attention and both triangle attentions, all
            over the residues (heads_msa and heads_pair must then both fit the layout's heads); None = dense.
    """

    def __init__(self, c_m: int, c_z: int, *, c_hidden_msa_att: int = 32, c_hidden_opm: int = 32,
                 c_hidden_mul: int = 128, c_hidden_pair_att: int = 32, heads_msa: int = 8, heads_pair: int = 4,
                 transition_n: int = 4, msa_dropout: float = 0.15, pair_dropout: float = 0.25, block_size: int = 64,
                 chunk_size: Optional[int] = None, impl: Optional[str] = None, row_layout_fn=None,
                 row_block_size: Optional[int] = None):
        super().__init__()
        self.c_m, self.c_z = check_int("c_m", c_m, minimum=1), check_int("c_z", c_z, minimum=1)
        chunk_size = _check_chunk_size(chunk_size)
        attention = dict(block_size=block_size, impl=impl)
        # The row attentions (MSA rows, triangle around either node) may be block-sparse over the residues.
        rows = dict(block_size=row_block_size or block_size, impl=impl, layout_fn=row_layout_fn)
        self.msa_att_row = MSARowAttentionWithPairBias(c_m, c_z, c_hidden_msa_att, heads_msa, **rows)
        self.msa_att_col = MSAColumnAttention(c_m, c_hidden_msa_att, heads_msa, **attention)
        self.msa_transition = MSATransition(c_m, transition_n, chunk_size=chunk_size)
        self.outer_product_mean = OuterProductMean(c_m, c_z, c_hidden_opm, chunk_size=chunk_size)
        self.tri_mul_out = TriangleMultiplicationOutgoing(c_z, c_hidden_mul, chunk_size=chunk_size)
        self.tri_mul_in = TriangleMultiplicationIncoming(c_z, c_hidden_mul, chunk_size=chunk_size)
        self.tri_att_start = TriangleAttention(c_z, c_hidden_pair_att, heads_pair, True, **rows)
        self.tri_att_end = TriangleAttention(c_z, c_hidden_pair_att, heads_pair, False, **rows)
        self.pair_transition = PairTransition(c_z, transition_n, chunk_size=chunk_size)
        self.msa_dropout_layer = DropoutRowwise(msa_dropout)
        self.ps_dropout_row_layer = DropoutRowwise(pair_dropout)
        self.ps_dropout_col_layer = DropoutColumnwise(pair_dropout)

    def _check_inputs(self, m, z, msa_mask, pair_mask) -> None:
        B, S, N = _check_msa_and_pair(m, z, self.c_m, self.c_z, same_dtype=True)
        _check_mask("msa_mask", msa_mask, (B, S, N), f"(B={B}, S={S}, N={N})", m.device)
        _check_mask("pair_mask", pair_mask, (B, N, N), f"(B={B}, N={N}, N={N})", m.device)

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                pair_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            m: (B, S, N, c_m) MSA representation.
            z: (B, N, N, c_z) pair representation.
            msa_mask: bool (B, S, N) or None, True = keep (padded residues and sequences False).
            pair_mask: bool (B, N, N) or None, True = keep (typically seq_mask_i & seq_mask_j).

        Returns:
            (m, z), the updated representations. Entries at kept positions do not depend on what masked ones hold.
        """
        self._check_inputs(m, z, msa_mask, pair_mask)
        m = m + self.msa_dropout_layer(self.msa_att_row(m, z, msa_mask))
        m = m + self.msa_att_col(m, msa_mask)
        m = m + self.msa_transition(m, msa_mask)
        z = z + self.outer_product_mean(m, msa_mask)
        z = z + self.ps_dropout_row_layer(self.tri_mul_out(z, pair_mask))
        z = z + self.ps_dropout_row_layer(self.tri_mul_in(z, pair_mask))
        z = z + self.ps_dropout_row_layer(self.tri_att_start(z, pair_mask))
        z = z + self.ps_dropout_col_layer(self.tri_att_end(z, pair_mask))
        z = z + self.pair_transition(z, pair_mask)
        return m, z


class EvoformerStack(nn.Module):
    """``depth`` Evoformer blocks in sequence (the trunk of AF2 supplementary Algorithm 2, without OpenFold's
    final projection of the first MSA row to the single representation).

    Args:
        depth: number of blocks (48 in AF2). c_m, c_z: MSA and pair widths.
        **block_kwargs: the keyword arguments of :class:`EvoformerBlock`, the same for every block.
    """

    def __init__(self, depth: int, c_m: int, c_z: int, **block_kwargs):
        super().__init__()
        self.depth = check_int("depth", depth, minimum=1)
        self.blocks = nn.ModuleList(EvoformerBlock(c_m, c_z, **block_kwargs) for _ in range(depth))

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                pair_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """m (B, S, N, c_m), z (B, N, N, c_z), masks as :meth:`EvoformerBlock.forward`. Returns (m, z)."""
        for block in self.blocks:
            m, z = block(m, z, msa_mask, pair_mask)
        return m, z
