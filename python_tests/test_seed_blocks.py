"""The seed's building blocks (alphafold2_pytorch.alphafold2 and .reversible of alphafold2-pytorch 0.0.19) from
af2_ext.alphafold2 and af2_ext.reversible: called as the seed's users call them, checked against the same math
written out in plain PyTorch (not the module code), with the seed's parameter names, and one test per deliberate
difference (``test_difference_*``)."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
from af2_ext import layouts, model
from af2_ext.alphafold2 import (DISTOGRAM_BUCKETS, GEGLU, MAX_NUM_MSA, NUM_AMINO_ACIDS, NUM_EMBEDDS_TR, Alphafold2,
                                Attention, AxialAttention, FeedForward, PreNorm, PreNormCross, SequentialSequence,
                                SparseAttention)
from af2_ext.reversible import (Deterministic, ReversibleCrossAttnBlock, ReversibleSelfAttnBlock,
                                ReversibleSequence)

_ = inspect.Parameter.empty
TOL = dict(atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------------------------
# names, signatures, parameter names
# ----------------------------------------------------------------------------------------------------------


def test_constants_are_the_seeds_and_the_models():
    assert (MAX_NUM_MSA, NUM_AMINO_ACIDS, NUM_EMBEDDS_TR, DISTOGRAM_BUCKETS) == (20, 21, 1280, 37)
    assert Alphafold2 is model.Alphafold2


def _params(fn) -> list:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]


@pytest.mark.parametrize("fn, expected", [
    (PreNorm.__init__, [("dim", _), ("fn", _)]),
    (PreNormCross.__init__, [("dim", _), ("fn", _)]),
    (FeedForward.__init__, [("dim", _), ("mult", 4), ("dropout", 0.0)]),
    (Attention.__init__, [("dim", _), ("seq_len", None), ("heads", 8), ("dim_head", 64), ("dropout", 0.0),
                          ("compress_ratio", 1)]),
    (Attention.forward, [("x", _), ("context", None), ("mask", None), ("context_mask", None), ("lead_dims", None)]),
    (SparseAttention.__init__, [("block_size", 16), ("num_random_blocks", None)]),
    (SparseAttention.forward, [("x", _), ("mask", None), ("lead_dims", None)]),
    (AxialAttention.__init__, [("sparse_attn", False)]),
    (AxialAttention.forward, [("x", _), ("context", None), ("mask", None), ("context_mask", None)]),
    (SequentialSequence.__init__, [("blocks", _)]),
    (SequentialSequence.forward, [("x", _), ("m", _), ("mask", None), ("msa_mask", None), ("msa_lead_dims", None)]),
    (Deterministic.__init__, [("net", _)]),
    (Deterministic.forward, [("record_rng", False), ("set_rng", False)]),
    (ReversibleSelfAttnBlock.__init__, [("f", _), ("g", _), ("j", _), ("k", _)]),
    (ReversibleCrossAttnBlock.__init__, [("f", _), ("g", _), ("j", _), ("k", _)]),
    (ReversibleSelfAttnBlock.forward, [("x", _), ("m", _), ("mask", None), ("msa_mask", None),
                                       ("msa_lead_dims", None), ("_reverse", True)]),
    (ReversibleSequence.__init__, [("input_blocks", _)]),
    (ReversibleSequence.forward, [("seq", _), ("msa", _), ("mask", None), ("msa_mask", None),
                                  ("msa_lead_dims", None), ("reverse", True)]),
], ids=lambda v: getattr(v, "__qualname__", ""))
def test_signature_is_the_seeds(fn, expected):
    assert _params(fn) == expected


# Parameter names read off the seed's source: Attention registers to_q, to_kv, to_out (dropout has none), then
# compress_fn; PreNorm fn then norm; PreNormCross fn, norm, norm_context; FeedForward's net is Linear, GEGLU,
# Dropout, Linear; AxialAttention attn_width then attn_height; Deterministic keeps its module as net; SparseAttention's
# DeepSpeed SparseSelfAttention (attn_fn) registers its layout as the buffer master_layout.
ATTN = ["to_q.weight", "to_kv.weight", "to_out.weight", "to_out.bias"]
COMPRESS = ["compress_fn.weight", "compress_fn.bias"]
FF = ["net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"]
NORM = ["norm.weight", "norm.bias"]
NORM_CONTEXT = ["norm_context.weight", "norm_context.bias"]
SPARSE = ATTN + ["attn_fn.master_layout"]
AXIAL = [f"attn_width.{k}" for k in ATTN] + [f"attn_height.{k}" for k in ATTN]
SPARSE_AXIAL = [f"attn_width.{k}" for k in SPARSE] + [f"attn_height.{k}" for k in SPARSE]


def _prefixed(prefix: str, keys: list) -> list:
    return [f"{prefix}.{k}" for k in keys]


def test_block_state_dict_keys_are_the_seeds():
    dim = 8
    assert list(Attention(dim, heads=2, dim_head=4).state_dict()) == ATTN
    assert list(Attention(dim, heads=2, dim_head=4, compress_ratio=3).state_dict()) == ATTN + COMPRESS
    assert list(SparseAttention(dim, seq_len=32, heads=2, dim_head=4).state_dict()) == SPARSE
    assert list(FeedForward(dim).state_dict()) == FF
    assert list(PreNorm(dim, FeedForward(dim)).state_dict()) == _prefixed("fn", FF) + NORM
    assert list(PreNormCross(dim, Attention(dim)).state_dict()) == _prefixed("fn", ATTN) + NORM + NORM_CONTEXT
    assert list(AxialAttention(dim=dim, heads=2, dim_head=4).state_dict()) == AXIAL
    assert list(AxialAttention(dim=dim, seq_len=32, sparse_attn=True).state_dict()) == SPARSE_AXIAL
    shapes = {k: tuple(v.shape) for k, v in Attention(dim, heads=2, dim_head=4, compress_ratio=3).state_dict().items()}
    assert shapes == {"to_q.weight": (8, 8), "to_kv.weight": (16, 8), "to_out.weight": (8, 8), "to_out.bias": (8,),
                      "compress_fn.weight": (8, 4, 3), "compress_fn.bias": (8,)}
    assert tuple(FeedForward(dim, mult=2).net[0].weight.shape) == (32, 8)


def _seed_trunk_lists(dim: int, *, reversible: bool) -> nn.ModuleList:
    """One layer as the seed's Alphafold2 builds it (4 modules a list; the non-reversible trunk keeps 3)."""
    layers = nn.ModuleList([
        nn.ModuleList([PreNorm(dim, AxialAttention(dim=dim, heads=2, dim_head=16)), PreNorm(dim, FeedForward(dim)),
                       PreNorm(dim, Attention(dim, heads=2, dim_head=16)), PreNorm(dim, FeedForward(dim))]),
        nn.ModuleList([PreNormCross(dim, Attention(dim, heads=2, dim_head=16, compress_ratio=2)),
                       PreNorm(dim, FeedForward(dim)),
                       PreNormCross(dim, Attention(dim, heads=2, dim_head=16, compress_ratio=2)),
                       PreNorm(dim, FeedForward(dim))]),
    ])
    return layers if reversible else nn.ModuleList([nn.ModuleList(list(t)[:3]) for t in layers])


