"""AlphaFold2's triangle self-attention around the starting and the ending node (supplementary Algorithms 13 and
14) and MSA row attention with pair bias (Algorithm 7), on :func:`af2_ext.ops.triangle_attention`.

Parameter names are OpenFold's (``openfold/model/triangular_attention.py``, ``msa.py`` and the ``mha`` of
``primitives.Attention``), so an OpenFold state dict of these modules loads as it is.

Masks are bool (True = keep) and reach the op as masks, not as OpenFold's additive ``inf * (mask - 1)`` bias.
Deliberate difference: a row whose keys are all masked attends to nothing (zeros before the gate and the output
projection), where OpenFold's -1e9 swamps every logit into a uniform average over the masked keys.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from af2_ext import ops, reversible
from af2_ext._checks import check_int


def _init_glorot_(linear: nn.Linear) -> None:
    """Queries, keys and values: Glorot uniform (AF2 supplement 1.11.4; OpenFold's 'glorot')."""
    nn.init.xavier_uniform_(linear.weight)


def _init_normal_(linear: nn.Linear) -> None:
    """Pair-bias projection: fan-in normal (OpenFold's 'normal')."""
    nn.init.kaiming_normal_(linear.weight, nonlinearity="linear")


def _init_gating_(linear: nn.Linear) -> None:
    """Gates start open at sigmoid(1) for every input: weight 0, bias 1 (OpenFold's 'gating')."""
    nn.init.zeros_(linear.weight)
    nn.init.ones_(linear.bias)


def _init_final_(linear: nn.Linear) -> None:
    """Last layer of a residual update: zero, so a fresh block is the identity (OpenFold's 'final')."""
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


def _check_features(name: str, t, shape_doc: str, channels: int) -> torch.Tensor:
    """``t`` a floating 4-d tensor whose last dimension is ``channels``; errors name the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dim() != 4 or t.shape[-1] != channels:
        raise ValueError(f"{name} must be {shape_doc}, got {tuple(t.shape)}")
    return t


def _check_msa_and_pair(m, z, c_m: int, c_z: int, *, same_dtype: bool = False) -> tuple[int, int, int]:
    """m (B, S, N, c_m) and z (B, N, N, c_z) on one device (and of one dtype with ``same_dtype``); returns
    (B, S, N). Errors name the argument."""
    _check_features("m", m, f"(B, S, N, c_m={c_m})", c_m)
    B, S, N = m.shape[:3]
    _check_features("z", z, f"(B={B}, N={N}, N={N}, c_z={c_z}) to match m", c_z)
    if z.shape[:3] != (B, N, N):
        raise ValueError(f"z must be (B={B}, N={N}, N={N}, c_z={c_z}) to match m {tuple(m.shape)}, got "
                         f"{tuple(z.shape)}")
    if same_dtype and (z.device != m.device or z.dtype != m.dtype):
        raise ValueError(f"z must have m's device and dtype ({m.device}, {m.dtype}), got {z.device}, {z.dtype}")
    if z.device != m.device:
        raise ValueError(f"z must be on m's device {m.device}, got {z.device}")
    return B, S, N


def _check_mask(name: str, mask, shape: tuple, shape_doc: str, device: torch.device) -> None:
    """``mask`` None or a bool tensor of ``shape`` on ``device``; errors name the argument."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be bool (True = keep), got {mask.dtype}; pass {name}.bool() for a 0/1 mask")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must be {shape_doc}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on the input's device {device}, got {mask.device}")


def _check_config(c_hidden: int, heads: int, block_size: int, impl: Optional[str], **channels: int) -> None:
    for name, value in channels.items():
        check_int(name, value, minimum=1)
    check_int("heads", heads, minimum=1)
    check_int("c_hidden", c_hidden, minimum=1)
    if c_hidden not in ops.HEAD_DIMS:
        raise ValueError(f"c_hidden (the per-head width) must be one of {ops.HEAD_DIMS}, the head dims the "
                         f"attention kernels support, got {c_hidden}")
    if block_size not in ops.BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {ops.BLOCK_SIZES}, got {block_size!r}")
    if impl is not None and impl not in ops.IMPLS:
        raise ValueError(f"impl must be None or one of {ops.IMPLS}, got {impl!r}")


def _keep_attention_output(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: keep the attention kernel's outputs (out and the log-sum-exp its backward
    reads), recompute every other op (LayerNorms, projections, bias, gate) in the backward."""
    if ops.extension_available() and op is torch.ops.af2_ext.block_sparse_attention_forward.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _recomputing_around_kernel(module: nn.Module, fn: Callable[..., torch.Tensor], *inputs) -> torch.Tensor:
    """``fn(*inputs)``; in training on the attention kernel with ``module.recompute`` True, under a selective
    checkpoint that saves only the inputs and the kernel's out / log-sum-exp, so the n x n x c_hidden projections
    and the normalised input are recomputed (a few GEMMs) in the backward instead of held from forward to backward.
    The reference attention runs without (recomputing it would need its n^3 logits again), and so does a reversible
    backward's recompute (its graph is differentiated at once)."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    recording = torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                             or any(p.requires_grad for p in module.parameters()))
    if not (recording and module.recompute and not reversible.recomputing()
            and ops.kernel_runs("block_sparse_attention_forward", tensors[0].device, module.mha.impl)):
        return fn(*inputs)
    return checkpoint(fn, *inputs, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_attention_output))


