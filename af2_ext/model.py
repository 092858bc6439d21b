"""``af2_ext.Alphafold2``: a drop-in for alphafold2-pytorch 0.0.19's ``Alphafold2`` on the af2_ext kernels.

The seed's architecture: one token embedding shared by the sequence and the MSA; the pair representation is
the outer sum of (token + position i) and (token + position j), flattened to (b, n*n, d); the MSA is token +
column position + row position, (b, M*N, d). Per layer: axial attention on the pair (rows and columns,
summed), MSA self-attention, cross-attention pair -> MSA and MSA -> pair (keys/values compressed by
``cross_attn_compress_ratio``), GEGLU feed-forwards (mult 4), all pre-LayerNorm. The head symmetrises the pair,
normalises it and projects to 37 distance bins.

Every attention runs on our ops: the axial and MSA attentions through block-sparse attention (a dense
layout when not sparse), the cross-attentions through compressed attention, the reversible trunk through
:mod:`af2_ext.reversible`. ``impl="reference"`` runs the same parameters in pure PyTorch (the test oracle).

Deliberate differences from the seed, each a bug fix with a test (python_tests/test_model.py):

- the pair mask is mask_i AND mask_j (the seed: OR, so a padded residue's row still attended);
- compression applies whatever Nk is (the seed skipped it when Nk was divisible by the ratio);
- padded context positions are zeroed before the key/value compression (the seed convolved them, so a padded
  token's embedding leaked into the kept compressed keys and values: padding must be invisible);
- ``inter_msa_self_attn=True`` attends across the whole MSA, ``False`` within each MSA row (the issue reports
  that the seed's True made each token attend only to itself; the installed 0.0.19's non-reversible path did
  attend across the MSA when we checked, so the test pins the behaviour rather than a difference);
- a ``sparse_self_attn`` tuple chooses sparsity per layer for the axial and the MSA attention alike (the seed
  made every axial layer sparse when given any tuple);
- the reversible recompute receives the MSA row structure and the masks like the forward (the seed dropped
  them);
- the cross-attention normalises its context with the context's own LayerNorm;
- reversible mode works without an MSA.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from einops import rearrange
from torch import nn

from af2_ext import layouts, ops
from af2_ext.blocks import AxialAttention, CrossAttention, FeedForward, MSARowAttention, SelfAttention
from af2_ext.evoformer import EvoformerBlock
from af2_ext.evoformer_trunk import block_couplings
from af2_ext.reversible import Coupling, ReversibleCouplings, SequentialCouplings
from af2_ext.triangle import _GatedAttention

NUM_AMINO_ACIDS = 21
NUM_EMBEDDS_TR = 1280  # ESM-1b embedding width
MAX_NUM_MSA = 20
DISTOGRAM_BUCKETS = 37
FF_CHUNK_SIZE = 4096  # tokens per feed-forward chunk (ff_chunk_size="auto")
EVOFORMER_CHUNK_ROWS = 64  # rows i per chunk of the Evoformer's n^2-sized updates (ff_chunk_size not None)
TRUNKS = ("seed", "evoformer")

# Halves of the reversible trunk: the pair x = (x1, x2) and the MSA m = (m1, m2), each a copy of the stream at
# the start (the seed's duplication); the outputs are averaged. The sequential trunk has two: x and m.
X1, X2, M1, M2 = range(4)
X, M = 0, 1


class _SeedSparseLayout:
    """The seed's sparse layout (DeepSpeed ``VariableSparsityConfig`` for ``max_seq_len``), cut to the blocks
    of the actual length, as DeepSpeed's SparseSelfAttention does."""

    def __init__(self, max_seq_len: int, block_size: int, heads: int, seed: int):
        self.full = layouts.seed_default(max_seq_len, block_size=block_size, num_heads=heads, seed=seed)

    def __call__(self, num_blocks: int) -> torch.Tensor:
        if num_blocks > self.full.shape[1]:
            raise ValueError(f"{num_blocks} blocks exceed the layout built for max_seq_len")
        return self.full[:, :num_blocks, :num_blocks]