def test_trunk_state_dict_keys_are_the_seeds():
    axial, attn = _prefixed("fn", AXIAL) + NORM, _prefixed("fn", ATTN) + NORM
    cross, ff = _prefixed("fn", ATTN + COMPRESS) + NORM + NORM_CONTEXT, _prefixed("fn", FF) + NORM
    sequential = SequentialSequence(_seed_trunk_lists(16, reversible=False))
    assert list(sequential.state_dict()) == (_prefixed("blocks.0.0", axial) + _prefixed("blocks.0.1", ff)
                                             + _prefixed("blocks.0.2", attn) + _prefixed("blocks.1.0", cross)
                                             + _prefixed("blocks.1.1", ff) + _prefixed("blocks.1.2", cross))
    reversible = ReversibleSequence(_seed_trunk_lists(16, reversible=True))
    assert list(reversible.state_dict()) == (
        _prefixed("blocks.0.f.net", axial) + _prefixed("blocks.0.g.net", ff) + _prefixed("blocks.0.j.net", attn)
        + _prefixed("blocks.0.k.net", ff) + _prefixed("blocks.1.f.net", cross) + _prefixed("blocks.1.g.net", ff)
        + _prefixed("blocks.1.j.net", cross) + _prefixed("blocks.1.k.net", ff))
    # Every parameter once, under that name: an optimizer over .parameters() sees each once.
    assert len(list(reversible.parameters())) == len(reversible.state_dict())


# ----------------------------------------------------------------------------------------------------------
# attention against the same math in plain PyTorch
# ----------------------------------------------------------------------------------------------------------


