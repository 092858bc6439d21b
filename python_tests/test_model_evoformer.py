"""Tests for Alphafold2(trunk="evoformer"): kernels against the reference with the same parameters (for the
reversible trunk the reference is the same four-half couplings run by ordinary autograd: reversible = sequential
gradients), padding invisible to real residues, chunking the same function, argument errors. The blocks themselves
are tested against the paper's algorithms in test_evoformer.py."""
from __future__ import annotations

import pytest
import torch

import helpers
from af2_ext import Alphafold2

SMALL = dict(dim=32, depth=2, heads=2, dim_head=16, max_seq_len=64, trunk="evoformer", pair_dim=16)


def _model(device, **config) -> Alphafold2:
    """A small Evoformer model with every parameter redrawn: AlphaFold2's zero-initialised output layers would make
    a fresh trunk the identity, and these comparisons trivial."""
    torch.manual_seed(0)
    model = Alphafold2(**{**SMALL, **config}).to(device)
    g = helpers.generator(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _batch(device, *, b=2, n=20, rows=3, msa=True, embedds=False, pad=True, seed=0, num_embedds=24):
    g = helpers.generator(seed)
    batch = dict(seq=torch.randint(0, 21, (b, n), generator=g), mask=torch.ones(b, n, dtype=torch.bool))
    if msa:
        batch["msa"] = torch.randint(0, 21, (b, rows, n), generator=g)
        batch["msa_mask"] = torch.ones(b, rows, n, dtype=torch.bool)
        batch["msa_mask"][0, rows - 1, 5:9] = False  # a gap in one aligned sequence
    if embedds:
        batch["embedds"] = torch.randn(b, n, num_embedds, generator=g)
    if pad:  # a shorter second protein
        batch["mask"][1, n - 5:] = False
    return {k: v.to(device) for k, v in batch.items()}


def _forward_backward(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch)
    weights = helpers.randn(*logits.shape, seed=77, device=logits.device, dtype=logits.dtype)
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()
                             if p.grad is not None}


CONFIGS = {
    "sequential": dict(),
    "reversible": dict(reversible=True),
    "no_msa": dict(_batch=dict(msa=False)),
    "reversible_embedds": dict(reversible=True, num_embedds=24, _batch=dict(msa=False, embedds=True)),
    "relative_positions_unchunked": dict(relative_positions=4, ff_chunk_size=None),
    "no_padding": dict(reversible=True, _batch=dict(pad=False)),
    "sparse": dict(sparse_self_attn=True, max_seq_len=128, _batch=dict(n=72)),
    "sparse_tuple_reversible": dict(sparse_self_attn=(False, True), reversible=True, max_seq_len=128,
                                    _batch=dict(n=72, rows=2)),
}


@pytest.mark.parametrize("device", helpers.DEVICES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kernel_matches_reference(device, name):
    helpers.require_device(device, "block_sparse_attention_forward")
    config = dict(CONFIGS[name])
    batch = _batch(device, **config.pop("_batch", {}))
    model = _model(device, **config)
    logits, grads = _forward_backward(model.set_impl("kernel"), batch)
    ref_logits, ref_grads = _forward_backward(model.set_impl("reference"), batch)
    n = batch["seq"].shape[1]
    assert logits.shape == (2, n, n, 37)
    helpers.assert_finite("logits", logits)
    torch.testing.assert_close(logits, ref_logits, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(logits, logits.transpose(1, 2), atol=0, rtol=0)
    assert set(ref_grads) <= set(grads), sorted(set(ref_grads) - set(grads))
    for pname in set(grads) - set(ref_grads):  # the reversible trunk returns zeros where autograd has None
        assert not grads[pname].any(), f"grad {pname}: nonzero where ordinary autograd has none"
    assert len(ref_grads) > 100, f"only {len(ref_grads)} parameters got gradients"
    for pname in ref_grads:
        torch.testing.assert_close(grads[pname], ref_grads[pname], atol=2e-4, rtol=1e-3,
                                   msg=lambda m, p=pname: f"grad {p}: {m}")


@pytest.mark.parametrize("reversible", [False, True], ids=["sequential", "reversible"])
def test_padding_is_invisible(reversible):
    """What a padded residue holds (its tokens, in the sequence and in every MSA row) changes no real pair."""
    model = _model("cpu", reversible=reversible).eval()
    batch = _batch("cpu")
    real = batch["mask"][:, :, None] & batch["mask"][:, None, :]  # [b, i, j]
    with torch.no_grad():
        clean = model(**batch)
        batch["seq"][1, -5:] = torch.tensor([3, 7, 11, 2, 19])
        batch["msa"][1, :, -5:] = 13
        changed = model(**batch)
    torch.testing.assert_close(changed[real], clean[real], atol=1e-6, rtol=1e-6)
    helpers.assert_finite("logits", changed)


def test_chunked_is_the_same_function():
    batch = _batch("cpu")
    whole = _model("cpu", ff_chunk_size=None)
    chunked = _model("cpu")
    assert all(block.fn.module.chunk_size == 64 for layer in chunked.layers for block in layer
               if hasattr(block.fn.module, "chunk_size"))
    for block in (b for layer in chunked.layers for b in layer if hasattr(b.fn.module, "chunk_size")):
        block.fn.module.chunk_size = 7  # rows per chunk: several chunks at n = 20
    a, ga = _forward_backward(whole, batch)
    b, gb = _forward_backward(chunked, batch)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


def test_sparse_layouts_reach_the_row_attentions():
    """sparse_self_attn (per layer) gives the MSA row and both triangle attentions the seed's layout over the
    residues, which at n = 72 (5 blocks of 16) leaves blocks out; the column attention stays dense."""
    model = _model("cpu", sparse_self_attn=(True, False), max_seq_len=128)
    for layer, sparse in zip(model.layers, (True, False)):
        modules = {type(c.fn.module).__name__ + ("" if not hasattr(c.fn.module, "starting") else
                                                  str(c.fn.module.starting)): c.fn.module for c in layer}
        for name in ("MSARowAttentionWithPairBias", "TriangleAttentionTrue", "TriangleAttentionFalse"):
            layout = modules[name].mha.layout(72, torch.device("cpu"))
            if sparse:
                assert layout is not None and layout.shape[1:] == (5, 5) and not layout.all(), name
            else:
                assert layout is None, name
        assert modules["MSAColumnAttention"]._msa_att.mha.layout_fn is None


@pytest.mark.parametrize("kwargs, error", [
    (dict(trunk="openfold"), "trunk must be one of"),
    (dict(trunk="seed", pair_dim=16), "pair_dim is the Evoformer's pair width"),
    (dict(cross_attn_compress_ratio=2), "trunk='evoformer' has none"),
    (dict(pair_dim=0), "pair_dim must be None or an int >= 1"),
])
def test_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        Alphafold2(**{**SMALL, **kwargs})


def test_msa_must_be_aligned():
    model = _model("cpu")
    batch = _batch("cpu")
    batch["msa"], batch["msa_mask"] = batch["msa"][..., :18], batch["msa_mask"][..., :18]
    with pytest.raises(ValueError, match=r"needs the MSA aligned to the sequence: msa \(b, M, N=20\)"):
        model(**batch)