def _per_layer(value: Union[bool, Sequence[bool]], depth: int, name: str) -> tuple[bool, ...]:
    if isinstance(value, bool):
        return (value,) * depth
    value = tuple(value)
    if len(value) != depth or not all(isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a bool or a tuple of {depth} bools (one per layer), got {value!r}")
    return value


class Alphafold2(nn.Module):
    """The seed's model on af2_ext kernels; same keyword arguments, then ours.

    Args:
        dim: model width. max_seq_len: longest sequence (and MSA row) accepted. depth: layers.
        heads, dim_head: attention shape (dim_head in 16, 32, 64, 128).
        pos_token: accepted for compatibility (unused, as in the seed).
        num_tokens: token vocabulary (21 amino acids). num_embedds: width of ``embedds`` inputs.
        attn_dropout: dropout on attention probabilities (the kernels have none: in training, > 0 runs the
            reference attention with a one-time warning). ff_dropout: feed-forward dropout.
        reversible: run the trunk through reversible recompute (activation memory flat in depth).
        sparse_self_attn: bool, or a tuple of one bool per layer: block-sparse axial and MSA self-attention
            with the seed's layout (block ``block_size``, windows of 4 blocks, block 0 global,
            ``max_seq_len // block_size // 4`` random blocks).
        cross_attn_compress_ratio: memory-compressed cross-attention ratio (1 = none).
        inter_msa_self_attn: MSA self-attention across the whole MSA (True) or within each row (False).
        impl: "auto" | "kernel" | "reference" for every op of the model (see :func:`set_impl`).
        block_size: tile of the dense attention kernels.
        sparse_block_size: block of the sparse layout (the seed's 16).
        layout_seed: seed of the sparse layout's random blocks.
        relative_positions: 0 (the seed) or R > 0: also add a learned embedding of the clipped offset
            ``clamp(j - i, -R, R)`` to each pair (AlphaFold2's relpos, R = 32 there). Not in the seed, whose
            absolute positions alone make the distance-vs-separation prior slow to learn; off by default.
        ff_chunk_size: tokens per chunk of the feed-forwards (see :class:`af2_ext.blocks.FeedForward`): None
            runs them whole (the seed); N runs N tokens at a time, so without autograd only one chunk's hidden
            layer (8x the width) exists, and in training each chunk is recomputed in the backward (one more
            feed-forward forward per step for that memory). "auto" (default): 4096 (``FF_CHUNK_SIZE``). The
            same function either way. Measured at the seed README's width, n = 192, 2-core CPU: chunks of 4096
            make the step 10 % faster (smaller working set, despite the recompute) and its peak 21 % lower
            (BENCHMARKS.md).
        trunk: "seed" (default: the seed's axial + cross-attention layers above) or "evoformer": AlphaFold2's
            Evoformer blocks (:mod:`af2_ext.evoformer`, supplementary Algorithm 6) with MSA width ``dim``, pair
            width ``pair_dim``, ``heads`` x ``dim_head`` for the MSA and triangle attentions, dropout
            ``ff_dropout`` (MSA and pair), and the n^2-sized updates in chunks of 64 rows unless ``ff_chunk_size``
            is None; in training on the kernels the row and triangle attentions keep only their input and the
            kernel's output and recompute their projections in the backward (``recompute`` of
            :class:`af2_ext.triangle.TriangleAttention`: one backward per forward). The MSA must be aligned to the sequence (N = n); without an MSA the sequence is its one row;
            ``embedds`` give n rows (their outer sum). The pair starts as AlphaFold2's input embedder does:
            projections of (token + position) for i and for j, summed (+ ``relative_positions``). ``reversible``
            runs it through :mod:`af2_ext.evoformer_trunk`'s four-half couplings. ``sparse_self_attn`` gives the
            row attentions (MSA rows, triangle attention around either node) the seed's layout over the residues,
            per layer; the column attention stays dense. Not with ``cross_attn_compress_ratio`` > 1.
        pair_dim: the Evoformer's pair width c_z (default ``dim``); only with ``trunk="evoformer"``.
    """

    def __init__(self, *, dim: int, max_seq_len: int = 2048, depth: int = 6, heads: int = 8, dim_head: int = 64,
                 pos_token: int = 3, num_tokens: int = NUM_AMINO_ACIDS, num_embedds: int = NUM_EMBEDDS_TR,
                 attn_dropout: float = 0.0, ff_dropout: float = 0.0, reversible: bool = False,
                 sparse_self_attn: Union[bool, Sequence[bool]] = False, cross_attn_compress_ratio: int = 1,
                 inter_msa_self_attn: bool = True, impl: Optional[str] = None, block_size: int = 64,
                 sparse_block_size: int = 16, layout_seed: int = 0, relative_positions: int = 0,
                 ff_chunk_size: Union[int, None, str] = "auto", trunk: str = "seed", pair_dim: Optional[int] = None):
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("max_seq_len", max_seq_len, 1), ("depth", depth, 1),
                                 ("heads", heads, 1), ("num_tokens", num_tokens, 1), ("num_embedds", num_embedds, 1),
                                 ("cross_attn_compress_ratio", cross_attn_compress_ratio, 1),
                                 ("relative_positions", relative_positions, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if dim_head not in ops.HEAD_DIMS:
            raise ValueError(f"dim_head must be one of {ops.HEAD_DIMS} (the kernels' head dims), got {dim_head!r}")
        for name, value in (("block_size", block_size), ("sparse_block_size", sparse_block_size)):
            if isinstance(value, bool) or value not in ops.BLOCK_SIZES:
                raise ValueError(f"{name} must be one of {ops.BLOCK_SIZES} (the kernels' block sizes), got {value!r}")
        for name, p in (("attn_dropout", attn_dropout), ("ff_dropout", ff_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        if ff_chunk_size == "auto":
            ff_chunk = FF_CHUNK_SIZE
        elif ff_chunk_size is None or (isinstance(ff_chunk_size, int) and not isinstance(ff_chunk_size, bool)
                                       and ff_chunk_size >= 1):
            ff_chunk = ff_chunk_size
        else:
            raise ValueError(f"ff_chunk_size must be 'auto', None or a positive int, got {ff_chunk_size!r}")
        sparse = _per_layer(sparse_self_attn, depth, "sparse_self_attn")
        if trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {trunk!r}")
        if trunk == "seed" and pair_dim is not None:
            raise ValueError("pair_dim is the Evoformer's pair width: pass it with trunk='evoformer'")
        if trunk == "evoformer":
            if pair_dim is not None and (isinstance(pair_dim, bool) or not isinstance(pair_dim, int) or pair_dim < 1):
                raise ValueError(f"pair_dim must be None or an int >= 1, got {pair_dim!r}")
            if cross_attn_compress_ratio != 1:
                raise ValueError("cross_attn_compress_ratio applies to the seed trunk's cross-attention; "
                                 "trunk='evoformer' has none")
        self.trunk_kind = trunk
        pair_dim = dim if pair_dim is None else pair_dim
        self.pair_dim = pair_dim
        self.dim, self.max_seq_len, self.num_tokens, self.num_embedds = dim, max_seq_len, num_tokens, num_embedds
        self.reversible, self.inter_msa_self_attn, self.pos_token = reversible, inter_msa_self_attn, pos_token
        self.sparse_msa = any(sparse)

        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.pos_emb_ax = nn.Embedding(max_seq_len, dim)
        self.msa_pos_emb = nn.Embedding(max_seq_len, dim)
        self.msa_num_pos_emb = nn.Embedding(MAX_NUM_MSA, dim)
        self.embedd_project = nn.Linear(num_embedds, dim)
        self.relative_positions = relative_positions
        self.rel_pos_emb = nn.Embedding(2 * relative_positions + 1, pair_dim) if relative_positions else None
        if trunk == "evoformer":  # AlphaFold2's input embedder: z_ij = left(a_i) + right(a_j) (+ relpos)
            self.pair_left, self.pair_right = nn.Linear(dim, pair_dim), nn.Linear(dim, pair_dim)

        seed_layout = _SeedSparseLayout(max_seq_len, sparse_block_size, heads, layout_seed) if any(sparse) else None
        attn = dict(heads=heads, dim_head=dim_head, attn_dropout=attn_dropout)
        layers = []

        def ff() -> FeedForward:
            return FeedForward(dim, dropout=ff_dropout, chunk_size=ff_chunk)

        for layer_sparse in (sparse if trunk == "seed" else ()):
            tile = dict(block_size=sparse_block_size, layout_fn=seed_layout) if layer_sparse else \
                dict(block_size=block_size)
            msa_attn_class = SelfAttention if inter_msa_self_attn else MSARowAttention
            axial = AxialAttention(dim, **attn, **tile)
            msa_attn = msa_attn_class(dim, mask_key="msa_mask", **attn, **tile)
            cross = CrossAttention(dim, ratio=cross_attn_compress_ratio, context_mask_key="msa_mask", **attn)
            msa_cross = CrossAttention(dim, ratio=cross_attn_compress_ratio, context_mask_key="mask", **attn)
            if reversible:  # the seed's reversible self block (f, g, j, k) then cross block (f, g, j, k)
                layers.append(nn.ModuleList([
                    Coupling(axial, X1, [X2]), Coupling(ff(), X2, [X1]),
                    Coupling(msa_attn, M1, [M2]), Coupling(ff(), M2, [M1]),
                    Coupling(cross, X1, [X2, M2]), Coupling(ff(), X2, [X1]),
                    Coupling(msa_cross, M1, [M2, X2]), Coupling(ff(), M2, [M1]),
                ]))
            else:  # the seed's sequential layer: residuals in this order
                layers.append(nn.ModuleList([
                    Coupling(axial, X, [X]), Coupling(msa_attn, M, [M]),
                    Coupling(cross, X, [X, M]), Coupling(msa_cross, M, [M, X]),
                    Coupling(ff(), X, [X]),
                    Coupling(ff(), M, [M]),
                ]))
        if trunk == "evoformer":
            evo = dict(c_hidden_msa_att=dim_head, c_hidden_pair_att=dim_head, heads_msa=heads, heads_pair=heads,
                       c_hidden_mul=pair_dim, msa_dropout=ff_dropout, pair_dropout=ff_dropout, block_size=block_size,
                       chunk_size=None if ff_chunk is None else EVOFORMER_CHUNK_ROWS, impl=impl)
            layers = [block_couplings(EvoformerBlock(dim, pair_dim, **evo, **(
                dict(row_layout_fn=seed_layout, row_block_size=sparse_block_size) if layer_sparse else {})), reversible)
                for layer_sparse in sparse]
        self.layers = nn.ModuleList(layers)
        # The trunks wrap self.layers without registering it again (one state dict, whatever runs it).
        num_halves = 4 if reversible else 2
        object.__setattr__(self, "_trunk", (ReversibleCouplings if reversible else SequentialCouplings)(
            self.layers, num_halves))
        object.__setattr__(self, "_reference_trunk", SequentialCouplings(self.layers, num_halves))

        self.to_distogram_logits = nn.Sequential(nn.LayerNorm(pair_dim), nn.Linear(pair_dim, DISTOGRAM_BUCKETS))
        self.impl = None
        self.set_impl(impl)

    def set_impl(self, impl: Optional[str]) -> "Alphafold2":
        """"auto" | "kernel" | "reference" (None: the process default) for every op of the model. With
        "reference" a reversible trunk runs through ordinary autograd (the same function, no recompute)."""
        if impl is not None and impl not in ops.IMPLS:
            raise ValueError(f"impl must be one of {ops.IMPLS} or None, got {impl!r}")
        self.impl = impl
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention, _GatedAttention)):
                module.impl = impl
        return self

    # ------------------------------------------------------------------------------------------------------

    def _check_inputs(self, seq, msa, embedds, mask, msa_mask) -> None:
        if not isinstance(seq, torch.Tensor) or seq.dim() != 2 or seq.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"seq must be an integer tensor (b, n), got {getattr(seq, 'shape', type(seq))} "
                             f"{getattr(seq, 'dtype', '')}")
        b, n = seq.shape
        if n == 0 or n > self.max_seq_len:
            raise ValueError(f"seq length must be in [1, max_seq_len={self.max_seq_len}], got {n}")

        def check_tokens(name, t):
            if torch.compiler.is_compiling():  # a data-dependent check; the embedding still rejects bad ids
                return
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_tokens):
                raise ValueError(f"{name} token ids must be in [0, num_tokens={self.num_tokens}), got "
                                 f"[{int(t.min())}, {int(t.max())}]")

        check_tokens("seq", seq)
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, n)):
            raise ValueError(f"mask must be bool (b, n) = ({b}, {n}), got {mask.dtype} {tuple(mask.shape)}")
        if msa is not None and embedds is not None:
            raise ValueError("pass msa or embedds, not both")
        if msa is not None:
            if msa.dim() != 3 or msa.shape[0] != b or msa.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"msa must be an integer tensor (b={b}, M, N), got {tuple(msa.shape)} {msa.dtype}")
            if not 1 <= msa.shape[1] <= MAX_NUM_MSA:
                raise ValueError(f"msa must have 1 to {MAX_NUM_MSA} rows (MAX_NUM_MSA), got {msa.shape[1]}")
            if not 1 <= msa.shape[2] <= self.max_seq_len:
                raise ValueError(f"msa row length must be in [1, max_seq_len={self.max_seq_len}], got {msa.shape[2]}")
            check_tokens("msa", msa)
            if self.trunk_kind == "evoformer" and msa.shape[2] != n:
                raise ValueError(f"trunk='evoformer' needs the MSA aligned to the sequence: msa (b, M, N={n}), got "
                                 f"{tuple(msa.shape)}")
            if msa_mask is not None and (msa_mask.dtype != torch.bool or msa_mask.shape != msa.shape):
                raise ValueError(f"msa_mask must be bool with msa's shape {tuple(msa.shape)}, got {msa_mask.dtype} "
                                 f"{tuple(msa_mask.shape)}")
        elif embedds is not None:
            if embedds.dim() != 3 or tuple(embedds.shape) != (b, n, self.num_embedds) or not embedds.is_floating_point():
                raise ValueError(f"embedds must be float (b, n, num_embedds) = ({b}, {n}, {self.num_embedds}), got "
                                 f"{tuple(embedds.shape)} {embedds.dtype}")
            if msa_mask is not None and (msa_mask.dtype != torch.bool or tuple(msa_mask.shape) != (b, n, n)):
                raise ValueError(f"msa_mask with embedds must be bool (b, n, n) = ({b}, {n}, {n}), got "
                                 f"{tuple(msa_mask.shape)}")
        elif msa_mask is not None:
            raise ValueError("msa_mask given without msa or embedds")
        if self.trunk_kind == "seed" and self.sparse_msa and self.inter_msa_self_attn and \
                (msa is not None or embedds is not None):
            length = msa.shape[1] * msa.shape[2] if msa is not None else n * n
            if length > self.max_seq_len:
                raise ValueError(f"sparse MSA self-attention across the whole MSA (inter_msa_self_attn=True) needs "
                                 f"rows * columns <= max_seq_len={self.max_seq_len}, got {length}; raise max_seq_len "
                                 "or use inter_msa_self_attn=False")

    def _embed_sequence(self, seq: torch.Tensor):
        """(positions [n], tokens [b, n, d], row = tokens + position i, col = tokens + position j)."""
        positions = torch.arange(seq.shape[1], device=seq.device)
        tokens = self.token_emb(seq)  # [b, n, d]
        return positions, tokens, tokens + self.pos_emb(positions)[None], tokens + self.pos_emb_ax(positions)[None]

    def _with_relative_positions(self, pair: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """pair [b, i, j, c] plus the embedding of the clipped offset j - i, when ``relative_positions``."""
        if self.rel_pos_emb is None:
            return pair
        r = self.relative_positions
        offsets = (positions[None, :] - positions[:, None]).clamp(-r, r) + r  # [i, j]
        return pair + self.rel_pos_emb(offsets)[None]

    def forward(self, seq: torch.Tensor, msa: Optional[torch.Tensor] = None, embedds: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, msa_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Distogram logits.

        Args:
            seq: int (b, n) token ids < num_tokens.
            msa: int (b, M, N), M <= 20; N may differ from n.
            embedds: float (b, n, num_embedds) (e.g. protein language-model embeddings), instead of an MSA:
                the "MSA" becomes their outer sum, n rows of n.
            mask: bool (b, n), True = residue present. msa_mask: bool (b, M, N) (or (b, n, n) with embedds).

        Returns:
            (b, n, n, 37) distogram logits (symmetric in i, j).

        ``torch.compile(model)``: in eval mode both trunks trace as one graph without breaks (the token-range
        check, a data-dependent read, is skipped while compiling; the embedding lookup still rejects a bad
        id). A training-mode reversible trunk draws its couplings' seeds on the host: graph breaks there.
        """
        self._check_inputs(seq, msa, embedds, mask, msa_mask)
        if self.trunk_kind == "evoformer":
            return self._forward_evoformer(seq, msa, embedds, mask, msa_mask)
        b, n = seq.shape
        device = seq.device
        positions, tokens, row, col = self._embed_sequence(seq)
        x = self._with_relative_positions(row[:, :, None] + col[:, None, :], positions)  # [b, i, j, d]
        x = rearrange(x, "b i j d -> b (i j) d")  # [b, n*n, d]
        pair_mask = None
        if mask is not None:  # deliberate difference from the seed: AND (the seed's OR kept padded rows)
            pair_mask = rearrange(mask[:, :, None] & mask[:, None, :], "b i j -> b (i j)")  # [b, n*n]

        m, msa_shape, flat_msa_mask = None, None, None
        if msa is not None:
            rows, cols = msa.shape[1:]
            m = self.token_emb(msa) + self.msa_pos_emb(torch.arange(cols, device=device))[None, None] \
                + self.msa_num_pos_emb(torch.arange(rows, device=device))[None, :, None]  # [b, M, N, d]
            m = rearrange(m, "b r c d -> b (r c) d")
            msa_shape = (rows, cols)
        elif embedds is not None:
            e = self.embedd_project(embedds)  # [b, n, d]
            m = rearrange(e[:, :, None] + e[:, None, :], "b i j d -> b (i j) d")  # [b, n*n, d]
            msa_shape = (n, n)
            if msa_mask is None and mask is not None:
                msa_mask = mask[:, :, None] & mask[:, None, :]
        if msa_mask is not None:
            flat_msa_mask = rearrange(msa_mask, "b r c -> b (r c)")

        context = dict(seq_len=n, mask=pair_mask, msa_mask=flat_msa_mask, msa_shape=msa_shape)
        trunk = self._reference_trunk if self.impl == "reference" else self._trunk
        if self.reversible:
            x1, x2, _, _ = trunk(x, x, m, m, **context)
            x = (x1 + x2) * 0.5
        else:
            x, _ = trunk(x, m, **context)

        x = rearrange(x, "b (i j) d -> b i j d", i=n)
        x = (x + x.transpose(1, 2)) * 0.5  # symmetrise
        return self.to_distogram_logits(x)

    def _forward_evoformer(self, seq, msa, embedds, mask, msa_mask) -> torch.Tensor:
        """forward() with trunk="evoformer": the same embeddings (the pair through AlphaFold2's input embedder),
        the Evoformer couplings on (m, z) or, reversible, (m1, m2, z1, z2), the distogram from z."""
        b, n = seq.shape
        device = seq.device
        positions, tokens, row, col = self._embed_sequence(seq)
        z = self._with_relative_positions(self.pair_left(row)[:, :, None] + self.pair_right(col)[:, None, :],
                                          positions)  # [b, i, j, c_z]
        pair_mask = None if mask is None else mask[:, :, None] & mask[:, None, :]  # [b, i, j]
        if msa is not None:
            rows = msa.shape[1]
            m = self.token_emb(msa) + self.msa_pos_emb(positions)[None, None] \
                + self.msa_num_pos_emb(torch.arange(rows, device=device))[None, :, None]  # [b, M, n, d]
        elif embedds is not None:
            e = self.embedd_project(embedds)  # [b, n, d]
            m = e[:, :, None] + e[:, None, :]  # [b, n rows, n, d]
            if msa_mask is None and mask is not None:
                msa_mask = mask[:, :, None] & mask[:, None, :]
        else:  # the sequence as the MSA's one row
            m = (tokens + self.msa_pos_emb(positions)[None] + self.msa_num_pos_emb.weight[0])[:, None]  # [b, 1, n, d]
            msa_mask = None if mask is None else mask[:, None]
        if msa_mask is None and mask is not None:
            msa_mask = mask[:, None].expand(b, m.shape[1], n)  # padded residues in every row
        elif msa_mask is not None and mask is not None:
            msa_mask = msa_mask & mask[:, None]
        context = dict(msa_mask=msa_mask, pair_mask=pair_mask)
        trunk = self._reference_trunk if self.impl == "reference" else self._trunk
        if self.reversible:
            _, _, z1, z2 = trunk(m, m, z, z, **context)
            z = (z1 + z2) * 0.5
        else:
            _, z = trunk(m, z, **context)
        z = (z + z.transpose(1, 2)) * 0.5  # symmetrise
        return self.to_distogram_logits(z)