def _plain_attention(module: Attention, x, context=None, key_keep=None):
    """The seed's attention written out: softmax(q k^T / sqrt(dim_head)) v over the kept keys; with
    compress_ratio > 1, keys and values (padded positions zeroed) compressed by conv1d over the context zero-padded
    to a multiple of the ratio, a compressed key kept when any of its inputs is."""
    heads = module.heads
    source = x if context is None else context
    q = x @ module.to_q.weight.T
    k, v = (source @ module.to_kv.weight.T).chunk(2, dim=-1)
    b, n, inner = q.shape
    if module.compress_ratio > 1:
        ratio = module.compress_ratio
        if key_keep is None:
            key_keep = torch.ones(b, source.shape[1], dtype=torch.bool, device=x.device)
        k, v = k * key_keep[..., None], v * key_keep[..., None]
        pad = (-source.shape[1]) % ratio
        k, v = (F.conv1d(F.pad(t.transpose(1, 2), (0, pad)), module.compress_fn.weight, module.compress_fn.bias,
                         stride=ratio, groups=heads).transpose(1, 2) for t in (k, v))
        key_keep = F.pad(key_keep, (0, pad)).reshape(b, -1, ratio).any(-1)
    q, k, v = (t.reshape(b, t.shape[1], heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if key_keep is not None:
        logits = logits.masked_fill(~key_keep[:, None, None, :], -torch.inf)
    out = (logits.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, n, inner)
    return module.to_out(out)


def _built(cls, *args, device="cpu", seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(*args, **kwargs).to(device).eval()


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("dim_head", [16, 24, 160])  # a kernel head dim, one padded to a kernel's, one past them
def test_attention_self_matches_plain_math(device, dim_head):
    helpers.require_device(device, "block_sparse_attention_forward")
    attn = _built(Attention, 32, heads=2, dim_head=dim_head, device=device)
    x = helpers.randn(2, 70, 32, seed=1, device=device)
    keep = helpers.make_key_padding_mask(2, 70, seed=2, keep=0.7, device=device)
    with torch.no_grad():
        for mask in (None, keep):
            got, expected = attn(x, mask=mask), _plain_attention(attn, x, key_keep=mask)
            rows = keep if mask is not None else torch.ones_like(keep)
            torch.testing.assert_close(got[rows], expected[rows], **TOL)


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("ratio, context_len, dim_head", [(1, 37, 32), (3, 37, 24), (4, 36, 16), (2, 9, 160)])
def test_attention_cross_and_compressed_match_plain_math(device, ratio, context_len, dim_head):
    helpers.require_device(device, "kv_compress_forward")
    attn = _built(Attention, 32, heads=2, dim_head=dim_head, compress_ratio=ratio, device=device)
    x = helpers.randn(2, 21, 32, seed=3, device=device)
    context = helpers.randn(2, context_len, 32, seed=4, device=device)
    context_keep = helpers.make_key_padding_mask(2, context_len, seed=5, keep=0.6, device=device)
    with torch.no_grad():
        for context_mask in (None, context_keep):
            got = attn(x, context=context, mask=torch.ones(2, 21, dtype=torch.bool, device=device),
                       context_mask=context_mask)
            torch.testing.assert_close(got, _plain_attention(attn, x, context, context_mask), **TOL)


def test_attention_gradients_match_plain_math():
    attn = _built(Attention, 16, heads=2, dim_head=8, compress_ratio=2)
    x = helpers.randn(1, 10, 16, seed=6, requires_grad=True)
    context = helpers.randn(1, 7, 16, seed=7, requires_grad=True)
    keep = torch.tensor([[True] * 5 + [False] * 2])
    grads = []
    for fn in (lambda: attn(x, context, context_mask=keep), lambda: _plain_attention(attn, x, context, keep)):
        fn().square().sum().backward()
        grads.append([t.grad.clone() for t in (x, context, attn.compress_fn.weight, attn.to_q.weight)])
        for t in (x, context, *attn.parameters()):
            t.grad = None
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_attention_lead_dims_attend_within_each_row():
    """The seed's msa call: x (b, M*N, d) with lead_dims (b, M, N) attends within each of the M rows."""
    attn = _built(Attention, 32, heads=2, dim_head=16)
    b, rows, cols = 2, 3, 11
    m = helpers.randn(b, rows * cols, 32, seed=8)
    keep = helpers.make_key_padding_mask(b * rows, cols, seed=9, keep=0.7)
    with torch.no_grad():
        got = attn(m, mask=keep.reshape(b, rows * cols), lead_dims=(b, rows, cols))
        row_keep = keep.view(b, rows, cols)
        per_row = torch.cat([_plain_attention(attn, m[:, r * cols:(r + 1) * cols], key_keep=row_keep[:, r])
                             for r in range(rows)], dim=1)
    assert got.shape == m.shape
    kept = keep.reshape(b, rows * cols)
    torch.testing.assert_close(got[kept], per_row[kept], **TOL)
    # lead_dims spanning the whole flattened MSA is plain self-attention over it
    with torch.no_grad():
        torch.testing.assert_close(attn(m, lead_dims=m.shape[:2]), _plain_attention(attn, m), **TOL)


def test_attention_padding_is_invisible():
    self_attn = _built(Attention, 32, heads=2, dim_head=16)
    cross_attn = _built(Attention, 32, heads=2, dim_head=16, compress_ratio=3, seed=1)
    x = helpers.randn(2, 40, 32, seed=10)
    context = helpers.randn(2, 17, 32, seed=11)
    keep = helpers.make_key_padding_mask(2, 40, seed=12, keep=0.6)
    context_keep = helpers.make_key_padding_mask(2, 17, seed=13, keep=0.6)
    noisy_x = torch.where(keep[..., None], x, 1e3 * helpers.randn(2, 40, 32, seed=14))
    noisy_context = torch.where(context_keep[..., None], context, 1e3 * helpers.randn(2, 17, 32, seed=15))
    with torch.no_grad():
        torch.testing.assert_close(self_attn(noisy_x, mask=keep)[keep], self_attn(x, mask=keep)[keep], **TOL)
        torch.testing.assert_close(cross_attn(x, noisy_context, context_mask=context_keep),
                                   cross_attn(x, context, context_mask=context_keep), **TOL)
        assert not torch.allclose(self_attn(noisy_x)[keep], self_attn(x)[keep])  # the mask is what hides them


@pytest.mark.filterwarnings("ignore:.*no attention-probability dropout")
def test_attention_dropout_only_in_training():
    attn = _built(Attention, 16, heads=2, dim_head=8, dropout=0.5)
    x = helpers.randn(1, 12, 16, seed=16)
    with torch.no_grad():
        evaluated = attn(x)
        torch.testing.assert_close(evaluated, _plain_attention(attn, x), **TOL)
        attn.train()
        torch.manual_seed(1)
        first = attn(x)
        torch.manual_seed(1)
        again = attn(x)
    assert not torch.allclose(first, evaluated)
    torch.testing.assert_close(first, again)


def test_attention_errors_name_the_argument():
    x = torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match="compress_ratio=2 .* needs a context"):
        Attention(16, compress_ratio=2)(x)
    with pytest.raises(ValueError, match=r"mask must be \(batch=2, n\)"):
        Attention(16)(x, mask=torch.ones(3, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="context_mask must be"):
        Attention(16)(x, context=torch.randn(2, 5, 16), context_mask=torch.ones(5, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------
# sparse and axial attention
# ----------------------------------------------------------------------------------------------------------


def _plain_sparse_attention(module: SparseAttention, x, keep=None):
    """Dense attention masked with the element mask of the module's layout cut to x's blocks (and the keys' keep)."""
    heads, n = module.heads, x.shape[1]
    nb = layouts.num_blocks(n, module.block_size)
    allowed = layouts.to_mask(module.layout[:, :nb, :nb], module.block_size, n, n)  # [heads, n, n]
    q = x @ module.to_q.weight.T
    k, v = (x @ module.to_kv.weight.T).chunk(2, dim=-1)
    b, _, inner = q.shape
    q, k, v = (t.reshape(b, n, heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))
    visible = allowed[None] if keep is None else allowed[None] & keep[:, None, None, :]
    logits = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~visible, -torch.inf)
    return module.to_out((logits.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, n, inner))


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("block_size, n", [(16, 256), (16, 200), (32, 130)])
def test_sparse_attention_matches_masked_dense(device, block_size, n):
    helpers.require_device(device, "block_sparse_attention_forward")
    sparse = _built(SparseAttention, 32, seq_len=256, heads=2, dim_head=16, block_size=block_size, device=device)
    assert layouts.density(sparse.layout) < 1.0  # a real sparse pattern, not dense
    x = helpers.randn(2, n, 32, seed=17, device=device)
    keep = helpers.make_key_padding_mask(2, n, seed=18, keep=0.8, device=device)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), _plain_sparse_attention(sparse, x), **TOL)
        got, expected = sparse(x, mask=keep), _plain_sparse_attention(sparse, x, keep)
        torch.testing.assert_close(got[keep], expected[keep], **TOL)


def test_sparse_attention_layout_is_the_seeds():
    sparse = SparseAttention(16, seq_len=512, heads=4, dim_head=16)
    assert sparse.block_size == 16 and sparse.num_random_blocks == 512 // 16 // 4
    assert torch.equal(sparse.layout, layouts.seed_default(512, block_size=16, num_heads=4))
    assert torch.equal(SparseAttention(16, seq_len=512, num_random_blocks=0).layout,
                       layouts.variable(32, num_random_blocks=0, num_heads=8))
    master = sparse.state_dict()["attn_fn.master_layout"]  # DeepSpeed's buffer: int64 (heads, nb, nb)
    assert master.dtype == torch.int64 and master.shape == (4, 32, 32)


def test_sparse_attention_loads_a_seed_layout():
    """A seed checkpoint carries its (randomly drawn) layout as attn_fn.master_layout: loading it makes the
    attention use that layout, cut to the actual length."""
    sparse = _built(SparseAttention, 32, seq_len=64, heads=2, dim_head=16)
    x = helpers.randn(1, 40, 32, seed=41)
    with torch.no_grad():
        before = sparse(x)
    state = sparse.state_dict()
    seed_layout = torch.zeros(2, 4, 4, dtype=torch.int64)
    seed_layout[:, torch.arange(4), torch.arange(4)] = 1  # block-diagonal: each block attends to itself
    state["attn_fn.master_layout"] = seed_layout
    sparse.load_state_dict(state)
    assert torch.equal(sparse.layout, seed_layout.bool())
    with torch.no_grad():
        got = sparse(x)
        expected = torch.cat([_plain_attention(sparse, x[:, i:i + 16]) for i in (0, 16, 32)], dim=1)
    torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(got, before)


def test_sparse_attention_lead_dims():
    sparse = _built(SparseAttention, 32, seq_len=64, heads=2, dim_head=16)
    m = helpers.randn(2, 3 * 20, 32, seed=19)
    with torch.no_grad():
        got = sparse(m, lead_dims=(2, 3, 20))
        expected = torch.cat([_plain_sparse_attention(sparse, m[:, r * 20:(r + 1) * 20]) for r in range(3)], dim=1)
    torch.testing.assert_close(got, expected, **TOL)


def test_sparse_attention_errors_name_the_argument():
    with pytest.raises(ValueError, match="seq_len"):
        SparseAttention(16)
    with pytest.raises(ValueError, match="exceeds seq_len=32 .*max_seq_len"):
        SparseAttention(16, seq_len=32)(torch.randn(1, 33, 16))


def test_difference_sparse_attention_keeps_the_mask():
    """The seed replaced the mask by all-ones when n % block_size != 0: padded tokens were attended."""
    sparse = _built(SparseAttention, 32, seq_len=64, heads=2, dim_head=16)
    x = helpers.randn(1, 40, 32, seed=20)  # 40 is not a multiple of 16
    keep = torch.arange(40)[None] < 33
    noisy = torch.where(keep[..., None], x, 1e3 * helpers.randn(1, 40, 32, seed=21))
    with torch.no_grad():
        torch.testing.assert_close(sparse(noisy, mask=keep)[keep], sparse(x, mask=keep)[keep], **TOL)


def _plain_axial(module: AxialAttention, x, keep=None, context=None, context_keep=None):
    """attn_width along each column (fixed w), attn_height along each row (fixed h) of the h x w grid, summed."""
    b, n, d = x.shape
    side = int(n ** 0.5)
    grid = x.reshape(b, side, side, d)
    grid_keep = None if keep is None else keep.reshape(b, side, side)

    def run(attn, tokens, token_keep):
        if context is None:
            return _plain_attention(attn, tokens, key_keep=token_keep)
        return _plain_attention(attn, tokens, context, context_keep)

    out = torch.zeros_like(grid)
    for w in range(side):
        out[:, :, w] += run(module.attn_width, grid[:, :, w], None if keep is None else grid_keep[:, :, w])
    for h in range(side):
        out[:, h, :] += run(module.attn_height, grid[:, h, :], None if keep is None else grid_keep[:, h, :])
    return out.reshape(b, n, d)


def test_axial_attention_matches_plain_math():
    axial = _built(AxialAttention, dim=32, heads=2, dim_head=16)
    x = helpers.randn(2, 49, 32, seed=22)
    keep = helpers.make_key_padding_mask(2, 49, seed=40, keep=0.7)  # not symmetric: rows and columns differ
    context = helpers.randn(2, 9, 32, seed=23)
    context_keep = helpers.make_key_padding_mask(2, 9, seed=24)
    with torch.no_grad():
        torch.testing.assert_close(axial(x), _plain_axial(axial, x), **TOL)
        torch.testing.assert_close(axial(x, mask=keep)[keep], _plain_axial(axial, x, keep)[keep], **TOL)
        torch.testing.assert_close(axial(x, context=context, context_mask=context_keep),
                                   _plain_axial(axial, x, context=context, context_keep=context_keep), **TOL)
        torch.testing.assert_close(axial(x, context=context), _plain_axial(axial, x, context=context), **TOL)


def test_axial_sparse_attention_runs_and_hides_padding():
    axial = _built(AxialAttention, dim=32, seq_len=16, heads=2, dim_head=16, sparse_attn=True)
    assert isinstance(axial.attn_width, SparseAttention)
    x = helpers.randn(1, 144, 32, seed=25)
    residue_keep = torch.arange(12)[None] < 9
    keep = (residue_keep[:, :, None] & residue_keep[:, None, :]).reshape(1, 144)
    noisy = torch.where(keep[..., None], x, 1e3 * helpers.randn(1, 144, 32, seed=26))
    with torch.no_grad():
        torch.testing.assert_close(axial(noisy, mask=keep)[keep], axial(x, mask=keep)[keep], **TOL)


def test_axial_attention_errors_name_the_argument():
    with pytest.raises(ValueError, match="n=10 .*perfect square"):
        AxialAttention(dim=16)(torch.randn(1, 10, 16))
    with pytest.raises(ValueError, match="context .*sparse_attn"):
        AxialAttention(dim=16, seq_len=16, sparse_attn=True)(torch.randn(1, 16, 16), context=torch.randn(1, 4, 16))


# ----------------------------------------------------------------------------------------------------------
# small helper classes
# ----------------------------------------------------------------------------------------------------------


class _Pass(nn.Module):
    def forward(self, *args, **kwargs):
        return args, kwargs


def test_prenorm_normalises_only_x_and_passes_the_rest():
    norm = PreNorm(8, _Pass())
    x, extra = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    (got_x, got_extra), kwargs = norm(x, extra, mask="m")
    torch.testing.assert_close(got_x, F.layer_norm(x, (8,)))
    assert got_extra is extra and kwargs == {"mask": "m"}


def test_difference_prenorm_cross_normalises_context_with_norm_context():
    """The seed normalised the context with the query's norm; norm_context was never used."""
    cross = PreNormCross(8, _Pass())
    with torch.no_grad():
        cross.norm.weight.fill_(2.0)
        cross.norm_context.weight.fill_(3.0)
        cross.norm_context.bias.fill_(1.0)
    x, context = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    (got_x, got_context), kwargs = cross(x, context, context_mask="c")
    torch.testing.assert_close(got_x, 2.0 * F.layer_norm(x, (8,)))
    torch.testing.assert_close(got_context, 3.0 * F.layer_norm(context, (8,)) + 1.0)
    assert kwargs == {"context_mask": "c"}


def test_feedforward_is_linear_geglu_dropout_linear():
    ff = _built(FeedForward, 8, mult=2, dropout=0.1)
    assert [type(m) for m in ff.net] == [nn.Linear, GEGLU, nn.Dropout, nn.Linear]
    x = torch.randn(3, 8)
    hidden, gate = F.linear(x, ff.net[0].weight, ff.net[0].bias).chunk(2, dim=-1)
    expected = F.linear(hidden * F.gelu(gate), ff.net[3].weight, ff.net[3].bias)
    torch.testing.assert_close(ff(x, mask=None), expected)


# ----------------------------------------------------------------------------------------------------------
# trunks
# ----------------------------------------------------------------------------------------------------------


def _masks(n_pair: int, n_msa: int):
    mask = torch.arange(n_pair)[None] < n_pair - 5
    msa_mask = torch.arange(n_msa)[None] < n_msa - 3
    return mask, msa_mask


def test_sequential_sequence_is_the_seeds_recurrence():
    layers = _seed_trunk_lists(32, reversible=False).eval()
    trunk = SequentialSequence(layers)
    x, m = helpers.randn(1, 36, 32, seed=27), helpers.randn(1, 3 * 8, 32, seed=28)
    mask, msa_mask = _masks(36, 24)
    with torch.no_grad():
        got_x, got_m = trunk(x, m, mask=mask, msa_mask=msa_mask, msa_lead_dims=(1, 3, 8))
        (attn, ff, msa_attn), (cross, msa_ff, msa_cross) = layers
        ex, em = x + attn(x, mask=mask), m + msa_attn(m, mask=msa_mask, lead_dims=(1, 3, 8))
        ex = ex + cross(ex, em, mask=mask, context_mask=msa_mask)
        em = em + msa_cross(em, ex, mask=msa_mask, context_mask=mask)
        ex, em = ex + ff(ex), em + msa_ff(em)
        torch.testing.assert_close(got_x, ex)
        torch.testing.assert_close(got_m, em)
        only_x, no_m = trunk(x, None, mask=mask)
        assert no_m is None
        torch.testing.assert_close(only_x, x + attn(x, mask=mask) + ff(x + attn(x, mask=mask)))


def test_sequential_sequence_errors_name_the_argument():
    with pytest.raises(ValueError, match="blocks must alternate"):
        SequentialSequence(nn.ModuleList([nn.ModuleList([nn.Identity()] * 3)]))
    with pytest.raises(ValueError, match=r"blocks\[1\] must hold 3 modules"):
        SequentialSequence(nn.ModuleList([nn.ModuleList([nn.Identity()] * 3), nn.ModuleList([nn.Identity()])]))


def _seed_test_blocks(dim: int, depth: int, dropout: float = 0.0) -> list:
    """As the seed's test: self blocks of Attention/FeedForward, cross blocks of the same, alternating."""
    blocks = []
    for _ in range(depth):
        blocks.append(ReversibleSelfAttnBlock(Attention(dim), FeedForward(dim, dropout=dropout), Attention(dim),
                                              FeedForward(dim, dropout=dropout)))
        blocks.append(ReversibleCrossAttnBlock(Attention(dim), FeedForward(dim, dropout=dropout), Attention(dim),
                                               FeedForward(dim, dropout=dropout)))
    return blocks


def _grads(net, seq, msa, **kwargs):
    seq, msa = seq.detach().requires_grad_(), msa.detach().requires_grad_()
    out_seq, out_msa = net(seq, msa, **kwargs)
    (out_seq.square().sum() + out_msa.sum()).backward()
    params = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    return out_seq.detach(), out_msa.detach(), seq.grad, msa.grad, params


def _assert_same_grads(a, b, tol=1e-4):
    for got, expected in zip(a[:4], b[:4]):
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert a[4].keys() == b[4].keys()
    for name in a[4]:
        torch.testing.assert_close(a[4][name], b[4][name], atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", helpers.DEVICES)
def test_reversible_sequence_seed_test(device):
    """The seed's test: dim 32, seq (1, 256, 32), msa (1, 16, 32); reverse=True and reverse=False give the same
    outputs and gradients."""
    helpers.require_device(device, "block_sparse_attention_forward")
    torch.manual_seed(0)
    net = ReversibleSequence(nn.ModuleList(_seed_test_blocks(32, depth=1))).to(device)
    seq, msa = helpers.randn(1, 256, 32, seed=29, device=device), helpers.randn(1, 16, 32, seed=30, device=device)
    reversed_ = _grads(net, seq, msa, reverse=True)
    _assert_same_grads(reversed_, _grads(net, seq, msa, reverse=False))
    assert reversed_[0].shape == (1, 256, 32) and reversed_[1].shape == (1, 16, 32)


def _seed_recurrence(groups, seq, msa, mask=None, msa_mask=None, msa_lead_dims=None):
    """The seed's reversible trunk written out on duplicated halves: self blocks then cross blocks."""
    x1 = x2 = seq
    m1 = m2 = msa
    for i, (f, g, j, k) in enumerate(groups):
        if i % 2 == 0:
            x1 = x1 + f(x2, mask=mask)
            x2 = x2 + g(x1)
            m1 = m1 + j(m2, mask=msa_mask, lead_dims=msa_lead_dims)
            m2 = m2 + k(m1)
        else:
            x1 = x1 + f(x2, m2, mask=mask, context_mask=msa_mask)
            x2 = x2 + g(x1)
            m1 = m1 + j(m2, x2, mask=msa_mask, context_mask=mask)
            m2 = m2 + k(m1)
    return (x1 + x2) / 2, (m1 + m2) / 2


@pytest.mark.parametrize("reverse", [True, False])
def test_reversible_sequence_from_groups_of_four_is_the_seeds_recurrence(reverse):
    """0.0.19's Alphafold2 passes lists of 4 modules (pre-normed axial/cross attentions); masks and the MSA row
    structure reach every function."""
    torch.manual_seed(0)
    layers = _seed_trunk_lists(32, reversible=True)
    net = ReversibleSequence(layers).eval()
    assert [type(b) for b in net.blocks] == [ReversibleSelfAttnBlock, ReversibleCrossAttnBlock]
    seq, msa = helpers.randn(1, 36, 32, seed=31), helpers.randn(1, 24, 32, seed=32)
    mask, msa_mask = _masks(36, 24)
    kwargs = dict(mask=mask, msa_mask=msa_mask, msa_lead_dims=(1, 3, 8))
    with torch.no_grad():
        got_seq, got_msa = net(seq, msa, reverse=reverse, **kwargs)
        expected_seq, expected_msa = _seed_recurrence(layers, seq, msa, **kwargs)
    torch.testing.assert_close(got_seq, expected_seq, **TOL)
    torch.testing.assert_close(got_msa, expected_msa, **TOL)


@pytest.mark.filterwarnings("ignore:.*no attention-probability dropout")
def test_reversible_sequence_gradients_with_masks_and_dropout():
    """In training, with dropout and masks, the recompute replays the forward's dropout: same gradients as the
    stored-activation run with the same global seed."""
    torch.manual_seed(0)
    net = ReversibleSequence(_seed_trunk_lists(32, reversible=True))
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.3
    net.train()
    seq, msa = helpers.randn(1, 36, 32, seed=33), helpers.randn(1, 24, 32, seed=34)
    mask, msa_mask = _masks(36, 24)
    kwargs = dict(mask=mask, msa_mask=msa_mask, msa_lead_dims=(1, 3, 8))
    torch.manual_seed(5)
    reversed_ = _grads(net, seq, msa, reverse=True, **kwargs)
    torch.manual_seed(5)
    _assert_same_grads(reversed_, _grads(net, seq, msa, reverse=False, **kwargs))
    torch.manual_seed(6)
    assert not torch.allclose(_grads(net, seq, msa, reverse=True, **kwargs)[0], reversed_[0])  # dropout is on


def test_reversible_sequence_in_eval_leaves_the_generator_alone():
    """Training draws a generator seed per coupling (to replay dropout); after .eval() nothing is drawn."""
    net = ReversibleSequence(nn.ModuleList(_seed_test_blocks(16, depth=1)))
    seq, msa = helpers.randn(1, 8, 16, seed=38), helpers.randn(1, 4, 16, seed=39)
    for training in (True, False):
        net.train(training)
        state = torch.get_rng_state()
        with torch.no_grad():
            net(seq, msa)
        assert torch.equal(state, torch.get_rng_state()) is not training


def test_difference_reversible_sequence_without_msa():
    """The seed asserted an MSA; here msa=None runs the pair couplings only (f, g of self blocks, g of cross
    blocks) and returns None for it."""
    torch.manual_seed(0)
    blocks = _seed_test_blocks(16, depth=1)
    net = ReversibleSequence(nn.ModuleList(blocks)).eval()
    seq = helpers.randn(1, 20, 16, seed=35, requires_grad=True)
    got_seq, got_msa = net(seq, None)
    assert got_msa is None
    self_block, cross_block = blocks
    with torch.no_grad():
        x1 = seq + self_block.f(seq)
        x2 = seq + self_block.g(x1)
        x2 = x2 + cross_block.g(x1)
        torch.testing.assert_close(got_seq, (x1 + x2) / 2, **TOL)
    got_seq.sum().backward()
    assert seq.grad is not None and torch.isfinite(seq.grad).all()


def test_reversible_blocks_step_on_double_width_streams():
    """The seed's block forward: x (b, n, 2d), m (b, M, 2d); _reverse=True runs without grad."""
    torch.manual_seed(0)
    self_block, cross_block = _seed_test_blocks(16, depth=1)
    self_block.eval(), cross_block.eval()
    x, m = helpers.randn(1, 12, 32, seed=36, requires_grad=True), helpers.randn(1, 6, 32, seed=37)
    y, n = self_block(x, m)
    assert not y.requires_grad
    y_grad, n_grad = self_block(x, m, _reverse=False)
    assert y_grad.requires_grad
    torch.testing.assert_close(y, y_grad.detach())
    x1, x2 = x.detach().chunk(2, dim=2)
    m1, m2 = m.chunk(2, dim=2)
    with torch.no_grad():
        y1 = x1 + self_block.f(x2)
        n1 = m1 + self_block.j(m2)
        torch.testing.assert_close(y, torch.cat([y1, x2 + self_block.g(y1)], dim=2))
        torch.testing.assert_close(n, torch.cat([n1, m2 + self_block.k(n1)], dim=2))
        cy, cn = cross_block(y, n)
        y1, y2 = y.chunk(2, dim=2)
        n1, n2 = n.chunk(2, dim=2)
        z1 = y1 + cross_block.f(y2, n2)
        z2 = y2 + cross_block.g(z1)
        o1 = n1 + cross_block.j(n2, z2)
        torch.testing.assert_close(cy, torch.cat([z1, z2], dim=2))
        torch.testing.assert_close(cn, torch.cat([o1, n2 + cross_block.k(o1)], dim=2))


def test_deterministic_replays_the_recorded_generator():
    drop = Deterministic(nn.Dropout(0.5))
    x = torch.ones(1000)
    first = drop(x, record_rng=True)
    state = torch.get_rng_state()
    replayed = drop(x, set_rng=True)
    assert torch.equal(first, replayed)
    assert torch.equal(state, torch.get_rng_state())  # the caller's generator is restored
    assert not torch.equal(drop(x), first)
    with pytest.raises(RuntimeError, match="record_rng"):
        Deterministic(nn.Identity())(x, set_rng=True)


def test_reversible_sequence_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"input_blocks\[0\] must be .* group of 4 modules"):
        ReversibleSequence([[nn.Identity()] * 3])