class _GatedAttention(nn.Module):
    """Gated multi-head self-attention within each row of x, with a bias shared by the rows: OpenFold's
    ``primitives.Attention`` with one input for queries, keys and values.

    Args:
        c_in: input and output width. c_hidden: per-head width. heads: number of heads.
        block_size, impl: passed to :func:`af2_ext.ops.triangle_attention`.
        layout_fn: None (dense) or ``num_blocks -> bool (H or 1, nb, nb)``: a block-sparse layout over the
            (query, key) blocks of each row, blocks of ``block_size``.
    """

    def __init__(self, c_in: int, c_hidden: int, heads: int, *, block_size: int, impl: Optional[str],
                 layout_fn=None):
        super().__init__()
        self.c_hidden, self.heads, self.block_size, self.impl = c_hidden, heads, block_size, impl
        self.layout_fn, self._layouts = layout_fn, {}
        inner = heads * c_hidden
        self.linear_q = nn.Linear(c_in, inner, bias=False)
        self.linear_k = nn.Linear(c_in, inner, bias=False)
        self.linear_v = nn.Linear(c_in, inner, bias=False)
        self.linear_g = nn.Linear(c_in, inner)
        self.linear_o = nn.Linear(inner, c_in)
        for linear in (self.linear_q, self.linear_k, self.linear_v):
            _init_glorot_(linear)
        _init_gating_(self.linear_g)
        _init_final_(self.linear_o)

    def layout(self, n: int, device: torch.device) -> Optional[torch.Tensor]:
        """The (cached) block-sparse layout for rows of n, or None (dense)."""
        if self.layout_fn is None:
            return None
        key = (-(-n // self.block_size), str(device))
        if key not in self._layouts:
            self._layouts[key] = self.layout_fn(key[0]).to(device)
        return self._layouts[key]

    def forward(self, x: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x: (B, R, N, c_in), already normalised: R rows of N positions each.
            bias: (B, H, N, N) additive logits bias [b, h, query, key], shared by the R rows.
            mask: bool (B, R, N) or None, True = keep the key.

        Returns:
            (B, R, N, c_in).
        """
        # Each projection is a contiguous (B, R, N, H*D) product and q, k, v are permuted views of it: the op
        # merges B and R in place, without a copy.
        q, k, v = (rearrange(linear(x), "b r n (h d) -> b r h n d", h=self.heads)  # [b, r, h, n, d]
                   for linear in (self.linear_q, self.linear_k, self.linear_v))
        out = ops.triangle_attention(q, k, v, bias, mask, layout=self.layout(x.shape[2], x.device),
                                     block_size=self.block_size, impl=self.impl)  # [b, r, h, n, d]
        out = rearrange(out, "b r h n d -> b r n (h d)")  # [b, r, n, h*d]
        return self.linear_o(torch.sigmoid(self.linear_g(x)) * out)  # [b, r, n, c_in]


class TriangleAttention(nn.Module):
    """Triangle self-attention around the starting node (AF2 supplementary Algorithm 13) or the ending node
    (Algorithm 14) on the pair representation.

    Starting node: each row i of z attends along j, ``softmax_k(q_ij . k_ik / sqrt(c_hidden) + b_jk) v_ik``, with
    the bias b_jk = LinearNoBias(LayerNorm(z_jk)) per head shared by every row, then gated and projected. Ending
    node: the same on z with i and j swapped (each column attends along i, bias b_ki), swapped back.

    Args:
        c_z: pair width. c_hidden: per-head width, one of 16, 32, 64, 128. heads: number of heads.
        starting: True for Algorithm 13 (around the starting node), False for Algorithm 14 (ending node).
        inf: kept for OpenFold's signature; unused, since the op takes the mask as a mask (no additive -inf).
        block_size: the attention kernels' tile, 16, 32, 64 or 128.
        layout_fn: None (dense) or ``num_blocks -> bool (H or 1, nb, nb)``, a block-sparse layout over each row's
            (query, key) blocks of ``block_size``.
        impl: "auto" | "kernel" | "reference" for :func:`af2_ext.ops.triangle_attention`; None = the process
            default.
        recompute: in training on the attention kernel, hold only the input and the kernel's output and
            log-sum-exp from forward to backward and recompute the LayerNorm, the projections and the gate there
            (a selective checkpoint; the attention itself is not recomputed). Such a graph can be differentiated
            once: pass False (or set ``.recompute = False``) for ``retain_graph`` / ``gradcheck``; False holds them
            all.
    """

    def __init__(self, c_z: int, c_hidden: int, heads: int, starting: bool = True, *, inf: float = 1e9,
                 block_size: int = 64, impl: Optional[str] = None, layout_fn=None, recompute: bool = True):
        super().__init__()
        _check_config(c_hidden, heads, block_size, impl, c_z=c_z)
        self.c_z, self.c_hidden, self.heads, self.recompute = c_z, c_hidden, heads, bool(recompute)
        self.starting, self.inf = bool(starting), inf
        self.layer_norm = nn.LayerNorm(c_z)
        self.linear = nn.Linear(c_z, heads, bias=False)  # the pair bias; OpenFold's name
        _init_normal_(self.linear)
        self.mha = _GatedAttention(c_z, c_hidden, heads, block_size=block_size, impl=impl, layout_fn=layout_fn)

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            z: (B, N, N, c_z) pair representation.
            mask: bool (B, N, N) or None, True = keep. Starting node: row i ignores the keys k with
                mask[b, i, k] False; ending node: column j ignores the keys k with mask[b, k, j] False.
                A row whose keys are all masked attends to nothing: its update is ``mha.linear_o``'s bias.

        Returns:
            (B, N, N, c_z): the update, not added to z (the caller adds it, with dropout, as the trunk does).
        """
        _check_features("z", z, f"(B, N, N, c_z={self.c_z})", self.c_z)
        if z.shape[1] != z.shape[2]:
            raise ValueError(f"z must be (B, N, N, c_z={self.c_z}) with two equal N, got {tuple(z.shape)}")
        B, N = z.shape[:2]
        _check_mask("mask", mask, (B, N, N), f"(B={B}, N={N}, N={N})", z.device)
        return _recomputing_around_kernel(self, self._attend, z, mask)

    def _attend(self, z: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.starting:
            z = rearrange(z, "b i j c -> b j i c")  # [b, j, i, c]: the ending node attends along i
            mask = None if mask is None else rearrange(mask, "b i j -> b j i")  # [b, j, i]
        z = self.layer_norm(z)  # [b, i, j, c]
        bias = rearrange(self.linear(z), "b q k h -> b h q k")  # [b, h, j, k]: b_jk, shared by the rows i
        out = self.mha(z, bias, mask)  # [b, i, j, c]
        if not self.starting:
            out = rearrange(out, "b j i c -> b i j c")  # [b, i, j, c]
        return out


class MSARowAttentionWithPairBias(nn.Module):
    """MSA row-wise gated self-attention with pair bias (AF2 supplementary Algorithm 7): each of the S rows of
    the MSA attends along its N residues, ``softmax_k(q_si . k_sk / sqrt(c_hidden) + b_ik) v_sk`` with the bias
    b_ik = LinearNoBias(LayerNorm(z_ik)) per head shared by all S rows, then gated and projected.

    Args:
        c_m: MSA width. c_z: pair width. c_hidden: per-head width, one of 16, 32, 64, 128. heads: number of heads.
        block_size: the attention kernels' tile, 16, 32, 64 or 128.
        layout_fn: None (dense) or ``num_blocks -> bool (H or 1, nb, nb)``, a block-sparse layout over each row's
            (query, key) blocks of ``block_size``.
        impl: "auto" | "kernel" | "reference" for :func:`af2_ext.ops.triangle_attention`; None = the process
            default.
        recompute: as :class:`TriangleAttention`'s (the LayerNorms of m and z, the pair bias and the projections
            recomputed in the backward).
    """

    def __init__(self, c_m: int, c_z: int, c_hidden: int, heads: int, *, block_size: int = 64,
                 impl: Optional[str] = None, layout_fn=None, recompute: bool = True):
        super().__init__()
        _check_config(c_hidden, heads, block_size, impl, c_m=c_m, c_z=c_z)
        self.c_m, self.c_z, self.c_hidden, self.heads, self.recompute = c_m, c_z, c_hidden, heads, bool(recompute)
        self.layer_norm_m = nn.LayerNorm(c_m)
        self.layer_norm_z = nn.LayerNorm(c_z)
        self.linear_z = nn.Linear(c_z, heads, bias=False)
        _init_normal_(self.linear_z)
        self.mha = _GatedAttention(c_m, c_hidden, heads, block_size=block_size, impl=impl, layout_fn=layout_fn)

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            m: (B, S, N, c_m) MSA representation.
            z: (B, N, N, c_z) pair representation.
            msa_mask: bool (B, S, N) or None, True = keep: row s ignores the residues k with msa_mask[b, s, k]
                False. A row whose residues are all masked attends to nothing: its update is ``mha.linear_o``'s
                bias (OpenFold's additive mask would leave it unmasked).

        Returns:
            (B, S, N, c_m): the update, not added to m.
        """
        B, S, N = _check_msa_and_pair(m, z, self.c_m, self.c_z)
        _check_mask("msa_mask", msa_mask, (B, S, N), f"(B={B}, S={S}, N={N})", m.device)
        return _recomputing_around_kernel(self, self._attend, m, z, msa_mask)

    def _attend(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor]) -> torch.Tensor:
        bias = rearrange(self.linear_z(self.layer_norm_z(z)), "b q k h -> b h q k")  # [b, h, i, k]: shared by rows s
        return self.mha(self.layer_norm_m(m), bias, msa_mask)  # [b, s, i, c_m]
